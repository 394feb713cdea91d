"""Resumable safetensors shards made from a JSON plan: the machinery shared by the stages that sample a teacher
before training (AGD's trajectories, the teacher's ODE pairs of DMD2's regression initialisation).

Folder layout::

    manifest.json             {"fingerprint", "complete", "plan", "shards": [{"file", <what>: [start, end)}]}
    shard-00000.safetensors   items [0, shard_size) of the plan: the tensors a stage makes, one row per item for
                              every tensor the stage's ``ShardSpec.shapes`` names, plus the items' global indices;
                              header metadata: the stage's kind, the plan's fingerprint, the shard index and the
                              sha256 of the tensors

A stage supplies the plan (a JSON-able dict with ``shard_size``, ``num_shards`` and its item count, whose fingerprint
keys the folder) and ``make(k)``, the tensors of shard k as a pure function of (plan, k). ``generate`` then makes
what is missing: a shard that opens, matches the plan and its checksum is skipped; a missing, truncated or corrupt
one is (re)made, written to a temporary file and renamed, so an interruption never leaves a half-written shard under
its final name. Rank r makes shards k = r mod world_size. ``ShardReader`` opens a complete folder and reads shards
lazily (``safe_open`` slices), so a folder may be far larger than memory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

logger = logging.getLogger("fastdiff")
MANIFEST = "manifest.json"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ShardError(ValueError):
    """A shard folder that does not fit the run: another plan, a missing or unreadable shard."""


@dataclass(frozen=True)
class ShardSpec:
    """What one stage's shard folder holds, and how its messages name things.

    Args:
        kind: written into every shard's metadata (e.g. ``"agd-trajectories"``).
        what: the items in messages and in the manifest's shard list (``"trajectories"``).
        keys: every tensor of a shard.
        index_key: the tensor of the items' global indices (``"trajectory_index"``).
        count_key: the plan's number of items (``"num_trajectories"``).
        shapes: ``shapes(plan, n)``, the expected shapes of a shard's per-item tensors for its n items (the other
            keys are small and are read whole).
        folder_key: the config key that moves the folder, named when a folder holds another plan.
        command: what generates the folder, named when it is incomplete.
        error: the exception class raised (a ``ShardError``).
    """

    kind: str
    what: str
    keys: tuple[str, ...]
    index_key: str
    count_key: str
    shapes: Callable[[dict, int], dict[str, tuple[int, ...]]]
    folder_key: str
    command: str
    error: type[ShardError] = ShardError


def teacher_fields(teacher, resolution: int) -> dict:
    """The plan entries that tie a folder to its teacher: path, family, prediction type, resolution, latent shape."""
    return {
        "teacher": str(Path(teacher.path).resolve()),
        "family": teacher.family,
        "prediction_type": teacher.prediction_type,
        "resolution": resolution,
        "latent_shape": list(teacher.latent_shape(resolution)),
    }


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def fingerprint(plan: dict) -> str:
    return hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()[:16]


def num_shards(num_items: int, shard_size: int) -> int:
    return -(-num_items // shard_size)


def digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the tensors' names, shapes and bytes (in key order)."""
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].contiguous()
        h.update(key.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def shard_range(plan: dict, spec: ShardSpec, k: int) -> tuple[int, int]:
    """The items [start, end) of shard k."""
    size = plan["shard_size"]
    return k * size, min((k + 1) * size, plan[spec.count_key])


def write_shard(path: Path, tensors: dict[str, torch.Tensor], plan: dict, spec: ShardSpec, k: int) -> None:
    """Write atomically: a temporary file renamed into place."""
    tensors = {key: v.contiguous() for key, v in tensors.items()}
    meta = {
        "fastdiff": spec.kind,
        "fingerprint": fingerprint(plan),
        "shard": str(k),
        "sha256": digest(tensors),
    }
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)


def check_shard(path: Path, plan: dict, spec: ShardSpec, k: int, verify: bool = True) -> str | None:
    """Why shard k at ``path`` is unusable (missing, truncated, another plan, wrong contents), or None if good.

    ``verify`` also recomputes the checksum of the tensor bytes (reads the whole shard)."""
    if not path.is_file():
        return "missing"
    start, end = shard_range(plan, spec, k)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("fingerprint") != fingerprint(plan) or meta.get("shard") != str(k):
                return "written for another plan or shard"
            if sorted(f.keys()) != sorted(spec.keys):
                return f"keys {sorted(f.keys())}"
            for key, shape in spec.shapes(plan, end - start).items():
                if tuple(f.get_slice(key).get_shape()) != tuple(shape):
                    return f"{key} has shape {f.get_slice(key).get_shape()}, expected {list(shape)}"
            if not verify:
                return None
            tensors = {key: f.get_tensor(key) for key in spec.keys}
    except Exception as e:  # truncated or not a safetensors file
        return f"unreadable ({type(e).__name__}: {e})"
    if digest(tensors) != meta.get("sha256"):
        return "checksum mismatch (corrupt)"
    if tensors[spec.index_key].tolist() != list(range(start, end)):
        return f"holds other {spec.what}"
    return None


def read_manifest(folder: Path, spec: ShardSpec) -> dict | None:
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise spec.error(f"{path} is not valid JSON ({e}): delete it to start the folder afresh") from None


def _write_manifest(folder: Path, manifest: dict) -> None:
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, folder / MANIFEST)


def check_same_plan(folder: Path, manifest: dict, plan: dict, spec: ShardSpec) -> None:
    if manifest.get("fingerprint") == fingerprint(plan):
        return
    old = manifest.get("plan", {})
    diff = sorted(k for k in set(old) | set(plan) if old.get(k) != plan.get(k))
    raise spec.error(
        f"{folder} holds {spec.what} of another plan (differs in: {', '.join(diff) or 'version'}); "
        f"set {spec.folder_key} to a new folder or delete this one"
    )


def generate(
    folder: str | Path,
    plan: dict,
    spec: ShardSpec,
    make: Callable[[int], dict[str, torch.Tensor]],
    rank: int = 0,
    world_size: int = 1,
    barrier: Callable[[], None] = lambda: None,
    max_shards: int | None = None,
) -> dict:
    """Make every missing or broken shard of ``plan`` in ``folder`` (ranks split the shards).

    Args:
        folder: the shard folder (created).
        plan: the stage's plan (``shard_size``, ``num_shards`` and ``plan[spec.count_key]`` items).
        spec: what the folder holds.
        make: ``make(k)``, the tensors of shard k (a pure function of the plan and k).
        rank / world_size / barrier: several processes share the work: rank r makes shards k = r mod world_size;
            ``barrier`` waits for all of them (e.g. ``accelerator.wait_for_everyone``).
        max_shards: stop after making this many shards (this rank); for tests of interrupted runs.

    Returns:
        {"generated": [shard indices made here], "skipped": [...already good], "complete": bool}.
    """
    folder = Path(folder)
    if rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
        manifest = read_manifest(folder, spec)
        if manifest is not None:
            check_same_plan(folder, manifest, plan, spec)
        else:
            _write_manifest(folder, {"fingerprint": fingerprint(plan), "complete": False, "plan": plan})
        for tmp in folder.glob("*.tmp"):  # left over by an interrupted write
            tmp.unlink()
    barrier()
    if rank != 0:
        check_same_plan(folder, read_manifest(folder, spec) or {}, plan, spec)
    generated, skipped = [], []
    for k in range(rank, plan["num_shards"], world_size):
        path = folder / shard_name(k)
        reason = check_shard(path, plan, spec, k)
        if reason is None:
            skipped.append(k)
            continue
        if max_shards is not None and len(generated) >= max_shards:
            break
        if reason != "missing":
            logger.warning("%s shard %s is %s: generating it again", spec.kind, path.name, reason)
        write_shard(path, make(k), plan, spec, k)
        generated.append(k)
        logger.info("%s shard %d/%d written", spec.kind, k + 1, plan["num_shards"])
    barrier()
    complete = False
    if rank == 0:
        missing = [
            k for k in range(plan["num_shards"]) if check_shard(folder / shard_name(k), plan, spec, k, False)
        ]
        complete = not missing
        shards = [
            {"file": shard_name(k), spec.what: list(shard_range(plan, spec, k))}
            for k in range(plan["num_shards"])
        ]
        _write_manifest(
            folder, {"fingerprint": fingerprint(plan), "complete": complete, "plan": plan, "shards": shards}
        )
    barrier()
    if not complete:
        manifest = read_manifest(folder, spec)
        complete = bool(manifest and manifest.get("complete"))
    return {"generated": generated, "skipped": skipped, "complete": complete}


def generate_all(
    folder: str | Path, plan: dict, spec: ShardSpec, make: Callable[[int], dict[str, torch.Tensor]], **kw
) -> dict:
    """``generate`` (keywords: rank, world_size, barrier), log what was made, and refuse a folder that is still
    incomplete after it (a rank that failed)."""
    report = generate(folder, plan, spec, make, **kw)
    logger.info(
        "%s in %s: %d shards generated, %d already done",
        spec.kind,
        folder,
        len(report["generated"]),
        len(report["skipped"]),
    )
    if not report["complete"]:
        raise spec.error(f"{folder} is incomplete after generation")
    return report


class ShardReader:
    """Read access to a complete shard folder (checked against ``plan`` when given); shards open lazily.

    Args:
        folder: the shard folder.
        spec: what it holds.
        plan: the plan the run expects (None: whatever the manifest holds).
    """

    def __init__(self, folder: str | Path, spec: ShardSpec, plan: dict | None = None):
        self.folder, self.spec = Path(folder), spec
        manifest = read_manifest(self.folder, spec)
        if manifest is None:
            raise spec.error(f"{self.folder} has no {MANIFEST}: generate {spec.what} first")
        if plan is not None:
            check_same_plan(self.folder, manifest, plan, spec)
        if not manifest.get("complete"):
            raise spec.error(f"{self.folder} is incomplete: run `{spec.command}` again to finish it")
        self.plan = manifest["plan"]
        for k in range(self.plan["num_shards"]):
            reason = check_shard(self.folder / shard_name(k), self.plan, spec, k, verify=False)
            if reason is not None:
                raise spec.error(f"{self.folder / shard_name(k)} is {reason}: run `{spec.command}` again")
        self.num_items = self.plan[spec.count_key]
        self._files: dict[int, object] = {}
        self._small: dict[int, dict[str, torch.Tensor]] = {}

    def locate(self, item: int) -> tuple[int, int]:
        """(shard, row) of a global item index."""
        if not 0 <= item < self.num_items:
            raise IndexError(f"item {item} out of range [0, {self.num_items})")
        return divmod(item, self.plan["shard_size"])

    def shard(self, k: int):
        """Shard k's open file (for slices of the per-item tensors) and its small tensors, read whole."""
        if k not in self._files:
            f = safe_open(str(self.folder / shard_name(k)), framework="pt")
            large = self.spec.shapes(self.plan, 0)
            self._files[k] = f
            self._small[k] = {key: f.get_tensor(key) for key in self.spec.keys if key not in large}
        return self._files[k], self._small[k]

    def rows(self, indices: list[int], keys) -> dict[str, torch.Tensor]:
        """The per-item tensors ``keys`` of the given items, float32, stacked in order (lazy slices; float32 before
        the cat, as CPU autocast refuses a float16 cat)."""
        out: dict[str, list] = {key: [] for key in keys}
        for j in indices:
            k, i = self.locate(j)
            f, _ = self.shard(k)
            for key in keys:
                out[key].append(f.get_slice(key)[i : i + 1].float())
        return {key: torch.cat(v) for key, v in out.items()}
