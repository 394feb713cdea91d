"""``accelerate launch`` command lines and environment for tests that train in subprocesses (CPU ranks over gloo)."""

import os
import sys


def launch_command(num_processes: int = 1, config_file: str | None = None) -> list[str]:
    """``python -m accelerate.commands.launch ...`` for ``num_processes`` CPU ranks (fp32, no dynamo), or with an
    accelerate config file instead of flags; the script and its arguments follow."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if config_file is not None:
        return [*cmd, "--config_file", str(config_file)]
    cmd += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    return [*cmd, "--num_processes", str(num_processes), "--multi_gpu" if num_processes > 1 else "--cpu"]


def launch_env(**extra: str) -> dict:
    """The environment of a launched run: offline, quiet bars, one thread per rank, CPU ranks, and none of the
    caller's ACCELERATE_* settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    env.update(HF_HUB_OFFLINE="1", TQDM_DISABLE="1", OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="1", **extra)
    return env
