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

Statuses: 401 missing/wrong bearer token; 404 unknown adapter; 409 adapter name taken; 400 a path or file that
cannot be registered; 413 request body or adapter file over the limit; 422 a field out of range or malformed;
503 queue full; 500 a generation that failed (the server keeps serving).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hmac
import io
import logging
import os
import re
import secrets
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

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
    mix_adapters: bool = True  # batch requests of different single adapters together
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
    log_level: str = "info"


class AdapterRef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=64)
    weight: float | None = Field(default=None, ge=-10.0, le=10.0)


class GenerationRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: str
    n: int = Field(default=1, ge=1)
    size: str | None = None
    response_format: Literal["b64_json"] = "b64_json"
    adapters: list[AdapterRef] = Field(default_factory=list)
    steps: int | None = Field(default=None, ge=1)
    guidance_scale: float | None = Field(default=None, ge=0.0)
    negative_prompt: str | None = None
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    model: str | None = None  # OpenAI clients send it; the served model is the server's base


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


class _Middleware:
    """Pure ASGI: refuse bodies over ``max_body_bytes`` (413) and count every response by path and status."""

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

        async def reject():
            msg = f"request body is over the server's limit of {self.max_body_bytes} bytes"
            await JSONResponse({"detail": msg}, status_code=413)(scope, receive, send_counted)

        length = dict(scope["headers"]).get(b"content-length")
        try:
            if length is not None and int(length) > self.max_body_bytes:
                await reject()
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


def _parse_size(size: str | None, default: int, limit: int) -> tuple[int, int]:
    if size is None:
        return default, default
    m = re.fullmatch(r"(\d{1,5})x(\d{1,5})", size.strip())
    if not m:
        raise RequestError(422, f"size {size!r} is not WIDTHxHEIGHT in pixels, e.g. '{default}x{default}'")
    w, h = int(m.group(1)), int(m.group(2))
    if not (8 <= w <= limit and 8 <= h <= limit) or w % 8 or h % 8:
        raise RequestError(
            422, f"size {size!r}: each side must be a multiple of 8 between 8 and {limit} pixels"
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
    token = config.token if config.token is not None else os.environ.get(TOKEN_ENV) or None
    metrics = Metrics()
    worker_box: dict = {}

    def check(path) -> None:
        """A LoRA's target modules must exist in the base UNet, and a LoRA recording its base (an export's) must
        be on that base (read on the worker thread once it runs)."""
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

    app = FastAPI(title="fastdiff serve", lifespan=lifespan)
    app.state.registry, app.state.worker, app.state.metrics, app.state.pipe = registry, worker, metrics, pipe
    app.add_middleware(_Middleware, metrics=metrics, max_body_bytes=config.max_body_bytes)

    @app.exception_handler(RequestError)
    async def adapter_error(request: Request, exc: RequestError):
        return JSONResponse({"detail": exc.message}, status_code=exc.status)

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
            raise RequestError(422, f"n={req.n} is over the server's limit of {c.max_n} images per request")
        for field_name in ("prompt", "negative_prompt"):
            text = getattr(req, field_name)
            if text is not None and len(text) > c.max_prompt_chars:
                raise RequestError(
                    422,
                    f"{field_name} has {len(text)} characters; the server's limit is {c.max_prompt_chars}",
                )
        if req.steps is not None and req.steps > c.max_steps:
            raise RequestError(422, f"steps={req.steps} is over the server's limit of {c.max_steps}")
        if req.guidance_scale is not None and req.guidance_scale > c.max_guidance_scale:
            raise RequestError(
                422,
                f"guidance_scale={req.guidance_scale} is over the server's limit of {c.max_guidance_scale}",
            )
        width, height = _parse_size(req.size, default_size, c.max_size)
        names = [a.name for a in req.adapters]
        if len(set(names)) != len(names):
            raise RequestError(422, f"adapters: each adapter may appear once, got {names}")
        if len(names) > c.cache_size:
            raise RequestError(422, f"adapters: at most {c.cache_size} per request (the server's cache size)")
        chosen = [(registry.get(a.name), a.weight) for a in req.adapters]
        exports = [a for a, _ in chosen if a.recipe is not None]
        if len(exports) > 1:
            raise RequestError(
                422,
                f"adapters: at most one fastdiff export per request (its recipe sets the sampler), got {[a.name for a in exports]}",
            )
        if exports:
            try:
                sampling = sampling_for(exports[0], req.steps, req.guidance_scale)
            except ValueError as e:
                raise RequestError(422, str(e)) from None
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

    @app.post("/v1/images/generations", dependencies=[Depends(auth)])
    async def generations(req: GenerationRequest):
        key, seed, warnings = plan(req)
        key, student = await route(key, req.prompt)
        job = Job(key, req.prompt, req.negative_prompt, req.n, seed)
        try:
            future = worker.submit(job)
        except Unavailable as e:
            raise HTTPException(503, str(e), {"Retry-After": "1"}) from None
        try:
            images = await asyncio.wrap_future(future)
        except Exception as e:
            raise HTTPException(500, f"generation failed: {type(e).__name__}: {e}") from None
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


def serve(config: ServeConfig) -> None:
    """Load the base, register the adapters and serve until interrupted."""
    import uvicorn

    logging.basicConfig(
        level=config.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    if not Path(config.adapters).is_dir():
        raise FileNotFoundError(f"adapters folder not found: {config.adapters}")
    app = create_app(config)
    uvicorn.run(app, host=config.host, port=config.port, log_level=config.log_level)
