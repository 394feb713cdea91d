"""Server metrics in the Prometheus text exposition format (version 0.0.4), written by hand: no extra dependency."""

from __future__ import annotations

import bisect
import threading
from collections import Counter

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, total = [], 0
        for le, n in zip((*self.buckets, "+Inf"), self.counts):
            total += n
            out.append(f'{name}_bucket{{le="{le}"}} {total}')
        return out + [f"{name}_sum {self.sum:.6f}", f"{name}_count {self.count}"]


class Metrics:
    """Request counts by path and status, generation latency, adapter loads/evictions, batch sizes."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests: Counter = Counter()  # (method, path, status) -> count
        self.latency = Histogram(LATENCY_BUCKETS)
        self.batch_images = Histogram(BATCH_BUCKETS)
        self.images = 0
        self.adapter_loads = 0  # written by the inference worker only
        self.adapter_evictions = 0
        self.mixed_batches = 0  # batches of requests with different adapters

    def observe_request(self, method: str, path: str, status: int, seconds: float | None) -> None:
        with self._lock:
            self.requests[(method, path, status)] += 1
            if seconds is not None:
                self.latency.observe(seconds)

    def observe_batch(self, images: int) -> None:
        with self._lock:
            self.batch_images.observe(images)
            self.images += images

    def render(self, queue_depth: int, adapters_loaded: int, adapters_registered: int) -> str:
        def block(name: str, kind: str, help_: str, lines: list[str]) -> list[str]:
            return [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", *lines]

        with self._lock:
            requests = [
                f'fastdiff_requests_total{{method="{m}",path="{p}",status="{s}"}} {n}'
                for (m, p, s), n in sorted(self.requests.items())
            ]
            out = [
                *block(
                    "fastdiff_requests_total",
                    "counter",
                    "HTTP requests by method, path and status.",
                    requests,
                ),
                *block(
                    "fastdiff_generation_latency_seconds",
                    "histogram",
                    "Latency of POST /v1/images/generations, all statuses.",
                    self.latency.lines("fastdiff_generation_latency_seconds"),
                ),
                *block(
                    "fastdiff_batch_images",
                    "histogram",
                    "Images per pipeline call (micro-batch size).",
                    self.batch_images.lines("fastdiff_batch_images"),
                ),
                *block(
                    "fastdiff_images_total",
                    "counter",
                    "Images generated.",
                    [f"fastdiff_images_total {self.images}"],
                ),
                *block(
                    "fastdiff_mixed_batches_total",
                    "counter",
                    "Batches mixing requests of different adapters.",
                    [f"fastdiff_mixed_batches_total {self.mixed_batches}"],
                ),
                *block(
                    "fastdiff_adapter_loads_total",
                    "counter",
                    "Adapters loaded onto the pipeline.",
                    [f"fastdiff_adapter_loads_total {self.adapter_loads}"],
                ),
                *block(
                    "fastdiff_adapter_evictions_total",
                    "counter",
                    "Adapters evicted from the LRU cache.",
                    [f"fastdiff_adapter_evictions_total {self.adapter_evictions}"],
                ),
                *block(
                    "fastdiff_queue_depth",
                    "gauge",
                    "Requests waiting for the inference worker.",
                    [f"fastdiff_queue_depth {queue_depth}"],
                ),
                *block(
                    "fastdiff_adapters_loaded",
                    "gauge",
                    "Adapters loaded on the pipeline.",
                    [f"fastdiff_adapters_loaded {adapters_loaded}"],
                ),
                *block(
                    "fastdiff_adapters_registered",
                    "gauge",
                    "Adapters in the registry.",
                    [f"fastdiff_adapters_registered {adapters_registered}"],
                ),
            ]
        return "\n".join(out) + "\n"
