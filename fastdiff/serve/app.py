"""The HTTP server: one base pipeline, many LoRA adapters chosen per request (FastAPI + uvicorn).

Endpoints:
- ``POST /v1/images/generations``: OpenAI-images-style (``prompt``, ``n``, ``size``, ``response_format=b64_json``)
  plus ``adapters`` ([{name, weight}]), ``steps``, ``guidance_scale``, ``negative_prompt``, ``seed``.
- ``GET /v1/adapters``, ``POST /v1/adapters`` ({path, name?}: a file or folder inside the adapters root),
  ``DELETE /v1/adapters/{name}``.
- ``GET /healthz`` (never needs the token), ``GET /metrics`` (Prometheus text).

A request naming a multi-student export (its recipe's ``students``) is routed by its prompt to one student, whose
LoRA serves all its images; the response's ``fastdiff.student`` says which (null for other requests). A request
for a step count an export was not trained for is a 422 naming the counts it was; one asking CFG of an export trained
without it is served, with the response's ``warnings`` saying so.

Every error body has the OpenAI API's shape, ``{"error": {"message", "type", "param", "code"}}`` (so OpenAI
clients show the message), and every JSON body is ASCII (a lone surrogate in a client's string cannot break it).
The OpenAI parameters ``user``, ``quality`` and ``style`` are accepted and ignored.

Statuses: 400 a path or file that cannot be registered (outside the root, unreadable, a NUL byte, a symlink loop,
a name too long; a LoRA whose keys or tensor shapes do not fit the base UNet, naming the first such key);
401 missing/wrong bearer token; 404 unknown adapter; 409 adapter name taken; 413 request body or adapter file over
the limit; 415 a POST whose Content-Type is not application/json (a web page cannot send one without the browser
asking first); 422 a field out of range, non-finite or malformed, or a prompt that cannot be encoded (a lone
surrogate, a NUL character), refused before it joins a batch; 503 queue full; 504 a generation not done within
``generation_timeout_s`` (the job is dropped if not yet started, its images thrown away otherwise); 500 a
generation that failed (e.g. an adapter file corrupted after registration, or now resolving outside the root). A
failed batch of several requests is run again request by request, so only the culprit gets its 500
(``worker.py``). A request whose client went away before its job ran is dropped unrun (counted as status 499).

Exposure: ``serve`` refuses a non-loopback ``--host`` without a token unless ``--insecure``. uvicorn closes idle
keep-alive connections after 5 s (its ``timeout_keep_alive``) and refuses a request head over h11's 16 KiB
(``h11_max_incomplete_event_size``), but has no timeout on a client sending its head slowly: the server's h11
protocol (``header_timeout_protocol``) closes a connection whose request head is not complete ``header_timeout_s``
after it opened or after its previous response.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hmac
import io
import ipaddress
import json
import logging
import os
import re
import secrets
import time
from concurrent.futures import Future
from contextlib import asynccontextmanager
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Literal

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..recipe import Recipe
from .adapters import Registry, RequestError, Sampling, sampling_for
from .metrics import CONTENT_TYPE, Metrics
from .worker import BatchKey, Job, Unavailable, Worker

logger = logging.getLogger("fastdiff.serve")
TOKEN_ENV = "FASTDIFF_SERVE_TOKEN"
MAX_SEED = 2**62


@dataclass
class ServeConfig:
    """Everything ``fastdiff serve`` takes. Limits are inclusive maxima."""

    base: str
    adapters: str
    host: str = "127.0.0.1"
    port: int = 8000
    token: str | None = None  # bearer token; default: $FASTDIFF_SERVE_TOKEN; none: no auth
    device: str | None = None  # default: cuda if available, else cpu
    dtype: str | None = None  # float32 | float16 | bfloat16; default: float16 on cuda, float32 on cpu
    cache_size: int = 8  # adapters kept loaded (LRU)
    max_batch_images: int = 8  # images per pipeline call; 1 turns micro-batching off
    batch_window_ms: float = 10.0  # how long a batch waits for more requests after its first
    mix_adapters: bool = True  # batch requests of different adapter sets and weights together (one UNet call)
    max_queue: int = 64
    default_steps: int = 25  # for requests without a fastdiff export adapter
    default_guidance_scale: float = 5.0
    max_steps: int = 50
    max_n: int = 4
    max_size: int = 1024  # pixels, each side
    max_prompt_chars: int = 2000
    max_guidance_scale: float = 30.0
    max_body_bytes: int = 1 << 20
    max_adapter_bytes: int = 2 << 30
    generation_timeout_s: float = 300.0  # a request whose images are not done by then gets 504
    header_timeout_s: float = 10.0  # to send a request head in (header_timeout_protocol)
    insecure: bool = False  # allow a non-loopback host without a token
    log_level: str = "info"


class ExposureError(ValueError):
    """A server reachable from other machines, without a token, and not started with ``insecure``."""


def check_exposure(config: ServeConfig) -> None:
    """Refuse a host reachable from other machines without a bearer token, unless ``config.insecure``."""
    if config.insecure or _token(config) is not None or _is_loopback(config.host):
        return
    raise ExposureError(
        f"--host {config.host} is reachable from other machines, and no --token (or ${TOKEN_ENV}) is set: give "
        "a token, or --insecure to serve anyone who can connect"
    )


def _token(config: ServeConfig) -> str | None:
    return config.token if config.token is not None else os.environ.get(TOKEN_ENV) or None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def error_body(status: int, message: str, param: str | None = None) -> dict:
    """An error in the OpenAI API's shape: ``type`` from the status class, ``code`` the status's name."""
    kind = "server_error" if status >= 500 else "invalid_request_error"
    if status == 401:
        kind = "authentication_error"
    try:
        code = HTTPStatus(status).phrase.lower().replace(" ", "_")
    except ValueError:
        code = None
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class ASCIIJSONResponse(JSONResponse):
    """JSON with every non-ASCII character escaped, so a lone surrogate (a client's string, an odd file name) in a
    message cannot make the body itself fail to encode."""

    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


def _error(status: int, message: str, param: str | None = None, headers=None) -> ASCIIJSONResponse:
    return ASCIIJSONResponse(error_body(status, message, param), status_code=status, headers=headers)


class AdapterRef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=64)
    weight: float | None = Field(default=None, ge=-10.0, le=10.0, allow_inf_nan=False)


class GenerationRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: str
    n: int = Field(default=1, ge=1)
    size: str | None = None
    response_format: Literal["b64_json"] = "b64_json"
    adapters: list[AdapterRef] = Field(default_factory=list)
    steps: int | None = Field(default=None, ge=1)
    guidance_scale: float | None = Field(default=None, ge=0.0, allow_inf_nan=False)
    negative_prompt: str | None = None
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    model: str | None = None  # OpenAI clients send it; the served model is the server's base
    user: str | None = None  # OpenAI parameters that mean nothing here: accepted and ignored
    quality: str | None = None
    style: str | None = None


class RegisterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str = Field(min_length=1, max_length=4096)
    name: str | None = None


def _path_label(path: str) -> str:
    if path.startswith("/v1/adapters/"):
        return "/v1/adapters/{name}"
    if path in ("/v1/images/generations", "/v1/adapters", "/healthz", "/metrics"):
        return path
    return "other"


def _is_json(content_type: bytes | None) -> bool:
    return content_type is not None and content_type.split(b";")[0].strip().lower() == b"application/json"


class _Middleware:
    """Pure ASGI: refuse bodies over ``max_body_bytes`` (413) and POSTs that are not JSON (415), and count every
    response by path and status."""

    def __init__(self, app, metrics: Metrics, max_body_bytes: int):
        self.app = app
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        path = _path_label(scope["path"])
        status = {"code": 500}

        async def send_counted(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        async def reject(code: int, message: str):
            await _error(code, message)(scope, receive, send_counted)

        headers = dict(scope["headers"])
        length = headers.get(b"content-length")
        try:
            if length is not None and int(length) > self.max_body_bytes:
                await reject(413, f"request body is over the server's limit of {self.max_body_bytes} bytes")
                return
            if scope["method"] == "POST" and not _is_json(headers.get(b"content-type")):
                await reject(415, "a POST body must be JSON, sent with Content-Type: application/json")
                return
            received = 0

            async def limited_receive():  # bodies without a content-length (chunked)
                nonlocal received
                message = await receive()
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise HTTPException(
                        413, f"request body is over the server's limit of {self.max_body_bytes} bytes"
                    )
                return message

            await self.app(scope, limited_receive, send_counted)
        finally:
            seconds = time.perf_counter() - t0 if path == "/v1/images/generations" else None
            self.metrics.observe_request(scope["method"], path, status["code"], seconds)


def _check_text(field_name: str, text: str, limit: int) -> None:
    """A prompt the pipeline can encode: at most ``limit`` characters, no NUL, no lone surrogate (422 otherwise:
    refused here, it cannot fail the batch it would have joined)."""
    if len(text) > limit:
        raise RequestError(
            422, f"{field_name} has {len(text)} characters; the server's limit is {limit}", field_name
        )
    nul = text.find("\x00")
    if nul >= 0:
        raise RequestError(422, f"{field_name} holds a NUL character (at character {nul})", field_name)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RequestError(
            422,
            f"{field_name} is not valid Unicode text: a lone surrogate at character {e.start}",
            field_name,
        ) from None


def _parse_size(size: str | None, default: int, limit: int) -> tuple[int, int]:
    if size is None:
        return default, default
    m = re.fullmatch(r"(\d{1,5})x(\d{1,5})", size.strip())
    if not m:
        raise RequestError(
            422, f"size {size!r} is not WIDTHxHEIGHT in pixels, e.g. '{default}x{default}'", "size"
        )
    w, h = int(m.group(1)), int(m.group(2))
    if not (8 <= w <= limit and 8 <= h <= limit) or w % 8 or h % 8:
        raise RequestError(
            422, f"size {size!r}: each side must be a multiple of 8 between 8 and {limit} pixels", "size"
        )
    return w, h


def load_pipeline(base: str, device: str | None = None, dtype: str | None = None):
    """The base pipeline, once: a local diffusers folder (SD1.5 / SDXL), safetensors only, offline."""
    import torch
    from diffusers import DiffusionPipeline

    from ..teacher import TeacherError, check_pipeline_folder

    try:
        check_pipeline_folder(base)
    except TeacherError as e:
        raise TeacherError(f"--base: {e}") from None
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    name = dtype or ("float16" if device.startswith("cuda") else "float32")
    if name not in dtypes:
        raise ValueError(f"dtype {name!r}: expected one of {sorted(dtypes)}")
    pipe = DiffusionPipeline.from_pretrained(
        base, dtype=dtypes[name], use_safetensors=True, local_files_only=True
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def create_app(config: ServeConfig, pipe=None):
    """The FastAPI app. ``pipe`` (default: loaded from ``config.base``) is owned by the inference worker, which
    runs while the app's lifespan does (uvicorn runs it)."""
    from ..models.lora import LoRAFormatError, validate_lora_file
    from ..recipe import check_lora_folder

    if config.cache_size < 1 or config.max_batch_images < 1:
        raise ValueError("cache_size and max_batch_images must be at least 1")
    if pipe is None:
        pipe = load_pipeline(config.base, config.device, config.dtype)
    token = _token(config)
    metrics = Metrics()
    worker_box: dict = {}

    def check(path) -> None:
        """A LoRA's target modules must exist in the base UNet, its tensors must have the shapes those modules
        need, and a LoRA recording its base (an export's) must be on that base (read on the worker thread once it
        runs)."""
        worker = worker_box.get("worker")

        def fn(p):
            validate_lora_file(path, p.unet)
            try:
                check_lora_folder(p.unet, path)
            except ValueError as e:
                raise LoRAFormatError(f"{e} (the server's --base is {config.base})") from None

        worker.call(fn) if worker is not None else fn(pipe)

    registry = Registry(config.adapters, dict(pipe.scheduler.config), config.max_adapter_bytes, check)
    registry.scan()
    worker = Worker(
        pipe,
        config.cache_size,
        config.max_batch_images,
        config.batch_window_ms / 1000,
        config.max_queue,
        metrics,
        lambda a: a in registry,
        config.mix_adapters,
        registry.loadable,
    )
    worker_box["worker"] = worker
    default_size = int(pipe.unet.config.sample_size * pipe.vae_scale_factor)

    @asynccontextmanager
    async def lifespan(app):
        worker.start()
        logger.info("serving %s with %d adapter(s) from %s", config.base, len(registry.list()), registry.root)
        try:
            yield
        finally:
            await run_in_threadpool(worker.stop)

    app = FastAPI(title="fastdiff serve", lifespan=lifespan, default_response_class=ASCIIJSONResponse)
    app.state.registry, app.state.worker, app.state.metrics, app.state.pipe = registry, worker, metrics, pipe
    app.add_middleware(_Middleware, metrics=metrics, max_body_bytes=config.max_body_bytes)

    @app.exception_handler(RequestError)
    async def request_error(request: Request, exc: RequestError):
        return _error(exc.status, exc.message, exc.param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return _error(exc.status_code, str(exc.detail), headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        """422 naming each bad field and why, never echoing the value (it may be NaN or a lone surrogate)."""
        problems, params = [], []
        for e in exc.errors():
            loc = [str(x) for x in e["loc"] if x != "body"]
            if e["type"] == "json_invalid":
                problems.append(f"the body is not valid JSON ({(e.get('ctx') or {}).get('error', e['msg'])})")
                continue
            params.append(".".join(loc) or None)
            problems.append(f"{'.'.join(loc) or 'body'}: {e['msg']}")
        return _error(422, "; ".join(problems), params[0] if params else None)

    @app.exception_handler(Exception)
    async def failed(request: Request, exc: Exception):
        return _error(500, f"internal server error ({type(exc).__name__})")

    def auth(request: Request) -> None:
        if token is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            raise HTTPException(
                401,
                "missing or wrong bearer token (Authorization: Bearer <token>)",
                {"WWW-Authenticate": "Bearer"},
            )

    def plan(req) -> tuple[BatchKey, int, list[str]]:
        """The batch key and seed of a request, and the warnings its answer carries (CFG asked of an export
        trained without it)."""
        c = config
        warnings = []
        if req.n > c.max_n:
            raise RequestError(
                422, f"n={req.n} is over the server's limit of {c.max_n} images per request", "n"
            )
        for field_name in ("prompt", "negative_prompt"):
            text = getattr(req, field_name)
            if text is not None:
                _check_text(field_name, text, c.max_prompt_chars)
        if req.steps is not None and req.steps > c.max_steps:
            raise RequestError(422, f"steps={req.steps} is over the server's limit of {c.max_steps}", "steps")
        if req.guidance_scale is not None and req.guidance_scale > c.max_guidance_scale:
            raise RequestError(
                422,
                f"guidance_scale={req.guidance_scale} is over the server's limit of {c.max_guidance_scale}",
                "guidance_scale",
            )
        width, height = _parse_size(req.size, default_size, c.max_size)
        names = [a.name for a in req.adapters]
        if len(set(names)) != len(names):
            raise RequestError(422, f"adapters: each adapter may appear once, got {names}", "adapters")
        if len(names) > c.cache_size:
            raise RequestError(
                422, f"adapters: at most {c.cache_size} per request (the server's cache size)", "adapters"
            )
        chosen = [(registry.get(a.name), a.weight) for a in req.adapters]
        exports = [a for a, _ in chosen if a.recipe is not None]
        if len(exports) > 1:
            raise RequestError(
                422,
                f"adapters: at most one fastdiff export per request (its recipe sets the sampler), got {[a.name for a in exports]}",
                "adapters",
            )
        if exports:
            try:
                sampling = sampling_for(exports[0], req.steps, req.guidance_scale)
            except ValueError as e:
                raise RequestError(422, str(e), "steps") from None
            warning = Recipe.from_json(exports[0].recipe).cfg_warning(req.guidance_scale)
            if warning:
                logger.warning("%s: %s", exports[0].name, warning)
                warnings.append(f"{exports[0].name}: {warning}")
        else:
            steps = c.default_steps if req.steps is None else req.steps
            guidance = c.default_guidance_scale if req.guidance_scale is None else req.guidance_scale
            sampling = Sampling(steps, float(guidance))
        weights = tuple((a, a.default_weight if w is None else float(w)) for a, w in chosen)
        key = BatchKey(weights, sampling, width, height, req.negative_prompt is not None)
        seed = secrets.randbelow(MAX_SEED) if req.seed is None else req.seed
        return key, seed, warnings

    def encode(images) -> list[str]:
        out = []
        for img in images:
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            out.append(base64.b64encode(buf.getvalue()).decode("ascii"))
        return out

    async def route(key: BatchKey, prompt: str) -> tuple[BatchKey, int | None]:
        """A multi-student export's request: the student serving ``prompt`` (routed on the worker thread) and
        the key sampling with its LoRA, so a micro-batch never mixes two students."""
        adapter = next((a for a, _ in key.adapters if a.students), None)
        if adapter is None:
            return key, None
        if not worker.is_alive():
            raise HTTPException(503, "the inference worker is not running", {"Retry-After": "1"})
        try:
            student = await asyncio.wrap_future(worker.student_for(adapter, prompt))
        except Exception as e:
            raise HTTPException(
                500, f"routing to a student of {adapter.name!r} failed: {type(e).__name__}: {e}"
            ) from None
        sampling = dataclasses.replace(key.sampling, lora=adapter.student_lora(student))
        return dataclasses.replace(key, sampling=sampling), student

    async def outcome(request: Request, future: Future):
        """The job's images, or None if the client went away first; 504 past ``generation_timeout_s``. Either
        way the job is cancelled: the worker drops it unrun if it has not taken it yet."""
        result = asyncio.wrap_future(future)
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            done, _ = await asyncio.wait(
                {result, gone}, timeout=config.generation_timeout_s, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            gone.cancel()
        if result in done:
            try:
                return result.result()
            except Exception as e:
                raise HTTPException(500, f"generation failed: {type(e).__name__}: {e}") from None
        result.cancel()  # cancels the job too, unless it runs already (then its images are thrown away)
        if gone in done:
            return None
        raise HTTPException(
            504, f"the generation did not finish within the server's limit of {config.generation_timeout_s} s"
        )

    @app.post("/v1/images/generations", dependencies=[Depends(auth)])
    async def generations(req: GenerationRequest, request: Request):
        key, seed, warnings = plan(req)
        key, student = await route(key, req.prompt)
        job = Job(key, req.prompt, req.negative_prompt, req.n, seed)
        try:
            future = worker.submit(job)
        except Unavailable as e:
            raise HTTPException(503, str(e), {"Retry-After": "1"}) from None
        images = await outcome(request, future)
        if images is None:  # nobody to answer; 499 (nginx's "client closed request") counts it in /metrics
            return Response(status_code=499)
        b64 = await run_in_threadpool(encode, images)
        s = key.sampling
        return {
            "created": int(time.time()),
            "data": [{"b64_json": b, "seed": seed + i} for i, b in enumerate(b64)],
            "fastdiff": {
                "adapters": [{"name": a.name, "weight": w} for a, w in key.adapters],
                "num_inference_steps": s.num_inference_steps,
                "guidance_scale": s.guidance_scale,
                "scheduler": s.scheduler or type(worker.base_scheduler).__name__,
                "timesteps": list(s.timesteps) if s.timesteps else None,
                "size": f"{key.width}x{key.height}",
                "seed": seed,
                "batch_images": job.batch_images,
                "student": student,
            },
            "warnings": warnings,
        }

    @app.get("/v1/adapters", dependencies=[Depends(auth)])
    def list_adapters():
        return {
            "data": [{**a.describe(), "loaded": a.uid in worker.loaded_uids} for a in registry.list()],
            "skipped": registry.skipped,
            "root": str(registry.root),
        }

    @app.post("/v1/adapters", status_code=201, dependencies=[Depends(auth)])
    def register(req: RegisterRequest):
        return registry.register(req.path, req.name).describe()

    @app.delete("/v1/adapters/{name}", status_code=204, dependencies=[Depends(auth)])
    def delete(name: str):
        registry.remove(name)
        worker.sweep()
        return Response(status_code=204)

    @app.get("/healthz")
    def healthz():
        alive = worker.is_alive()
        body = {
            "status": "ok" if alive else "worker stopped",
            "adapters": len(registry.list()),
            "queue_depth": worker.depth,
        }
        return JSONResponse(body, status_code=200 if alive else 503)

    @app.get("/metrics", dependencies=[Depends(auth)])
    def prometheus():
        text = metrics.render(worker.depth, len(worker.loaded_uids), len(registry.list()))
        return Response(text, media_type=CONTENT_TYPE)

    return app


async def _disconnected(request: Request) -> None:
    """Return once the client has gone away (its body is read: what ``receive`` gives now is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def header_timeout_protocol(seconds: float):
    """uvicorn's h11 protocol, closing a connection whose request head (request line and headers) is not complete
    ``seconds`` after the connection opened or after its previous response. uvicorn's own ``timeout_keep_alive``
    runs only between requests and stops at the first byte received, so a client sending its head a byte at a time
    would otherwise hold the connection open forever."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderTimeoutH11Protocol(H11Protocol):
        _head_timer = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:  # the head is in
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
                self._arm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self._head_timer = self.loop.call_later(seconds, self._head_timeout)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timeout(self) -> None:
            self._head_timer = None
            if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
                self.transport.close()

    return HeaderTimeoutH11Protocol


def uvicorn_config(app, config: ServeConfig, **kwargs):
    """The ``uvicorn.Config`` serving ``app``: ``config``'s host, port and log level, and the h11 protocol with
    the header-read timeout (``kwargs`` go to uvicorn, e.g. ``log_level``)."""
    import uvicorn

    settings = dict(host=config.host, port=config.port, log_level=config.log_level)
    return uvicorn.Config(
        app, http=header_timeout_protocol(config.header_timeout_s), **{**settings, **kwargs}
    )


def serve(config: ServeConfig) -> None:
    """Check the exposure, load the base, register the adapters and serve until interrupted."""
    import uvicorn

    check_exposure(config)
    logging.basicConfig(
        level=config.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    if not Path(config.adapters).is_dir():
        raise FileNotFoundError(f"adapters folder not found: {config.adapters}")
    app = create_app(config)
    uvicorn.Server(uvicorn_config(app, config)).run()
