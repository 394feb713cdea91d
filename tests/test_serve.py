"""fastdiff serve: a real uvicorn server on loopback, a tiny SDXL base, tiny LoRAs (diffusers, kohya, an export)."""

import base64
import io
import json
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from fastdiff.eval.bench_serve import random_lora  # noqa: E402
from fastdiff.serve.adapters import Adapter, sampling_for  # noqa: E402
from fastdiff.serve.app import ServeConfig, create_app, uvicorn_config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TOKEN = "test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def make_export(teacher: str, out: Path) -> Path:
    """A real fastdiff export of a 4-step DMD2 LoRA student (weights randomised instead of trained)."""
    from fastdiff.config import load_config, to_dict
    from fastdiff.export import export
    from fastdiff.methods import build
    from fastdiff.models.lora import adapter_parameters
    from fastdiff.run import run_context
    from fastdiff.teacher import Teacher

    cfg = load_config(
        REPO / "assets/configs/tiny_sdxl_dmd2.yaml", [f"teacher={teacher}", f"output_dir={out}"]
    )
    t = Teacher(teacher)
    method = build(run_context(cfg, t, with_data=False))
    gen = method.generator
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in adapter_parameters(gen.unet, gen.adapter):
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return export(method, t, to_dict(cfg), out, lora_scale=0.8, prompts=["a red square"])


def make_tscd_export(teacher: str, out: Path) -> Path:
    """A real fastdiff export of a TSCD LoRA student with a 2-segment stage kept (weights randomised): lora/ is the
    final (1-segment) LoRA, lora/2step/ the 2-segment stage's."""
    from fastdiff.config import load_config, to_dict
    from fastdiff.export import export
    from fastdiff.methods import build
    from fastdiff.run import run_context
    from fastdiff.teacher import Teacher

    overrides = [f"teacher={teacher}", f"output_dir={out}", "tscd.segments=[2,1]", "tscd.stage_steps=[1,1]"]
    cfg = load_config(REPO / "assets/configs/digits_tscd.yaml", overrides)
    t = Teacher(teacher)
    method = build(run_context(cfg, t, with_data=False))
    g = torch.Generator().manual_seed(7)
    params = method.groups()[0].params
    method.stage_weights = {2: {n: torch.randn(p.shape, generator=g) * 0.05 for n, p in params.items()}}
    method._last_segments = 1  # trained through both stages
    with torch.no_grad():
        for p in params.values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return export(method, t, to_dict(cfg), out, lora_scale=0.8, prompts=["a red square"])


@pytest.fixture(scope="module")
def assets(tiny_teachers, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    root = tmp / "adapters"
    root.mkdir()
    a = random_lora("sdxl", tmp / "a", seed=1)
    b = random_lora("sdxl", tmp / "b", seed=2)
    shutil.copy(a["diffusers"], root / "style_a.safetensors")
    shutil.copy(b["diffusers"], root / "style_b.safetensors")
    shutil.copy(b["kohya"], root / "style_b_kohya.safetensors")  # the same adapter, kohya keys
    make_export(tiny_teachers["sdxl"], root / "distilled")
    (root / "notes.txt").write_text("not an adapter")
    (root / "legacy.ckpt").write_bytes(b"pickle")  # skipped: pickle formats are never loaded
    return {"base": tiny_teachers["sdxl"], "root": root, "tmp": tmp, "a": a, "b": b}


def config(assets, **kw) -> ServeConfig:
    base = dict(
        base=assets["base"],
        adapters=str(assets["root"]),
        token=TOKEN,
        cache_size=2,
        default_steps=2,
        default_guidance_scale=3.0,
        batch_window_ms=100,
        max_steps=8,
        max_n=4,
        max_size=64,
        max_prompt_chars=100,
        max_body_bytes=4096,
        max_adapter_bytes=1_000_000,
    )
    return ServeConfig(**{**base, **kw})


@contextmanager
def serving(cfg: ServeConfig, app=None, **uvicorn_kwargs):
    """``cfg`` served on a free loopback port with ``uvicorn_config`` (the header-read timeout included); yields an
    authenticated client, the app and the port."""
    import uvicorn

    app = create_app(cfg) if app is None else app
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn_config(app, cfg, log_level="warning", **uvicorn_kwargs))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    port = sock.getsockname()[1]
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=AUTH, timeout=120) as c:
            yield c, app, port
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


@contextmanager
def running(cfg: ServeConfig):
    """``serving`` yielding (client, app)."""
    with serving(cfg) as (client, app, _):
        yield client, app


@pytest.fixture(scope="module")
def server(assets):
    with running(config(assets)) as (client, app):
        yield client, app


def generate(client, **body) -> dict:
    r = client.post("/v1/images/generations", json={"prompt": "a red square", "seed": 0, **body})
    assert r.status_code == 200, r.text
    return r.json()


def pixels(response: dict) -> list[np.ndarray]:
    from PIL import Image

    return [
        np.asarray(Image.open(io.BytesIO(base64.b64decode(d["b64_json"])))).astype(int)
        for d in response["data"]
    ]


def metric(client, line_start: str) -> float:
    text = client.get("/metrics").text
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(line_start)]
    return sum(values)


def requests16() -> list[dict]:
    return [
        {"prompt": f"prompt {i % 3}", "seed": 100 + i, "adapters": [{"name": ("style_a", "style_b")[i % 2]}]}
        for i in range(16)
    ]


def concurrently(client, bodies: list[dict]) -> list[dict]:
    def one(body):
        r = client.post("/v1/images/generations", json=body)
        assert r.status_code == 200, r.text
        return r.json()

    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(one, bodies))


def test_concurrent_alternating_adapters_match_one_at_a_time_with_batching_off(assets):
    """No micro-batching: every image is bit-identical (same PNG bytes) to the same request served alone."""
    with running(config(assets, max_batch_images=1)) as (client, _):
        alone = [generate(client, **body) for body in requests16()]
        together = concurrently(client, requests16())
    for i, (x, y) in enumerate(zip(alone, together)):
        assert x["data"][0]["b64_json"] == y["data"][0]["b64_json"], f"request {i}"
    a, b = pixels(alone[0])[0], pixels(alone[1])[0]
    assert np.abs(a - b).max() > 20  # the two adapters (and prompts) really differ


def test_concurrent_alternating_adapters_match_one_at_a_time_with_micro_batching(server):
    """Micro-batched images equal the one-at-a-time images up to float rounding (batched kernels sum in another
    order: about 1e-4 in the latents after the steps, so at most 1/255 in a pixel); an adapter leaking between
    requests would move them by tens of levels."""
    client, app = server
    loads = metric(client, "fastdiff_adapter_loads_total")
    alone = [generate(client, **body) for body in requests16()]
    together = concurrently(client, requests16())
    assert all(r["fastdiff"]["batch_images"] == 1 for r in alone)
    assert max(r["fastdiff"]["batch_images"] for r in together) > 1  # requests really were batched
    assert metric(client, "fastdiff_mixed_batches_total") > 0  # ... style_a and style_b images in one call
    for i, (x, y) in enumerate(zip(alone, together)):
        assert x["fastdiff"]["adapters"] == y["fastdiff"]["adapters"]
        diff = np.abs(pixels(x)[0] - pixels(y)[0])
        assert diff.max() <= 1 and diff.mean() < 0.01, f"request {i}: max {diff.max()}, mean {diff.mean()}"
    # both adapters stay cached: alternating never reloads them (nor the base)
    assert metric(client, "fastdiff_adapter_loads_total") - loads <= 2


def test_seed_per_image_is_independent_of_n_and_batching(server):
    client, _ = server
    four = pixels(generate(client, n=4, seed=50, adapters=[{"name": "style_a"}]))
    third = pixels(generate(client, n=1, seed=52, adapters=[{"name": "style_a"}]))[0]
    assert np.abs(four[2] - third).max() <= 1
    ones = concurrently(client, [{"prompt": "a red square", "seed": 50 + i, "adapters": [{"name": "style_a"}]} for i in range(4)])  # fmt: skip
    assert max(r["fastdiff"]["batch_images"] for r in ones) > 1
    for i, r in enumerate(ones):
        assert np.abs(pixels(r)[0] - four[i]).max() <= 1
    assert np.abs(four[0] - four[1]).max() > 20


def test_hot_add_and_remove(server, assets):
    client, app = server
    plain = pixels(generate(client))[0]
    shutil.copy(assets["a"]["diffusers"], assets["root"] / "late.safetensors")
    r = client.post("/v1/adapters", json={"path": "late.safetensors", "name": "hot"})
    assert r.status_code == 201, r.text
    assert r.json()["format"] == "diffusers"
    assert "hot" in [a["name"] for a in client.get("/v1/adapters").json()["data"]]
    hot = pixels(generate(client, adapters=[{"name": "hot"}]))[0]
    assert np.abs(hot - plain).max() > 20
    assert client.delete("/v1/adapters/hot").status_code == 204
    assert "hot" not in [a["name"] for a in client.get("/v1/adapters").json()["data"]]
    r = client.post("/v1/images/generations", json={"prompt": "x", "adapters": [{"name": "hot"}]})
    assert r.status_code == 404 and "hot" in r.json()["error"]["message"]
    # the same name again (a new registration), from a folder holding pytorch_lora_weights.safetensors
    (assets["root"] / "late_dir").mkdir()
    shutil.copy(assets["a"]["diffusers"], assets["root"] / "late_dir")
    r = client.post("/v1/adapters", json={"path": str(assets["root"] / "late_dir"), "name": "hot"})
    assert r.status_code == 201, r.text
    again = pixels(generate(client, adapters=[{"name": "hot"}]))[0]
    assert np.abs(again - hot).max() <= 1
    # no request ever changed the base: no adapters gives the same image as before
    assert np.array_equal(pixels(generate(client))[0], plain)


def test_bad_input_gets_its_status(server, assets, tmp_path):
    client, _ = server
    root = assets["root"]
    gen = "/v1/images/generations"
    ok = {"prompt": "a red square"}
    cases = [
        (gen, {**ok, "adapters": [{"name": "nope"}]}, 404, "unknown adapter"),
        (gen, {**ok, "adapters": [{"name": "../style_a"}]}, 404, "unknown adapter"),
        (gen, {**ok, "n": 5}, 422, "n=5"),
        (gen, {**ok, "steps": 9}, 422, "steps=9"),
        (gen, {**ok, "steps": 0}, 422, "greater than or equal"),
        (gen, {**ok, "guidance_scale": 31}, 422, "guidance_scale"),
        (gen, {"prompt": "x" * 101}, 422, "101 characters"),
        (gen, {**ok, "negative_prompt": "x" * 101}, 422, "negative_prompt"),
        (gen, {**ok, "size": "128x128"}, 422, "between 8 and 64"),
        (gen, {**ok, "size": "30x30"}, 422, "multiple of 8"),
        (gen, {**ok, "size": "big"}, 422, "WIDTHxHEIGHT"),
        (gen, {**ok, "response_format": "url"}, 422, "b64_json"),
        (gen, {**ok, "stepz": 4}, 422, "stepz"),
        (gen, {"n": 1}, 422, "prompt"),
        (gen, {**ok, "seed": -1}, 422, "seed"),
        (gen, {**ok, "adapters": [{"name": "style_a"}, {"name": "style_a"}]}, 422, "once"),
        (
            gen,
            {**ok, "adapters": [{"name": n} for n in ("style_a", "style_b", "distilled")]},
            422,
            "at most 2",
        ),
        (gen, {**ok, "adapters": [{"name": "style_a", "weight": 100}]}, 422, "weight"),
        (gen, {"prompt": "x" * 5000}, 413, "4096 bytes"),
    ]
    (tmp_path / "outside.safetensors").write_bytes(b"")
    (root / "escape.safetensors").symlink_to(tmp_path / "outside.safetensors")
    (root / "weights.bin").write_bytes(b"pickle")
    from safetensors.torch import save_file

    save_file({"model.weight": torch.zeros(2)}, str(root / "not_lora.safetensors"))
    save_file({"unet.conv_in.lora_A.weight": torch.zeros(512, 1024)}, str(root / "huge.safetensors"))
    foreign = {"unet.mid_block.no_such.to_q.lora_A.weight": torch.zeros(4, 64)}
    foreign["unet.mid_block.no_such.to_q.lora_B.weight"] = torch.zeros(64, 4)
    save_file(foreign, str(root / "foreign.safetensors"))
    reg = "/v1/adapters"
    cases += [
        (reg, {"path": "../style_a.safetensors"}, 400, "only from inside"),
        (reg, {"path": str(tmp_path / "outside.safetensors")}, 400, "only from inside"),
        (reg, {"path": "escape.safetensors"}, 400, "only from inside"),
        (reg, {"path": "missing.safetensors"}, 400, "no such file"),
        (reg, {"path": "weights.bin"}, 400, "only .safetensors"),
        (reg, {"path": "notes.txt"}, 400, "only .safetensors"),
        (reg, {"path": "not_lora.safetensors"}, 400, "not LoRA keys"),
        (reg, {"path": "foreign.safetensors"}, 400, "do not exist in this UNet"),
        (reg, {"path": "huge.safetensors"}, 413, "size limit"),
        (reg, {"path": "style_a.safetensors"}, 409, "already registered"),
        (reg, {"path": "style_a.safetensors", "name": "a/b"}, 422, "not allowed"),
    ]
    for path, body, status, fragment in cases:
        r = client.post(path, json=body)
        assert r.status_code == status, (body, r.status_code, r.text[:300])
        assert fragment in r.text, (body, r.text[:300])
    chunked = iter([b'{"prompt": "', b"x" * 5000, b'"}'])  # no content-length: counted as it arrives
    r = client.post(gen, content=chunked, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "4096 bytes" in r.text
    r = client.post(gen, content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422 and "JSON" in r.text
    assert client.delete("/v1/adapters/nope").status_code == 404
    for headers in ({"Authorization": ""}, {"Authorization": "Bearer wrong"}):
        for method, path in (
            ("POST", gen),
            ("GET", reg),
            ("GET", "/metrics"),
            ("DELETE", "/v1/adapters/style_a"),
        ):
            r = client.request(method, path, json=ok, headers=headers)
            assert r.status_code == 401 and "bearer token" in r.text, (method, path, r.status_code)
    assert client.get("/healthz", headers={"Authorization": ""}).status_code == 200
    listed = client.get(reg).json()
    assert {"style_a", "style_b", "style_b_kohya", "distilled"} <= {a["name"] for a in listed["data"]}
    assert any("legacy.ckpt" in s["path"] for s in listed["skipped"])
    assert (
        metric(client, 'fastdiff_requests_total{method="POST",path="/v1/images/generations",status="422"}')
        >= 17
    )


def test_a_failing_generation_is_a_500_and_the_server_keeps_serving(server, assets, tmp_path):
    client, _ = server
    root = assets["root"]
    shutil.copy(assets["b"]["diffusers"], root / "broken.safetensors")
    assert client.post("/v1/adapters", json={"path": "broken.safetensors"}).status_code == 201
    (root / "broken.safetensors").write_bytes(b"\x00" * 64)  # corrupted after registration
    # an SD1.5 LoRA swapped in after registration: registration checks shapes, so only loading finds it out
    random_lora("sd15", tmp_path / "sd15", seed=3)
    shutil.copy(assets["b"]["diffusers"], root / "sd15_style.safetensors")
    assert client.post("/v1/adapters", json={"path": "sd15_style.safetensors"}).status_code == 201
    shutil.copy(tmp_path / "sd15/pytorch_lora_weights.safetensors", root / "sd15_style.safetensors")
    status_500 = 'fastdiff_requests_total{method="POST",path="/v1/images/generations",status="500"}'
    failures = metric(client, status_500)
    for name in ("broken", "sd15_style"):
        r = client.post("/v1/images/generations", json={"prompt": "x", "adapters": [{"name": name}]})
        assert r.status_code == 500, r.text
        assert "generation failed" in r.text and f"adapter '{name}' could not be loaded" in r.text
    assert metric(client, status_500) == failures + 2
    assert client.get("/healthz").json()["status"] == "ok"
    a = pixels(generate(client, adapters=[{"name": "style_a"}]))[0]
    a_again = pixels(generate(client, adapters=[{"name": "style_a"}]))[0]
    assert np.array_equal(a, a_again)
    for name in ("broken", "sd15_style"):
        assert client.delete(f"/v1/adapters/{name}").status_code == 204


def test_kohya_lora_and_fastdiff_export_are_served_with_the_export_recipe(server, assets):
    client, app = server
    evictions = metric(client, "fastdiff_adapter_evictions_total")
    # the same LoRA in kohya keys and in diffusers keys gives the same image
    kohya = pixels(generate(client, adapters=[{"name": "style_b_kohya"}]))[0]
    diffusers_keys = pixels(generate(client, adapters=[{"name": "style_b"}]))[0]
    plain = pixels(generate(client))[0]
    assert np.abs(kohya - diffusers_keys).max() <= 1 and np.abs(kohya - plain).max() > 20

    # the export: its recipe (LCMScheduler, 4 steps at [999, 749, 499, 249], CFG 0, LoRA scale 0.8) applies
    calls = []
    hook = app.state.pipe.unet.register_forward_hook(lambda *a: calls.append(1))
    try:
        served = generate(client, adapters=[{"name": "distilled"}], seed=3)
        n_calls = len(calls)
        two = generate(client, adapters=[{"name": "distilled"}], seed=3, steps=2)
        n_calls_two = len(calls) - n_calls
    finally:
        hook.remove()
    meta = served["fastdiff"]
    assert meta["num_inference_steps"] == 4 and n_calls == 4  # no CFG: one UNet call per step
    assert meta["scheduler"] == "LCMScheduler" and meta["guidance_scale"] == 0.0
    assert meta["adapters"] == [{"name": "distilled", "weight": 0.8}]
    assert (
        two["fastdiff"]["num_inference_steps"] == 2 and n_calls_two == 2
    )  # an LCM export may change its steps
    assert served["warnings"] == []
    # a step count it was not trained for is the client's error, naming the counts it was
    r = client.post(
        "/v1/images/generations", json={"prompt": "x", "adapters": [{"name": "distilled"}], "steps": 8}
    )
    assert r.status_code == 422 and "[1, 2, 3, 4]" in r.text and "fastdiff.json" in r.text, r.text
    # CFG asked of a student trained without it is served with a warning
    cfg = generate(client, adapters=[{"name": "distilled"}], guidance_scale=3.0)
    assert cfg["fastdiff"]["guidance_scale"] == 3.0
    assert len(cfg["warnings"]) == 1 and "trained without it" in cfg["warnings"][0]

    # ... and equals the export sampled by plain diffusers as its model card says
    from diffusers import DiffusionPipeline, LCMScheduler

    export = assets["root"] / "distilled"
    pipe = DiffusionPipeline.from_pretrained(assets["base"])
    pipe.load_lora_weights(export / "lora", adapter_name="distilled")
    pipe.set_adapters(["distilled"], [0.8])
    pipe.scheduler = LCMScheduler.from_pretrained(export / "pipeline", subfolder="scheduler")
    recipe = json.loads((export / "fastdiff.json").read_text())
    ref = pipe("a red square", num_inference_steps=recipe["num_inference_steps"], guidance_scale=0.0,
               generator=[torch.Generator().manual_seed(3)], output_type="np").images[0]  # fmt: skip
    ref = (ref * 255).round().astype(int)
    assert np.abs(pixels(served)[0] - ref).max() <= 1
    assert np.abs(pixels(two)[0] - ref).max() > 5
    assert metric(client, "fastdiff_adapter_evictions_total") > evictions  # cache of 2, three adapters used
    listed = {a["name"]: a for a in client.get("/v1/adapters").json()["data"]}
    assert (
        listed["distilled"]["kind"] == "fastdiff-export"
        and listed["distilled"]["recipe"]["num_inference_steps"] == 4
    )
    assert listed["distilled"]["recipe"]["step_counts"] == [1, 2, 3, 4]  # a 4-step LCM export: 1..4 steps
    assert listed["style_b_kohya"]["format"] == "kohya"
    text = client.get("/metrics").text
    for name in (
        "fastdiff_generation_latency_seconds_bucket",
        "fastdiff_queue_depth",
        "fastdiff_adapter_loads_total",
    ):
        assert name in text


def test_an_export_lora_on_another_base_is_refused(server, assets):
    """An export's LoRA records the UNet it was trained on; registered on a server whose base has other UNet weights
    (here: the record altered, as if trained on another teacher), it is a 400 naming the trained-on teacher."""
    client, _ = server
    wrong = assets["root"] / "wrong_base"
    shutil.copytree(assets["root"] / "distilled", wrong)
    info_file = wrong / "lora" / "fastdiff_lora.json"
    info = json.loads(info_file.read_text())
    info["lora_base"]["unet_fingerprint"] = "0" * 16
    info_file.write_text(json.dumps(info))
    try:
        r = client.post("/v1/adapters", json={"path": "wrong_base"})
        assert r.status_code == 400 and "was trained on" in r.text and "--base" in r.text, r.text
    finally:
        shutil.rmtree(wrong)


def test_a_tscd_export_serves_each_step_count_with_its_own_lora(tiny_teachers, tmp_path):
    """At 2 steps the 2-segment stage's LoRA (lora/2step) with DDIM trailing, at 1 step the unified LoRA with TCD:
    each equals plain diffusers with that LoRA on the base, as the export's recipe says."""
    from diffusers import DiffusionPipeline

    from fastdiff.recipe import make_scheduler

    root = tmp_path / "adapters"
    root.mkdir()
    export = make_tscd_export(tiny_teachers["sdxl"], root / "segmented")
    recipe = json.loads((export / "fastdiff.json").read_text())
    assert recipe["recipes"]["2"]["lora"] == "lora/2step" and recipe["recipes"]["1"]["lora"] is None
    cfg = config({"base": tiny_teachers["sdxl"], "root": root}, cache_size=2, max_adapter_bytes=10_000_000)
    with running(cfg) as (client, _):
        # 2, then 1, then 2 again: switching between the two LoRAs of one export
        served = {k: generate(client, adapters=[{"name": "segmented"}], seed=3, steps=k) for k in (2, 1, 2)}
        listed = client.get("/v1/adapters").json()["data"]
    assert [a["name"] for a in listed] == ["segmented"]
    assert (
        served[2]["fastdiff"]["scheduler"] == "DDIMScheduler"
        and served[1]["fastdiff"]["scheduler"] == "TCDScheduler"
    )
    for k in (1, 2):
        r = recipe["recipes"][str(k)]
        pipe = DiffusionPipeline.from_pretrained(tiny_teachers["sdxl"])
        pipe.load_lora_weights(export / (r["lora"] or "lora"), adapter_name="student")
        pipe.set_adapters(["student"], [0.8])
        pipe.scheduler = make_scheduler(pipe.scheduler.config, r["scheduler"], r["scheduler_kwargs"])
        ref = pipe("a red square", num_inference_steps=k, guidance_scale=0.0, **({"eta": r["eta"]} if "eta" in r else {}),
                   generator=[torch.Generator().manual_seed(3)], output_type="np").images[0]  # fmt: skip
        ref = (ref * 255).round().astype(int)
        assert np.abs(pixels(served[k])[0] - ref).max() <= 1, k
    assert np.abs(pixels(served[2])[0] - pixels(served[1])[0]).max() > 5


def test_export_recipe_overrides_are_limited():
    lcm = {"method": "dmd2", "num_inference_steps": 4, "guidance_scale": 0.0, "timesteps": [999, 749, 499, 249], "scheduler": "LCMScheduler", "scheduler_kwargs": {"original_inference_steps": 4}, "timesteps_derivable": True, "sampler": "lcm", "step_counts": [1, 2, 3, 4], "recipes": {}, "lora_scale": 1.0}  # fmt: skip
    sched = {"num_train_timesteps": 1000, "original_inference_steps": 4}
    a = Adapter("lcm", Path("x.safetensors"), "diffusers", Path("x"), 1, recipe=lcm, scheduler_config=sched)
    s = sampling_for(a, None, None)
    assert (s.num_inference_steps, s.guidance_scale, s.scheduler, s.timesteps) == (
        4,
        0.0,
        "LCMScheduler",
        None,
    )
    assert sampling_for(a, 2, 1.5).num_inference_steps == 2 and sampling_for(a, 2, 1.5).guidance_scale == 1.5
    with pytest.raises(ValueError, match="samples at \\[1, 2, 3, 4\\] step"):
        sampling_for(a, 5, None)  # a K-step LCM export: 1..K
    odd = {**lcm, "num_inference_steps": 2, "timesteps": [999, 333], "timesteps_derivable": False, "step_counts": [2]}  # fmt: skip
    b = Adapter("odd", Path("x.safetensors"), "diffusers", Path("x"), 1, recipe=odd, scheduler_config=sched)
    assert sampling_for(b, None, None).timesteps == (999, 333)  # passed explicitly
    with pytest.raises(ValueError, match="samples at \\[2\\] step"):
        sampling_for(b, 4, None)
    ddim = {**lcm, "method": "tscd", "scheduler": "DDIMScheduler", "scheduler_kwargs": {"timestep_spacing": "trailing"}, "sampler": "ddim", "step_counts": [1, 2, 4], "recipes": {
        "1": {"num_inference_steps": 1, "guidance_scale": 0.0, "scheduler": "TCDScheduler", "scheduler_kwargs": {}, "lora": None, "eta": 1.0},
        "2": {"num_inference_steps": 2, "guidance_scale": 0.0, "scheduler": "DDIMScheduler", "scheduler_kwargs": {"timestep_spacing": "trailing"}, "lora": None},
    }}  # fmt: skip
    c = Adapter("tscd", Path("x.safetensors"), "diffusers", Path("x"), 1, recipe=ddim, scheduler_config=sched)
    one = sampling_for(c, 1, None)
    assert (one.scheduler, one.eta) == ("TCDScheduler", 1.0)
    two = sampling_for(c, 2, None)
    assert (
        two.scheduler == "DDIMScheduler"
        and json.loads(two.scheduler_config)["timestep_spacing"] == "trailing"
    )
    with pytest.raises(ValueError, match="samples at \\[1, 2, 4\\] step"):
        sampling_for(c, 3, None)
    per_step = {**ddim, "recipes": {**ddim["recipes"], "4": {**ddim["recipes"]["2"], "num_inference_steps": 4, "lora": "lora/4step"}}}  # fmt: skip
    d = Adapter("seg", Path("x/lora/a.safetensors"), "diffusers", Path("x"), 1, recipe=per_step,
                scheduler_config=sched, variants={"lora/4step": Path("x/lora/4step/w.safetensors")})  # fmt: skip
    assert sampling_for(d, 4, None).lora == "lora/4step" and sampling_for(d, 2, None).lora is None
    assert d.weights_for("lora/4step") == (
        Path("x/lora/4step/w.safetensors"),
        f"{d.internal_name}_lora_4step",
    )
    assert (
        d.weights_for(None) == d.weights_for("lora/other") == (Path("x/lora/a.safetensors"), d.internal_name)
    )


def test_cli_builds_the_serve_config(monkeypatch):
    import fastdiff.serve.app as app_module
    from fastdiff.cli import main

    seen = []
    monkeypatch.setattr(app_module, "serve", seen.append)
    main(
        [
            "serve",
            "--base",
            "b",
            "--adapters",
            "a",
            "--port",
            "9000",
            "--max-batch-images",
            "1",
            "--token",
            "t",
        ]
    )
    main(["serve", "--base", "b", "--adapters", "a", "--no-mix-adapters", "--batch-window-ms", "2.5"])
    first, second = seen
    assert (first.base, first.adapters, first.port, first.max_batch_images, first.token) == (
        "b",
        "a",
        9000,
        1,
        "t",
    )
    assert first.mix_adapters and first.cache_size == ServeConfig.cache_size  # unset flags keep the defaults
    assert not second.mix_adapters and second.batch_window_ms == 2.5 and second.token is None


def test_bench_serve_tables_from_samples():
    from fastdiff.eval.bench_serve import CLIENTS, aggregate, summarize

    cell = aggregate([{"latencies": [0.1, 0.3], "batch_images": [1, 3], "seconds": 1.0}] * 2)
    assert (cell["requests"], cell["images_per_s"], cell["p50_ms"], cell["mean_batch_images"]) == (
        4,
        2.0,
        200.0,
        2.0,
    )
    rows = [
        {
            "batching": b,
            "adapters": a,
            "clients": c,
            "p50_ms": 100.0 * (1.1 if a == 4 else 1),
            "images_per_s": 3.0 if b else 2.0,
        }  # fmt: skip
        for b in (True, False)
        for a in (1, 4)
        for c in CLIENTS
    ]
    s = summarize(rows)
    assert set(s["alternating_p50_overhead"].values()) == {0.1}
    assert set(s["micro_batching_throughput_gain"].values()) == {1.5}


MSD_PROMPTS = ["a red square", "a red circle", "a blue sky", "a blue sea", "a green tree"]


def make_msd_export(teacher: str, out: Path) -> Path:
    """A real MSD export of K = 2 one-step LoRA students on ``teacher``, trained 4 steps on five prompts split between
    them; a generator update every step at a high lr without warm-up, so that the students draw visibly different
    images (at lr 1e-3 they differ by about 2 levels of 255, too little to tell a misrouted request)."""
    from fastdiff.config import load_config
    from fastdiff.run import train

    prompts = out.parent / "msd_prompts.txt"
    prompts.write_text("\n".join(MSD_PROMPTS))
    args = [
        f"teacher={teacher}", f"prompts={prompts}", f"output_dir={out}", "msd.num_students=2", "max_steps=4",
        "mixed_precision=no", "gradient_checkpointing=false", "msd.dmd2.optim.warmup_steps=0",
        "msd.dmd2.generator_lr=1e-2", "msd.dmd2.dfake_gen_update_ratio=1", "checkpointing_steps=100",
        "validation_steps=100",
    ]  # fmt: skip
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(REPO)
        train(load_config(REPO / "assets/configs/sdxl_msd_1step.yaml", args))
    return out


@pytest.fixture(scope="module")
def msd_server(tiny_teachers, tmp_path_factory):
    """A server over an adapters root holding an MSD export (``students``) and a copy of its recipe claiming
    whole-UNet students (``whole``, skipped by the startup scan)."""
    root = tmp_path_factory.mktemp("serve_msd") / "adapters"
    root.mkdir()
    export = make_msd_export(tiny_teachers["sdxl"], root / "students")
    recipe = json.loads((export / "fastdiff.json").read_text())
    (root / "whole").mkdir()
    whole = {**recipe, "students": {**recipe["students"], "lora": None}}
    (root / "whole" / "fastdiff.json").write_text(json.dumps(whole))
    cfg = config({"base": tiny_teachers["sdxl"], "root": root}, max_adapter_bytes=20_000_000)
    with running(cfg) as (client, app):
        yield client, app, export


def test_a_multi_student_export_serves_each_prompt_with_its_students_lora(msd_server, tiny_teachers):
    """Each request is routed by its prompt (training prompts by the table, others by the nearest centroid, as the
    exported multi-student pipeline routes) and sampled with that student's LoRA: the images equal plain diffusers
    with lora/student_<k> on the base (and the exported pipeline's), also when requests of both students arrive
    together, and the response names the student."""
    from diffusers import DiffusionPipeline, LCMScheduler

    from fastdiff.pipelines import StableDiffusionXLMultiStudentPipeline

    client, _, export = msd_server
    listed = {a["name"]: a for a in client.get("/v1/adapters").json()["data"]}
    assert listed["students"]["kind"] == "fastdiff-export"
    assert listed["students"]["students"]["num_students"] == 2
    assert listed["students"]["students"]["lora"] == ["lora/student_0", "lora/student_1"]

    ms = StableDiffusionXLMultiStudentPipeline.from_pretrained(export / "pipeline")
    ms.set_progress_bar_config(disable=True)
    table = ms.students.config.table
    first = next(p for p in MSD_PROMPTS if table[p] == 0)
    second = next(p for p in MSD_PROMPTS if table[p] == 1)
    novel = "a purple cow on the moon"  # not a training prompt: routed by the centroids
    prompts = [first, second, novel]
    expected = ms.route(prompts)
    assert expected[:2] == [0, 1]

    bodies = [{"prompt": p, "seed": 3, "n": 2, "adapters": [{"name": "students"}]} for p in prompts]
    alone = [generate(client, **body) for body in bodies]
    together = concurrently(client, bodies)
    assert (
        [r["fastdiff"]["student"] for r in alone] == [r["fastdiff"]["student"] for r in together] == expected
    )
    assert alone[0]["fastdiff"]["num_inference_steps"] == 1 and alone[0]["fastdiff"]["guidance_scale"] == 0.0

    refs = {}
    for k in (0, 1):
        pipe = DiffusionPipeline.from_pretrained(tiny_teachers["sdxl"])
        pipe.set_progress_bar_config(disable=True)
        pipe.load_lora_weights(export / f"lora/student_{k}", adapter_name="student")
        pipe.scheduler = LCMScheduler.from_pretrained(export / "pipeline", subfolder="scheduler")
        for p in prompts:
            images = pipe([p, p], num_inference_steps=1, guidance_scale=0.0, output_type="np",
                          generator=[torch.Generator().manual_seed(3 + i) for i in range(2)]).images  # fmt: skip
            refs[p, k] = [(img * 255).round().astype(int) for img in images]
    theirs = ms(prompts, num_inference_steps=1, guidance_scale=0.0, output_type="np",
                generator=[torch.Generator().manual_seed(3) for _ in prompts]).images  # fmt: skip
    for p, k, a, b, mine in zip(prompts, expected, alone, together, theirs):
        for served in (a, b):
            for i, img in enumerate(pixels(served)):
                assert np.abs(img - refs[p, k][i]).max() <= 1, (p, k, i)
        assert np.abs(pixels(a)[0] - (mine * 255).round().astype(int)).max() <= 1, p
        assert np.abs(refs[p, k][0] - refs[p, 1 - k][0]).max() > 5, p  # the other student draws another image


def test_a_multi_student_export_of_whole_unets_is_refused(msd_server):
    client, _, _ = msd_server
    skipped = client.get("/v1/adapters").json()["skipped"]
    assert any(s["path"].endswith("whole") and "whole UNets" in s["error"] for s in skipped)
    r = client.post("/v1/adapters", json={"path": "whole"})
    assert r.status_code == 400, r.text
    assert "whole UNets, not LoRAs" in r.text and "serve its pipeline/ as --base" in r.text
