"""Uni-Instruct on the analytic Gaussian-mixture teacher: each f-divergence's 1-step student next to DMD2 and SiD.

The problem, networks and pretraining are ``bench_gmm``'s (``gmm_setup``: 4 classes x 2 neighbouring modes in 2-D,
a 7-layer x0 generator and a 3-layer eps fake score, both pretrained by denoising). Uni-Instruct runs SiD's GMM
set-up (``sid_gmm.student_config``: Adam (0, 0.999), lr 3e-4, t ~ U[5, 600), 1:1 updates, EMA 0.999) with
DMD2's MLP discriminator head on the fake score's last hidden layer (log r = its logit), data-free: the head's
"real" samples are the exact teacher sampled with ``teacher_sample_steps`` DDIM steps. DMD2 and SiD rows use their
own GMM set-ups (``bench_gmm.train_and_evaluate``, ``sid_gmm``) at the same iteration count.

    python -m fastdiff.eval.uni_gmm --out assets/bench/gmm_uni --seeds 0 1 --steps 2000 \
        --methods dmd2 sid uni:reverse_kl uni:forward_kl uni:js ...

Writes bench.json (every run) and bench.md (mean ± spread over seeds per system, and the command).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from ..methods.uni_instruct import UniConfig, UniInstruct
from ..models.gmm import GMM
from ..models.heads import DiscriminatorHead
from .gmm_metrics import gmm_report
from .gmm_setup import DIM, NUM_CLASSES, networks, null_labels, paired_gmm, train
from .sid_gmm import student_config


def uni_config(
    divergence: str, kl_weight: float = 1.0, score_weight: float = 1.0, fdistill_weight: float = 0.0, **kw
) -> UniConfig:
    """SiD's 1-step GMM set-up as a Uni-Instruct section; defaults: the exact gradient of the expansion (both
    branches, SiD's α = ½)."""
    sid = student_config(1, 3e-4)
    fields = {f.name: getattr(sid, f.name) for f in dataclasses.fields(sid)}
    fields["alpha"] = kw.pop("alpha", 0.5)
    return UniConfig(
        **fields,
        divergence=divergence,
        kl_weight=kl_weight,
        score_weight=score_weight,
        fdistill_weight=fdistill_weight,
        teacher_sample_steps=kw.pop("teacher_sample_steps", 8),
        **kw,
    )


def train_uni(gmm: GMM, cfg: UniConfig, steps: int, seed: int, out_dir: str, batch: int = 256) -> UniInstruct:
    teacher, fake, generator = networks(gmm, NUM_CLASSES, seed)
    head = DiscriminatorHead(fake.layers[-1].out_features)  # on the fake MLP's last hidden layer
    method = UniInstruct(
        generator,
        fake,
        teacher,
        cfg,
        (gmm.dim,),
        dict(generator.named_parameters()),
        dict(fake.named_parameters()),
        null_labels,
        head,
        seed=seed,
    )
    train(method, cfg, NUM_CLASSES, steps, batch, seed, out_dir)
    return method


def evaluate(method, gmm: GMM, per_class: int) -> dict:
    labels = torch.arange(NUM_CLASSES).repeat_interleave(per_class)
    noise = torch.randn(len(labels), DIM, generator=torch.Generator().manual_seed(1234))
    return gmm_report(method.generate(noise, labels), gmm, labels)


def run_one(system: str, seed: int, steps: int, per_class: int) -> dict:
    """One 1-step student: ``dmd2``, ``sid`` or ``uni:<divergence>[:kl_weight:score_weight[:fdistill_weight]]``."""
    from . import bench_gmm, sid_gmm

    gmm = paired_gmm()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        kind = system.partition(":")[0]
        if kind in ("dmd2",):
            report = bench_gmm.train_and_evaluate(tmp, seed=seed, max_steps=steps, per_class=per_class)
        elif kind in ("sid",):
            method = sid_gmm.train_sid(gmm, NUM_CLASSES, student_config(1, 3e-4), steps, seed, tmp)
            report = evaluate(method, gmm, per_class)
        elif system.startswith("uni:"):
            parts = system.split(":")[1:]
            weights = [float(v) for v in parts[1:4]] if len(parts) >= 3 else []
            method = train_uni(gmm, uni_config(parts[0], *weights), steps, seed, tmp)
            report = evaluate(method, gmm, per_class)
        else:
            raise ValueError(
                f"unknown system {system!r}: dmd2, sid or uni:<divergence>[:kl_weight:score_weight[:fdistill_weight]]"
            )
    excess = (report["nll"] - report["nll_true"]) / abs(report["nll_true"])
    row = {"system": system, "seed": seed, "iterations": steps, "nll_excess": excess, **report}
    row["train_seconds"] = time.perf_counter() - t0
    print(
        f"{system} seed {seed}: nll excess {excess:+.2%}, coverage {report['mode_coverage']:.3f}, "
        f"weight error {report['mode_weight_error']:.4f}, sw2 {report['sw2']:.4f} ({row['train_seconds']:.0f} s)",
        flush=True,
    )
    return row


def summarize(rows: list[dict]) -> list[dict]:
    """Per system: mean and min..max over seeds of the NLL excess, coverage, weight error and sliced W2."""
    out = []
    for system in dict.fromkeys(r["system"] for r in rows):
        rs = [r for r in rows if r["system"] == system]
        s = {"system": system, "seeds": [r["seed"] for r in rs]}
        for key in ("nll_excess", "mode_coverage", "mode_weight_error", "sw2"):
            vals = [r[key] for r in rs]
            s[key] = {"mean": statistics.fmean(vals), "min": min(vals), "max": max(vals)}
        out.append(s)
    return out


def markdown(summary: list[dict], command: str, iterations: int) -> str:
    lines = [
        "# Uni-Instruct divergences on the analytic GMM (1-step students)",
        "",
        f"Command: `{command}`",
        "",
        f"{iterations} iterations per run; NLL excess = (NLL - NLL of true samples) / |NLL of true samples|: "
        "closer to 0 is better, negative means samples packed too tightly onto the modes (too narrow); coverage = share of modes holding at least 10% of their expected mass; "
        "mean [min, max] over seeds.",
        "",
        "| system | seeds | NLL excess | mode coverage | mode weight error | sliced W2 |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for s in sorted(summary, key=lambda s: abs(s["nll_excess"]["mean"])):

        def cell(key, fmt, s=s):
            v = s[key]
            return f"{fmt(v['mean'])} [{fmt(v['min'])}, {fmt(v['max'])}]"

        pct = "{:+.1%}".format
        num = "{:.4f}".format
        lines.append(
            f"| {s['system']} | {len(s['seeds'])} | {cell('nll_excess', pct)} | "
            f"{cell('mode_coverage', '{:.3f}'.format)} | {cell('mode_weight_error', num)} | {cell('sw2', num)} |"
        )
    return "\n".join(lines) + "\n"


def rewrite(out: str | Path) -> None:
    """bench.md again from bench.json (e.g. after an interrupted run: the rows written so far)."""
    out = Path(out)
    data = json.loads((out / "bench.json").read_text())
    summary = summarize(data["rows"])
    data["summary"] = summary
    (out / "bench.json").write_text(json.dumps(data, indent=1))
    (out / "bench.md").write_text(markdown(summary, data["command"], data["rows"][0]["iterations"]))


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="assets/bench/gmm_uni")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--per-class", type=int, default=2500)
    p.add_argument(
        "--methods",
        nargs="+",
        default=["dmd2", "sid", "uni:reverse_kl", "uni:forward_kl", "uni:js", "uni:jeffreys"],
    )
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for seed in args.seeds:
        for system in args.methods:
            rows.append(run_one(system, seed, args.steps, args.per_class))
            (out / "bench.json").write_text(json.dumps({"command": command(argv), "rows": rows}, indent=1))
    summary = summarize(rows)
    (out / "bench.json").write_text(
        json.dumps({"command": command(argv), "rows": rows, "summary": summary}, indent=1)
    )
    (out / "bench.md").write_text(markdown(summary, command(argv), args.steps))
    print((out / "bench.md").read_text())
    return rows


def command(argv) -> str:
    return "python -m fastdiff.eval.uni_gmm " + " ".join(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
