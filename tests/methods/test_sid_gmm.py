"""Acceptance (DESIGN §3, §4): SiD students trained against the analytic GMM teacher, and its guidance variants.

The set-ups (and why each choice) live in ``fastdiff/eval/sid_gmm.py``. Each test trains for minutes on one CPU
thread: marked slow; the numbers they print are quoted in the SiD report.
"""

import pytest
import torch

from fastdiff.eval import sid_gmm


@pytest.fixture
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _rel(report):
    return abs(report["nll"] - report["nll_true"]) / abs(report["nll_true"])


@pytest.mark.slow
def test_one_step_sid_student_covers_every_mode_with_nll_near_truth(single_thread):
    (report,) = sid_gmm.train_and_evaluate(num_steps=1).values()
    assert report["mode_coverage"] == 1.0, report
    assert _rel(report) <= 0.10, report


@pytest.mark.slow
def test_four_step_sid_generator_is_good_at_every_step_count(single_thread):
    reports = sid_gmm.train_and_evaluate(num_steps=4)
    assert sorted(reports) == [1, 2, 3, 4]
    for k, report in reports.items():
        assert report["mode_coverage"] == 1.0, (k, report)
        assert _rel(report) <= 0.10, (k, report)


@pytest.mark.slow
def test_zero_and_anti_cfg_keep_the_modes_that_teacher_cfg_drains(single_thread):
    variants = {
        "cfg": sid_gmm.guidance_config("cfg", guidance_scale=3.0),
        "zero_cfg": sid_gmm.guidance_config("zero_cfg"),
        "anti_cfg": sid_gmm.guidance_config("anti_cfg", anti_cfg_scale=-0.5),
    }
    r = sid_gmm.guidance_experiment(variants)
    # CFG: every sample in its class, but the shared inner modes are drained
    assert r["cfg"]["adherence"] >= 0.95 and r["cfg"]["coverage"] < 1.0
    for name in ("zero_cfg", "anti_cfg"):
        assert r[name]["adherence"] >= 0.95, (name, r[name])
        assert r[name]["coverage"] > r["cfg"]["coverage"], (name, r[name], r["cfg"])
        assert r[name]["mode_weight_error"] < r["cfg"]["mode_weight_error"], (name, r[name], r["cfg"])
