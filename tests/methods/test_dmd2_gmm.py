"""Acceptance (DESIGN §3, §4): a 1-step DMD2 student trained against the analytic GMM teacher.

A small MLP generator, trained with the real ``DMD2`` method and the real ``Trainer`` against the exact
conditional-GMM denoiser, must cover every mode and reach an exact NLL within 10% of the NLL of true samples. The
set-up (and why each choice) lives in ``fastdiff/eval/bench_gmm.py``, shared with ``fastdiff bench quality --gmm``.
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
