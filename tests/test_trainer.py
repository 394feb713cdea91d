"""The trainer on a small analytic problem: two-time-scale updates, exact resume, atomic checkpoints, NaN guard."""

import json

import pytest
import torch
from safetensors.torch import load_file

from fastdiff.config import OptimizerConfig, TrainConfig
from fastdiff.methods.dmd2 import DMD2, DMD2Config
from fastdiff.models.denoiser import CFG
from fastdiff.models.gmm import GMM, GMMDenoiser, MLPDenoiser, scaled_linear_alphas_cumprod
from fastdiff.trainer import NonFiniteLossError, Trainer, find_checkpoint, make_optimizer


def make_method(seed=0):
    torch.manual_seed(seed)
    acp = scaled_linear_alphas_cumprod()
    gmm = GMM.random(num_classes=2, modes_per_class=1, dim=2)
    real = CFG(GMMDenoiser(gmm, acp), 1.0, lambda n: torch.full((n,), -1))
    gen = MLPDenoiser(acp, dim=2, num_classes=2, hidden=32, prediction_type="sample")
    fake = MLPDenoiser(acp, dim=2, num_classes=2, hidden=32)
    optim = OptimizerConfig(weight_decay=0.01, warmup_steps=0, max_grad_norm=10.0)  # DMD2's, no warm-up
    cfg = DMD2Config(
        student_timesteps=[999], generator_lr=1e-3, fake_lr=1e-3, optim=optim, dfake_gen_update_ratio=3
    )
    return DMD2(gen, fake, real, cfg, (2,), dict(gen.named_parameters()), dict(fake.named_parameters()))


def batch_fn(step, micro, g):
    return {"cond": torch.randint(0, 2, (16,), generator=g)}


def run(tmp_path, max_steps, **kw):
    cfg = TrainConfig(
        teacher="gmm", output_dir=str(tmp_path), max_steps=max_steps, checkpointing_steps=5, **kw
    )
    trainer = Trainer(make_method(), cfg, batch_fn)
    trainer.fit()
    return trainer


def test_two_time_scale_updates(tmp_path):
    method = make_method()
    cfg = TrainConfig(teacher="gmm", output_dir=str(tmp_path), max_steps=7, checkpointing_steps=100)
    trainer = Trainer(method, cfg, batch_fn)
    seen = []
    original = method.loss
    method.loss = lambda group, *a: seen.append(group) or original(group, *a)
    trainer.fit()
    # generator every 3rd iteration (0, 3, 6), critic every iteration, generator first
    assert [g for g in seen if g == "generator"] == ["generator"] * 3
    assert seen[:2] == ["generator", "critic"] and seen.count("critic") == 7


def test_resume_is_exact(tmp_path):
    run(tmp_path / "a", 20)
    half = run(tmp_path / "b", 10)
    assert half.step == 10
    resumed = run(tmp_path / "b", 20, resume_from_checkpoint="latest")
    assert resumed.step == 20
    a = load_file(str(tmp_path / "a/checkpoints/checkpoint-20/trainable.safetensors"))
    b = load_file(str(tmp_path / "b/checkpoints/checkpoint-20/trainable.safetensors"))
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)
    # and a run that did not resume differs (the comparison can fail)
    fresh = run(tmp_path / "c", 10, seed=1)
    assert any(not torch.equal(p, a[f"critic/{n}"]) for n, p in fresh.groups[1].params.items())


def test_checkpoints_atomic_latest_and_limit(tmp_path):
    run(tmp_path, 20, checkpoints_total_limit=2)
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert ckpts == ["checkpoint-15", "checkpoint-20"]
    # an interrupted write leaves only a temporary folder, which "latest" ignores
    (tmp_path / "checkpoints/.tmp-checkpoint-25").mkdir()
    (tmp_path / "checkpoints/checkpoint-30").mkdir()  # incomplete: no trainer_state.json
    assert find_checkpoint(tmp_path, "latest").name == "checkpoint-20"
    state = json.loads((tmp_path / "checkpoints/checkpoint-20/trainer_state.json").read_text())
    assert state["step"] == 20 and state["groups"] == ["generator", "critic"]
    with pytest.raises(FileNotFoundError, match="not a fastdiff checkpoint"):
        find_checkpoint(tmp_path, str(tmp_path / "nowhere"))


def test_nonfinite_loss_is_skipped_then_stops(tmp_path, caplog):
    method = make_method()
    cfg = TrainConfig(
        teacher="gmm",
        output_dir=str(tmp_path),
        max_steps=30,
        checkpointing_steps=100,
        max_consecutive_nonfinite=3,
    )
    trainer = Trainer(method, cfg, batch_fn)
    original = method.loss
    bad_steps = {4} | set(range(10, 30))

    def loss(group, batch, step, gen):
        terms = original(group, batch, step, gen)
        if group == "critic" and step in bad_steps:
            terms["fake_dsm"] = terms["fake_dsm"] * float("nan")
        return terms

    method.loss = loss
    before = {}

    def snapshot(step):
        before[step] = [p.detach().clone() for p in trainer.groups[1].params.values()]

    with pytest.raises(NonFiniteLossError, match="3 non-finite losses in a row"):
        orig_update = trainer._update

        def update(gi, group):
            if group.name == "critic":
                snapshot(trainer.step)
            orig_update(gi, group)
            if group.name == "critic" and trainer.step == 4:  # the skipped update left the weights alone
                after = list(trainer.groups[1].params.values())
                assert all(torch.equal(a, b) for a, b in zip(after, before[4]))

        trainer._update = update
        trainer.fit()
    assert trainer.nonfinite_total == 4  # step 4, then 10, 11, 12
    assert "non-finite loss" in caplog.text


def test_ema_weights_are_kept_and_used(tmp_path):
    method = make_method()
    method.cfg.ema_decay = 0.5
    cfg = TrainConfig(teacher="gmm", output_dir=str(tmp_path), max_steps=6, checkpointing_steps=6)
    trainer = Trainer(method, cfg, batch_fn)
    trainer.fit()
    ema = load_file(str(tmp_path / "checkpoints/checkpoint-6/ema.safetensors"))
    assert ema and all(k.startswith("generator/") for k in ema)
    live = {n: p.detach().clone() for n, p in trainer.groups[0].params.items()}
    trainer.use_ema_weights()
    assert any(not torch.equal(live[n], p) for n, p in trainer.groups[0].params.items())
    for n, p in trainer.groups[0].params.items():
        torch.testing.assert_close(p.detach(), ema[f"generator/{n}"])


def test_train_step_is_one_iteration(tmp_path):
    method = make_method()
    cfg = TrainConfig(teacher="gmm", output_dir=str(tmp_path), max_steps=7, checkpointing_steps=100)
    trainer = Trainer(method, cfg, batch_fn)
    seen = []
    original = method.loss
    method.loss = lambda group, *a: seen.append(group) or original(group, *a)
    terms = trainer.train_step()
    assert trainer.step == 1 and seen == ["generator", "critic"]
    assert {"generator/dm", "critic/fake_dsm", "generator/lr", "critic/lr"} <= set(terms)
    seen.clear()
    trainer.train_step()  # step 1: the critic only (the generator's interval is 3)
    assert trainer.step == 2 and seen == ["critic"]
    assert not (tmp_path / "checkpoints").exists()  # checkpointing is fit's, not train_step's


def test_make_optimizer_follows_the_group():
    groups = {g.name: g for g in make_method().groups()}
    opt = make_optimizer(groups["critic"])
    assert isinstance(opt, torch.optim.AdamW)
    (pg,) = opt.param_groups
    assert pg["lr"] == 1e-3 and pg["weight_decay"] == 0.01 and pg["betas"] == (0.9, 0.999)
    assert len(pg["params"]) == len(groups["critic"].params)
    groups["critic"].optimizer = "adamw8bit"
    with pytest.raises(ValueError, match="adamw8bit"):
        make_optimizer(groups["critic"], "cpu")
    groups["critic"].optimizer = "sgd"
    with pytest.raises(ValueError, match="unknown optimizer 'sgd'"):
        make_optimizer(groups["critic"])


def test_a_regression_phase_runs_the_generator_at_its_own_lr(tmp_path):
    """DMD2's regression phase (``regression_lr``) is a phase of the generator group's lr: its first
    ceil(regression_steps / ratio) updates run at regression_lr, the later ones at generator_lr."""
    from fastdiff.methods.dmd2 import DMD2Config

    method = make_method()
    method.cfg = DMD2Config(
        student_timesteps=[999], generator_lr=1e-3, fake_lr=1e-3, dfake_gen_update_ratio=3,
        init="regression", regression_pairs=1, regression_steps=5, regression_lr=4e-3,
        optim=OptimizerConfig(warmup_steps=0),
    )  # fmt: skip
    method.regression_loss = lambda n, g, device: (
        method.generator(
            torch.randn(n, 2, generator=g), torch.full((n,), 999), torch.zeros(n, dtype=torch.long)
        )
        .square()
        .mean()
    )
    cfg = TrainConfig(teacher="gmm", output_dir=str(tmp_path), max_steps=10, checkpointing_steps=100)
    trainer = Trainer(method, cfg, batch_fn)
    lrs = []  # the generator's lr at each of its updates (steps 0, 3, 6, 9)
    for step in range(10):
        if step % 3 == 0:
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])
        trainer.train_step()
    assert lrs == pytest.approx(
        [4e-3, 4e-3, 1e-3, 1e-3]
    )  # the regression phase (steps < 5) holds the first two
