"""``fastdiff bench serve``: bounded loopback load against ``fastdiff serve`` on a tiny SDXL pipeline.

Images/s and p50/p95 latency with 1 adapter vs 4 adapters alternating (request k uses adapter k mod 4), micro-batching
on (8 images, 10 ms window) vs off, at 1/4/8 concurrent closed-loop clients. Each cell runs for ``duration`` seconds
(in interleaved rounds) and stops by itself; each server runs in its own process (one torch thread), so clients do
not share its GIL.
Targets: alternating adds < 15% to p50 vs one adapter; micro-batching gives >= 1.5x images/s at 8 clients; with
micro-batching, 4 adapters in the mix (one UNet call for all, ``fastdiff.serve.multi_lora``) give >= 0.9x the
images/s of one adapter at 8 clients.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

import numpy as np
import torch

CLIENTS = (1, 4, 8)
STEPS = 4


def random_lora(
    family: str, out: str | Path, seed: int, rank: int = 4, std: float = 0.3, alpha: float | None = None
) -> dict[str, Path]:
    """A LoRA on the tiny ``family`` UNet with random (non-zero) weights, saved in diffusers and kohya keys;
    ``alpha`` defaults to ``rank`` (scale 1)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from ..models.lora import add_adapter, save_lora
    from ..models.tiny import tiny_unet

    unet = tiny_unet(family)
    params = add_adapter(unet, "style", rank=rank, alpha=rank if alpha is None else alpha)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * std)
    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    return save_lora(out, unet, "style", cls)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def server_process(base: Path, adapters: Path, batching: bool, log: Path):
    """``fastdiff serve`` in its own process (one torch thread, no token) on a free loopback port, as the benches
    run it: ``STEPS`` steps without CFG by default, 8-image micro-batches (``batching``) or none; yields (its URL,
    its ``subprocess.Popen``) once ``/healthz`` answers, and stops it after the block."""
    import httpx

    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "fastdiff.cli",
        "serve",
        "--base",
        str(base),
        "--adapters",
        str(adapters),
        "--port",
        str(port),
        "--default-steps",
        str(STEPS),
        "--default-guidance-scale",
        "0",
        "--max-batch-images",
        "8" if batching else "1",
        "--batch-window-ms",
        "10",
        "--max-queue",
        "256",
        "--log-level",
        "warning",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    env.pop("FASTDIFF_SERVE_TOKEN", None)
    with open(log, "w") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 180
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(
                        f"fastdiff serve exited with {proc.returncode}: {log.read_text()[-2000:]}"
                    )
                try:
                    if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError("fastdiff serve did not start within 180 s")
                time.sleep(0.2)
            yield url, proc
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def measure(url: str, names: list[str], clients: int, duration: float) -> dict:
    """Closed-loop load: ``clients`` threads send requests back to back for ``duration`` seconds; raw samples."""
    import httpx

    counter = itertools.count()
    lock = threading.Lock()
    latencies: list[float] = []
    batch_images: list[int] = []
    errors: list[str] = []
    start = time.perf_counter()
    stop_at = start + duration

    def loop() -> None:
        with httpx.Client(base_url=url, timeout=120) as c:
            while time.perf_counter() < stop_at:
                k = next(counter)
                body = {
                    "prompt": f"a digit {k % 10}",
                    "seed": k,
                    "adapters": [{"name": names[k % len(names)]}],
                }
                t0 = time.perf_counter()
                r = c.post("/v1/images/generations", json=body)
                dt = time.perf_counter() - t0
                with lock:
                    if r.status_code != 200:
                        errors.append(f"{r.status_code}: {r.text[:200]}")
                        return
                    latencies.append(dt)
                    batch_images.append(r.json()["fastdiff"]["batch_images"])

    threads = [threading.Thread(target=loop) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"{len(errors)} request(s) failed, e.g. {errors[0]}")
    return {"latencies": latencies, "batch_images": batch_images, "seconds": time.perf_counter() - start}


def aggregate(samples: list[dict]) -> dict:
    """One table cell from its rounds: images/s over the summed time, latency percentiles over all requests."""
    lat = np.array([x for s in samples for x in s["latencies"]]) * 1000
    seconds = sum(s["seconds"] for s in samples)
    return {
        "requests": len(lat),
        "seconds": round(seconds, 2),
        "images_per_s": round(len(lat) / seconds, 2),
        "p50_ms": round(float(np.percentile(lat, 50)), 1),
        "p95_ms": round(float(np.percentile(lat, 95)), 1),
        "mean_batch_images": round(float(np.mean([b for s in samples for b in s["batch_images"]])), 2),
    }


def summarize(rows: list[dict]) -> dict:
    """The two targets from the table: alternation's p50 overhead and micro-batching's throughput gain."""
    cell = {(r["batching"], r["adapters"], r["clients"]): r for r in rows}
    overhead = {
        f"batching {'on' if b else 'off'}, {c} client(s)": round(
            cell[(b, 4, c)]["p50_ms"] / cell[(b, 1, c)]["p50_ms"] - 1, 3
        )
        for b in (True, False)
        for c in CLIENTS
    }
    gain = {
        f"{a} adapter(s), 8 clients": round(
            cell[(True, a, 8)]["images_per_s"] / cell[(False, a, 8)]["images_per_s"], 2
        )
        for a in (1, 4)
    }
    mixed = {
        f"batching on, {c} client(s)": round(
            cell[(True, 4, c)]["images_per_s"] / cell[(True, 1, c)]["images_per_s"], 2
        )
        for c in CLIENTS
    }
    return {
        "alternating_p50_overhead": overhead,
        "micro_batching_throughput_gain": gain,
        "four_vs_one_adapter_throughput": mixed,
    }


def markdown(rows: list[dict], summary: dict, meta: dict) -> str:
    lines = [
        "# fastdiff bench serve",
        "",
        f"Tiny SDXL pipeline ({meta['size']}, {meta['steps']} steps, no CFG), rank-4 LoRAs, {meta['device']}, "
        f"{meta['torch_threads']} torch thread per server, {meta['duration_s']} s per cell in {meta['rounds']} "
        "interleaved rounds, loopback HTTP, closed-loop clients. Machine load average (1 min) at start and end: "
        f"{meta.get('load_average_start_end', 'not recorded')} on {meta.get('cpu_count')} CPUs.",
        "",
        "| micro-batching | adapters | clients | requests | images/s | p50 ms | p95 ms | mean batch |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {'on' if r['batching'] else 'off'} | {r['adapters']} | {r['clients']} | {r['requests']} | "
            f"{r['images_per_s']} | {r['p50_ms']} | {r['p95_ms']} | {r['mean_batch_images']} |"
        )
    lines += ["", "Alternating 4 adapters vs 1: added p50 (target < 15%)", ""]
    lines += [f"- {k}: {v:+.1%}" for k, v in summary["alternating_p50_overhead"].items()]
    lines += ["", "Micro-batching on vs off: images/s ratio (target >= 1.5x at 8 clients)", ""]
    lines += [f"- {k}: {v:.2f}x" for k, v in summary["micro_batching_throughput_gain"].items()]
    lines += ["", "4 adapters in the mix vs 1: images/s ratio (target >= 0.9x at 8 clients)", ""]
    lines += [f"- {k}: {v:.2f}x" for k, v in summary["four_vs_one_adapter_throughput"].items()]
    return "\n".join(lines) + "\n"


def run(out: str | Path, duration: float = 9.0, rounds: int = 3) -> dict:
    """Run the whole table (12 cells of ``duration`` seconds plus two server starts); write bench_serve.json/.md.

    Both servers (batching on and off) run at once, idle but for the cell being measured, and every cell is
    measured in ``rounds`` interleaved slices: the machine's load drifts alike over the cells being compared.
    """
    from ..models.tiny import save_tiny

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        tmp = Path(tmp)
        base = save_tiny("sdxl", tmp / "base")
        adapters = tmp / "adapters"
        adapters.mkdir()
        names = [f"style_{i}" for i in range(4)]
        for i, name in enumerate(names):
            files = random_lora("sdxl", tmp / name, seed=i)
            (adapters / f"{name}.safetensors").write_bytes(files["diffusers"].read_bytes())
        urls = {
            b: stack.enter_context(server_process(base, adapters, b, tmp / f"server-{b}.log"))[0]
            for b in (True, False)
        }
        for url in urls.values():
            measure(url, names, 4, 2.0)  # warm-up: every adapter loaded, allocator warm
        cells = [(b, a, c) for c in CLIENTS for b in (True, False) for a in (1, 4)]
        samples: dict[tuple, list[dict]] = {cell: [] for cell in cells}
        for _ in range(rounds):
            for b, a, c in cells:
                samples[(b, a, c)].append(measure(urls[b], names[:a], c, duration / rounds))
    rows = []
    for b, a, c in sorted(cells, key=lambda x: (not x[0], x[1], x[2])):
        rows.append({"batching": b, "adapters": a, "clients": c, **aggregate(samples[(b, a, c)])})
        print(json.dumps(rows[-1]), flush=True)
    meta = {
        "size": "32x32",
        "steps": STEPS,
        "device": "cpu",
        "torch_threads": 1,
        "duration_s": duration,
        "rounds": rounds,
        "cpu_count": os.cpu_count(),
        "load_average_start_end": [
            round(load_start[0], 2),
            round(os.getloadavg()[0], 2),
        ],  # 1-minute, whole machine
        "torch": torch.__version__,
    }
    summary = summarize(rows)
    result = {"meta": meta, "rows": rows, "summary": summary}
    (out / "bench_serve.json").write_text(json.dumps(result, indent=2))
    (out / "bench_serve.md").write_text(markdown(rows, summary, meta))
    print(markdown(rows, summary, meta))
    return result
