"""AGD trajectory data: the teacher's CFG-guided sampling trajectories in safetensors shards, plus a JSON manifest.

Folder layout::

    manifest.json             the plan (teacher, prompts, negative prompts, scheduler, timesteps, w range, seed...) and
                              its fingerprint; "complete" once every shard is done
    shard-00000.safetensors   trajectories [0, shard_size): x_t [n, S, C, H, W] (S: UNet evaluations per
                              trajectory), target [n, S, C, H, W] (the CFG-combined native prediction), t [S],
                              w [n], prompt_index [n], negative_index [n] (-1: no negative prompt),
                              trajectory_index [n]; header metadata: fingerprint, shard index, sha256 of the tensors

Prompts are stored by reference (indices into the manifest's lists); training re-encodes them (cached). Every
trajectory belongs to exactly one shard, and each shard is a pure function of (plan, shard index): its randomness
comes from a generator seeded by (seed, shard). Generation is resumable: a shard that opens, matches the plan and
its checksum is skipped; a missing, truncated or corrupt one is (re)generated, written to a temporary file and
renamed, so an interruption never leaves a half-written shard under its final name. Ranks split the shards.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

logger = logging.getLogger("fastdiff")
MANIFEST = "manifest.json"
VERSION = 1
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
KEYS = ("x_t", "target", "t", "w", "prompt_index", "negative_index", "trajectory_index")


class TrajectoryError(ValueError):
    """A trajectory folder that does not fit the run: another plan, a missing or unreadable shard."""


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def make_plan(
    cfg, teacher, prompts: list[str], negative_prompts: list[str] | None, resolution: int, seed: int
) -> dict:
    """The JSON-able description of what to generate; its fingerprint keys the folder.

    Args:
        cfg: the ``agd`` config section.
        teacher: the loaded Teacher (path, scheduler config, latent shape).
        prompts: the training prompts (trajectory j uses prompt j mod len(prompts)).
        negative_prompts: where negative prompts are drawn from (None: the other training prompts).
        resolution: image side in pixels.
        seed: the run seed.
    """
    from .method import check_config, make_scheduler

    check_config(cfg)
    if not prompts:
        raise ValueError("AGD trajectories need at least one prompt")
    if cfg.negative_prompt_prob > 0 and negative_prompts is None and len(prompts) < 2:
        raise ValueError(
            "agd.negative_prompt_prob > 0 with no negative_prompts file needs at least two prompts"
        )
    scheduler = make_scheduler(teacher.pipeline.scheduler, cfg.scheduler, cfg.scheduler_kwargs)
    scheduler.set_timesteps(cfg.num_inference_steps)
    n = cfg.num_trajectories or len(prompts)
    return {
        "version": VERSION,
        "teacher": str(Path(teacher.path).resolve()),
        "family": teacher.family,
        "prediction_type": teacher.prediction_type,
        "resolution": resolution,
        "latent_shape": list(teacher.latent_shape(resolution)),
        "prompts": list(prompts),
        "negative_prompts": None if negative_prompts is None else list(negative_prompts),
        "negative_prompt_prob": cfg.negative_prompt_prob,
        "num_trajectories": n,
        "shard_size": cfg.shard_size,
        "num_shards": -(-n // cfg.shard_size),
        "num_inference_steps": cfg.num_inference_steps,
        "scheduler": {"class": type(scheduler).__name__, "config": _scheduler_config(scheduler)},
        "timesteps": scheduler.timesteps.float().tolist(),  # one record per UNet evaluation (PNDM: steps + 1)
        "w_min": cfg.w_min,
        "w_max": cfg.w_max,
        "seed": seed,
        "dtype": cfg.trajectory_dtype,
        "batch_size": cfg.trajectory_batch_size,
    }


def _scheduler_config(scheduler) -> dict:
    """The scheduler's settings as JSON, without diffusers' bookkeeping keys (``_use_default_values`` is built
    from a set: its order changes between processes, which would change the fingerprint)."""
    config = {k: v for k, v in dict(scheduler.config).items() if not k.startswith("_")}
    return json.loads(json.dumps(config, default=lambda v: v.tolist() if hasattr(v, "tolist") else str(v)))


def fingerprint(plan: dict) -> str:
    return hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()[:16]


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].contiguous()
        h.update(key.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _shard_range(plan: dict, k: int) -> tuple[int, int]:
    size = plan["shard_size"]
    return k * size, min((k + 1) * size, plan["num_trajectories"])


# --- generation ------------------------------------------------------------------------------------------------
def _draws(plan: dict, k: int, device) -> dict:
    """The random choices of shard k (w, negative prompts, noise), from a generator seeded by (seed, k)."""
    start, end = _shard_range(plan, k)
    n = end - start
    g = torch.Generator().manual_seed(plan["seed"] * 1_000_003 + k)
    w = plan["w_min"] + (plan["w_max"] - plan["w_min"]) * torch.rand(n, generator=g, dtype=torch.float64)
    prompt_index = torch.arange(start, end) % len(plan["prompts"])
    use_negative = torch.rand(n, generator=g) < plan["negative_prompt_prob"]
    if plan["negative_prompts"] is None:  # another training prompt, never the trajectory's own
        other = torch.randint(0, max(1, len(plan["prompts"]) - 1), (n,), generator=g)
        negative = other + (other >= prompt_index).long()
    else:
        negative = torch.randint(0, len(plan["negative_prompts"]), (n,), generator=g)
    negative_index = torch.where(use_negative, negative, torch.full_like(negative, -1))
    noise = torch.randn((n, *plan["latent_shape"]), generator=g)
    return {
        "w": w.float(),
        "prompt_index": prompt_index,
        "negative_index": negative_index,
        "trajectory_index": torch.arange(start, end),
        "noise": noise.to(device),
        "generator": g,
    }


def negative_texts(plan: dict) -> list[str]:
    return plan["prompts"] if plan["negative_prompts"] is None else plan["negative_prompts"]


def negative_conds(teacher, plan: dict, negative_index: torch.Tensor, resolution: int):
    """The CFG branch each trajectory guides away from: a negative prompt, or the unconditional input (-1)."""
    from ...models.denoiser import cat_conds

    texts = negative_texts(plan)
    null = teacher.null_cond(1, resolution)
    return cat_conds(
        [null if i < 0 else teacher.encode([texts[i]], resolution) for i in negative_index.tolist()]
    )


@torch.no_grad()
def make_shard(plan: dict, k: int, teacher) -> dict[str, torch.Tensor]:
    """The tensors of shard k: the teacher's CFG trajectories of its trajectories (a pure function of plan, k)."""
    from .method import cfg_trajectory, make_scheduler

    d = _draws(plan, k, teacher.device)
    res = plan["resolution"]
    native = teacher.denoiser(adapter=None).native
    dtype = DTYPES[plan["dtype"]]
    parts: dict[str, list] = {"x_t": [], "target": []}
    for i in range(0, len(d["w"]), plan["batch_size"]):
        sl = slice(i, i + plan["batch_size"])
        cond = teacher.encode([plan["prompts"][j] for j in d["prompt_index"][sl].tolist()], res)
        uncond = negative_conds(teacher, plan, d["negative_index"][sl], res)
        sched = make_scheduler(plan["scheduler"]["config"], plan["scheduler"]["class"])
        out = cfg_trajectory(
            native,
            sched,
            d["noise"][sl],
            cond,
            uncond,
            d["w"][sl],
            plan["num_inference_steps"],
            d["generator"],
        )
        parts["x_t"].append(out["x_t"].to(dtype).cpu())
        parts["target"].append(out["target"].to(dtype).cpu())
        t = out["t"].cpu()
    return {
        "x_t": torch.cat(parts["x_t"]),
        "target": torch.cat(parts["target"]),
        "t": t,
        **{key: d[key] for key in ("w", "prompt_index", "negative_index", "trajectory_index")},
    }


def write_shard(path: Path, tensors: dict[str, torch.Tensor], plan: dict, k: int) -> None:
    """Write atomically: a temporary file renamed into place."""
    tensors = {key: v.contiguous() for key, v in tensors.items()}
    meta = {"fastdiff": "agd-trajectories", "fingerprint": fingerprint(plan), "shard": str(k)}
    meta["sha256"] = _digest(tensors)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)


def check_shard(path: Path, plan: dict, k: int, verify: bool = True) -> str | None:
    """Why shard k at ``path`` is unusable (missing, truncated, another plan, wrong contents), or None if good.

    ``verify`` also recomputes the checksum of the tensor bytes (reads the whole shard)."""
    if not path.is_file():
        return "missing"
    start, end = _shard_range(plan, k)
    n, steps = end - start, len(plan["timesteps"])
    shape = (n, steps, *plan["latent_shape"])
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("fingerprint") != fingerprint(plan) or meta.get("shard") != str(k):
                return "written for another plan or shard"
            if sorted(f.keys()) != sorted(KEYS):
                return f"keys {sorted(f.keys())}"
            for key in ("x_t", "target"):
                if tuple(f.get_slice(key).get_shape()) != shape:
                    return f"{key} has shape {f.get_slice(key).get_shape()}, expected {list(shape)}"
            if not verify:
                return None
            tensors = {key: f.get_tensor(key) for key in KEYS}
    except Exception as e:  # truncated or not a safetensors file
        return f"unreadable ({type(e).__name__}: {e})"
    if _digest(tensors) != meta.get("sha256"):
        return "checksum mismatch (corrupt)"
    if tensors["trajectory_index"].tolist() != list(range(start, end)):
        return "holds other trajectories"
    return None


def _read_manifest(folder: Path) -> dict | None:
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise TrajectoryError(
            f"{path} is not valid JSON ({e}): delete it to start the folder afresh"
        ) from None


def _write_manifest(folder: Path, manifest: dict) -> None:
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, folder / MANIFEST)


def _check_same_plan(folder: Path, manifest: dict, plan: dict) -> None:
    if manifest.get("fingerprint") == fingerprint(plan):
        return
    old = manifest.get("plan", {})
    diff = sorted(k for k in set(old) | set(plan) if old.get(k) != plan.get(k))
    raise TrajectoryError(
        f"{folder} holds trajectories of another plan (differs in: {', '.join(diff) or 'version'}); "
        "set agd.trajectories to a new folder or delete this one"
    )


def generate_trajectories(
    folder: str | Path,
    plan: dict,
    teacher,
    rank: int = 0,
    world_size: int = 1,
    barrier: Callable[[], None] = lambda: None,
    max_shards: int | None = None,
) -> dict:
    """Generate every missing or broken shard of ``plan`` into ``folder`` (ranks split the shards).

    Args:
        folder: the trajectory folder (created).
        plan: from ``make_plan``.
        teacher: the loaded Teacher (its bare UNet with CFG).
        rank / world_size / barrier: several processes share the work: rank r makes shards k = r mod world_size;
            ``barrier`` waits for all of them (e.g. ``accelerator.wait_for_everyone``).
        max_shards: stop after generating this many shards (this rank); for tests of interrupted runs.

    Returns:
        {"generated": [shard indices made here], "skipped": [...already good], "complete": bool}.
    """
    folder = Path(folder)
    if rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
        manifest = _read_manifest(folder)
        if manifest is not None:
            _check_same_plan(folder, manifest, plan)
        else:
            _write_manifest(folder, {"fingerprint": fingerprint(plan), "complete": False, "plan": plan})
        for tmp in folder.glob("*.tmp"):  # left over by an interrupted write
            tmp.unlink()
    barrier()
    if rank != 0:
        _check_same_plan(folder, _read_manifest(folder) or {}, plan)
    generated, skipped = [], []
    for k in range(rank, plan["num_shards"], world_size):
        path = folder / shard_name(k)
        reason = check_shard(path, plan, k)
        if reason is None:
            skipped.append(k)
            continue
        if max_shards is not None and len(generated) >= max_shards:
            break
        if reason != "missing":
            logger.warning("trajectory shard %s is %s: generating it again", path.name, reason)
        write_shard(path, make_shard(plan, k, teacher), plan, k)
        generated.append(k)
        logger.info("trajectory shard %d/%d written", k + 1, plan["num_shards"])
    barrier()
    complete = False
    if rank == 0:
        missing = [
            k for k in range(plan["num_shards"]) if check_shard(folder / shard_name(k), plan, k, False)
        ]
        complete = not missing
        shards = [
            {"file": shard_name(k), "trajectories": list(_shard_range(plan, k))}
            for k in range(plan["num_shards"])
        ]
        _write_manifest(
            folder, {"fingerprint": fingerprint(plan), "complete": complete, "plan": plan, "shards": shards}
        )
    barrier()
    return {"generated": generated, "skipped": skipped, "complete": complete or _complete(folder)}


def _complete(folder: Path) -> bool:
    manifest = _read_manifest(folder)
    return bool(manifest and manifest.get("complete"))


# --- reading ---------------------------------------------------------------------------------------------------
class TrajectoryStore:
    """Read access to a complete trajectory folder: records (one per trajectory and step) by global index.

    Record r is step r mod S of trajectory r div S (trajectories in shard order). Shards are read lazily, one
    record at a time (``safe_open`` slices), so the folder may be far larger than memory.
    """

    def __str__(self) -> str:
        return f"{self.folder}: {self.plan['num_trajectories']} trajectories, {self.num_records} records"

    def __init__(self, folder: str | Path, plan: dict | None = None):
        self.folder = Path(folder)
        manifest = _read_manifest(self.folder)
        if manifest is None:
            raise TrajectoryError(f"{self.folder} has no {MANIFEST}: generate trajectories first")
        if plan is not None:
            _check_same_plan(self.folder, manifest, plan)
        if not manifest.get("complete"):
            raise TrajectoryError(
                f"{self.folder} is incomplete: run `fastdiff agd-trajectories` again to finish it"
            )
        self.plan = manifest["plan"]
        for k in range(self.plan["num_shards"]):
            reason = check_shard(self.folder / shard_name(k), self.plan, k, verify=False)
            if reason is not None:
                raise TrajectoryError(
                    f"{self.folder / shard_name(k)} is {reason}: run agd-trajectories again"
                )
        self.steps = len(self.plan["timesteps"])  # records per trajectory
        self.num_records = self.plan["num_trajectories"] * self.steps
        self._files: dict[int, object] = {}
        self._small: dict[int, dict[str, torch.Tensor]] = {}

    @property
    def prompts(self) -> list[str]:
        return self.plan["prompts"]

    @property
    def negative_prompts(self) -> list[str]:
        return negative_texts(self.plan)

    def _shard(self, k: int):
        if k not in self._files:
            f = safe_open(str(self.folder / shard_name(k)), framework="pt")
            self._files[k] = f
            self._small[k] = {key: f.get_tensor(key) for key in KEYS if key not in ("x_t", "target")}
        return self._files[k], self._small[k]

    def records(self, indices: list[int]) -> dict[str, torch.Tensor]:
        """x_t, target (float32), t, w (float32), prompt_index, negative_index of the given records."""
        out: dict[str, list] = {
            key: [] for key in ("x_t", "target", "t", "w", "prompt_index", "negative_index")
        }
        size = self.plan["shard_size"]
        for r in indices:
            if not 0 <= r < self.num_records:
                raise IndexError(f"record {r} out of range [0, {self.num_records})")
            traj, step = divmod(r, self.steps)
            k, i = divmod(traj, size)
            f, small = self._shard(k)
            out["x_t"].append(f.get_slice("x_t")[i : i + 1, step : step + 1])
            out["target"].append(f.get_slice("target")[i : i + 1, step : step + 1])
            out["t"].append(small["t"][step])
            for key in ("w", "prompt_index", "negative_index"):
                out[key].append(small[key][i])
        x_t = torch.cat(out.pop("x_t")).flatten(0, 1).float()
        target = torch.cat(out.pop("target")).flatten(0, 1).float()
        return {"x_t": x_t, "target": target, **{key: torch.stack(v) for key, v in out.items()}}


# --- a run's AGD data stage ------------------------------------------------------------------------------------
def trajectory_folder(cfg) -> Path:
    """``agd.trajectories``, or ``<output_dir>/trajectories``."""
    return Path(cfg.section.trajectories or Path(cfg.output_dir) / "trajectories")


def prepare(cfg, teacher, resolution: int, rank: int = 0, world_size: int = 1, barrier=lambda: None):
    """Generate what is missing of the run's trajectory folder and open it (``fastdiff agd-trajectories``)."""
    from ...data import load_prompts

    if not cfg.prompts:
        raise ValueError(
            "agd samples its training data from the teacher and needs prompts: set `prompts=<file.txt|.jsonl>`"
        )
    prompts = load_prompts(cfg.prompts)
    negatives = load_prompts(cfg.section.negative_prompts) if cfg.section.negative_prompts else None
    plan = make_plan(cfg.section, teacher, prompts, negatives, resolution, cfg.seed)
    folder = trajectory_folder(cfg)
    report = generate_trajectories(folder, plan, teacher, rank, world_size, barrier)
    logger.info(
        "AGD trajectories in %s: %d shards generated, %d already done",
        folder,
        len(report["generated"]),
        len(report["skipped"]),
    )
    if not report["complete"]:
        raise TrajectoryError(f"{folder} is incomplete after generation")
    return TrajectoryStore(folder, plan)


def trajectory_batch_fn(
    cfg, teacher, store: TrajectoryStore, resolution: int, rank: int = 0, world_size: int = 1
):
    """``batch_fn(step, micro, generator)`` of the trainer: records drawn as ``data.sample_indices`` orders them."""
    from ...data import sample_indices

    accum = cfg.gradient_accumulation_steps

    def batch_fn(step: int, micro: int, generator: torch.Generator) -> dict:
        idx = sample_indices(
            store.num_records, cfg.train_batch_size, step * accum + micro, cfg.seed, rank, world_size
        )
        rec = store.records(idx)
        texts = [store.prompts[i] for i in rec["prompt_index"].tolist()]
        dev = teacher.device
        return {
            "x_t": rec["x_t"].to(dev),
            "target": rec["target"].to(dev),
            "t": rec["t"].to(dev),
            "w": rec["w"].to(dev),
            "cond": teacher.encode(texts, resolution),
            "negative": negative_conds(teacher, store.plan, rec["negative_index"], resolution),
            "prompts": texts,
        }

    return batch_fn
