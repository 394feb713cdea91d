"""DMD2's regression initialisation: the teacher ODE pair stage (exact, resumable, corrupt shards redone), the
regression phase (it drives the generator to the teacher's outputs), its config errors, LPIPS from a local model,
and a tiny SDXL run with ``dmd2.init=regression`` that resumes exactly and exports."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fastdiff.config import OptimizerConfig, load_config
from fastdiff.methods import ode_pairs
from fastdiff.methods.base import RunContext
from fastdiff.methods.dmd2 import DMD2, DMD2Config, check_config
from fastdiff.methods.shards import shard_name
from fastdiff.models.denoiser import CFG

REPO = Path(__file__).resolve().parents[2]
PROMPTS = ["a red square", "a blue circle", "a green line"]


@pytest.fixture(scope="module")
def teacher(tiny_teachers):
    from fastdiff.teacher import Teacher

    return Teacher(tiny_teachers["sdxl"])


def _plan(teacher, **kw):
    settings = dict(num_pairs=5, steps=3, guidance_scale=3.0, resolution=teacher.resolution, seed=0)
    settings |= dict(shard_size=2, batch_size=2, dtype="float32")
    return ode_pairs.make_plan(teacher, PROMPTS, **(settings | kw))


def _shards(folder, n):
    return [{k: v.clone() for k, v in load_file(str(folder / shard_name(i))).items()} for i in range(n)]


# --- the pair stage ----------------------------------------------------------------------------------------------
def test_pairs_are_the_teachers_cfg_ode_samples_of_their_noise(teacher, tmp_path):
    plan = _plan(teacher)
    ode_pairs.generate_pairs(tmp_path, plan, teacher)
    store = ode_pairs.PairStore(tmp_path, plan)
    assert store.num_items == 5 and str(store).endswith("5 teacher ODE pairs")
    rec = store.pairs(list(range(5)))
    assert sorted(rec["prompt_index"][:3].tolist()) == [0, 1, 2]  # every prompt before any repeats
    assert not torch.allclose(rec["noise"][0], rec["noise"][2])  # shards draw their own noise
    real = CFG(teacher.denoiser(adapter=None), 3.0, teacher.unconditional(teacher.latent_shape()))
    cond = teacher.encode([PROMPTS[i] for i in rec["prompt_index"].tolist()])
    x0 = ode_pairs.ode_sample(real, rec["noise"], cond, 3, teacher.alphas_cumprod)
    torch.testing.assert_close(rec["image"], x0, atol=1e-4, rtol=1e-4)  # batched by 2 there, by 5 here
    assert not torch.allclose(rec["image"], rec["noise"])
    # the sampler is DDIM on trailing timesteps: one step from pure noise is the CFG x0 prediction at t = 999
    one = ode_pairs.ode_sample(real, rec["noise"][:1], cond[[0]], 1, teacher.alphas_cumprod)
    with torch.no_grad():
        torch.testing.assert_close(one, real(rec["noise"][:1], torch.tensor([999]), cond[[0]]))


def test_an_interrupted_pair_stage_resumes_and_matches_an_uninterrupted_one(teacher, tmp_path):
    plan = _plan(teacher)
    whole = tmp_path / "whole"
    assert ode_pairs.generate_pairs(whole, plan, teacher)["generated"] == [0, 1, 2]
    parts = tmp_path / "parts"
    first = ode_pairs.generate_pairs(parts, plan, teacher, max_shards=1)  # "killed" after one shard
    assert first["generated"] == [0] and not first["complete"]
    with pytest.raises(ode_pairs.PairError, match="incomplete"):
        ode_pairs.PairStore(parts, plan)
    second = ode_pairs.generate_pairs(parts, plan, teacher)
    assert second["generated"] == [1, 2] and second["skipped"] == [0] and second["complete"]
    assert ode_pairs.generate_pairs(parts, plan, teacher)["generated"] == []
    for a, b in zip(_shards(whole, 3), _shards(parts, 3)):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    manifest = json.loads((parts / "manifest.json").read_text())
    assert manifest["complete"] and [s["pairs"] for s in manifest["shards"]] == [[0, 2], [2, 4], [4, 5]]
    # two ranks split the shards and make the same folder
    ranks = tmp_path / "ranks"
    reports = [ode_pairs.generate_pairs(ranks, plan, teacher, rank=r, world_size=2) for r in (0, 1)]
    assert reports[0]["generated"] == [0, 2] and reports[1]["generated"] == [1]
    for a, b in zip(_shards(whole, 3), _shards(ranks, 3)):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_corrupt_or_truncated_pair_shard_is_redone_and_another_plan_refused(teacher, tmp_path):
    plan = _plan(teacher)
    ode_pairs.generate_pairs(tmp_path, plan, teacher)
    good = _shards(tmp_path, 3)
    path0, path2 = tmp_path / shard_name(0), tmp_path / shard_name(2)
    path0.write_bytes(path0.read_bytes()[:-50])  # truncated
    data = bytearray(path2.read_bytes())
    data[-5] ^= 0xFF  # one flipped byte inside a tensor
    path2.write_bytes(bytes(data))
    (tmp_path / (shard_name(1) + ".tmp")).write_bytes(b"half a shard")
    report = ode_pairs.generate_pairs(tmp_path, plan, teacher)
    assert report["generated"] == [0, 2] and report["skipped"] == [1] and report["complete"]
    assert not list(tmp_path.glob("*.tmp"))
    for a, b in zip(good, _shards(tmp_path, 3)):
        assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ode_pairs.PairError, match="differs in: guidance_scale.*dmd2.pairs"):
        ode_pairs.generate_pairs(tmp_path, _plan(teacher, guidance_scale=5.0), teacher)


# --- the regression phase -----------------------------------------------------------------------------------------
def test_the_regression_phase_drives_the_generator_to_the_teachers_ode_outputs(tmp_path):
    """On the analytic GMM: pairs from the exact teacher (DDIM, CFG), then DMD2 with init=regression for only its
    regression phase through the real Trainer; the generator's one step lands on the teacher's samples."""
    from fastdiff.eval.gmm_setup import DIM, NUM_CLASSES, networks, null_labels, paired_gmm, train

    gmm = paired_gmm()
    teacher, fake, generator = networks(gmm, NUM_CLASSES, seed=0, pretrain_steps=200)
    acp = teacher.alphas_cumprod
    real = CFG(teacher, 1.5, null_labels)
    g = torch.Generator().manual_seed(0)
    noise, labels = torch.randn(512, DIM, generator=g), torch.randint(0, NUM_CLASSES, (512,), generator=g)
    images = ode_pairs.ode_sample(real, noise, labels, 8, acp)

    def draw(n, generator, device):  # an in-memory pair source with ode_pairs.pair_sampler's contract
        idx = torch.randint(0, 448, (n,), generator=generator)
        return {"noise": noise[idx], "image": images[idx], "cond": labels[idx]}

    cfg = DMD2Config(
        guidance_scale=1.5,
        student_timesteps=[999],
        generator_lr=1e-3,
        fake_lr=1e-3,
        dfake_gen_update_ratio=1,
        optim=OptimizerConfig(),
        init="regression",
        regression_pairs=512,
        regression_steps=400,
    )
    gen_params, fake_params = dict(generator.named_parameters()), dict(fake.named_parameters())
    method = DMD2(generator, fake, real, cfg, (DIM,), gen_params, fake_params, regression=draw)
    held_out = slice(448, 512)

    def error():
        with torch.no_grad():
            x = method.generator(noise[held_out], torch.full((64,), 999), labels[held_out])
        return float((x - images[held_out]).square().mean())

    before = error()
    trainer = train(method, cfg, NUM_CLASSES, 400, 64, 0, str(tmp_path))
    after = error()
    assert "generator/regression" in trainer.last_terms and "critic/fake_dsm" in trainer.last_terms
    print(f"regression phase: MSE to the teacher {before:.4f} -> {after:.4f}")
    assert after < 0.05 * before, (before, after)


def test_regression_settings_are_checked_with_clear_errors(teacher, tmp_path):
    for kw, match in [
        ({"init": "ode"}, r"dmd2\.init must be one of \['teacher', 'regression'\], got 'ode'"),
        ({"init": "regression", "regression_steps": 10}, r"dmd2\.regression_pairs >= 1"),
        ({"init": "regression", "regression_pairs": 10}, r"dmd2\.regression_steps >= 1"),
        ({"regression_pairs": 10}, r"dmd2\.regression_pairs only apply with dmd2\.init=regression"),
        ({"lpips_model": "lpips.pt"}, r"dmd2\.lpips_model only apply"),
    ]:
        with pytest.raises(ValueError, match=match):
            check_config(DMD2Config(**kw))
    run = load_config(None, [f"teacher={teacher.path}", f"output_dir={tmp_path}"])
    regression = dict(init="regression", regression_pairs=2, regression_steps=2)

    def ctx(prompts=PROMPTS, **kw):
        section = DMD2Config(**(regression | kw))
        return RunContext(teacher, section, run, teacher.resolution, teacher.latent_shape(), prompts=prompts)

    with pytest.raises(FileNotFoundError, match="LPIPS model .*nowhere.pt not found.*latent MSE"):
        DMD2.prepare(ctx(lpips_model=str(tmp_path / "nowhere.pt")))
    with pytest.raises(ValueError, match="needs prompts"):
        DMD2.prepare(ctx(prompts=None))
    assert DMD2.prepare(RunContext(teacher, DMD2Config(), run, 64, teacher.latent_shape())) is None
    # a regression phase without its pairs (e.g. a method built outside a training run) says what is missing
    full = dict(
        generator="full", fake_score="full", shared_base=False
    )  # leaves the shared teacher's UNet bare
    method = DMD2.from_teacher(
        teacher, DMD2Config(**regression, **full), teacher.latent_shape(), with_gan=False
    )
    with pytest.raises(RuntimeError, match="needs the teacher ODE pairs"):
        method.loss("generator", {"cond": teacher.encode(PROMPTS[:1])}, 0, torch.Generator().manual_seed(0))


class ImageL1(torch.nn.Module):
    """A stand-in LPIPS network: mean |a - b| per sample of two image batches."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a - b).abs().mean(dim=(1, 2, 3))


def test_lpips_loss_compares_decoded_images_with_a_local_torchscript_model(teacher, tmp_path):
    torch.jit.save(torch.jit.script(ImageL1()), str(tmp_path / "lpips.pt"))
    lpips = ode_pairs.LatentLPIPS(ode_pairs.load_lpips(tmp_path), teacher.vae)  # a folder holding lpips.pt
    x = torch.randn(2, *teacher.latent_shape(), requires_grad=True)
    target = torch.randn(2, *teacher.latent_shape())
    loss = ode_pairs.regression_loss(x, target, lpips)
    vae = teacher.vae
    with torch.no_grad():
        a, b = (vae.decode(z / vae.config.scaling_factor).sample for z in (x, target))
    torch.testing.assert_close(loss, (a - b).abs().mean(), atol=1e-5, rtol=1e-5)
    loss.backward()
    assert x.grad.abs().sum() > 0
    assert ode_pairs.regression_loss(x, target).item() == pytest.approx(float((x - target).square().mean()))


# --- a tiny SDXL run ----------------------------------------------------------------------------------------------
def _run(tiny, out, steps, extra=()):
    from fastdiff.run import train

    overrides = [
        f"teacher={tiny}",
        f"output_dir={out}",
        f"max_steps={steps}",
        "checkpointing_steps=3",
        "validation_steps=100",
        "dmd2.student_timesteps=[399]",
        "dmd2.dfake_gen_update_ratio=2",
        "dmd2.init=regression",
        "dmd2.regression_pairs=3",
        "dmd2.regression_steps=4",
        "dmd2.regression_sampler_steps=2",
        "dmd2.pair_shard_size=2",
        "mixed_precision=bf16",  # pairs are read inside the loss, under autocast
        *extra,
    ]
    return train(load_config(REPO / "assets/configs/tiny_sdxl_dmd2.yaml", overrides))


def test_a_tiny_sdxl_run_with_regression_init_resumes_exactly_and_exports(
    tiny_teachers, tmp_path, monkeypatch
):
    monkeypatch.chdir(REPO)
    a, b = tmp_path / "a", tmp_path / "b"
    _run(tiny_teachers["sdxl"], a, 6)
    _run(tiny_teachers["sdxl"], b, 3, ["export=false"])
    _run(tiny_teachers["sdxl"], b, 6, ["resume_from_checkpoint=latest"])
    first = json.loads((a / "checkpoints/checkpoint-6/trainer_state.json").read_text())
    assert "generator/regression" in first["last_terms"] and "generator/dm" in first["last_terms"]
    sa, sb = (load_file(str(o / "checkpoints/checkpoint-6/trainable.safetensors")) for o in (a, b))
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], atol=1e-6, rtol=0)
    assert json.loads((a / "ode_pairs/manifest.json").read_text())["complete"]
    recipe = json.loads((a / "fastdiff.json").read_text())
    assert recipe["timesteps"] == [399] and (a / "pipeline/model_index.json").is_file()
    assert recipe["config"]["dmd2"]["init"] == "regression"
