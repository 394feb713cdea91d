"""The training loop on accelerate. It knows parameter groups, not algorithms.

Per iteration, each group due at the step (``Group.updates_at``) computes its loss (over gradient-accumulation
micro-batches), has its gradients averaged across ranks, clipped, and applied by its own optimizer. All randomness
of a step comes from a generator seeded by (seed, step, slice, group), where slice = rank * accumulation + micro-batch
numbers the global batch's parts, so a resumed run replays the uninterrupted one exactly, and R ranks train as one
rank with R times the accumulation. Gradients are averaged with one flattened all-reduce per group instead of DDP: methods
call the same network several times per loss (in shared-base mode the teacher, fake score and generator are one
UNet), which DDP's forward hooks cannot follow.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import re
import shutil
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import AutocastKwargs, ProjectConfiguration
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from .methods.base import Group, Method
from .parallel import copy_full_into, local_bytes

logger = logging.getLogger("fastdiff")
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
OPTIMIZER_DIR = "optimizer"  # parallel=fsdp: the optimizers' sharded states (torch.distributed.checkpoint)


class NonFiniteLossError(RuntimeError):
    """Too many non-finite losses in a row."""


def step_seed(seed: int, step: int, rank: int, group: int, micro: int) -> int:
    return (seed * 1_000_003 + step * 10_007 + rank * 1_009 + group * 101 + micro) % (2**63)


def find_checkpoint(output_dir: str | Path, which: str) -> Path | None:
    """Resolve ``resume_from_checkpoint``: "latest" (the newest checkpoint that verifies, with a warning for each
    damaged one passed over; None when there is none) or a folder (a ValueError naming it when it is damaged)."""
    if which != "latest":
        path = Path(which)
        if not path.is_dir():
            path = Path(output_dir) / "checkpoints" / which
        if not (path / "trainer_state.json").is_file():
            raise FileNotFoundError(f"resume_from_checkpoint: {which} is not a fastdiff checkpoint folder")
        problem = verify_checkpoint(path)
        if problem:
            raise ValueError(f"resume_from_checkpoint: {path} is damaged: {problem}")
        return path
    root = Path(output_dir) / "checkpoints"
    found = [(int(m.group(1)), p) for p in root.glob("checkpoint-*") if (m := CHECKPOINT_RE.match(p.name))]
    for _, path in sorted(found, reverse=True):
        problem = verify_checkpoint(path)
        if problem is None:
            return path
        logger.warning("checkpoint %s is damaged (%s): trying the one before", path, problem)
    return None


MANIFEST = "manifest.json"  # a checkpoint's files and sizes, written last


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(folder: Path) -> None:
    """Flush every file of a checkpoint folder to disk, then record each one's size in ``manifest.json`` (flushed
    too, with the folders)."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        _fsync(path)
        files[path.relative_to(folder).as_posix()] = path.stat().st_size
    (folder / MANIFEST).write_text(json.dumps({"files": files}, indent=1))
    _fsync(folder / MANIFEST)
    for sub in sorted({p.parent for p in folder.rglob("*")} | {folder}):
        _fsync(sub)


def verify_checkpoint(path: Path) -> str | None:
    """What is wrong with a checkpoint folder, or None: no trainer state; a file of its manifest missing or of
    another size (a checkpoint written before manifests is taken on its trainer state); a safetensors file whose
    header does not read."""
    from safetensors import safe_open

    if not (path / "trainer_state.json").is_file():
        return "no trainer_state.json"
    manifest = path / MANIFEST
    if manifest.is_file():
        try:
            files = json.loads(manifest.read_text())["files"]
        except (ValueError, KeyError):
            return f"{MANIFEST} does not read"
        for name, size in files.items():
            f = path / name
            if not f.is_file():
                return f"{name} is missing"
            if f.stat().st_size != size:
                return f"{name} has {f.stat().st_size} bytes, {size} were written"
    for f in path.glob("*.safetensors"):
        try:
            with safe_open(str(f), "pt") as handle:
                handle.keys()
        except Exception as e:  # truncated or overwritten
            return f"{f.name} does not read ({type(e).__name__}: {e})"
    return None


def make_optimizer(group: Group, device=None) -> torch.optim.Optimizer:
    """The optimizer a group asks for: ``adamw`` (torch) or ``adamw8bit`` (bitsandbytes' 8-bit AdamW, GPU only)."""
    params = list(group.params.values())
    kwargs = dict(lr=group.lr, betas=group.betas, weight_decay=group.weight_decay, eps=group.eps)
    if group.optimizer == "adamw":
        return torch.optim.AdamW(params, **kwargs)
    if group.optimizer == "adamw8bit":
        if device is not None and torch.device(device).type != "cuda":
            raise ValueError(f"group {group.name!r}: optimizer adamw8bit (bitsandbytes) needs a CUDA GPU")
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ValueError(
                f"group {group.name!r}: optimizer adamw8bit needs bitsandbytes: pip install 'fastdiff[gpu]'"
            ) from None
        return bnb.optim.AdamW8bit(params, **kwargs)
    raise ValueError(f"group {group.name!r}: unknown optimizer {group.optimizer!r} (adamw, adamw8bit)")


TRACKER_PACKAGES = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",)}  # either one will do


def trackers(report_to: str) -> list[str]:
    """The trackers ``report_to`` names: none, tensorboard, wandb, a comma list of them, or all (those installed).
    A named tracker whose package is missing is an error here, before training (accelerate would only warn and
    train without logs)."""
    from .config import ConfigError

    names = [n.strip() for n in str(report_to).split(",") if n.strip()]
    if names in ([], ["none"]):
        return []
    installed = [n for n, pkgs in TRACKER_PACKAGES.items() if any(importlib.util.find_spec(p) for p in pkgs)]
    if names == ["all"]:
        if not installed:
            raise ConfigError("report_to=all: no tracker is installed; pip install tensorboard (or wandb)")
        return installed
    for name in names:
        if name not in TRACKER_PACKAGES:
            raise ConfigError(
                f"report_to: unknown tracker {name!r}; use none, tensorboard, wandb, tensorboard,wandb or all"
            )
        if name not in installed:
            raise ConfigError(
                f"report_to={report_to} needs the {name} package, which is not installed: pip install {name}"
            )
    return list(dict.fromkeys(names))


def make_accelerator(cfg) -> Accelerator:
    """The Accelerator of a run, in the run's precision (``config.resolve_mixed_precision``) and with its trackers
    (``trackers``). Autocast's weight-cast cache is off: a method may call a network without grad (backward
    simulation) and then with grad in one autocast region, and cached casts would make gradient checkpointing
    recompute a different graph."""
    from .config import resolve_mixed_precision

    out = Path(cfg.output_dir)
    return Accelerator(
        mixed_precision=resolve_mixed_precision(cfg.mixed_precision),
        log_with=trackers(cfg.report_to) or None,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
        kwargs_handlers=[AutocastKwargs(cache_enabled=False)],
    )


class Trainer:
    """Train a ``Method`` with accelerate.

    Args:
        method: the algorithm (its groups, losses and sampler).
        cfg: the run config (``TrainConfig``: steps, precision, checkpointing, validation, trackers).
        batch_fn: ``batch_fn(step, micro, generator) -> dict``, the batch of one micro-step (deterministic).
        validate_fn: ``validate_fn(step) -> None``, run on the main process every ``validation_steps``.
        config_dict: the plain config saved in checkpoints and given to trackers.
        accelerator: an Accelerator to use (default: one built from cfg).
    """

    def __init__(
        self,
        method: Method,
        cfg,
        batch_fn: Callable,
        validate_fn: Callable | None = None,
        config_dict: dict | None = None,
        accelerator: Accelerator | None = None,
    ):
        self.cfg, self.method, self.batch_fn, self.validate_fn = cfg, method, batch_fn, validate_fn
        self.config_dict = config_dict or {}
        self.output_dir = Path(cfg.output_dir)
        self.accelerator = accelerator or make_accelerator(cfg)
        acc = self.accelerator
        self.groups: list[Group] = method.groups()
        self.fsdp = (
            getattr(cfg, "parallel", "ddp") == "fsdp"
        )  # sharded UNets (several ranks), sharded checkpoints
        if self.fsdp and acc.mixed_precision == "fp16":
            raise ValueError(
                "parallel=fsdp trains in fp32 or bf16 (fp16 would need a sharded gradient scaler)"
            )
        self.step = 0
        self.nonfinite_total = 0
        self.nonfinite_in_row: dict[str, int] = {}  # per group: consecutive skipped updates
        self.last_terms: dict[str, float] = {}
        self._setup_networks()
        self.optimizers, self.schedulers = [], []
        for g in self.groups:
            opt = make_optimizer(g, acc.device)
            warmup = (
                g.warmup_steps * acc.num_processes
            )  # accelerate steps a prepared scheduler once per process
            updates = g.num_updates(cfg.max_steps) * acc.num_processes  # this group's scheduler steps
            procs = acc.num_processes

            def factor(s, w=warmup, n=updates, kind=g.lr_schedule, phase=g.lr_multiplier, procs=procs):
                return lr_factor(s, w, n, kind) * (phase(s // procs) if phase is not None else 1.0)

            sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
            opt, sched = acc.prepare(opt, sched)
            self.optimizers.append(opt)
            self.schedulers.append(sched)
        self.emas = [self._make_ema(g) for g in self.groups]

    # --- set-up -----------------------------------------------------------------------------------------------
    def _setup_networks(self):
        acc, method = self.accelerator, self.method
        method.to(acc.device)
        trainable = {id(p) for g in self.groups for p in g.params.values()}
        keep = {id(p) for name in method.keep_fp32 for p in method.get_submodule(name).parameters()}
        weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(acc.mixed_precision, torch.float32)
        for p in method.parameters():
            if id(p) not in trainable:
                p.requires_grad_(False)
                if p.is_floating_point() and weight_dtype != torch.float32 and id(p) not in keep:
                    p.data = p.data.to(weight_dtype)  # frozen weights in half precision, trainable in fp32
        for g in self.groups:
            for p in g.params.values():
                p.data = p.data.float()
        if self.cfg.gradient_checkpointing:
            method.enable_gradient_checkpointing()
        if self.fsdp and acc.num_processes > 1:
            from .parallel import shard

            dtype = None if weight_dtype == torch.float32 else weight_dtype
            self.groups = shard(method, self.groups, acc.device, dtype, self.cfg.fsdp_shard_frozen)
        self._set_trainable(None)

    def _make_ema(self, g: Group):
        """diffusers' EMAModel; note its warm-up caps the decay at (1 + n) / (10 + n) after n updates."""
        if not g.ema_decay:
            return None
        from diffusers.training_utils import EMAModel

        return EMAModel(list(g.params.values()), decay=g.ema_decay)

    def _set_trainable(self, group: Group | None):
        """Only the group being updated requires grad; gradients still flow *through* the other networks."""
        for g in self.groups:
            for p in g.params.values():
                p.requires_grad_(g is group)

    # --- the loop ---------------------------------------------------------------------------------------------
    def fit(self) -> None:
        acc, cfg = self.accelerator, self.cfg
        if trackers(cfg.report_to):
            acc.init_trackers(cfg.tracker_project, config=_flat_config(self.config_dict))
        if cfg.resume_from_checkpoint:
            path = find_checkpoint(self.output_dir, cfg.resume_from_checkpoint)
            if path is not None:
                self.load_checkpoint(path)
            else:
                logger.info("resume_from_checkpoint=latest: no checkpoint yet, starting from scratch")
        quiet = (
            {} if acc.is_local_main_process else {"disable": True}
        )  # leave TQDM_DISABLE in charge on rank 0
        bar = tqdm(total=cfg.max_steps, initial=self.step, desc="train", **quiet)
        with logging_redirect_tqdm():  # log lines (a checkpoint saved, a skipped update) print above the bar
            while self.step < cfg.max_steps:
                self.train_step()
                bar.update(1)
                bar.set_postfix({k: f"{v:.4g}" for k, v in self.last_terms.items()}, refresh=False)
                acc.log({**self.last_terms, "nonfinite_total": self.nonfinite_total}, step=self.step)
                if self.step % cfg.checkpointing_steps == 0 or self.step == cfg.max_steps:
                    self.save_checkpoint()
                if self.validate_fn is not None and (
                    self.step % cfg.validation_steps == 0 or self.step == cfg.max_steps
                ):
                    if acc.is_main_process or (self.fsdp and acc.num_processes > 1):  # shards: every rank
                        self.validate_fn(self.step)
                    acc.wait_for_everyone()
        bar.close()

    def train_step(self) -> dict[str, float]:
        """One iteration: every group due at this step (``Group.updates_at``) is updated, then the step advances.
        Returns the latest loss terms (checkpointing, validation and logging are ``fit``'s)."""
        for gi, group in enumerate(self.groups):
            if group.updates_at(self.step):
                self._update(gi, group)
        self.step += 1
        return dict(self.last_terms)

    def _update(self, gi: int, group: Group) -> None:
        acc, cfg = self.accelerator, self.cfg
        opt, sched, accum = self.optimizers[gi], self.schedulers[gi], cfg.gradient_accumulation_steps
        self._set_trainable(group)
        terms_sum: dict[str, float] = {}
        finite = True
        for micro in range(accum):
            part = acc.process_index * accum + micro  # the global batch's slice (see run.make_batch_fn)
            gen = torch.Generator().manual_seed(step_seed(cfg.seed, self.step, part, gi, 0))
            batch = self.batch_fn(self.step, micro, gen)
            with acc.autocast():
                terms = self.method.loss(group.name, batch, self.step, gen)
            loss = sum(terms.values()) / accum
            # every rank must agree to skip, or the others would wait in the all-reduce forever
            ok = acc.reduce(torch.isfinite(loss.detach()).float().reshape(1), reduction="sum")
            if ok.item() < acc.num_processes:
                finite = False
                bad = {k: float(v.detach()) for k, v in terms.items()}
                break
            acc.backward(loss)
            for k, v in terms.items():
                terms_sum[f"{group.name}/{k}"] = (
                    terms_sum.get(f"{group.name}/{k}", 0.0) + float(v.detach()) / accum
                )
        params = list(group.params.values())
        if finite:
            self._all_reduce_grads(params)
            if group.max_grad_norm and self.fsdp:
                from .parallel import clip_grad_norm

                norm = clip_grad_norm(params, group.max_grad_norm, lambda t: acc.reduce(t, reduction="sum"))
                finite = bool(torch.isfinite(norm))
                bad = {"grad_norm": float(norm)}
            elif group.max_grad_norm:
                norm = acc.clip_grad_norm_(params, group.max_grad_norm)
                finite = bool(torch.isfinite(torch.as_tensor(norm)))
                bad = {"grad_norm": float(norm)}
        if not finite:
            opt.zero_grad(set_to_none=True)
            self.nonfinite_total += 1
            in_row = self.nonfinite_in_row[group.name] = self.nonfinite_in_row.get(group.name, 0) + 1
            logger.warning(
                "non-finite loss in group %r at step %d (%s): update skipped", group.name, self.step, bad
            )
            acc.log({"nonfinite_total": self.nonfinite_total}, step=self.step)
            if in_row >= cfg.max_consecutive_nonfinite:
                raise NonFiniteLossError(
                    f"{in_row} non-finite losses in a row (last: group {group.name!r}, step {self.step}, "
                    f"terms {bad}); lower the learning rate or check the data. Training stopped."
                )
            self._set_trainable(None)
            return
        self.nonfinite_in_row[group.name] = 0
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if self.emas[gi] is not None:
            self.emas[gi].step(params)
        self.last_terms.update(terms_sum)
        self.last_terms[f"{group.name}/lr"] = sched.get_last_lr()[0]
        self._set_trainable(None)

    def _all_reduce_grads(self, params: list[torch.nn.Parameter]) -> None:
        """Average gradients across ranks with one flattened all-reduce. Parameters sharded by FSDP2 (DTensors) are
        skipped: their gradients arrive reduce-scattered (averaged) already."""
        from torch.distributed.tensor import DTensor

        acc = self.accelerator
        params = [p for p in params if not isinstance(p, DTensor)]
        if acc.num_processes == 1 or not params:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = acc.reduce(torch.cat([g.flatten().float() for g in grads]), reduction="mean")
        offset = 0
        for p in params:
            n = p.numel()
            p.grad = flat[offset : offset + n].view_as(p).to(p.dtype)
            offset += n

    # --- checkpoints ------------------------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        """Write checkpoints/checkpoint-<step> atomically: everything goes to a temporary folder, then a rename."""
        acc = self.accelerator
        root = self.output_dir / "checkpoints"
        final, tmp = root / f"checkpoint-{self.step}", root / f".tmp-checkpoint-{self.step}"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        if self.fsdp:  # optimizer states sharded (torch.distributed.checkpoint), schedulers in trainer_state
            optimizer_groups = self._save_optimizers(tmp / OPTIMIZER_DIR)
        else:
            acc.save_state(str(tmp))  # optimizers, lr schedulers, RNG states (accelerate)
        sync = self._rank_report()
        has_ema = any(e is not None for e in self.emas)
        if acc.is_main_process or self.fsdp:  # sharded weights are all-gathered: every rank takes part
            weights = self._state_tensors(ema=False)
            ema = self._state_tensors(ema=True) if has_ema else None
        if acc.is_main_process:
            save_file(weights, str(tmp / "trainable.safetensors"))
            extra = self.method.extra_state()
            if extra:
                save_file(
                    {k: v.detach().cpu().contiguous() for k, v in extra.items()},
                    str(tmp / "method_state.safetensors"),
                )
            if has_ema:
                save_file(ema, str(tmp / "ema.safetensors"))
            state = {
                "step": self.step,
                "method": self.method.name,
                "groups": [g.name for g in self.groups],
                "nonfinite_total": self.nonfinite_total,
                "nonfinite_in_row": self.nonfinite_in_row,
                "last_terms": self.last_terms,
                "num_processes": acc.num_processes,
                # EMAModel's update counters: its warm-up decay (1 + n) / (10 + n) continues from them on resume
                "ema_steps": [None if e is None else e.optimization_step for e in self.emas],
                "parallel": "fsdp" if self.fsdp else "ddp",
                **(
                    {"lr_updates": self._lr_updates(), "optimizer_groups": optimizer_groups}
                    if self.fsdp
                    else {}
                ),
                **sync,
                "config": self.config_dict,
            }
            (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))
            write_manifest(tmp)  # last: a checkpoint without it, or not matching it, was not finished
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync(root)
            self._prune(root)
            logger.info("saved checkpoint %s", final)
        acc.wait_for_everyone()
        return final

    def _save_optimizers(self, folder: Path) -> list[str]:
        """Every group's optimizer state (of groups that have updated; their names returned) with
        torch.distributed.checkpoint: each rank writes its shards; a load may reshard them to another number of
        ranks."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        with self._all_trainable():
            state = {
                g.name: get_optimizer_state_dict(self.method, opt.optimizer)
                for g, opt in zip(self.groups, self.optimizers)
                if opt.optimizer.state  # a group that has not updated yet has no state to keep
            }
        dcp.save({"optimizers": state}, checkpoint_id=str(folder))
        return sorted(state)

    def _load_optimizers(self, folder: Path, names: list[str]) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

        live = {g.name: opt.optimizer for g, opt in zip(self.groups, self.optimizers)}
        with self._all_trainable():
            state = {
                name: get_optimizer_state_dict(self.method, live[name]) for name in names
            }  # the template
            dcp.load({"optimizers": state}, checkpoint_id=str(folder))
            for name in names:
                set_optimizer_state_dict(self.method, live[name], state[name])

    @contextmanager
    def _all_trainable(self):
        """Every group's parameters require grad for the length of a block: torch's optimizer state dicts leave
        out parameters that do not (frozen ones), which between updates all are (``_set_trainable``)."""
        for g in self.groups:
            for p in g.params.values():
                p.requires_grad_(True)
        try:
            yield
        finally:
            self._set_trainable(None)

    def _lr_updates(self) -> list[int]:
        """Each group's learning-rate scheduler position in updates (accelerate steps a prepared scheduler once per
        process per update, so this is independent of the number of ranks)."""
        return [sched.scheduler.last_epoch // self.accelerator.num_processes for sched in self.schedulers]

    def _set_lr_updates(self, sched, updates: int) -> None:
        """Put a prepared LambdaLR at ``updates`` updates of this run's number of processes."""
        inner = sched.scheduler
        n = updates * self.accelerator.num_processes
        inner.last_epoch, inner._step_count = n, n + 1
        lrs = [base * factor(n) for base, factor in zip(inner.base_lrs, inner.lr_lambdas)]
        for group, lr in zip(inner.optimizer.param_groups, lrs):
            group["lr"] = lr
        inner._last_lr = lrs

    def _rank_report(self) -> dict:
        """Per-rank parameter checksums (must agree: gradients are synchronised), last losses (data differ) and the
        bytes of trainable parameters each rank holds."""
        acc = self.accelerator
        from .parallel import full

        with torch.no_grad():
            params = [full(p) for g in self.groups for p in g.params.values()]
            checksum = sum(float(p.double().sum()) + float(p.double().square().sum()) for p in params)
        loss = sum(v for k, v in self.last_terms.items() if not k.endswith("/lr"))
        held = local_bytes({id(p): p for g in self.groups for p in g.params.values()}.values())
        row = torch.tensor([[checksum, loss, held]], dtype=torch.float64, device=acc.device)
        table = acc.gather(row).cpu().tolist() if acc.num_processes > 1 else row.cpu().tolist()
        sums = [r[0] for r in table]
        if max(sums) - min(sums) > 1e-6 * max(1.0, abs(sums[0])):
            raise RuntimeError(f"ranks hold different weights at step {self.step}: checksums {sums}")
        return {
            "param_checksum_by_rank": sums,
            "loss_by_rank": [r[1] for r in table],
            "trainable_bytes_by_rank": [int(r[2]) for r in table],  # this rank's shards (fsdp) or all
        }

    def _prune(self, root: Path) -> None:
        limit = self.cfg.checkpoints_total_limit
        if not limit:
            return
        found = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := CHECKPOINT_RE.match(p.name)))
        for _, p in found[:-limit]:
            shutil.rmtree(p)

    def _state_tensors(self, ema: bool) -> dict[str, torch.Tensor]:
        """Every group's parameters (or EMA weights) in full, float32 on the CPU (sharded ones all-gathered: every
        rank calls this)."""
        from .parallel import full

        out = {}
        for g, e in zip(self.groups, self.emas):
            if ema and e is None:
                continue
            values = e.shadow_params if ema else list(g.params.values())
            for name, v in zip(g.params, values):
                out[f"{g.name}/{name}"] = full(v.detach()).float().cpu().contiguous()
        return out

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore weights, EMA, optimizers, schedulers and the step: the run continues exactly."""
        path = Path(path)
        state = json.loads((path / "trainer_state.json").read_text())
        if state["method"] != self.method.name or state["groups"] != [g.name for g in self.groups]:
            raise ValueError(
                f"{path} is a checkpoint of {state['method']} {state['groups']}, not of {self.method.name}"
            )
        saved = state.get("parallel", "ddp")
        if saved != ("fsdp" if self.fsdp else "ddp"):
            raise ValueError(
                f"{path} was written with parallel={saved}; resume it with parallel={saved} (its optimizer states "
                "are stored for that mode)"
            )
        if self.fsdp:
            self._load_optimizers(path / OPTIMIZER_DIR, state["optimizer_groups"])
            for sched, updates in zip(self.schedulers, state["lr_updates"]):
                self._set_lr_updates(sched, updates)
        else:
            self.accelerator.load_state(str(path))
        self._load_tensors(load_file(str(path / "trainable.safetensors")), ema=False, where=path)
        if (path / "ema.safetensors").is_file():
            self._load_tensors(load_file(str(path / "ema.safetensors")), ema=True, where=path)
            for e, n in zip(self.emas, state.get("ema_steps") or [None] * len(self.emas)):
                if e is not None and n is not None:
                    e.optimization_step = n
        if (path / "method_state.safetensors").is_file():
            self.method.load_extra_state(load_file(str(path / "method_state.safetensors")))
        self.step = state["step"]
        self.nonfinite_total, self.nonfinite_in_row = state["nonfinite_total"], state["nonfinite_in_row"]
        self.last_terms = state.get("last_terms", {})
        logger.info("resumed from %s at step %d", path, self.step)

    def _load_tensors(self, tensors: dict[str, torch.Tensor], ema: bool, where: Path) -> None:
        if not ema:
            return load_group_tensors(self.groups, tensors, where)
        for g, e in zip(self.groups, self.emas):
            if e is not None:
                load_group_tensors([g], tensors, where, targets=[e.shadow_params])

    def use_ema_weights(self) -> None:
        """Copy each group's EMA weights (where kept) into the live parameters, e.g. before export."""
        for g, e in zip(self.groups, self.emas):
            if e is not None:
                e.copy_to(list(g.params.values()))


def lr_factor(step: int, warmup: int, total: int, schedule: str = "constant") -> float:
    """Learning-rate multiplier after ``step`` scheduler steps: linear warm-up over ``warmup`` steps, then
    constant or a cosine decay that reaches 0 at ``total``."""
    if schedule not in ("constant", "cosine"):
        raise ValueError(f"unknown lr schedule {schedule!r}; expected constant or cosine")
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, max(0.0, (step - warmup) / max(1, total - warmup)))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def _flat_config(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat_config(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float, str, bool)) or v is None:
            out[f"{prefix}{k}"] = v if v is not None else "none"
        else:
            out[f"{prefix}{k}"] = str(v)
    return out


def load_group_tensors(groups: list[Group], tensors: dict[str, torch.Tensor], where, targets=None) -> None:
    """Copy ``<group>/<param>`` tensors of a checkpoint into the groups' parameters (or into ``targets``)."""
    for i, g in enumerate(groups):
        dests = targets[i] if targets is not None else list(g.params.values())
        for name, dest in zip(g.params, dests):
            key = f"{g.name}/{name}"
            if key not in tensors:
                raise KeyError(f"checkpoint {where} lacks {key}: it was written by a different configuration")
            copy_full_into(dest, tensors[key])
