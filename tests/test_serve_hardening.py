"""fastdiff serve under bad input and faults (issue 20, items 1-5): a failing request fails alone, adapters are checked
against the base, bad values and paths are 4xx in the OpenAI error shape, loads stay inside the adapters root, and
the server is not exposed by default (415, timeouts, dropped requests of clients that left)."""

import json
import logging
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from test_serve import TOKEN, config, generate, metric, serving  # noqa: E402

from fastdiff.eval.bench_serve import random_lora  # noqa: E402
from fastdiff.serve.app import (  # noqa: E402
    ExposureError,
    ServeConfig,
    check_exposure,
)

GEN = "/v1/images/generations"


@pytest.fixture(scope="module")
def assets(tiny_teachers, tmp_path_factory):
    """An adapters root with two good LoRAs and bad entries the start-up scan must skip: an SD1.5 LoRA (same module
    names as the tiny SDXL, other shapes), an SDXL LoRA with one tensor of a wrong shape, a symlink loop."""
    from safetensors.torch import load_file, save_file

    tmp = tmp_path_factory.mktemp("serve_hardening")
    root = tmp / "adapters"
    root.mkdir()
    a = random_lora("sdxl", tmp / "a", seed=1)
    b = random_lora("sdxl", tmp / "b", seed=2)
    sd15 = random_lora("sd15", tmp / "sd15", seed=3)
    shutil.copy(a["diffusers"], root / "style_a.safetensors")
    shutil.copy(b["diffusers"], root / "style_b.safetensors")
    shutil.copy(sd15["diffusers"], root / "sd15_at_start.safetensors")
    bad_key = "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight"
    tensors = load_file(str(a["diffusers"]))
    tensors[bad_key] = torch.zeros(tensors[bad_key].shape[0] + 1, tensors[bad_key].shape[1])
    save_file(tensors, str(tmp / "wrong_shape.safetensors"), metadata={"format": "pt"})
    shutil.copy(tmp / "wrong_shape.safetensors", root / "wrong_shape_at_start.safetensors")
    (root / "loop.safetensors").symlink_to(root / "loop2.safetensors")
    (root / "loop2.safetensors").symlink_to(root / "loop.safetensors")
    (root / "dirloop").symlink_to(root / "dirloop")
    return {"base": tiny_teachers["sdxl"], "root": root, "tmp": tmp, "a": a, "b": b, "sd15": sd15,
            "wrong_shape": tmp / "wrong_shape.safetensors", "bad_key": bad_key}  # fmt: skip


@pytest.fixture(scope="module")
def server(assets):
    cfg = config(assets, max_adapter_bytes=2_000_000)
    with serving(cfg) as (client, app, port):
        yield client, app, port, cfg


def wait_until(condition, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


@contextmanager
def worker_held(worker):
    """Keep the inference worker busy (a control call waiting) for the block: requests queue up meanwhile."""
    started, release = threading.Event(), threading.Event()

    def hold(_pipe):
        started.set()
        release.wait(60)

    worker.call(hold, wait=False)
    assert started.wait(30)
    try:
        yield
    finally:
        release.set()


@contextmanager
def unet_calls(app):
    """A list that gets one entry per UNet forward while the block runs."""
    calls = []
    hook = app.state.pipe.unet.register_forward_hook(lambda *a: calls.append(1))
    try:
        yield calls
    finally:
        hook.remove()


def post_raw(client, path: str, body: bytes, content_type: str | None = "application/json"):
    """A POST of exact bytes (JSON with NaN, lone-surrogate escapes, ... that httpx would not encode)."""
    headers = {} if content_type is None else {"Content-Type": content_type}
    return client.post(path, content=body, headers=headers)


def assert_openai_error(r, status: int, fragment: str, param: str | None = None) -> dict:
    assert r.status_code == status, (r.status_code, r.text[:300])
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert fragment in error["message"], error
    if param is not None:
        assert error["param"] == param, error
    return error


# 1 -------------------------------------------------------------------------------------------------------------------
def test_a_failing_request_fails_alone(server, assets, caplog):
    """Three requests in one micro-batch, one naming an adapter that no longer loads: only that one fails; the others
    get the very images they get alone. Prompts the pipeline cannot encode are refused before batching."""
    client, app, _, _ = server
    root = assets["root"]
    shutil.copy(assets["b"]["diffusers"], root / "broken.safetensors")
    assert client.post("/v1/adapters", json={"path": "broken.safetensors"}).status_code == 201
    (root / "broken.safetensors").write_bytes(b"\x00" * 64)  # corrupted after registration
    bodies = [
        {"prompt": "a red square", "seed": 11, "adapters": [{"name": "style_a"}]},
        {"prompt": "a blue sky", "seed": 12, "adapters": [{"name": "broken"}]},
        {"prompt": "a green tree", "seed": 13},
    ]
    alone = [generate(client, **bodies[0]), None, generate(client, **bodies[2])]
    worker = app.state.worker
    with caplog.at_level(logging.WARNING, logger="fastdiff.serve"), ThreadPoolExecutor(3) as pool:
        with worker_held(worker):
            futures = [pool.submit(client.post, GEN, json=body) for body in bodies]
            wait_until(lambda: worker.depth == 3)  # all three wait: they are gathered into one batch
        together = [f.result() for f in futures]
    assert "a batch of 3 requests failed" in caplog.text and "running each alone" in caplog.text
    assert_openai_error(together[1], 500, "adapter 'broken' could not be loaded")
    for i in (0, 2):
        assert together[i].status_code == 200, together[i].text
        assert together[i].json()["data"][0]["b64_json"] == alone[i]["data"][0]["b64_json"], i
    assert client.delete("/v1/adapters/broken").status_code == 204

    for prompt in ("\\ud800", "a\\u0000b"):  # JSON escapes: a lone surrogate, a NUL character
        r = post_raw(client, GEN, f'{{"prompt": "{prompt}"}}'.encode())
        assert_openai_error(r, 422, "prompt", param="prompt")
    r = post_raw(client, GEN, b'{"prompt": "x", "negative_prompt": "\\udfff"}')
    assert_openai_error(r, 422, "lone surrogate", param="negative_prompt")


# 2 -------------------------------------------------------------------------------------------------------------------
def test_adapters_are_checked_against_the_base_at_registration_and_start_up(server, assets):
    """A LoRA of another family (SD1.5 on SDXL: the tiny UNets share module names, not shapes) or one with a tensor
    of a wrong shape is a 400 naming the first mismatched key; the start-up scan skipped both with the reason."""
    client, _, _, _ = server
    root = assets["root"]
    shutil.copy(assets["sd15"]["diffusers"], root / "sd15.safetensors")
    shutil.copy(assets["sd15"]["kohya"], root / "sd15_kohya.safetensors")
    shutil.copy(assets["wrong_shape"], root / "wrong_shape.safetensors")
    first_sd15 = "down_blocks.1.attentions.0.proj_in"  # a Linear in SDXL, a 1x1 conv in SD1.5
    for path, key in (
        ("sd15.safetensors", f"unet.{first_sd15}.lora_A.weight"),
        ("sd15_kohya.safetensors", f"lora_unet_{first_sd15.replace('.', '_')}.lora_down.weight"),
        ("wrong_shape.safetensors", assets["bad_key"]),
    ):
        r = client.post("/v1/adapters", json={"path": path})
        error = assert_openai_error(r, 400, f"LoRA key {key!r} has shape")
        assert "needs (" in error["message"], error
    listed = client.get("/v1/adapters").json()
    names = {a["name"] for a in listed["data"]}
    assert {"style_a", "style_b"} <= names and not names & {"sd15", "wrong_shape", "sd15_at_start"}
    skipped = {s["path"].rsplit("/", 1)[-1]: s["error"] for s in listed["skipped"]}
    assert "has shape" in skipped["sd15_at_start.safetensors"]
    assert assets["bad_key"] in skipped["wrong_shape_at_start.safetensors"]


# 3 -------------------------------------------------------------------------------------------------------------------
def test_bad_values_and_paths_are_4xx_in_the_openai_shape(server, assets):
    client, _, _, _ = server
    for body, param in (
        (b'{"prompt": "x", "guidance_scale": NaN}', "guidance_scale"),
        (b'{"prompt": "x", "guidance_scale": Infinity}', "guidance_scale"),
        (b'{"prompt": "x", "guidance_scale": -Infinity}', "guidance_scale"),
        (b'{"prompt": "x", "adapters": [{"name": "style_a", "weight": NaN}]}', "adapters.0.weight"),
        (b'{"prompt": "x", "adapters": [{"name": "style_a", "weight": Infinity}]}', "adapters.0.weight"),
    ):
        assert_openai_error(post_raw(client, GEN, body), 422, "finite number", param=param)
    assert_openai_error(post_raw(client, GEN, b"{not json"), 422, "not valid JSON")
    assert_openai_error(client.post(GEN, json={"prompt": "x", "stepz": 1}), 422, "stepz", param="stepz")
    error = assert_openai_error(client.post(GEN, json={"prompt": "x", "n": 9}), 422, "n=9", param="n")
    assert error["type"] == "invalid_request_error" and error["code"] == "unprocessable_entity"
    assert_openai_error(
        client.post(GEN, json={"prompt": "x", "adapters": [{"name": "nope"}]}), 404, "unknown"
    )
    r = client.post(GEN, json={"prompt": "x"}, headers={"Authorization": "Bearer wrong"})
    assert assert_openai_error(r, 401, "bearer token")["type"] == "authentication_error"
    assert r.headers["www-authenticate"] == "Bearer"
    assert_openai_error(client.post(GEN, json={"prompt": "x" * 5000}), 413, "4096 bytes")
    assert_openai_error(client.get("/no/such/path"), 404, "Not Found")
    # adapter paths that cannot even be looked up: a NUL, symlink loops, a name over 255 bytes; a lone surrogate
    # is not a string pydantic takes
    for raw in (b'"a\\u0000b.safetensors"', b'"loop.safetensors"', b'"dirloop/x.safetensors"',
                ('"' + "x" * 300 + '.safetensors"').encode()):  # fmt: skip
        r = post_raw(client, "/v1/adapters", b'{"path": ' + raw + b"}")
        assert_openai_error(r, 400, "not a usable path")
    r = post_raw(client, "/v1/adapters", b'{"path": "\\ud800.safetensors"}')
    assert_openai_error(r, 422, "path: Input should be a valid string", param="path")
    r = post_raw(client, "/v1/adapters", b'{"path": "style_a.safetensors", "name": "\\ud800"}')
    assert_openai_error(r, 422, "not allowed")
    r = client.post("/v1/adapters", json={"path": "style_a.safetensors", "name": "ok\n"})
    assert_openai_error(r, 422, "not allowed")
    # the standard OpenAI parameters are accepted (and ignored)
    plain = generate(client, seed=5)
    openai_style = generate(client, seed=5, user="u-1", quality="standard", style="vivid", model="dall-e-2")
    assert openai_style["data"][0]["b64_json"] == plain["data"][0]["b64_json"]


def test_the_official_openai_client_shows_the_server_s_messages(server):
    openai = pytest.importorskip("openai")
    _, _, port, _ = server
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=TOKEN, max_retries=0)
    out = client.images.generate(model="base", prompt="a red square", n=2, size="64x64",
                                 response_format="b64_json", quality="standard", style="natural", user="me",
                                 extra_body={"seed": 1, "adapters": [{"name": "style_a"}]})  # fmt: skip
    assert len(out.data) == 2 and out.data[0].b64_json
    with pytest.raises(openai.UnprocessableEntityError) as e:
        client.images.generate(model="base", prompt="x", n=9)
    assert "n=9 is over the server's limit of 4" in str(e.value)
    with pytest.raises(openai.NotFoundError) as e:
        client.images.generate(model="base", prompt="x", extra_body={"adapters": [{"name": "nope"}]})
    assert "unknown adapter 'nope'" in str(e.value)


# 4 -------------------------------------------------------------------------------------------------------------------
def test_a_symlink_swapped_in_after_registration_is_not_loaded(server, assets):
    """The file registered is replaced by a symlink to a LoRA outside the root: the load resolves the path again and
    refuses it (the image the outside LoRA would give is never made). The start-up scan skipped the loops."""
    client, app, _, _ = server
    root, outside = assets["root"], assets["tmp"] / "outside.safetensors"
    shutil.copy(assets["b"]["diffusers"], outside)
    shutil.copy(assets["a"]["diffusers"], root / "swap.safetensors")
    assert client.post("/v1/adapters", json={"path": "swap.safetensors"}).status_code == 201
    (root / "swap.safetensors").unlink()
    (root / "swap.safetensors").symlink_to(outside)
    with unet_calls(app) as calls:
        r = client.post(GEN, json={"prompt": "x", "adapters": [{"name": "swap"}]})
    assert_openai_error(r, 500, "outside the adapters root")
    assert calls == []
    assert client.delete("/v1/adapters/swap").status_code == 204
    skipped = {s["path"].rsplit("/", 1)[-1]: s["error"] for s in client.get("/v1/adapters").json()["skipped"]}
    assert "loop.safetensors" in skipped and "loop2.safetensors" in skipped


# 5 -------------------------------------------------------------------------------------------------------------------
def test_a_public_host_needs_a_token_or_insecure(monkeypatch, capsys):
    from fastdiff.cli import main

    monkeypatch.delenv("FASTDIFF_SERVE_TOKEN", raising=False)
    for host in ("0.0.0.0", "::", "192.168.1.5", "example.org"):
        with pytest.raises(ExposureError, match="--insecure"):
            check_exposure(ServeConfig(base="b", adapters="a", host=host))
        check_exposure(ServeConfig(base="b", adapters="a", host=host, token="t"))
        check_exposure(ServeConfig(base="b", adapters="a", host=host, insecure=True))
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        check_exposure(ServeConfig(base="b", adapters="a", host=host))
    monkeypatch.setenv("FASTDIFF_SERVE_TOKEN", "t")
    check_exposure(ServeConfig(base="b", adapters="a", host="0.0.0.0"))
    monkeypatch.delenv("FASTDIFF_SERVE_TOKEN")
    with pytest.raises(SystemExit) as e:  # refused before anything loads (the base does not exist)
        main(["serve", "--base", "nowhere", "--adapters", "nowhere", "--host", "0.0.0.0"])
    assert e.value.code == 2 and "--insecure" in capsys.readouterr().err

    import fastdiff.serve.app as app_module

    seen = []
    monkeypatch.setattr(app_module, "serve", seen.append)
    main(["serve", "--base", "b", "--adapters", "a", "--host", "0.0.0.0", "--insecure",
          "--generation-timeout-s", "30", "--header-timeout-s", "2"])  # fmt: skip
    assert seen[0].insecure and seen[0].generation_timeout_s == 30 and seen[0].header_timeout_s == 2


def test_a_post_that_is_not_json_is_415(server):
    client, _, _, _ = server
    body = b'{"prompt": "x"}'
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data", None):
        for path in (GEN, "/v1/adapters"):
            assert_openai_error(post_raw(client, path, body, content_type), 415, "application/json")
    r = post_raw(client, GEN, b'{"prompt": "x", "seed": 1}', "Application/JSON; charset=utf-8")
    assert r.status_code == 200, r.text


def test_a_generation_past_the_timeout_is_504_and_dropped(server):
    client, app, _, cfg = server
    with unet_calls(app) as one:
        generate(client, seed=2)
    cfg.generation_timeout_s = 0.3  # the app reads its config per request
    try:
        with unet_calls(app) as calls:
            with worker_held(app.state.worker):
                t0 = time.monotonic()
                r = client.post(GEN, json={"prompt": "x", "seed": 1})
                assert time.monotonic() - t0 < 10
            assert_openai_error(r, 504, "did not finish within")
            cfg.generation_timeout_s = 300.0
            generate(client, seed=2)  # served after the job that timed out (one queue): that one never ran
        assert len(calls) == len(one) > 0
    finally:
        cfg.generation_timeout_s = 300.0


def test_a_request_whose_client_left_is_dropped_before_it_runs(server):
    client, app, port, _ = server
    body = json.dumps({"prompt": "x", "seed": 1}).encode()
    head = (f"POST {GEN} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()  # fmt: skip
    status_499 = f'fastdiff_requests_total{{method="POST",path="{GEN}",status="499"}}'
    left = metric(client, status_499)
    worker = app.state.worker
    with unet_calls(app) as one:
        generate(client, seed=2)
    with unet_calls(app) as calls:
        with worker_held(worker):
            with socket.create_connection(("127.0.0.1", port)) as s:
                s.sendall(head + body)
                wait_until(lambda: worker.depth == 1)
            wait_until(lambda: metric(client, status_499) == left + 1)  # the server saw the client go
        generate(client, seed=2)  # served after the abandoned job (one queue): that one never ran
    assert len(calls) == len(one) > 0


def test_a_connection_must_send_its_request_head_in_time():
    """The header-read timeout: a client trickling its head, or sending nothing, is disconnected; one that sends its
    head in time is served, and its keep-alive connection is closed when idle as long."""

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    cfg = ServeConfig(base="", adapters="", header_timeout_s=0.5)
    with serving(cfg, app=app, lifespan="off") as (_, _, port):

        def seconds_until_closed(trickle: bytes) -> float:
            t0 = time.monotonic()
            with socket.create_connection(("127.0.0.1", port)) as s:
                s.settimeout(0.1)
                for i in range(100):
                    try:
                        if i < len(trickle):
                            s.sendall(trickle[i : i + 1])
                        if s.recv(1024) == b"":
                            return time.monotonic() - t0
                    except TimeoutError:
                        continue
                    except OSError:  # reset, or a broken pipe: closed as well
                        return time.monotonic() - t0
            return float("inf")

        assert seconds_until_closed(b"") < 3
        assert seconds_until_closed(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"y" * 60) < 3
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            s.settimeout(5)
            response = s.recv(1024)
            while not response.endswith(b"\r\n\r\nok"):
                chunk = s.recv(1024)
                assert chunk, response
                response += chunk
            assert response.startswith(b"HTTP/1.1 200")
            t0 = time.monotonic()
            assert s.recv(1024) == b"" and time.monotonic() - t0 < 3
