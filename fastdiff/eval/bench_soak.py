"""``fastdiff bench soak``: many clients, hostile requests mixed in; every answer checked (issue 20's acceptance).

Protocol, on the tiny SDXL pipeline of ``fastdiff bench serve`` (32x32, 4 steps, no CFG, rank-4 LoRAs) served by
``fastdiff serve`` in its own process (8-image micro-batches, 10 ms window):

1. Every distinct valid request is sent alone, one after the other: its images are the reference (and the
   server's warm-up: every adapter loaded).
2. ``clients`` closed-loop clients send ``requests`` requests taken in a fixed-seed shuffled order, a ``hostile``
   share of them hostile (``HOSTILE``: bad prompts, unknown or path-traversal adapter names, non-finite, negative
   and huge weights, wrong types, oversized values, bad JSON, a wrong content type, bad adapter files and paths
   to register). The valid ones name different adapter sets (none, one, two with weights, a negative weight) and
   seeds, so micro-batches mix them.
3. Invariants (``violations``): every valid request is 200 and each of its images equals its reference within
   ``tolerance`` pixel levels (batched kernels sum in another order than a batch of one); every hostile one gets
   its 4xx status with a body in the OpenAI error shape; the server's RSS grows by at most ``max_rss_growth_mib``
   from after the warm-up to after the load; the server is still healthy at the end.

Writes ``bench.json`` (every number, the violations) and ``bench.md`` to ``out``.
"""

from __future__ import annotations

import base64
import io
import json
import os
import random
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

GEN = "/v1/images/generations"
ADAPTERS = tuple(f"style_{i}" for i in range(4))
PROMPTS = ("a digit 3", "a red square", "a cat on a mat", "a blue sky over hills")
ADAPTER_SETS: tuple[tuple[tuple[str, float | None], ...], ...] = (
    (),
    (("style_0", None),),
    (("style_1", None),),
    (("style_2", None),),
    (("style_3", None),),
    (("style_0", 0.6), ("style_1", 0.5)),
    (("style_2", -0.5),),
    (("style_1", 0.8), ("style_3", 0.7)),
    (("style_0", 1.2),),
)


@dataclass(frozen=True)
class Probe:
    """One request of the soak: ``kind`` names it; ``status`` is the status it must get."""

    kind: str
    path: str
    content: bytes
    status: int
    content_type: str = "application/json"
    valid: int | None = None  # index of the distinct valid request, None for a hostile one


def _json(body: dict) -> bytes:
    return json.dumps(body).encode()


HOSTILE: tuple[Probe, ...] = (
    Probe("lone surrogate in the prompt", GEN, b'{"prompt": "a \\ud800 cat", "seed": 1}', 422),
    Probe("NUL in the prompt", GEN, b'{"prompt": "a\\u0000b", "seed": 1}', 422),
    Probe(
        "lone surrogate in the negative prompt", GEN, b'{"prompt": "x", "negative_prompt": "\\udfff"}', 422
    ),
    Probe("unknown adapter", GEN, _json({"prompt": "x", "adapters": [{"name": "no_such_adapter"}]}), 404),
    Probe(
        "path-traversal adapter name", GEN, _json({"prompt": "x", "adapters": [{"name": "../style_0"}]}), 404
    ),
    Probe(
        "absolute-path adapter name", GEN, _json({"prompt": "x", "adapters": [{"name": "/etc/passwd"}]}), 404
    ),
    Probe("NaN weight", GEN, b'{"prompt": "x", "adapters": [{"name": "style_0", "weight": NaN}]}', 422),
    Probe(
        "infinite weight", GEN, b'{"prompt": "x", "adapters": [{"name": "style_0", "weight": Infinity}]}', 422
    ),
    Probe(
        "negative weight out of range",
        GEN,
        _json({"prompt": "x", "adapters": [{"name": "style_1", "weight": -1e3}]}),
        422,
    ),  # fmt: skip
    Probe(
        "huge weight", GEN, _json({"prompt": "x", "adapters": [{"name": "style_1", "weight": 1e300}]}), 422
    ),
    Probe("NaN guidance scale", GEN, b'{"prompt": "x", "guidance_scale": NaN}', 422),
    Probe("prompt of the wrong type", GEN, _json({"prompt": 123}), 422),
    Probe("n of the wrong type", GEN, _json({"prompt": "x", "n": "two"}), 422),
    Probe("adapters not a list", GEN, _json({"prompt": "x", "adapters": "style_0"}), 422),
    Probe("oversized n", GEN, _json({"prompt": "x", "n": 1000}), 422),
    Probe("oversized image", GEN, _json({"prompt": "x", "size": "4096x4096"}), 422),
    Probe("too many steps", GEN, _json({"prompt": "x", "steps": 10_000}), 422),
    Probe("negative seed", GEN, _json({"prompt": "x", "seed": -1}), 422),
    Probe("unknown field", GEN, _json({"prompt": "x", "stepz": 1}), 422),
    Probe("same adapter twice", GEN, _json({"prompt": "x", "adapters": [{"name": "style_0"}] * 2}), 422),
    Probe("missing prompt", GEN, _json({"n": 1}), 422),
    Probe("bad JSON", GEN, b'{"prompt": "x",', 422),
    Probe("wrong content type", GEN, _json({"prompt": "x"}), 415, content_type="text/plain"),
    Probe("body over the limit", GEN, _json({"prompt": "x" * (1 << 20)}), 413),
    Probe("register a path outside the root", "/v1/adapters", _json({"path": "../../../etc/passwd"}), 400),
    Probe("register a path with a NUL", "/v1/adapters", b'{"path": "a\\u0000b.safetensors"}', 400),
    Probe(
        "register a LoRA of wrong shapes", "/v1/adapters", _json({"path": "bad/wrong_shape.safetensors"}), 400
    ),  # fmt: skip
    Probe(
        "register a file that is not safetensors",
        "/v1/adapters",
        _json({"path": "bad/garbage.safetensors"}),
        400,
    ),  # fmt: skip
)


def valid_bodies(count: int) -> list[dict]:
    """``count`` distinct valid requests: prompts, adapter sets and seeds varied, every fourth ``n=2``."""
    bodies = []
    for i in range(count):
        adapters = ADAPTER_SETS[i % len(ADAPTER_SETS)]
        bodies.append(
            {
                "prompt": PROMPTS[i % len(PROMPTS)],
                "seed": 1000 + 7 * i,
                "n": 2 if i % 4 == 3 else 1,
                "adapters": [{"name": a} | ({} if w is None else {"weight": w}) for a, w in adapters],
            }
        )
    return bodies


def plan(requests: int, hostile: float, distinct: int, seed: int = 0) -> list[Probe]:
    """The soak's requests in order: ``round(requests * hostile)`` hostile ones (every kind in turn) and valid ones
    (each distinct request in turn), shuffled with ``seed``."""
    n_hostile = round(requests * hostile)
    bodies = valid_bodies(min(distinct, max(1, requests - n_hostile)))
    probes = [HOSTILE[i % len(HOSTILE)] for i in range(n_hostile)]
    probes += [
        Probe("valid", GEN, _json(bodies[i % len(bodies)]), 200, valid=i % len(bodies))
        for i in range(requests - n_hostile)
    ]
    random.Random(seed).shuffle(probes)
    return probes


def rss_bytes(pid: int) -> int:
    """Resident set size of process ``pid`` (psutil if installed, else /proc/PID/status VmRSS)."""
    try:
        import psutil

        return psutil.Process(pid).memory_info().rss
    except ImportError:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError(f"no VmRSS for process {pid}") from None


def decode(response: dict) -> list[np.ndarray]:
    from PIL import Image

    return [
        np.asarray(Image.open(io.BytesIO(base64.b64decode(d["b64_json"])))).astype(np.int16)
        for d in response["data"]
    ]


def send(client, probe: Probe) -> dict:
    """Send one probe; the record of its answer (status, latency, body or its decoded images)."""
    t0 = time.perf_counter()
    r = client.post(probe.path, content=probe.content, headers={"Content-Type": probe.content_type})
    record = {"kind": probe.kind, "valid": probe.valid, "expected": probe.status, "status": r.status_code}
    record["seconds"] = time.perf_counter() - t0
    try:
        body = r.json()
    except ValueError:
        body = None
    if r.status_code == 200 and probe.valid is not None:
        record["images"] = decode(body)
        record["batch_images"] = body["fastdiff"]["batch_images"]
    else:
        record["body"] = body if body is not None else r.text[:300]
    return record


def _openai_error(body) -> bool:
    error = body.get("error") if isinstance(body, dict) else None
    return (
        isinstance(error, dict)
        and set(error) == {"message", "type", "param", "code"}
        and isinstance(error["message"], str)
        and bool(error["message"])
    )


def violations(records: list[dict], references: dict[int, list[np.ndarray]], tolerance: int) -> list[str]:
    """Every broken invariant among ``records`` (answers of the load): a valid request not 200, or an image more
    than ``tolerance`` levels from its reference (or a different image count); a hostile request without its
    status or without an OpenAI-shaped error body."""
    out = []
    for i, r in enumerate(records):
        if r["valid"] is None:
            if r["status"] != r["expected"]:
                out.append(
                    f"request {i} ({r['kind']}): status {r['status']}, expected {r['expected']}: {r['body']}"
                )
            elif not _openai_error(r["body"]):
                out.append(
                    f"request {i} ({r['kind']}): the error body is not in the OpenAI shape: {r['body']}"
                )
            continue
        if r["status"] != 200:
            out.append(f"request {i} (valid #{r['valid']}): status {r['status']}: {r.get('body')}")
            continue
        reference = references[r["valid"]]
        if len(r["images"]) != len(reference):
            out.append(
                f"request {i} (valid #{r['valid']}): {len(r['images'])} images, expected {len(reference)}"
            )
            continue
        diff = max(int(np.abs(a - b).max()) for a, b in zip(r["images"], reference))
        if diff > tolerance:
            out.append(
                f"request {i} (valid #{r['valid']}): an image differs from its reference by {diff} levels"
            )
    return out


def _percentiles(seconds: list[float]) -> dict:
    if not seconds:
        return {}
    ms = np.array(seconds) * 1000
    return {f"p{q}_ms": round(float(np.percentile(ms, q)), 1) for q in (50, 95, 99)} | {
        "max_ms": round(float(ms.max()), 1)
    }


def load(url: str, probes: list[Probe], clients: int, pid: int) -> tuple[list[dict], float, list[int]]:
    """``clients`` threads send ``probes`` in order, each taking the next one when its last is answered;
    -> the records in ``probes`` order, the wall time, and the server's RSS sampled every 0.2 s meanwhile."""
    import httpx

    records: list[dict | None] = [None] * len(probes)
    lock = threading.Lock()
    position = iter(range(len(probes)))
    samples: list[int] = []
    done = threading.Event()

    def client_loop() -> None:
        with httpx.Client(base_url=url, timeout=300) as c:
            while True:
                with lock:
                    i = next(position, None)
                if i is None:
                    return
                records[i] = send(c, probes[i])

    def sample_rss() -> None:
        while not done.wait(0.2):
            samples.append(rss_bytes(pid))

    sampler = threading.Thread(target=sample_rss, daemon=True)
    sampler.start()
    threads = [threading.Thread(target=client_loop) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0
    done.set()
    sampler.join()
    return records, seconds, samples


def _metric(text: str, prefix: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix))


def _bad_adapter_files(root: Path, lora: Path) -> None:
    """``root/bad``: a LoRA with one tensor a row too long, and a file that is not safetensors at all."""
    from safetensors.torch import load_file, save_file

    bad = root / "bad"
    bad.mkdir()
    tensors = load_file(str(lora))
    key = sorted(k for k in tensors if k.endswith("lora_B.weight"))[0]
    tensors[key] = tensors[key].new_zeros(tensors[key].shape[0] + 1, *tensors[key].shape[1:])
    save_file(tensors, str(bad / "wrong_shape.safetensors"), metadata={"format": "pt"})
    (bad / "garbage.safetensors").write_bytes(b"\x00" * 64)


MIB = 1 << 20


def run(
    out: str | Path,
    requests: int = 500,
    clients: int = 8,
    hostile: float = 0.1,
    distinct: int = 24,
    tolerance: int = 1,
    max_rss_growth_mib: float = 64.0,
    base: str | Path | None = None,
    seed: int = 0,
) -> dict:
    """The soak; writes ``bench.json`` and ``bench.md`` to ``out`` and returns the result (``passed``: no
    violation).

    Args:
        out: folder for the results.
        requests: requests sent under load (valid and hostile).
        clients: concurrent closed-loop clients.
        hostile: share of hostile requests.
        distinct: distinct valid requests (each one's reference is its image sent alone).
        tolerance: most pixel levels (0-255) an image under load may differ from its reference.
        max_rss_growth_mib: most the server's RSS may grow from after the warm-up to after the load.
        base: a tiny SDXL pipeline folder (default: one made here, as ``fastdiff bench serve`` makes it).
        seed: the shuffle of the requests.
    """
    import httpx
    import torch

    from ..models.tiny import save_tiny
    from .bench_serve import STEPS, random_lora, server_process

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    load_start = os.getloadavg()
    probes = plan(requests, hostile, distinct, seed)
    bodies = valid_bodies(len({p.valid for p in probes if p.valid is not None}))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = Path(base) if base is not None else save_tiny("sdxl", tmp / "base")
        root = tmp / "adapters"
        root.mkdir()
        for i, name in enumerate(ADAPTERS):
            files = random_lora("sdxl", tmp / name, seed=i)
            (root / f"{name}.safetensors").write_bytes(files["diffusers"].read_bytes())
        _bad_adapter_files(root, root / "style_0.safetensors")
        with server_process(base, root, True, tmp / "server.log") as (url, proc):
            rss = {"before": rss_bytes(proc.pid)}
            with httpx.Client(base_url=url, timeout=300) as c:
                references, alone = {}, []
                for i, body in enumerate(bodies):  # 1. each distinct valid request alone: its reference
                    record = send(c, Probe("valid", GEN, _json(body), 200, valid=i))
                    if record["status"] != 200:
                        raise RuntimeError(
                            f"valid request {body} sent alone: {record['status']} {record['body']}"
                        )
                    references[i] = record["images"]
                    alone.append(record)
                rss["after_warm_up"] = rss_bytes(proc.pid)
                metrics_before = c.get("/metrics").text
                records, seconds, samples = load(url, probes, clients, proc.pid)  # 2. the load
                rss["after"] = rss_bytes(proc.pid)
                rss["peak_during_load"] = max(samples + [rss["after"]])
                metrics_after = c.get("/metrics").text
                healthy = c.get("/healthz").status_code == 200
        log = (tmp / "server.log").read_text()
    # 3. the invariants
    broken = violations(records, references, tolerance)
    for r in alone:  # a reference is an image of a batch of its own request only
        if r["batch_images"] != len(r["images"]):
            broken.append(f"valid #{r['valid']} sent alone was batched with {r['batch_images']} images")
    growth = (rss["after"] - rss["after_warm_up"]) / MIB
    if growth > max_rss_growth_mib:
        broken.append(
            f"the server's RSS grew by {growth:.1f} MiB under load (limit {max_rss_growth_mib} MiB)"
        )
    if not healthy:
        broken.append("the server is not healthy after the load")
    valid = [r for r in records if r["valid"] is not None]
    hostile_records = [r for r in records if r["valid"] is None]
    diffs = [
        int(np.abs(a - b).max())
        for r in valid
        if r["status"] == 200 and len(r["images"]) == len(references[r["valid"]])
        for a, b in zip(r["images"], references[r["valid"]])
    ]
    statuses: dict[str, dict[str, int]] = {}
    for r in records:
        group = statuses.setdefault("valid" if r["valid"] is not None else "hostile", {})
        group[str(r["status"])] = group.get(str(r["status"]), 0) + 1
    kinds: dict[str, dict] = {p.kind: None for p in HOSTILE}  # in HOSTILE's order
    for r in hostile_records:
        k = kinds[r["kind"]] = kinds[r["kind"]] or {"expected": r["expected"], "statuses": {}}
        k["statuses"][str(r["status"])] = k["statuses"].get(str(r["status"]), 0) + 1
    kinds = {k: v for k, v in kinds.items() if v is not None}
    images = sum(len(r.get("images", ())) for r in valid)
    quarters = [max(q, default=0) / MIB for q in np.array_split(np.array(samples), 4)] if samples else []
    result = {
        "meta": {
            "requests": requests,
            "clients": clients,
            "hostile_share": hostile,
            "distinct_valid_requests": len(bodies),
            "adapters": len(ADAPTERS),
            "size": "32x32",
            "steps": STEPS,
            "server": "fastdiff serve, own process, 1 torch thread, 8-image micro-batches, 10 ms window",
            "device": "cpu",
            "tolerance_levels": tolerance,
            "max_rss_growth_mib": max_rss_growth_mib,
            "seed": seed,
            "cpu_count": os.cpu_count(),
            "load_average_start_end": [round(load_start[0], 2), round(os.getloadavg()[0], 2)],
            "torch": torch.__version__,
        },
        "passed": not broken,
        "violations": broken,
        "counts": {"valid": len(valid), "hostile": len(hostile_records), "statuses": statuses},
        "hostile_kinds": kinds,
        "pixels": {
            "images_compared": len(diffs),
            "max_abs_diff_levels": max(diffs, default=0),
            "images_not_identical": sum(d > 0 for d in diffs),
        },
        "rss_mib": {k: round(v / MIB, 1) for k, v in rss.items()}
        | {
            "growth_under_load": round(growth, 1),
            "peak_per_quarter_of_load": [round(q, 1) for q in quarters],
        },
        "load": {
            "seconds": round(seconds, 2),
            "requests_per_s": round(len(records) / seconds, 2),
            "valid_images_per_s": round(images / seconds, 2),
            "valid_latency": _percentiles([r["seconds"] for r in valid]),
            "hostile_latency": _percentiles([r["seconds"] for r in hostile_records]),
            "mean_batch_images": round(
                float(np.mean([r["batch_images"] for r in valid if "batch_images" in r] or [0])), 2
            ),  # fmt: skip
            "mixed_batches": int(
                _metric(metrics_after, "fastdiff_mixed_batches_total")
                - _metric(metrics_before, "fastdiff_mixed_batches_total")
            ),
            "server_5xx": int(
                sum(
                    _metric(metrics_after, f'fastdiff_requests_total{{method="POST",path="{p}",status="{s}"')
                    for p in (GEN, "/v1/adapters")
                    for s in range(500, 600)
                )
            ),
        },
        "server_log_tracebacks": log.count("Traceback"),
    }
    (out / "bench.json").write_text(json.dumps(result, indent=2))
    (out / "bench.md").write_text(markdown(result))
    print(markdown(result))
    return result


def markdown(result: dict) -> str:
    m, c, p, rss, ld = result["meta"], result["counts"], result["pixels"], result["rss_mib"], result["load"]
    lines = [
        "# fastdiff bench soak",
        "",
        f"{m['requests']} requests from {m['clients']} closed-loop clients, {c['hostile']} of them hostile "
        f"({len(result['hostile_kinds'])} kinds), {c['valid']} valid ({m['distinct_valid_requests']} distinct: "
        f"{m['adapters']} adapters, none / one / two per request, weights from -0.5 to 1.2, seeds, n = 1 or 2). "
        f"Tiny SDXL {m['size']}, {m['steps']} steps, no CFG, {m['server']}, {m['device']}, {m['cpu_count']} CPUs, "
        f"load average (1 min) {m['load_average_start_end'][0]} -> {m['load_average_start_end'][1]}.",
        "",
        f"**{'PASSED' if result['passed'] else 'FAILED'}**: {len(result['violations'])} violation(s).",
        "",
        "| | |",
        "| --- | --- |",
        f"| valid statuses | {c['statuses'].get('valid', {})} |",
        f"| hostile statuses | {c['statuses'].get('hostile', {})} |",
        f"| images compared with their reference (sent alone) | {p['images_compared']} |",
        f"| max pixel difference (levels of 255; tolerance {m['tolerance_levels']}) | {p['max_abs_diff_levels']} |",
        f"| images not bit-identical to their reference | {p['images_not_identical']} |",
        f"| server RSS MiB: before / after warm-up / peak under load / after | {rss['before']} / "
        f"{rss['after_warm_up']} / {rss['peak_during_load']} / {rss['after']} |",
        f"| RSS growth under load, MiB (limit {m['max_rss_growth_mib']}) | {rss['growth_under_load']} |",
        f"| RSS peak in each quarter of the load, MiB | {' / '.join(map(str, rss['peak_per_quarter_of_load']))} |",
        f"| load wall time, s | {ld['seconds']} |",
        f"| requests/s, valid images/s | {ld['requests_per_s']}, {ld['valid_images_per_s']} |",
        f"| valid latency ms (p50 / p95 / p99 / max) | {_row(ld['valid_latency'])} |",
        f"| hostile latency ms (p50 / p95 / p99 / max) | {_row(ld['hostile_latency'])} |",
        f"| mean batch (images), mixed-adapter batches | {ld['mean_batch_images']}, {ld['mixed_batches']} |",
        f"| 5xx counted by the server, tracebacks in its log | {ld['server_5xx']}, {result['server_log_tracebacks']} |",
        "",
        "| hostile kind | expected | got |",
        "| --- | --- | --- |",
    ]
    lines += [f"| {k} | {v['expected']} | {v['statuses']} |" for k, v in result["hostile_kinds"].items()]
    if result["violations"]:
        lines += ["", "Violations:", ""] + [f"- {v}" for v in result["violations"][:50]]
    return "\n".join(lines) + "\n"


def _row(p: dict) -> str:
    return " / ".join(str(p.get(k, "-")) for k in ("p50_ms", "p95_ms", "p99_ms", "max_ms"))
