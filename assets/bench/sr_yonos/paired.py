"""Paired comparison of upscaler exports on the held-out grid, same calls and seed as ``fastdiff bench sr``.

Usage: ``python assets/bench/sr_yonos/paired.py OUT.json a=EXPORT b=EXPORT [c=EXPORT d=EXPORT ...]``: every export's
``bench_sr.scores`` (the bench's metrics), per-image PSNR-Y, and for each consecutive pair (a, b) the per-patch
PSNR-Y difference a - b (mean, standard error, patches where a is better) and the per-image differences.
"""

import json
import sys

import torch

from fastdiff.eval.bench_sr import run_pipeline, scores
from fastdiff.sr.data import grid_pairs
from fastdiff.sr.metrics import rgb_to_y
from fastdiff.sr.upscale import load_upscaler

runs = dict(a.split("=") for a in sys.argv[2:])
pairs = grid_pairs("heldout")
y_hr = rgb_to_y(pairs.hr)
names = pairs.names
per_patch, per_image, rows = {}, {}, {}
for name, folder in runs.items():
    pipe, call = load_upscaler(folder)
    pred, _ = run_pipeline(pipe, pairs.lr, call, 0)
    rows[name] = scores(pred, pairs.hr, pairs.lr, names)
    mse = (rgb_to_y(pred) - y_hr).pow(2).flatten(1).mean(1)
    per_patch[name] = 10 * torch.log10(255.0**2 / mse)
    per_image[name] = {
        n: float(10 * torch.log10(255.0**2 / mse[torch.tensor([m == n for m in names])].mean()))
        for n in dict.fromkeys(names)
    }
out = {"scores": rows, "per_image": per_image}
keys = list(runs)
for i in range(0, len(keys), 2):
    a, b = keys[i], keys[i + 1]
    d = per_patch[a] - per_patch[b]
    out[f"{a} - {b}"] = {
        "mean_db": round(float(d.mean()), 4),
        "stderr_db": round(float(d.std() / len(d) ** 0.5), 4),
        "patches_a_better": int((d > 0).sum()),
        "patches": len(d),
        "per_image_db": {n: round(per_image[a][n] - per_image[b][n], 4) for n in per_image[a]},
    }
print(json.dumps(out, indent=1))
open(sys.argv[1], "w").write(json.dumps(out, indent=1))
