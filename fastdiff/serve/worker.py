"""The one inference worker: owns the pipeline, its adapter cache and its scheduler, runs micro-batches.

Only this thread touches the pipeline, one batch at a time, so a request never sees another request's adapter
state. A batch is requests that arrive within ``window_s`` of its first one, up to ``max_batch_images`` images, with
the same sampling, size and negative-prompt use (``BatchKey.shared``) and either the same adapter set and weights,
or (``mix_adapters``) any adapter sets and weights, no more distinct adapters than the cache holds: then one UNet
call serves them all, every image getting its own adapters' low-rank updates with its own weights (several summed,
none for a request without adapters) from ``MultiLoRA`` (``_route``). When an adapter has text-encoder LoRA layers
(``MultiLoRA`` covers the UNet only), peft's mixed-adapter batches (``adapter_names``) route the images instead,
which needs one adapter per request and one weight per adapter; a mixed batch that needs more runs as one call per
adapter set. Each image has its own ``torch.Generator`` seeded with ``seed + index``: its noise does not depend on
what it is batched with.

A request fails alone: when a batch of several requests fails (an adapter that does not load, a prompt the
pipeline refuses), each of its requests runs again on its own, so only the culprit gets the error and the others
the images they would have got alone. A job whose future was cancelled before the worker took it (its client left,
or the server stopped waiting for it) is dropped unrun (``Future.set_running_or_notify_cancel``).

Adapters load lazily (``load_lora_weights(adapter_name=...)``) into an LRU cache of ``cache_size`` adapters; a
switch sets the active adapters and their scales on weights already in memory (``_switch``), never a reload of
the base. An export with a LoRA of its own for some step counts has one cache entry per LoRA it was used with
(``Adapter.weights_for(sampling.lora)``): a batch at such a count runs that LoRA's weights. A multi-student
export's students are such LoRAs: ``student_for`` routes a prompt (on this thread, with the pipeline's text
encoders) before the request is keyed, so a batch only ever holds the requests of one student.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import warnings
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .adapters import Adapter, Sampling, build_scheduler

logger = logging.getLogger("fastdiff.serve")


_STOP = object()  # queue sentinel: finish the current batch, then exit


class _NoTextEncoderNotice(logging.Filter):
    """diffusers logs a warning per text encoder when a LoRA has no text-encoder keys (most UNet LoRAs)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No LoRA keys associated")


_DIFFUSERS_LORA_LOGGER = logging.getLogger("diffusers.loaders.lora_base")
if not any(isinstance(f, _NoTextEncoderNotice) for f in _DIFFUSERS_LORA_LOGGER.filters):
    _DIFFUSERS_LORA_LOGGER.addFilter(_NoTextEncoderNotice())


@contextmanager
def _quiet_peft():
    """peft warns on every second adapter ("Already found a `peft_config`") and when the active one is deleted:
    both are what the cache intends."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        warnings.filterwarnings("ignore", message="Adapter .* was active which is now deleted")
        yield


class Unavailable(Exception):
    """The worker takes no more requests now: its queue is full, or it has stopped."""


@dataclass(frozen=True)
class BatchKey:
    """What requests must share to run as one pipeline call."""

    adapters: tuple[tuple[Adapter, float], ...]
    sampling: Sampling
    width: int
    height: int
    negative: bool  # a negative prompt is given (SDXL zeroes the unconditional embedding when it is not)

    @property
    def shared(self) -> tuple:
        """What every request of a mixed-adapter batch must still share."""
        return (self.sampling, self.width, self.height, self.negative)


@dataclass
class Job:
    key: BatchKey
    prompt: str
    negative_prompt: str | None
    n: int
    seed: int
    future: Future = field(default_factory=Future)
    enqueued: float = field(default_factory=time.perf_counter)
    batch_images: int = 0  # filled in by the worker: images in the pipeline call that served this job


class Worker(threading.Thread):
    """The inference thread.

    Args:
        pipe: a diffusers StableDiffusion(XL)Pipeline (peft backend).
        cache_size: adapters kept loaded on the pipeline (least recently used evicted).
        max_batch_images: most images in one pipeline call; 1 turns micro-batching off.
        window_s: how long a batch waits for more requests after its first one.
        max_queue: most jobs waiting; ``submit`` raises Unavailable beyond it.
        metrics: a ``Metrics`` (adapter loads/evictions, batch sizes).
        is_registered: adapter -> whether it is still registered (deleted adapters are evicted).
        mix_adapters: batch requests of different adapter sets together (``MultiLoRA``'s per-row updates).
        resolve_weights: weights path -> the path to load now, checked again before every load (e.g.
            ``Registry.loadable``: still inside the adapters root); None loads the registered path as it is.
    """

    def __init__(
        self,
        pipe,
        cache_size: int,
        max_batch_images: int,
        window_s: float,
        max_queue: int,
        metrics,
        is_registered: Callable[[Adapter], bool],
        mix_adapters: bool = True,
        resolve_weights: Callable[[Path], Path] | None = None,
    ):
        super().__init__(name="fastdiff-inference", daemon=True)
        self.pipe = pipe
        self.cache_size = cache_size
        self.max_batch_images = max_batch_images
        self.window_s = window_s
        self.max_queue = max_queue
        self.metrics = metrics
        self.is_registered = is_registered
        self.mix_adapters = mix_adapters
        self.resolve_weights = resolve_weights
        self.base_scheduler = pipe.scheduler
        # (adapter, its per-step LoRA or None) -> peft adapter name, LRU order, oldest first; worker thread only
        self.loaded: OrderedDict[tuple[Adapter, str | None], str] = OrderedDict()
        self.loaded_uids: frozenset[int] = frozenset()  # a snapshot for other threads
        self.active: tuple | None = None  # ((peft name, weight), ...) set on the pipeline; None = unknown
        self.schedulers: dict[Sampling, object] = {}
        self._queue: queue.Queue = queue.Queue()
        self._pending: deque[Job] = deque()  # taken off the queue while gathering a batch of another key
        self._in_flight = 0  # jobs submitted and not yet answered
        self._in_flight_lock = threading.Lock()
        self._last_batch_jobs = 0
        self._layers: list | None = None  # the pipeline's peft tuner layers (rebuilt after loads/deletes)

    # called from other threads ------------------------------------------------------------------------------
    @property
    def depth(self) -> int:
        return self._queue.qsize() + len(self._pending)

    def submit(self, job: Job) -> Future:
        if not self.is_alive():
            raise Unavailable("the inference worker is not running")
        if self.depth >= self.max_queue:
            raise Unavailable(f"{self.depth} requests are waiting (the server's limit is {self.max_queue})")
        with self._in_flight_lock:
            self._in_flight += 1
        job.future.add_done_callback(self._answered)
        self._queue.put(job)
        return job.future

    def _answered(self, _future: Future) -> None:
        with self._in_flight_lock:
            self._in_flight -= 1

    def call(self, fn: Callable, wait: bool = True):
        """Run ``fn(pipe)`` on the worker thread between batches; return its result (``wait``) or at once a
        Future of it."""
        if threading.current_thread() is self or not self.is_alive():
            if wait:
                return fn(self.pipe)
            future = Future()
            try:
                future.set_result(fn(self.pipe))
            except Exception as e:
                future.set_exception(e)
            return future
        future: Future = Future()
        self._queue.put((fn, future))
        return future.result() if wait else future

    def student_for(self, adapter: Adapter, prompt: str) -> Future:
        """A Future of the student of multi-student ``adapter`` that serves ``prompt``: the router's table entry of
        the prompt, else the student of the nearest centroid to its routing embedding (the pooled text embedding,
        SDXL, or the mean of the prompt embeddings, SD), from this pipeline's ``encode_prompt`` without CFG, as the
        export's own pipeline routes. Runs on the worker thread between batches."""
        return self.call(lambda pipe: self._student_for(adapter, prompt), wait=False)

    def stop(self, timeout: float = 30) -> None:
        self._queue.put(_STOP)
        self.join(timeout)

    # the thread ---------------------------------------------------------------------------------------------
    def run(self) -> None:
        while True:
            batch = self._gather()
            if batch is None:
                break
            batch = [job for job in batch if job.future.set_running_or_notify_cancel()]  # drop cancelled jobs
            if batch:
                self._run_batch(batch)
            try:
                self._evict_deleted()
            except Exception:  # keep serving; the cache is rebuilt from what the pipeline holds
                logger.exception("could not unload deleted adapters")
                self._recover()

    def _next(self, timeout: float | None):
        """The next job or control item off the queue (control items run right here), or None on timeout."""
        while True:
            try:
                item = (
                    self._queue.get(timeout=timeout)
                    if timeout is None or timeout > 0
                    else self._queue.get_nowait()
                )
            except queue.Empty:
                return None
            if isinstance(item, tuple):  # (fn, future): a control call
                fn, future = item
                try:
                    future.set_result(fn(self.pipe))
                except Exception as e:  # the caller gets it
                    future.set_exception(e)
                continue
            return item

    def _gather(self) -> list[Job] | None:
        """The next batch: the oldest job plus compatible ones already waiting; then, if nothing else is waiting
        and more requests are likely (other requests in flight, or the last batch had several), those arriving
        until ``window_s`` after the oldest one. A lone client never waits for the window."""
        if self._pending:
            first = self._pending.popleft()
        else:
            first = self._next(None)
            if first is _STOP:
                return None
        batch, images = [first], first.n
        for job in list(self._pending):  # same key, already waiting
            if self._joins(batch, job, images):
                self._pending.remove(job)
                batch.append(job)
                images += job.n
        deadline = first.enqueued + self.window_s
        while images < self.max_batch_images:
            expect_more = self._in_flight > len(batch) or self._last_batch_jobs > 1
            wait = deadline - time.perf_counter() if expect_more and not self._pending else 0
            job = self._next(wait)
            if job is None:
                break
            if job is _STOP:
                self._queue.put(job)  # stop after this batch
                break
            if self._joins(batch, job, images):
                batch.append(job)
                images += job.n
            else:
                self._pending.append(job)
        self._last_batch_jobs = len(batch)
        return batch

    def _joins(self, batch: list[Job], job: Job, images: int) -> bool:
        """Whether ``job`` may join ``batch``: the same adapter set and weights, or (``mix_adapters``) any, as long
        as the batch names no more distinct adapters than the cache holds."""
        first = batch[0].key
        if images + job.n > self.max_batch_images or job.key.shared != first.shared:
            return False
        if all(j.key.adapters == job.key.adapters for j in batch):
            return True
        if not self.mix_adapters:
            return False
        return len({a for j in (*batch, job) for a, _ in j.key.adapters}) <= self.cache_size

    def _run_batch(self, batch: list[Job]) -> None:
        key = batch[0].key
        images = sum(j.n for j in batch)
        hooks: list = []
        error = None
        try:
            lora = key.sampling.lora  # the batch's per-step LoRA of an export (shared by every request)
            if all(j.key.adapters == key.adapters for j in batch):
                self._use_adapters(key.adapters, lora)
            else:  # a mixed batch: each image routed to its own adapters and weights, in one pipeline call
                routed = self._route(batch, lora)
                if routed is None:  # no one-call route for this mix: one call per adapter set
                    groups: dict[tuple, list[Job]] = {}
                    for job in batch:
                        groups.setdefault(job.key.adapters, []).append(job)
                    for group in groups.values():
                        self._run_batch(group)
                    return
                hooks = routed
                self.metrics.mixed_batches += 1
            out = self._generate(batch)
        except Exception as e:
            error = e
        finally:
            self.pipe.scheduler = self.base_scheduler
            for hook in hooks:
                hook.remove()
        if error is not None:
            self._recover()
            if len(batch) == 1:
                logger.error("generation failed", exc_info=error)
                batch[0].future.set_exception(error)
            else:  # find the culprit: every request again on its own
                logger.warning(
                    "a batch of %d requests failed (%s: %s); running each alone",
                    len(batch),
                    type(error).__name__,
                    error,
                )
                for job in batch:
                    self._run_batch([job])
            return
        self.metrics.observe_batch(images)
        start = 0
        for job in batch:
            job.batch_images = images
            job.future.set_result(out[start : start + job.n])
            start += job.n

    def _generate(self, batch: list[Job]) -> list:
        """One pipeline call for every image of ``batch`` (adapters already set up), PIL images in order."""
        key = batch[0].key
        s = key.sampling
        self.pipe.scheduler = self._scheduler(s)
        kwargs = {}
        if s.timesteps is not None:
            kwargs["timesteps"] = list(s.timesteps)
        if s.eta is not None:
            kwargs["eta"] = s.eta
        return self.pipe(
            prompt=[j.prompt for j in batch for _ in range(j.n)],
            negative_prompt=[j.negative_prompt for j in batch for _ in range(j.n)] if key.negative else None,
            num_inference_steps=s.num_inference_steps,
            guidance_scale=s.guidance_scale,
            width=key.width,
            height=key.height,
            generator=[torch.Generator().manual_seed(j.seed + i) for j in batch for i in range(j.n)],
            output_type="pil",
            **kwargs,
        ).images

    @torch.no_grad()
    def _student_for(self, adapter: Adapter, prompt: str) -> int:
        from ..paths import pipeline_module

        router = adapter.router
        table = router.config.table or {}
        if prompt in table:  # a training prompt: its student, no need to embed it
            return table[prompt]
        if self.active and any(
            getattr(getattr(self.pipe, c, None), "peft_config", None)
            for c in ("text_encoder", "text_encoder_2")
        ):
            self._use_adapters(())  # route with the base text encoders, not a LoRA's
        out = self.pipe.encode_prompt(
            prompt=[prompt],
            device=self.pipe._execution_device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=False,
        )
        pooled = out[2] if len(out) == 4 else None  # SDXL: (embeds, negative, pooled, negative pooled)
        embedding = pipeline_module("multi_student").route_embedding(out[0], pooled)
        return router.route([prompt], embedding)[0]

    def _scheduler(self, sampling: Sampling):
        if sampling.scheduler is None:
            return self.base_scheduler
        if sampling not in self.schedulers:
            if len(self.schedulers) > 64:
                self.schedulers.clear()
            self.schedulers[sampling] = build_scheduler(sampling)
        return self.schedulers[sampling]

    # adapters -----------------------------------------------------------------------------------------------
    def _use_adapters(self, adapters: tuple[tuple[Adapter, float], ...], lora: str | None = None) -> None:
        """Make exactly ``adapters`` (with their weights) active on the pipeline, loading what is missing; an
        export with a per-step LoRA named ``lora`` runs that LoRA's weights."""
        names = self._load([a for a, _ in adapters], lora)
        state = tuple((names[a], w) for a, w in adapters)
        if state != self.active:
            self._switch([name for name, _ in state], [w for _, w in state])
            self.active = state

    def _load(self, adapters: list[Adapter], lora: str | None = None) -> dict[Adapter, str]:
        """Load what is missing of ``adapters`` into the cache (evicting others, least recently used first);
        -> each adapter's peft name. An export with a per-step LoRA named ``lora`` loads that LoRA's weights."""
        entries = {a: (a, lora if lora in a.variants else None) for a in adapters}
        wanted = set(entries.values())
        for entry in entries.values():
            if entry in self.loaded:
                self.loaded.move_to_end(entry)
                continue
            while len(self.loaded) >= self.cache_size:
                victim = next((e for e in self.loaded if e not in wanted), None)
                if victim is None:
                    break
                self._unload(victim)
            self.active = None
            adapter, variant = entry
            path, name = adapter.weights_for(variant)
            try:
                if self.resolve_weights is not None:
                    path = self.resolve_weights(path)
                with _quiet_peft():
                    self.pipe.load_lora_weights(
                        str(path.parent),
                        weight_name=path.name,
                        adapter_name=name,
                        use_safetensors=True,
                        local_files_only=True,
                    )
            except Exception as e:
                raise RuntimeError(
                    f"adapter {adapter.name!r} could not be loaded ({type(e).__name__}: {e})"
                ) from e
            self.loaded[entry] = name
            self._layers = None
            self.loaded_uids = frozenset(a.uid for a, _ in self.loaded)
            self.metrics.adapter_loads += 1
        return {a: self.loaded[entry] for a, entry in entries.items()}

    def _switch(self, names: list[str], weights: list[float]) -> None:
        """``pipe.set_adapters(names, weights)`` (or no adapter at all for ``[]``) over the cached tuner layers.

        diffusers' ``set_adapters`` walks every module and peft's ``layer.set_adapter`` also toggles
        ``requires_grad`` on every adapter's weights: 14 ms of a ~60 ms tiny-pipeline request, more on SDXL. For
        inference only the active list and the scales matter: set peft's ``_active_adapter`` (what
        ``set_adapter`` stores; an empty list leaves the base layer alone) and call ``set_scale``.
        """
        for layer in self._tuner_layers():
            if hasattr(layer, "_active_adapter") and not layer.disable_adapters:
                layer._active_adapter = list(names)
            else:  # another peft layout: the public (slower) way
                layer.enable_adapters(True)
                layer.set_adapter(list(names), inference_mode=True)
            for name, weight in zip(names, weights):
                layer.set_scale(name, weight)

    def _route(self, batch: list[Job], lora: str | None) -> list | None:
        """Hooks routing each image of a mixed batch to its own adapters and weights in one pipeline call:
        ``MultiLoRA``'s per-row updates (``_multi_rows``), or, when an adapter has text-encoder LoRA layers, peft's
        mixed-adapter batches: ``adapter_names`` passed to every LoRA layer's forward, repeated for the CFG halves
        ([unconditional, conditional], in prompt order). None when neither can run this batch (peft's route with a
        request of several adapters, or one adapter at two weights)."""
        names = self._load(list(dict.fromkeys(a for j in batch for a, _ in j.key.adapters)), lora)
        per_image = [[(names[a], w) for a, w in j.key.adapters] for j in batch for _ in range(j.n)]
        hooks = self._multi_rows(per_image)
        if hooks is not None:
            return hooks
        weights: dict[Adapter, float] = {}
        for j in batch:
            for a, w in j.key.adapters:
                if len(j.key.adapters) > 1 or weights.setdefault(a, w) != w:
                    return None
        self._use_adapters(tuple(weights.items()), lora)
        routed = [row[0][0] if row else "__base__" for row in per_image]
        n = len(routed)

        def add_names(module, args, kwargs):
            x = args[0] if args else next(iter(kwargs.values()))
            if len(x) % n:
                raise RuntimeError(f"a LoRA layer saw a batch of {len(x)}, not a multiple of the {n} images")
            return args, {**kwargs, "adapter_names": routed * (len(x) // n)}

        return [
            layer.register_forward_pre_hook(add_names, with_kwargs=True) for layer in self._tuner_layers()
        ]

    def _multi_rows(self, per_image: list[list[tuple[str, float]]]) -> list | None:
        """The ``MultiLoRA`` hooks of a mixed batch: every image's rows get the updates of its ``(peft name,
        weight)`` pairs (summed; none for ``[]``) in the UNet's base layers; peft's layers are left inactive
        (``active`` then is unknown). Its copies of the weights follow peft's cache (``sync_peft``). None for
        adapters with text-encoder LoRA layers (MultiLoRA covers the UNet only)."""
        from .multi_lora import MultiLoRA

        used = {name for row in per_image for name, _ in row}
        other = {n for c, ns in self.pipe.get_list_adapters().items() if c != "unet" for n in ns}
        if other & used:
            return None
        if getattr(self, "_multi_lora", None) is None:
            self._multi_lora = MultiLoRA(self.pipe.unet)
        self._multi_lora.sync_peft(used)
        self._switch([], [])
        self.active = None
        return self._multi_lora.attach(per_image)

    def _tuner_layers(self) -> list:
        if self._layers is None:
            from peft.tuners.tuners_utils import BaseTunerLayer

            components = [getattr(self.pipe, c, None) for c in self.pipe._lora_loadable_modules]
            self._layers = [
                m for c in components if c is not None for m in c.modules() if isinstance(m, BaseTunerLayer)
            ]
        return self._layers

    def _unload(self, entry: tuple[Adapter, str | None], evicted: bool = True) -> None:
        with _quiet_peft():
            self.pipe.delete_adapters([self.loaded.pop(entry)])
        self.loaded_uids = frozenset(a.uid for a, _ in self.loaded)
        self._layers = None
        self.active = None
        if evicted:
            self.metrics.adapter_evictions += 1

    def _evict_deleted(self) -> None:
        for entry in [e for e in self.loaded if not self.is_registered(e[0])]:
            self._unload(entry, evicted=False)

    def sweep(self) -> None:
        """Drop deleted adapters from the pipeline soon (on the worker thread, between batches); returns at once."""
        self.call(lambda _: self._evict_deleted(), wait=False)

    def _recover(self) -> None:
        """After a failed batch: drop adapters the pipeline holds but the cache does not know (a load that
        failed half-way), and forget the active set so the next batch sets it again."""
        self.active = None
        self._layers = None
        try:
            present = {n for names in self.pipe.get_list_adapters().values() for n in names}
            stray = sorted(present - set(self.loaded.values()))
            if stray:
                self.pipe.delete_adapters(stray)
        except Exception:  # leave the rest to the next batch's set_adapters
            logger.exception("could not clean up after a failed batch")
