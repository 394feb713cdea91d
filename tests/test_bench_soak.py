"""``fastdiff bench soak`` (issue 20's acceptance) at a small scale, and its checker on answers that break it."""

import json

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("httpx")

from fastdiff.eval import bench_soak  # noqa: E402
from fastdiff.eval.bench_soak import HOSTILE, plan, violations  # noqa: E402


def test_the_plan_is_a_fixed_shuffle_with_its_share_of_hostile_requests():
    probes = plan(500, 0.1, 24)
    assert probes == plan(500, 0.1, 24) and probes != plan(500, 0.1, 24, seed=1)
    hostile = [p for p in probes if p.valid is None]
    assert len(hostile) == 50 and {p.kind for p in hostile} == {p.kind for p in HOSTILE}
    assert {p.valid for p in probes if p.valid is not None} == set(range(24))
    assert all(p.status == 200 for p in probes if p.valid is not None)
    assert all(400 <= p.status < 500 for p in HOSTILE)


def test_the_checker_catches_broken_answers():
    """A hostile request answered 500 (or with another 4xx, or without the OpenAI error shape), a valid one not 200,
    with an image off by more than the tolerance, or a missing image: each is a violation."""
    image = np.zeros((32, 32, 3), dtype=np.int16)
    off_by = image.copy()
    off_by[3, 4, 1] = 2
    error = {"error": {"message": "m", "type": "invalid_request_error", "param": None, "code": "x"}}
    references = {0: [image], 1: [image, image]}

    def valid(i, images, status=200):
        return {"kind": "valid", "valid": i, "expected": 200, "status": status, "images": images}

    def hostile(status, body=error, expected=422):
        return {"kind": "NaN weight", "valid": None, "expected": expected, "status": status, "body": body}

    good = [valid(0, [image]), valid(0, [image + 1]), valid(1, [image, image])]
    good += [hostile(422), hostile(404, expected=404)]
    assert violations(good, references, tolerance=1) == []
    for bad, fragment in (
        (hostile(500), "status 500, expected 422"),
        (hostile(400), "status 400, expected 422"),
        (hostile(422, body={"detail": "x"}), "OpenAI shape"),
        (hostile(422, body="Internal Server Error"), "OpenAI shape"),
        (valid(0, [], status=500), "status 500"),
        (valid(0, [off_by]), "differs from its reference by 2 levels"),
        (valid(1, [image]), "1 images, expected 2"),
    ):
        found = violations(good + [bad], references, tolerance=1)
        assert len(found) == 1 and fragment in found[0], (fragment, found)
    assert violations([valid(0, [image + 1])], references, tolerance=0)  # "the same image": tolerance 0


def test_a_small_soak_keeps_every_invariant(tiny_teachers, tmp_path):
    """60 requests from 4 clients, half of them hostile (every kind at least once): every valid one 200 with its
    image alone within one level, every hostile one its 4xx in the OpenAI shape, no 5xx, RSS bounded."""
    result = bench_soak.run(
        tmp_path, requests=60, clients=4, hostile=0.5, distinct=12, base=tiny_teachers["sdxl"]
    )
    assert result["violations"] == [] and result["passed"]
    assert result["counts"]["valid"] == 30 and result["counts"]["hostile"] == 30
    assert result["counts"]["statuses"]["valid"] == {"200": 30}
    assert set(result["hostile_kinds"]) == {p.kind for p in HOSTILE}
    assert all(not s.startswith("5") for s in result["counts"]["statuses"]["hostile"])
    assert result["pixels"]["images_compared"] > 30 and result["pixels"]["max_abs_diff_levels"] <= 1
    assert result["load"]["server_5xx"] == 0 and result["server_log_tracebacks"] == 0
    assert result["load"]["mixed_batches"] > 0  # valid requests of different adapter sets shared batches
    assert 0 < result["rss_mib"]["before"] <= result["rss_mib"]["peak_during_load"]
    assert json.loads((tmp_path / "bench.json").read_text())["passed"]
    assert "PASSED" in (tmp_path / "bench.md").read_text()


def test_the_cli_runs_the_soak_and_fails_on_a_violation(monkeypatch, tmp_path):
    from fastdiff.cli import main

    calls = []

    def fake_run(out, requests, clients):
        calls.append((out, requests, clients))
        return {"passed": len(calls) == 1}

    monkeypatch.setattr(bench_soak, "run", fake_run)
    main(["bench", "soak", "--out", str(tmp_path), "--requests", "40", "--clients", "4"])
    with pytest.raises(SystemExit, match="invariants"):
        main(["bench", "soak"])
    assert calls == [(str(tmp_path), 40, 4), ("assets/bench/soak", 500, 8)]
