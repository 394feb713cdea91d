"""MultiLoRA: a batch mixing LoRA adapters (per-row weights, several per row, CFG on or off) in one UNet call gives
the images of the one-adapter-at-a-time path (peft's loaded adapters, or the LoRA fused), on tiny SD1.5 and SDXL."""

import warnings

import pytest
import torch

from fastdiff.eval.bench_serve import random_lora
from fastdiff.serve.multi_lora import LoRAModule, MultiLoRA, read_lora

# Latents after 2 steps, float32, values up to about 7: the batched path sums the low-rank products in another order
# than peft's per-adapter layers. Measured max differences: up to 5e-5 in these tests (SDXL, CFG), 7.6e-5 in a probe;
# peft's own mixed batch (adapter_names) vs one at a time: up to 2.7e-5. An adapter on the wrong row, or a wrong
# alpha / rank scale, moves them by more than 0.1.
TOL = 2e-4
RANKS = (2, 4, 4, 3)  # different ranks: the stacks zero-pad them
# scales alpha / rank of 1, 2, 0.25, 1: read from the file's LoraConfig metadata or its kohya .alpha keys
ALPHAS = (2, 8, 1, 3)
ROWS = {  # per image: (adapter, weight) pairs
    "one adapter": [[("a0", 1.0)], [("a0", 0.4)]],
    "four adapters": [[("a0", 1.0)], [("a1", 0.7)], [("a2", 0.5), ("a3", 1.2)], [], [("a3", -0.6)]],
}


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def setup(request, tiny_teachers, tmp_path_factory):
    """A tiny pipeline carrying 4 random LoRAs as peft adapters a0..a3, and their files (diffusers, kohya)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    family = request.param
    tmp = tmp_path_factory.mktemp(f"multi_lora_{family}")
    files = [
        random_lora(family, tmp / f"a{i}", seed=i, rank=r, alpha=a, std=0.3 / (a / r) ** 0.5)
        for i, (r, a) in enumerate(zip(RANKS, ALPHAS))
    ]
    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    pipe = cls.from_pretrained(tiny_teachers[family])
    pipe.set_progress_bar_config(disable=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore")
        for i, f in enumerate(files):
            path = f["diffusers"]
            pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=f"a{i}")
    return pipe, files


def generate(pipe, n: int, guidance_scale: float, first: int = 0) -> torch.Tensor:
    """Latents of images ``first .. first + n - 1`` (prompt and seed by index), 2 steps."""
    with torch.no_grad():
        return pipe(
            prompt=[f"a digit {i}" for i in range(first, first + n)],
            num_inference_steps=2,
            guidance_scale=guidance_scale,
            height=32,
            width=32,
            generator=[torch.Generator().manual_seed(100 + i) for i in range(first, first + n)],
            output_type="latent",
        ).images


def one_at_a_time(pipe, rows, guidance_scale: float) -> torch.Tensor:
    """Each image alone, with its adapters set on peft's layers."""
    out = []
    for i, pairs in enumerate(rows):
        if pairs:
            pipe.enable_lora()
            pipe.set_adapters([a for a, _ in pairs], adapter_weights=[w for _, w in pairs])
        else:
            pipe.disable_lora()
        out.append(generate(pipe, 1, guidance_scale, first=i))
    pipe.enable_lora()
    return torch.cat(out)


def multi_from_files(pipe, files, kohya: set[int]) -> MultiLoRA:
    multi = MultiLoRA(pipe.unet)
    for i, f in enumerate(files):
        multi.load(f"a{i}", read_lora(f["kohya" if i in kohya else "diffusers"], pipe.unet))
    return multi


@pytest.mark.parametrize("guidance_scale", [1.0, 3.0], ids=["no-cfg", "cfg"])
@pytest.mark.parametrize("case", list(ROWS))
def test_one_batch_equals_one_adapter_at_a_time(setup, case, guidance_scale):
    """Diffusers- and kohya-keyed files mixed, peft's layers present but disabled (the server's situation)."""
    pipe, files = setup
    rows = ROWS[case]
    expected = one_at_a_time(pipe, rows, guidance_scale)
    multi = multi_from_files(pipe, files, kohya={1, 3})
    pipe.disable_lora()
    try:
        with multi.rows(rows):
            got = generate(pipe, len(rows), guidance_scale)
        base = generate(pipe, len(rows), guidance_scale)
    finally:
        pipe.enable_lora()
    diff = (got - expected).abs().amax(dim=(1, 2, 3))
    print(f"{case}, guidance {guidance_scale}: max |multi - peft| per image {diff.tolist()}")
    assert diff.max() < TOL
    for i, pairs in enumerate(rows):  # the adapters really act; rows without one are the base model exactly
        if pairs:
            assert (got[i] - base[i]).abs().max() > 0.1
        else:
            assert torch.equal(got[i], base[i])


def test_equals_the_lora_fused_and_peft_weights(setup):
    """The same LoRA fused into the base weights; and weights taken from peft's loaded adapters (``load_peft``)
    equal the file's."""
    pipe, files = setup
    from_files = multi_from_files(pipe, files, kohya={0})
    from_peft = MultiLoRA(pipe.unet)
    for i in range(4):
        from_peft.load_peft(f"a{i}")
    for name in from_files.names:
        for module, layer in from_files._layers.items():
            if name in layer.modules:
                a, b = layer.modules[name], from_peft._layers[module].modules[name]
                assert torch.equal(a.down, b.down) and torch.equal(a.up, b.up) and a.scaling == b.scaling

    rows = [[("a0", 0.8)], [("a2", 0.8)]]
    pipe.disable_lora()
    try:
        with from_files.rows(rows):
            got = generate(pipe, 2, 3.0)
    finally:
        pipe.enable_lora()
    for i, (name, weight) in enumerate(p[0] for p in rows):
        pipe.set_adapters([name], adapter_weights=[weight])
        pipe.fuse_lora(adapter_names=[name])  # merged layers run their base layer alone
        try:
            fused = generate(pipe, 1, 3.0, first=i)
        finally:
            pipe.unfuse_lora()
        diff = (got[i] - fused[0]).abs().max()
        print(f"max |multi - fused {name}| {diff.item():.2e}")
        assert diff < TOL


def test_a_unet_without_peft(tiny_teachers, tmp_path):
    """No peft at all: the hooks sit on the plain modules; unloading an adapter removes its update."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_teachers["sd15"], subfolder="unet").eval()
    lora = random_lora("sd15", tmp_path / "a", seed=5)
    multi = MultiLoRA(unet)
    multi.load("a", read_lora(lora["kohya"], unet))
    x, text = torch.randn(1, 4, 8, 8).repeat(3, 1, 1, 1), torch.randn(1, 77, 32).repeat(3, 1, 1)
    t = torch.tensor([500] * 3)
    with torch.no_grad():
        base = unet(x, t, text).sample
        with multi.rows([[("a", 1.0)], [], [("a", 0.5), ("a", 0.5)]]):  # one adapter twice: weights sum
            got = unet(x, t, text).sample
        assert torch.equal(got[1], base[1]) and (got[0] - base[0]).abs().max() > 0.1
        assert (got[0] - got[2]).abs().max() < TOL
        assert torch.equal(unet(x, t, text).sample, base)  # the hooks are gone after the block
        multi.unload("a")
        assert multi.names == [] and not multi._layers


def test_bad_input_is_refused(tiny_teachers):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_teachers["sd15"], subfolder="unet")
    multi = MultiLoRA(unet)
    name = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    with pytest.raises(ValueError, match="do not fit"):
        multi.load("a", {name: LoRAModule(torch.zeros(4, 33), torch.zeros(64, 4), 1.0)})
    with pytest.raises(ValueError, match="no module"):
        multi.load("a", {"nope.to_q": LoRAModule(torch.zeros(4, 64), torch.zeros(64, 4), 1.0)})
    assert multi.names == []
    multi.load("a", {name: LoRAModule(torch.randn(4, 64), torch.randn(64, 4), 1.0)})
    with pytest.raises(KeyError, match="not loaded"):
        with multi.rows([[("b", 1.0)]]):
            pass
    x, t, text = torch.randn(3, 4, 8, 8), torch.tensor([500] * 3), torch.randn(3, 77, 32)
    with pytest.raises(RuntimeError, match="not a multiple"), multi.rows([[("a", 1.0)], []]):
        unet(x, t, text)


def test_the_server_worker_runs_a_mixed_batch_as_one_call(setup, tmp_path):
    """``Worker``'s mixed-adapter batch (CFG on, one request with 2 images, one without an adapter, kohya and
    diffusers files) gives each request the image it gets alone, within one pixel level."""
    import numpy as np

    from fastdiff.serve.adapters import Adapter, Sampling
    from fastdiff.serve.metrics import Metrics
    from fastdiff.serve.worker import BatchKey, Job, Worker

    pipe, files = setup  # the worker loads the files again as adapters of its own
    adapters = []
    for i, f in enumerate(files):
        path = f["kohya" if i % 2 else "diffusers"]
        adapters.append(Adapter(f"a{i}", path, "kohya" if i % 2 else "diffusers", path, path.stat().st_size))
    worker = Worker(pipe, 4, 8, 0.0, 8, Metrics(), lambda a: True, mix_adapters=True)
    sampling = Sampling(num_inference_steps=2, guidance_scale=3.0)

    def jobs():
        spec = [(0, 1.0, 1), (1, 0.7, 2), (None, 0, 1), (2, 0.5, 1), (3, 1.2, 1)]
        return [
            Job(
                BatchKey(((adapters[i], w),) if i is not None else (), sampling, 32, 32, False),
                f"a digit {k}",
                None,
                n,
                seed=10 * k,
            )
            for k, (i, w, n) in enumerate(spec)
        ]

    together = jobs()
    worker._run_batch(together)
    assert worker.metrics.mixed_batches == 1 and sorted(worker._multi_lora.names) == sorted(
        worker.loaded.values()
    )
    for job, mixed in zip(jobs(), together):
        worker._run_batch([job])
        for a, b in zip(job.future.result(), mixed.future.result()):
            diff = np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int))
            assert diff.max() <= 1, diff.max()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Adapter .* was active")
        pipe.delete_adapters(list(worker.loaded.values()))


def test_sync_peft_follows_the_peft_cache():
    """Adapters taken from peft are dropped once peft deletes them, and taken again when peft reloads a name."""
    from fastdiff.models.lora import add_adapter
    from fastdiff.models.tiny import tiny_unet

    unet = tiny_unet("sd15")
    add_adapter(unet, "a", rank=2, alpha=2, targets=["to_q"])
    multi = MultiLoRA(unet)
    multi.sync_peft(["a"])
    layer = next(iter(multi._layers.values()))
    first = layer.modules["a"].down
    multi.sync_peft(["a"])  # unchanged: not taken again
    assert layer.modules["a"].down is first
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore")
        unet.delete_adapters(["a"])
        multi.sync_peft([])
        assert multi.names == []
        add_adapter(unet, "a", rank=2, alpha=2, targets=["to_q"])
    multi.sync_peft(["a"])
    layer = next(iter(multi._layers.values()))
    assert layer.modules["a"].down is not first


def test_the_server_worker_runs_several_adapters_per_request_in_one_call(setup):
    """A mixed batch of requests with {a0}, {a0, a1} (other weights), {} and {a1}, CFG on: one pipeline call whose
    images equal, within one pixel level, each request's image when it runs alone (peft's ``set_adapters`` with both
    weights). With no one-call route (peft's ``adapter_names`` takes one adapter per image), the batch runs as one
    call per adapter set, with the same images."""
    import numpy as np

    from fastdiff.serve.adapters import Adapter, Sampling
    from fastdiff.serve.metrics import Metrics
    from fastdiff.serve.worker import BatchKey, Job, Worker

    pipe, files = setup
    a0, a1 = (
        Adapter(f"a{i}", f["diffusers"], "diffusers", f["diffusers"], 1) for i, f in enumerate(files[:2])
    )
    worker = Worker(pipe, 4, 8, 0.0, 8, Metrics(), lambda a: True, mix_adapters=True)
    sampling = Sampling(num_inference_steps=2, guidance_scale=3.0)
    spec = [((a0, 1.0),), ((a0, 0.6), (a1, -0.8)), (), ((a1, 0.7),)]

    def jobs():
        return [
            Job(BatchKey(adapters, sampling, 32, 32, False), f"a digit {k}", None, 1 + (k == 1), seed=10 * k)
            for k, adapters in enumerate(spec)
        ]

    assert all(worker._joins(jobs()[:k], job, k) for k, job in enumerate(jobs()) if k)  # one batch
    calls = []
    hook = pipe.unet.register_forward_hook(lambda *_: calls.append(1))
    try:
        alone = jobs()
        for job in alone:
            worker._run_batch([job])
        per_call = len(calls) // len(spec)  # UNet calls of one pipeline call
        together = jobs()
        worker._run_batch(together)
        assert len(calls) == per_call * (len(spec) + 1) and worker.metrics.mixed_batches == 1
        split = jobs()
        worker._multi_rows = lambda per_image: None  # as for adapters with text-encoder layers
        worker._run_batch(split)
        assert len(calls) == per_call * (2 * len(spec) + 1)  # one pipeline call per adapter set
        del worker._multi_rows
    finally:
        hook.remove()
    for k, (x, y, z) in enumerate(zip(alone, together, split)):
        for a, b, c in zip(x.future.result(), y.future.result(), z.future.result()):
            a, b, c = (np.asarray(i, dtype=int) for i in (a, b, c))
            print(
                f"request {k}: max |mixed - alone| {np.abs(a - b).max()}, |split - alone| {np.abs(a - c).max()}"
            )
            assert np.abs(a - b).max() <= 1 and np.abs(a - c).max() <= 1
    images = [np.asarray(j.future.result()[0], dtype=int) for j in alone]
    assert min(np.abs(images[i] - images[j]).max() for i in range(4) for j in range(i)) > 20  # all differ
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Adapter .* was active")
        pipe.delete_adapters(list(worker.loaded.values()))
