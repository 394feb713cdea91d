"""The MSD pipeline file (pipelines/multi_student.py): routing, per-student sampling equal to plain diffusers with
that student, output order, and export folders that load with diffusers (trust_remote_code) and with fastdiff."""

import copy
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import (
    DiffusionPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from safetensors.torch import load_file, save_file

from fastdiff.models.lora import adapter_metadata, adapter_state_dict, add_adapter, save_lora
from fastdiff.paths import pipeline_module

msd = pipeline_module("multi_student")
REPO = Path(__file__).resolve().parents[1]

PLAIN = {"sdxl": StableDiffusionXLPipeline, "sd15": StableDiffusionPipeline}
MULTI = {"sdxl": msd.StableDiffusionXLMultiStudentPipeline, "sd15": msd.StableDiffusionMultiStudentPipeline}
TABLE = {"a red square": 1, "a blue circle": 0, "a green star": 2}  # training prompts -> student
ANCHORS = ["one small dog", "two tall trees", "three old cars"]  # centroid k = embedding of ANCHORS[k]
CALL = dict(num_inference_steps=2, guidance_scale=2.0)


def _embed(pipe, prompts):
    """The routing embedding, computed here from the stock encode_prompt as training computes it."""
    with torch.no_grad():
        if isinstance(pipe, StableDiffusionXLPipeline):
            embeds, _, pooled, _ = pipe.encode_prompt(
                prompts, device="cpu", do_classifier_free_guidance=False
            )
            return msd.route_embedding(embeds, pooled)
        embeds, _ = pipe.encode_prompt(prompts, "cpu", 1, False)
        return msd.route_embedding(embeds)


def _lora_students(unet, k=3):
    """A copy of ``unet`` carrying K rank-4 LoRAs s0..s{K-1} with random lora_B (so the students differ)."""
    unet = copy.deepcopy(unet)
    for i in range(k):
        add_adapter(unet, f"s{i}", rank=4)
        for name, p in unet.named_parameters():
            if f".lora_B.s{i}." in name:
                p.data.normal_(0, 0.3)
    return unet


def _router(plain, kind="lora", weights=None, configs=None, unets=()):
    k = 3
    centroids = _embed(plain, ANCHORS)
    router = msd.StudentRouter(k, centroids.shape[1], table=TABLE, kind=kind, lora_configs=configs)
    router.centroids.copy_(centroids)
    if kind == "lora":
        router.lora_weights = list(weights)
    router.unets.extend(unets)
    return router


@pytest.fixture(scope="module", params=["sdxl", "sd15"])
def lora_setup(request, tiny_teachers, tmp_path_factory):
    """A 3-student LoRA MSD pipeline of one family, each student's LoRA also saved for plain diffusers."""
    family = request.param
    folder = tiny_teachers[family]
    base = PLAIN[family].from_pretrained(folder)
    with_loras = _lora_students(base.unet)
    weights = [adapter_state_dict(with_loras, f"s{i}") for i in range(3)]
    configs = [adapter_metadata(with_loras, f"s{i}") for i in range(3)]
    lora_dirs = [tmp_path_factory.mktemp(f"{family}_s{i}") for i in range(3)]
    for i, d in enumerate(lora_dirs):
        save_lora(d, with_loras, f"s{i}", PLAIN[family])
    pipe = MULTI[family](**base.components, students=_router(base, "lora", weights, configs))
    return SimpleNamespace(
        family=family, folder=folder, pipe=pipe, weights=weights, configs=configs, loras=lora_dirs
    )


def _noise(n, seed=0):
    return torch.randn((n, 4, 8, 8), generator=torch.Generator().manual_seed(seed))


def test_router_table_wins_then_nearest_centroid():
    router = msd.StudentRouter(3, 4, table={"known": 2}, lora_configs=[{}] * 3)
    router.centroids.copy_(torch.eye(3, 4))
    emb = torch.tensor([[0.1, 0.9, 0.0, 0.2], [0.0, 0.1, 5.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    assert router.route(["u", "v", "known"], emb) == [
        1,
        2,
        2,
    ]  # "known" is nearest to 0, its table entry says 2
    with pytest.raises(ValueError, match="shape"):
        router.route(["u"], emb)
    with pytest.raises(ValueError, match="no student"):
        msd.StudentRouter(3, 4, table={"x": 3}, lora_configs=[{}] * 3)
    with pytest.raises(ValueError, match="lora_configs"):
        msd.StudentRouter(3, 4)


def test_pipeline_routes_table_prompts_and_unknown_prompts(lora_setup):
    pipe = lora_setup.pipe
    anchors = _embed(pipe, ANCHORS)
    assert (anchors @ anchors.T - torch.eye(3)).max() < 1 - 1e-4  # distinct centroids: nearest is meaningful
    assert pipe.route(list(TABLE)) == list(TABLE.values())
    assert pipe.route(ANCHORS) == [0, 1, 2] and pipe.route(ANCHORS[1]) == [1]


def test_mixed_batch_equals_plain_diffusers_with_each_students_lora(lora_setup):
    """Each image equals plain diffusers + that student's LoRA (diffusers' own loader) on the same latents."""
    pipe, family = lora_setup.pipe, lora_setup.family
    prompts = ["a red square", "a blue circle", ANCHORS[1], "a green star"]  # students 1, 0, 1 (centroid), 2
    routes = [1, 0, 1, 2]
    assert pipe.route(prompts) == routes
    latents = _noise(4)
    out = pipe(prompts, latents=latents, output_type="np", **CALL).images
    plain = PLAIN[family].from_pretrained(lora_setup.folder)
    for i, (prompt, k) in enumerate(zip(prompts, routes)):
        plain.load_lora_weights(str(lora_setup.loras[k]))
        ref = plain(prompt, latents=latents[i : i + 1], output_type="np", **CALL).images
        plain.unload_lora_weights()
        np.testing.assert_allclose(out[i : i + 1], ref, atol=1e-4, rtol=0)
    bare = plain(prompts[0], latents=latents[:1], output_type="np", **CALL).images
    assert np.abs(out[:1] - bare).max() > 1e-3  # the LoRA acts
    assert np.abs(out[0] - out[1]).max() > 1e-3
    negative = ["blurry", "dark", "noisy", "flat"]  # per-prompt arguments are split with the prompts
    with_negative = pipe(prompts, latents=latents, negative_prompt=negative, output_type="np", **CALL).images
    for i in (0, 3):
        one = pipe(
            prompts[i], latents=latents[i : i + 1], negative_prompt=negative[i], output_type="np", **CALL
        )
        np.testing.assert_allclose(with_negative[i : i + 1], one.images, atol=1e-4, rtol=0)
    assert np.abs(with_negative - out).max() > 1e-3
    after = pipe(prompts[:1], latents=latents[:1], output_type="np", **CALL).images
    np.testing.assert_allclose(after, out[:1], atol=1e-4, rtol=0)  # the call left the UNet as it found it


def test_images_per_prompt_order_generator_noise_and_output_types(lora_setup):
    """Image j of prompt i lands at i * n + j; the generator's noise is drawn for the whole batch at once; PIL, np,
    pt, latent and tuple outputs all come back in the input order."""
    pipe = lora_setup.pipe
    prompts = ["a red square", "a blue circle", "a red square"]  # students 1, 0, 1
    latents = _noise(6, seed=1)
    out = pipe(prompts, latents=latents, num_images_per_prompt=2, output_type="pt", **CALL).images
    assert out.shape == (6, 3, 32, 32)
    for i, prompt in enumerate(prompts):
        for j in range(2):
            one = pipe(prompt, latents=latents[2 * i + j : 2 * i + j + 1], output_type="pt", **CALL).images
            torch.testing.assert_close(out[2 * i + j : 2 * i + j + 1], one, atol=1e-4, rtol=0)
    assert (out[0] - out[1]).abs().max() > 1e-3  # different noise

    def run(output_type, **kw):
        return pipe(
            prompts,
            generator=torch.Generator().manual_seed(1),
            output_type=output_type,
            num_images_per_prompt=2,
            **kw,
        )

    torch.testing.assert_close(
        run("pt", **CALL).images, out
    )  # noise = one draw of 6, as prepare_latents draws it
    as_np = run("np", **CALL).images
    pil = run("pil", **CALL).images
    assert len(pil) == 6 and all(
        np.array_equal(np.asarray(p), (a * 255).round().astype("uint8")) for p, a in zip(pil, as_np)
    )
    lat = run("latent", **CALL).images
    assert lat.shape == (6, 4, 8, 8)
    np.testing.assert_array_equal(run("np", return_dict=False, **CALL)[0], as_np)
    with pytest.raises(ValueError, match="prompt text"):
        pipe(prompt_embeds=torch.zeros(1, 77, 32), **CALL)


def test_save_and_load_with_diffusers_and_fastdiff(lora_setup, tmp_path):
    """The folder loads with diffusers (the folder's code, trust_remote_code), with fastdiff's class and with
    fastdiff.recipe.load_pipeline (fastdiff's code): same routing, same images."""
    from fastdiff import pipelines
    from fastdiff.recipe import load_pipeline

    pipe = lora_setup.pipe
    folder = tmp_path / "export"
    pipe.save_pretrained(folder)
    source = (REPO / "pipelines" / "multi_student.py").read_text()
    assert (
        (folder / "multi_student.py").read_text()
        == source
        == (folder / "students/multi_student.py").read_text()
    )
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == ["multi_student", type(pipe).__name__]
    assert index["students"] == ["multi_student", "StudentRouter"]
    assert not [k for k in load_file(folder / "unet/diffusion_pytorch_model.safetensors") if "lora" in k]
    assert sorted(load_file(folder / "students/student_2/lora.safetensors")) == sorted(lora_setup.weights[2])

    remote = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    local = getattr(pipelines, type(pipe).__name__).from_pretrained(folder)
    loaded = load_pipeline(folder)
    with pytest.raises(ValueError, match="trust_remote_code"):
        DiffusionPipeline.from_pretrained(folder)  # never runs folder code unasked
    assert type(remote).__module__.startswith("diffusers_modules")
    assert type(local) is type(loaded) is type(pipe) and type(local.students) is msd.StudentRouter

    prompts = ["a green star", ANCHORS[0], "a red square", ANCHORS[2]]
    kw = dict(output_type="latent", num_images_per_prompt=2, **CALL)
    ref = pipe(prompts, generator=torch.Generator().manual_seed(3), **kw).images
    for other in (remote, local, loaded):
        assert other.route(prompts) == pipe.route(prompts) == [2, 0, 1, 2]
        torch.testing.assert_close(
            other(prompts, generator=torch.Generator().manual_seed(3), **kw).images, ref
        )


@pytest.mark.parametrize("family", ["sd15"])
def test_unet_students_route_and_round_trip(family, tiny_teachers, tmp_path):
    """Kind "unet": student 0 is the pipeline's UNet, students 1 and 2 half-width UNets stored in the router."""
    from fastdiff.recipe import load_pipeline

    base = PLAIN[family].from_pretrained(tiny_teachers[family])
    half = tuple(c // 2 for c in base.unet.config.block_out_channels)
    unets = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        unets.append(UNet2DConditionModel.from_config(base.unet.config, block_out_channels=half))
    pipe = MULTI[family](**base.components, students=_router(base, "unet", unets=unets))
    prompts = ["a green star", "a blue circle", "a red square"]  # students 2, 0, 1
    latents = _noise(3)
    out = pipe(prompts, latents=latents, output_type="latent", **CALL).images
    for i, unet in enumerate([unets[1], base.unet, unets[0]]):
        plain = PLAIN[family](**(base.components | {"unet": unet}))
        ref = plain(prompts[i], latents=latents[i : i + 1], output_type="latent", **CALL).images
        torch.testing.assert_close(out[i : i + 1], ref, atol=1e-4, rtol=0)
    assert pipe.unet is base.unet

    folder = tmp_path / "export"
    pipe.save_pretrained(folder)
    assert (folder / "students/student_1/diffusion_pytorch_model.safetensors").is_file()
    assert not (folder / "students/student_0").exists()
    assert list(load_file(folder / "students/diffusion_pytorch_model.safetensors")) == ["centroids"]
    for other in (DiffusionPipeline.from_pretrained(folder, trust_remote_code=True), load_pipeline(folder)):
        assert other.route(prompts) == [2, 0, 1]
        torch.testing.assert_close(other(prompts, latents=latents, output_type="latent", **CALL).images, out)
    router = msd.StudentRouter.from_pretrained(folder, subfolder="students", torch_dtype=torch.bfloat16)
    assert [u.dtype for u in router.unets] == [torch.bfloat16] * 2
    assert router.unets[0].config.block_out_channels == list(half)


@pytest.mark.parametrize("lora_setup", ["sdxl"], indirect=True)
@pytest.mark.parametrize("bad", ["missing", "unexpected"])
def test_lora_file_with_wrong_keys_is_refused_by_name(bad, lora_setup, tmp_path):
    from fastdiff.recipe import load_pipeline

    folder = tmp_path / "export"
    lora_setup.pipe.save_pretrained(folder)
    path = folder / "students/student_1/lora.safetensors"
    weights = load_file(path)
    if bad == "missing":
        key = sorted(weights)[3]
        del weights[key]
    else:
        key = "down_blocks.0.resnets.0.conv9.lora_A.weight"
        weights[key] = torch.zeros(4, 4)
    save_file(weights, path)
    with pytest.raises(ValueError, match=f"student 1 .*{bad} keys .*{key.replace('.', '[.]')}"):
        load_pipeline(folder)
