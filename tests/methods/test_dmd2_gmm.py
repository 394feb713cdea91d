"""Acceptance (DESIGN §3, §4): a 1-step DMD2 student trained against the analytic GMM teacher.

A small MLP generator, trained with the real ``DMD2`` method and the real ``Trainer`` against the exact
conditional-GMM denoiser (``CFG(GMMDenoiser, 1.0, null)``), must cover every mode and reach an exact NLL within
10% of the NLL of true samples. The test prints the numbers it reached (``pytest -s`` shows them).

The set-up, and why (each choice was measured on this problem):

- **Problem.** 4 classes x 2 modes in 2-D, std 0.3, mildly non-uniform weights (as ``GMM.random``). Modes on a
  circle whose radius puts neighbours exactly 8 std apart (``GMM.random``'s minimum separation, overlap ~1e-5);
  each class owns two *neighbouring* modes. A one-step generator is a continuous map of Gaussian noise, so
  splitting a class into two modes leaves a thin "tear" of samples between them, and a tear sample's NLL grows
  with the square of the gap. ``GMM.random`` interleaves the classes, so a class's two modes sit on opposite
  sides of the circle (~27 std apart): a sample half-way costs ~90 nats, and 1% of them alone exceed the
  whole 10% budget (~0.1 nats). There a student reached NLL 3-5 against 1.04.
- **Generator**: ``MLPDenoiser(prediction_type="sample")``, 7 hidden layers (a steep tear needs depth: with 3
  layers 7-10% of the samples stayed > 4 std from their mode after 4-6k iterations), initialised by denoising
  pretraining on GMM samples, as DMD2 initialises its generator from the teacher. From a random init each
  class first collapses onto one of its modes (a local minimum of the reverse KL) and escapes only after
  1-3k iterations, depending on the seed.
- **Fake score**: an eps-prediction ``MLPDenoiser`` initialised by a short denoising pretraining on GMM samples
  (DMD2 initialises it from the teacher).
- **DMD2 hyperparameters.** t ~ U[5, 600] for the distribution-matching gradient: read through eps, the fake
  score's x0 error grows like sigma/alpha (13x at t=980), so t > 600 adds mostly noise, while the balance
  between a class's two modes is already set at t <= 600 (sigma/alpha = 2.3 there, the gap is 2.4); the small t
  pull the tear samples onto the modes (min_step 5 instead of 20: NLL excess +1.4..+4.4% over 6 seeds, against
  +0.4..+9.3% over 5). lr 1e-3 for both networks (2e-3 converges faster but the mode width then wanders by
  +-7%, i.e. +-15% in NLL); 4 fake-score updates per generator update; generator EMA (without it the NLL
  excess was +14..+17% at min_step 20).
"""

import torch

from fastdiff.eval.bench_gmm import train_and_evaluate


def test_one_step_dmd2_student_covers_every_mode_with_nll_near_truth(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        report = train_and_evaluate(tmp_path)
    finally:
        torch.set_num_threads(threads)
    rel = abs(report["nll"] - report["nll_true"]) / abs(report["nll_true"])
    assert report["mode_coverage"] == 1.0, report
    assert rel <= 0.10, report
