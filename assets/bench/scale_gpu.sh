#!/usr/bin/env bash
# `fastdiff bench scale` on one H100/H200: full-size SDXL (1024²) and SD1.5 (512²) UNets in random init, DMD2 in
# shared-base and full-copy modes (fsdp rows are recorded as skipped in one process), AdamW and 8-bit AdamW,
# batch 1, 2, 4. Writes $OUT/scale/scale.json + scale.md (+ log.txt) and $OUT/gpu.txt; publish scale.json as
# assets/bench/scale.json (it names the GPU in "device").
#
# Run from the repository root through the device tool, as one call with timeout_s=600 and carry [".whl"]:
#   bash assets/bench/scale_gpu.sh
# The device image has torch, accelerate, peft, transformers, safetensors, pyyaml, scikit-learn, but not diffusers,
# omegaconf or bitsandbytes. Before the call, fetch their wheels into .whl/ here (ignored via .git/info/exclude,
# as the device README says): `python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12
# --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64
# --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl diffusers==0.42.1 omegaconf==2.4.0
# bitsandbytes==0.50.2`. Without bitsandbytes the adamw8bit rows are recorded as skipped, with the reason.
#
# Time (estimate, not yet measured): SDXL 1024² forward ~45 ms per image in bf16 on an H100; one DMD2 iteration
# (generator + fake-score update, gradient checkpointing, CFG teacher) is ~12 forward-equivalents, so ~0.6 s at
# batch 1 and ~2 s at batch 4; building the UNet on the GPU plus the warm-up iteration ~10 s. With iters 3 and
# warm-up 1: ~10-15 s per SDXL row, ~5-8 s per SD1.5 row, 9 rows per family: ~3-4 min in all, plus ~30 s of
# imports. Each row writes the files again, so the `timeout` below (480 s) keeps what was measured if it runs long.
set -uo pipefail
OUT=${OUT:-bench-scale-out}
mkdir -p "$OUT/scale"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TQDM_DISABLE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, diffusers, peft, accelerate; print('torch', torch.__version__, 'diffusers', \
diffusers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__)" | tee -a "$OUT/gpu.txt" \
  || exit 1
python3 -c "import bitsandbytes as b; print('bitsandbytes', b.__version__)" 2>&1 | tail -1 | tee -a "$OUT/gpu.txt"

ARGS=(--out "$OUT/scale" --families sdxl,sd15 --batches 1,2,4 --iters 3)
if python3 -m fastdiff.cli bench scale --help >/dev/null 2>&1; then
  CMD=(python3 -m fastdiff.cli bench scale "${ARGS[@]}")
else  # the CLI is not wired yet: the same function directly
  CMD=(python3 -c "import logging, sys; logging.basicConfig(level=logging.INFO, format='%(message)s'); \
from fastdiff.eval.bench_scale import run; run(sys.argv[1], families=('sdxl', 'sd15'), batches=(1, 2, 4), iters=3)" \
    "$OUT/scale")
fi
timeout 480 "${CMD[@]}" 2>&1 | tee "$OUT/scale/log.txt"
status=${PIPESTATUS[0]}
cat "$OUT/scale/scale.md" 2>/dev/null
exit "$status"
