"""AGD trajectory shards: exact CFG records, resume without duplicates, truncated / corrupt shards redone."""

import json

import pytest
import torch
from safetensors.torch import load_file

from fastdiff.config import load_config
from fastdiff.methods.agd import AGDConfig
from fastdiff.methods.agd.trajectories import (
    TrajectoryError,
    TrajectoryStore,
    generate_trajectories,
    make_plan,
    prepare,
    shard_name,
)

PROMPTS = ["a red square", "a blue circle", "a green line"]


@pytest.fixture(scope="module")
def teacher(tiny_teachers):
    from fastdiff.teacher import Teacher

    return Teacher(tiny_teachers["sdxl"])


def _plan(teacher, **kw):
    settings = dict(num_trajectories=5, shard_size=2, num_inference_steps=3, trajectory_batch_size=2)
    settings |= dict(trajectory_dtype="float32", negative_prompt_prob=0.5, w_min=1.0, w_max=4.0)
    return make_plan(AGDConfig(**(settings | kw)), teacher, PROMPTS, None, teacher.resolution, seed=0)


def _shards(folder, n):
    """Shard tensors, copied out of the file (safetensors maps it: later writes would show through)."""
    return [{k: v.clone() for k, v in load_file(str(folder / shard_name(i))).items()} for i in range(n)]


def test_records_are_the_teachers_cfg_predictions_along_its_own_trajectory(teacher, tmp_path):
    plan = _plan(teacher)
    generate_trajectories(tmp_path, plan, teacher)
    store = TrajectoryStore(tmp_path, plan)
    assert store.num_records == 5 * 3
    rec = store.records(list(range(store.num_records)))
    assert rec["w"].min() >= 1.0 and rec["w"].max() <= 4.0 and len(set(rec["w"].tolist())) == 5
    assert set(rec["negative_index"].tolist()) - {-1}  # some trajectories guide away from another prompt ...
    assert (rec["negative_index"] != rec["prompt_index"]).all()  # ... never from their own
    # recompute the CFG prediction at every stored state with the bare teacher
    from fastdiff.methods.agd.trajectories import negative_conds

    cond = teacher.encode([PROMPTS[i] for i in rec["prompt_index"].tolist()])
    uncond = negative_conds(teacher, plan, rec["negative_index"], teacher.resolution)
    native = teacher.denoiser(adapter=None).native
    with torch.no_grad():
        u, c = native(rec["x_t"], rec["t"], uncond), native(rec["x_t"], rec["t"], cond)
    w = rec["w"].view(-1, 1, 1, 1)
    torch.testing.assert_close(rec["target"], u + w * (c - u), atol=1e-5, rtol=1e-5)
    # and the states follow the teacher's scheduler: x_{k+1} = step(target_k, t_k, x_k)
    from fastdiff.methods.agd import make_scheduler

    sched = make_scheduler(teacher.pipeline.scheduler)
    sched.set_timesteps(3)
    assert rec["t"][:3].tolist() == sched.timesteps.tolist()
    x = rec["x_t"][0:1] * (sched.sigmas[0] ** 2 + 1) ** 0.5  # undo Euler's input scaling at step 0
    for k in range(2):
        sched.scale_model_input(x, sched.timesteps[k])
        x = sched.step(rec["target"][k : k + 1], sched.timesteps[k], x).prev_sample
        x_in = sched.scale_model_input(x, sched.timesteps[k + 1])
        torch.testing.assert_close(x_in, rec["x_t"][k + 1 : k + 2], atol=1e-5, rtol=1e-5)


def test_an_interrupted_run_resumes_without_duplicates_and_matches_an_uninterrupted_one(teacher, tmp_path):
    plan = _plan(teacher)
    whole = tmp_path / "whole"
    assert generate_trajectories(whole, plan, teacher)["generated"] == [0, 1, 2]
    parts = tmp_path / "parts"
    first = generate_trajectories(parts, plan, teacher, max_shards=1)  # "killed" after one shard
    assert first["generated"] == [0] and not first["complete"]
    with pytest.raises(TrajectoryError, match="incomplete"):
        TrajectoryStore(parts, plan)
    second = generate_trajectories(parts, plan, teacher)
    assert second["generated"] == [1, 2] and second["skipped"] == [0] and second["complete"]
    assert generate_trajectories(parts, plan, teacher)["generated"] == []  # nothing left to do
    ids = torch.cat([s["trajectory_index"] for s in _shards(parts, 3)]).tolist()
    assert ids == list(range(5))  # every trajectory exactly once
    for a, b in zip(_shards(whole, 3), _shards(parts, 3)):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    manifest = json.loads((parts / "manifest.json").read_text())
    assert manifest["complete"] and [s["trajectories"] for s in manifest["shards"]] == [
        [0, 2],
        [2, 4],
        [4, 5],
    ]


def test_truncated_and_corrupt_shards_are_detected_and_redone(teacher, tmp_path):
    plan = _plan(teacher)
    generate_trajectories(tmp_path, plan, teacher)
    good = _shards(tmp_path, 3)
    path1, path2 = tmp_path / shard_name(1), tmp_path / shard_name(2)
    path1.write_bytes(path1.read_bytes()[:-100])  # truncated (e.g. a full disk)
    data = bytearray(path2.read_bytes())
    data[-7] ^= 0xFF  # one flipped byte inside a tensor
    path2.write_bytes(bytes(data))
    (tmp_path / (shard_name(0) + ".tmp")).write_bytes(b"half a shard")  # left by a kill mid-write
    report = generate_trajectories(tmp_path, plan, teacher)
    assert report["generated"] == [1, 2] and report["skipped"] == [0]
    assert not list(tmp_path.glob("*.tmp"))
    for a, b in zip(good, _shards(tmp_path, 3)):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_folder_of_another_plan_is_refused(teacher, tmp_path):
    generate_trajectories(tmp_path, _plan(teacher), teacher, max_shards=1)
    with pytest.raises(TrajectoryError, match="differs in: w_max"):
        generate_trajectories(tmp_path, _plan(teacher, w_max=6.0), teacher)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(TrajectoryError, match="not valid JSON"):
        generate_trajectories(tmp_path, _plan(teacher), teacher)


def test_bad_settings_are_refused(teacher, tmp_path, monkeypatch):
    for kw, match in [
        ({"w_min": 5.0, "w_max": 2.0}, "must not exceed"),
        ({"negative_prompt_prob": 1.5}, r"in \[0, 1\]"),
        ({"scheduler": "NoSuchScheduler"}, "not a diffusers scheduler"),
        ({"trajectory_dtype": "int8"}, "trajectory_dtype"),
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"negative_prompt_prob": 0.5, "use_negative_prompt": False}, "use_negative_prompt"),
    ]:
        with pytest.raises(ValueError, match=match):
            make_plan(AGDConfig(**kw), teacher, PROMPTS, None, teacher.resolution, 0)
    with pytest.raises(ValueError, match="at least two prompts"):
        make_plan(AGDConfig(negative_prompt_prob=0.5), teacher, PROMPTS[:1], None, teacher.resolution, 0)
    cfg = load_config(None, [f"teacher={teacher.path}", "method=agd", f"output_dir={tmp_path}"])
    with pytest.raises(ValueError, match="needs prompts"):
        prepare(cfg, teacher, teacher.resolution)


def test_the_agd_trajectories_command_generates_then_resumes(tiny_teachers, tmp_path, capsys, caplog):
    from fastdiff.cli import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS))
    args = [
        "agd-trajectories",
        f"teacher={tiny_teachers['sdxl']}",
        f"prompts={prompts}",
        f"output_dir={tmp_path}",
    ]
    args += ["agd.num_trajectories=3", "agd.shard_size=2", "agd.num_inference_steps=2"]
    main(args)
    assert "3 trajectories, 6 records" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "trajectories").glob("shard-*")) == [
        shard_name(0),
        shard_name(1),
    ]
    caplog.clear()
    with caplog.at_level("INFO", logger="fastdiff"):
        main(args)
    assert "0 shards generated, 2 already done" in caplog.text
    # the general form, `fastdiff prepare` with the method named, runs the same stage on the same folder
    caplog.clear()
    with caplog.at_level("INFO", logger="fastdiff"):
        main(["prepare", "method=agd", *args[1:]])
    assert "0 shards generated, 2 already done" in caplog.text
    assert "3 trajectories, 6 records" in capsys.readouterr().out


def test_the_plan_fingerprint_is_the_same_in_every_process(teacher):
    """The plan keys the folder: it must not depend on hash randomisation (diffusers' config bookkeeping does)."""
    import os
    import subprocess
    import sys

    code = (
        "import sys; from fastdiff.methods.agd import AGDConfig; from fastdiff.teacher import Teacher; "
        "from fastdiff.methods.agd.trajectories import fingerprint, make_plan; t = Teacher(sys.argv[1]); "
        "c = AGDConfig(scheduler='DDIMScheduler'); print(fingerprint(make_plan(c, t, ['a'], None, t.resolution, 0)))"
    )
    prints = {
        subprocess.run(
            [sys.executable, "-c", code, teacher.path],
            env={**os.environ, "PYTHONHASHSEED": str(seed), "HF_HUB_OFFLINE": "1"},
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()[-1]
        for seed in (1, 2, 3)
    }
    assert len(prints) == 1
