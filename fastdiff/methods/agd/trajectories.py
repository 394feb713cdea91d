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
comes from a generator seeded by (seed, shard). Generation is resumable, atomic and split over ranks
(``fastdiff.methods.shards``, shared with the other teacher-sampling stages).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

from .. import shards
from ..shards import DTYPES, ShardError, ShardReader, ShardSpec, fingerprint, shard_name

__all__ = [
    "TrajectoryError",
    "TrajectoryStore",
    "fingerprint",
    "generate_trajectories",
    "make_plan",
    "shard_name",
]

VERSION = 1
KEYS = ("x_t", "target", "t", "w", "prompt_index", "negative_index", "trajectory_index")


class TrajectoryError(ShardError):
    """A trajectory folder that does not fit the run: another plan, a missing or unreadable shard."""


def _record_shapes(plan: dict, n: int) -> dict[str, tuple[int, ...]]:
    shape = (n, len(plan["timesteps"]), *plan["latent_shape"])
    return {"x_t": shape, "target": shape}


SPEC = ShardSpec(
    kind="agd-trajectories",
    what="trajectories",
    keys=KEYS,
    index_key="trajectory_index",
    count_key="num_trajectories",
    shapes=_record_shapes,
    folder_key="agd.trajectories",
    command="fastdiff agd-trajectories",
    error=TrajectoryError,
)


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
        **shards.teacher_fields(teacher, resolution),
        "prompts": list(prompts),
        "negative_prompts": None if negative_prompts is None else list(negative_prompts),
        "negative_prompt_prob": cfg.negative_prompt_prob,
        "num_trajectories": n,
        "shard_size": cfg.shard_size,
        "num_shards": shards.num_shards(n, cfg.shard_size),
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


# --- generation ------------------------------------------------------------------------------------------------
def _draws(plan: dict, k: int, device) -> dict:
    """The random choices of shard k (w, negative prompts, noise), from a generator seeded by (seed, k)."""
    start, end = shards.shard_range(plan, SPEC, k)
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


def generate_trajectories(folder: str | Path, plan: dict, teacher, **kw) -> dict:
    """Generate every missing or broken shard of ``plan`` (from ``make_plan``) into ``folder`` with the teacher's
    bare UNet and CFG; keywords ``rank``, ``world_size``, ``barrier``, ``max_shards`` and the report as
    ``fastdiff.methods.shards.generate``."""
    return shards.generate(folder, plan, SPEC, functools.partial(make_shard, plan, teacher=teacher), **kw)


# --- reading ---------------------------------------------------------------------------------------------------
class TrajectoryStore(ShardReader):
    """Read access to a complete trajectory folder: records (one per trajectory and step) by global index.

    Record r is step r mod S of trajectory r div S (trajectories in shard order), read one at a time.
    """

    def __str__(self) -> str:
        return f"{self.folder}: {self.plan['num_trajectories']} trajectories, {self.num_records} records"

    def __init__(self, folder: str | Path, plan: dict | None = None):
        super().__init__(folder, SPEC, plan)
        self.steps = len(self.plan["timesteps"])  # records per trajectory
        self.num_records = self.num_items * self.steps

    @property
    def prompts(self) -> list[str]:
        return self.plan["prompts"]

    @property
    def negative_prompts(self) -> list[str]:
        return negative_texts(self.plan)

    def records(self, indices: list[int]) -> dict[str, torch.Tensor]:
        """x_t, target (float32), t, w (float32), prompt_index, negative_index of the given records."""
        out: dict[str, list] = {
            key: [] for key in ("x_t", "target", "t", "w", "prompt_index", "negative_index")
        }
        for r in indices:
            if not 0 <= r < self.num_records:
                raise IndexError(f"record {r} out of range [0, {self.num_records})")
            traj, step = divmod(r, self.steps)
            k, i = self.locate(traj)
            f, small = self.shard(k)
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
    make = functools.partial(make_shard, plan, teacher=teacher)
    shards.generate_all(folder, plan, SPEC, make, rank=rank, world_size=world_size, barrier=barrier)
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
