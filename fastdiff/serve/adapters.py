"""The adapter registry: names -> LoRA files (diffusers or kohya keys) and fastdiff exports, with their recipes.

Names are looked up here and nowhere else: a request names an adapter, never a path. Paths come from the server's
adapters root only (the startup scan, or ``POST /v1/adapters`` with a path that must resolve, symlinks included,
inside that root). Only ``.safetensors`` files are registered; their keys are checked at registration (diffusers
and kohya formats, see ``fastdiff.models.lora.validate_lora_file``), their weights are read when first used, from
the path ``Registry.loadable`` resolves and checks again at that moment (a symlink swapped in after registration
cannot point a load outside the root). A path that cannot even be looked up (a NUL byte, a lone surrogate, a
symlink loop, a name over the file system's limit) is a 400; the startup scan skips any bad entry with a warning.

A fastdiff export (a folder with ``fastdiff.json`` and ``lora/``) carries its sampling recipe: scheduler, step count,
timesteps, guidance and LoRA scale, and per step count possibly a LoRA of its own (``lora/<k>step/``, checked at
registration like the main one). ``sampling_for`` turns it, and a request's overrides, into a ``Sampling``; the
worker loads the weights ``Adapter.weights_for(sampling.lora)`` names as their own peft adapter.

An export whose recipe has a ``students`` entry (several students, each a LoRA ``lora/student_<k>/``, and a router
in ``pipeline/students``) carries its ``StudentRouter`` (fastdiff's own class; no code from the folder runs): every
request is routed by its prompt (``Adapter.students``, ``Worker.student_for``) and sampled with that student's
LoRA, one of the adapter's ``variants``. Students that are whole UNets cannot be served as adapters.
"""

from __future__ import annotations

import itertools
import json
import logging
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

from ..models.lora import DIFFUSERS_WEIGHT_NAME, LoRAFormatError, validate_lora_file
from ..recipe import RECIPE_FILE, Recipe, make_scheduler, pipeline_dir, read_recipe, scheduler_class

logger = logging.getLogger("fastdiff.serve")
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_UIDS = itertools.count(1)


class RequestError(Exception):
    """A request the server refuses (a bad registration, an unknown adapter, a value out of range); ``status`` is
    its HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param  # the request field at fault, if one is


def _resolve(path: Path, given: str | Path) -> Path:
    """``path.resolve()``, a RequestError (400) for a path that cannot be looked up (``given`` is what the client
    sent)."""
    try:
        return path.resolve()
    except (OSError, ValueError, RuntimeError) as e:  # NUL byte, lone surrogate, symlink loop, name too long
        raise RequestError(400, f"{str(given)!r}: not a usable path ({type(e).__name__}: {e})") from None


def _exists(path: Path, given: str | Path) -> bool:
    try:
        return path.exists()
    except (OSError, ValueError) as e:
        raise RequestError(400, f"{str(given)!r}: not a usable path ({type(e).__name__}: {e})") from None


@dataclass(frozen=True)
class Sampling:
    """How a batch is sampled; hashable, part of the micro-batch key.

    ``scheduler`` is a diffusers scheduler class name and ``scheduler_config`` its config as JSON; ``None`` / ``""``
    for the base pipeline's own scheduler. ``timesteps`` is passed to the pipeline only when the scheduler cannot
    derive it from the step count; ``eta`` only when the recipe sets it. ``lora``: the export's LoRA folder for
    this step count (its recipe's ``lora``), None for the export's main LoRA.
    """

    num_inference_steps: int
    guidance_scale: float
    scheduler: str | None = None
    scheduler_config: str = ""
    timesteps: tuple[int, ...] | None = None
    eta: float | None = None
    lora: str | None = None


@dataclass(frozen=True, eq=False)
class Adapter:
    """One registered adapter. Compared by identity: a re-registered name is a new adapter (new ``uid``)."""

    name: str
    path: Path  # the .safetensors weights
    format: str  # "diffusers" | "kohya"
    source: Path  # what was registered: the file, a diffusers LoRA folder, or an export folder
    nbytes: int
    recipe: dict | None = None  # fastdiff.json of an export
    scheduler_config: dict | None = None  # the export's scheduler (its pipeline/scheduler, or derived)
    variants: dict[str, Path] = field(default_factory=dict)  # an export's per-step LoRA folder -> its weights
    students: tuple[str, ...] = ()  # a multi-student export: student k's LoRA folder (a key of ``variants``)
    router: object = None  # ... and its ``StudentRouter`` (routing table and centroids; no weights)
    uid: int = field(default_factory=lambda: next(_UIDS))

    @property
    def default_weight(self) -> float:
        scale = (self.recipe or {}).get("lora_scale")
        return 1.0 if scale is None else float(scale)

    @property
    def internal_name(self) -> str:
        """The peft adapter name on the pipeline (request names may hold '.', which peft module keys cannot)."""
        return f"fd{self.uid}"

    def weights_for(self, lora: str | None) -> tuple[Path, str]:
        """(weights file, peft adapter name) serving a sampling's ``lora``: one of this export's per-step LoRAs, or
        the main weights (None, or a LoRA folder of another export)."""
        if lora is None or lora not in self.variants:
            return self.path, self.internal_name
        return self.variants[lora], f"{self.internal_name}_{re.sub(r'[^A-Za-z0-9]', '_', lora)}"

    def student_lora(self, k: int) -> str:
        """The LoRA folder (a ``Sampling.lora`` / key of ``variants``) of student ``k`` of a multi-student export."""
        if not 0 <= k < len(self.students):
            raise ValueError(f"adapter {self.name!r} has no student {k} (it has {len(self.students)})")
        return self.students[k]

    def describe(self) -> dict:
        out = {
            "name": self.name,
            "kind": "fastdiff-export" if self.recipe else "lora",
            "format": self.format,
            "path": str(self.source),
            "bytes": self.nbytes,
            "default_weight": self.default_weight,
        }
        if self.recipe:
            r = self.recipe
            out["recipe"] = {
                "method": r.get("method"),
                "scheduler": r.get("scheduler"),
                "num_inference_steps": r["num_inference_steps"],
                "timesteps": r.get("timesteps"),
                "guidance_scale": r["guidance_scale"],
                "lora_scale": r.get("lora_scale"),
                "step_counts": r.get("step_counts"),
            }
        if self.students:
            info = (self.recipe or {}).get("students") or {}
            out["students"] = {
                "num_students": len(self.students),
                "lora": list(self.students),
                "partition": info.get("partition"),
                "sizes": info.get("sizes"),
            }
        return out


def build_scheduler(sampling: Sampling):
    """A fresh scheduler object for ``sampling`` (None: use the base pipeline's)."""
    if sampling.scheduler is None:
        return None
    return scheduler_class(sampling.scheduler).from_config(json.loads(sampling.scheduler_config))


def sampling_for(adapter: Adapter, steps: int | None, guidance_scale: float | None) -> Sampling:
    """The export's recipe as a ``Sampling``, with a request's step / guidance overrides; the step counts an export
    may run at are its recipe's (``Recipe.for_steps``: a ValueError names them otherwise)."""
    assert adapter.recipe is not None and adapter.scheduler_config is not None
    recipe = Recipe.from_json(adapter.recipe)
    step = recipe.for_steps(steps)
    config = {**adapter.scheduler_config, **step.scheduler_kwargs}
    guidance = step.guidance_scale if guidance_scale is None else float(guidance_scale)
    timesteps = None if step.timesteps is None else tuple(step.timesteps)
    return Sampling(
        step.num_inference_steps,
        guidance,
        step.scheduler or recipe.scheduler,
        json.dumps(config, sort_keys=True),
        timesteps,
        step.eta,
        step.lora,
    )


class Registry:
    """Thread-safe name -> Adapter map over one adapters root.

    Args:
        root: the folder adapters may be registered from (nothing outside it, after resolving symlinks).
        base_scheduler_config: the base pipeline's scheduler config (to derive an export's scheduler when the
            export folder has no ``pipeline/``).
        max_adapter_bytes: larger weight files are refused (413).
        check: called with a weights path to check it against the base model (e.g. its UNet's modules); raises
            LoRAFormatError for a LoRA of another model.
    """

    def __init__(self, root: str | Path, base_scheduler_config: dict, max_adapter_bytes: int, check=None):
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise FileNotFoundError(f"adapters folder not found: {root}")
        self.base_scheduler_config = dict(base_scheduler_config)
        self.max_adapter_bytes = max_adapter_bytes
        self.check = check
        self._adapters: dict[str, Adapter] = {}
        self._lock = threading.Lock()
        self.skipped: list[dict] = []  # startup-scan entries that were not registered, with the reason

    # lookup ---------------------------------------------------------------------------------------------------
    def get(self, name: str) -> Adapter:
        with self._lock:
            adapter = self._adapters.get(name)
        if adapter is None:
            raise RequestError(404, f"unknown adapter {name!r}; GET /v1/adapters lists the registered ones")
        return adapter

    def __contains__(self, adapter: Adapter) -> bool:
        with self._lock:
            return self._adapters.get(adapter.name) is adapter

    def list(self) -> list[Adapter]:
        with self._lock:
            return sorted(self._adapters.values(), key=lambda a: a.name)

    def remove(self, name: str) -> Adapter:
        with self._lock:
            adapter = self._adapters.pop(name, None)
        if adapter is None:
            raise RequestError(404, f"unknown adapter {name!r}; GET /v1/adapters lists the registered ones")
        return adapter

    # registration ---------------------------------------------------------------------------------------------
    def scan(self) -> list[Adapter]:
        """Register every ``*.safetensors`` file and adapter folder directly under the root; skip (and record)
        the rest with the reason."""
        added = []
        for entry in sorted(self.root.iterdir()):
            if entry.name.startswith("."):
                continue
            try:
                if entry.is_dir() and not self._is_adapter_folder(entry):
                    continue
                if entry.is_file() and entry.suffix != ".safetensors":
                    if entry.suffix in (".ckpt", ".pt", ".pth", ".bin"):
                        self._skip(
                            entry, "only .safetensors adapters are loaded (pickle formats can run code)"
                        )
                    continue
                added.append(self.register(entry))
            except RequestError as e:
                self._skip(entry, e.message)
            except Exception as e:  # any other bad entry: the server starts without it
                self._skip(entry, f"{type(e).__name__}: {e}")
        return added

    def register(self, path: str | Path, name: str | None = None) -> Adapter:
        """Register a file or folder inside the root under ``name`` (default: its file stem / folder name)."""
        source = self._inside_root(path)
        name = name if name is not None else (source.stem if source.is_file() else source.name)
        if not NAME_PATTERN.fullmatch(name):
            raise RequestError(
                422,
                f"adapter name {name!r} is not allowed: 1-64 characters of letters, digits, '_', '-', '.', "
                "starting with a letter or digit",
            )
        try:
            adapter = self._load_entry(name, source)
        except (OSError, ValueError, TypeError, KeyError, RuntimeError) as e:  # e.g. a malformed recipe
            raise RequestError(400, f"{source}: cannot be registered ({type(e).__name__}: {e})") from None
        with self._lock:
            if name in self._adapters:
                raise RequestError(409, f"adapter {name!r} is already registered; DELETE it first")
            self._adapters[name] = adapter
        logger.info("registered adapter %s (%s, %s)", name, adapter.format, source)
        return adapter

    def _skip(self, path: Path, reason: str) -> None:
        logger.warning("adapter %r skipped: %s", str(path), reason)
        self.skipped.append({"path": str(path), "error": reason})

    @staticmethod
    def _is_adapter_folder(folder: Path) -> bool:
        return (folder / RECIPE_FILE).is_file() or (folder / DIFFUSERS_WEIGHT_NAME).is_file()

    def _inside_root(self, path: str | Path) -> Path:
        raw = Path(path)
        candidate = raw if raw.is_absolute() else self.root / raw
        resolved = _resolve(candidate, path)
        if not resolved.is_relative_to(self.root):
            raise RequestError(400, f"{path}: adapters are registered only from inside {self.root}")
        if not _exists(resolved, path):
            raise RequestError(400, f"{path}: no such file or folder under {self.root}")
        return resolved

    def loadable(self, path: Path) -> Path:
        """A registered weights file, resolved again now: still a file inside the root and within the size limit
        (the worker calls this before every load, so a symlink swapped in after registration is refused)."""
        resolved = _resolve(path, path)
        if not resolved.is_relative_to(self.root):
            raise RequestError(
                400, f"{path} now resolves to {resolved}, outside the adapters root {self.root}"
            )
        if not resolved.is_file():
            raise RequestError(400, f"{path} is no longer a file inside {self.root}")
        if resolved.stat().st_size > self.max_adapter_bytes:
            raise RequestError(
                413, f"{path} is now over the server's adapter size limit ({self.max_adapter_bytes})"
            )
        return resolved

    def _weights(self, path: Path) -> tuple[str, int]:
        """Check one weights file: inside the root, .safetensors, size limit, LoRA keys; -> (format, bytes)."""
        if path.suffix != ".safetensors":
            raise RequestError(
                400,
                f"{path.name}: only .safetensors adapters are loaded (got {path.suffix or 'no suffix'!r})",
            )
        if not _resolve(path, path).is_relative_to(self.root) or not path.is_file():
            raise RequestError(400, f"{path}: not a file inside {self.root}")
        nbytes = path.stat().st_size
        if nbytes > self.max_adapter_bytes:
            raise RequestError(
                413,
                f"{path.name}: {nbytes} bytes is over the server's adapter size limit ({self.max_adapter_bytes})",
            )
        try:
            fmt = validate_lora_file(path)
            if self.check is not None:
                self.check(path)
        except LoRAFormatError as e:
            raise RequestError(400, str(e)) from None
        except Exception as e:  # unreadable / not a safetensors file at all
            raise RequestError(
                400, f"{path.name}: not a readable safetensors LoRA ({type(e).__name__}: {e})"
            ) from None
        return fmt, nbytes

    def _load_entry(self, name: str, source: Path) -> Adapter:
        if source.is_file():
            fmt, nbytes = self._weights(source)
            return Adapter(name, source, fmt, source, nbytes)
        if (source / RECIPE_FILE).is_file():
            return self._export_entry(name, source)
        weights = source / DIFFUSERS_WEIGHT_NAME
        if weights.is_file():
            fmt, nbytes = self._weights(weights)
            return Adapter(name, weights, fmt, source, nbytes)
        raise RequestError(
            400,
            f"{source}: a folder must be a fastdiff export ({RECIPE_FILE} + lora/) or hold {DIFFUSERS_WEIGHT_NAME}",
        )

    def _export_entry(self, name: str, folder: Path) -> Adapter:
        try:
            recipe = read_recipe(folder)
            missing = [
                k
                for k in ("num_inference_steps", "guidance_scale", "timesteps", "scheduler")
                if k not in recipe
            ]
            if missing:
                raise ValueError(f"{RECIPE_FILE} lacks {missing}")
            scheduler_class(recipe["scheduler"])
        except (ValueError, OSError) as e:
            raise RequestError(400, f"{folder}: not a usable fastdiff export ({e})") from None
        if recipe.get("students") is not None:
            return self._students_entry(name, folder, recipe)
        if not recipe.get("lora"):
            raise RequestError(
                400,
                f"{folder}: this export's student is a full UNet, not a LoRA; serve its pipeline/ as --base instead",
            )
        weights = _resolve(folder / recipe["lora"], recipe["lora"])
        if not weights.is_relative_to(folder.resolve()):
            raise RequestError(
                400, f"{folder}: {RECIPE_FILE} points its LoRA outside the export ({recipe['lora']})"
            )
        fmt, nbytes = self._weights(weights)
        variants = {}
        for steps, r in sorted((recipe.get("recipes") or {}).items()):
            if r.get("lora"):  # a LoRA of this step count's own, e.g. TSCD's lora/<k>step/
                path = _resolve(folder / r["lora"] / DIFFUSERS_WEIGHT_NAME, r["lora"])
                if not path.is_relative_to(folder.resolve()):
                    raise RequestError(
                        400,
                        f"{folder}: {RECIPE_FILE} points the {steps}-step LoRA outside the export ({r['lora']})",
                    )
                self._weights(path)
                variants[r["lora"]] = path
        config = self._export_scheduler(folder, recipe)
        return Adapter(
            name, weights, fmt, folder, nbytes, recipe=recipe, scheduler_config=config, variants=variants
        )

    def _export_scheduler(self, folder: Path, recipe: dict) -> dict:
        """The scheduler config an export samples with (without diffusers' private ``_`` keys)."""
        sched_file = pipeline_dir(folder) / "scheduler" / "scheduler_config.json"
        if sched_file.is_file():  # the scheduler the export saved (and self-checked)
            config = json.loads(sched_file.read_text())
        else:  # only fastdiff.json + lora/ were copied: make it as the export did
            sched = make_scheduler(
                self.base_scheduler_config, recipe["scheduler"], recipe.get("scheduler_kwargs")
            )
            config = dict(sched.config)
        return {k: v for k, v in config.items() if not k.startswith("_")}

    def _students_entry(self, name: str, folder: Path, recipe: dict) -> Adapter:
        """A multi-student export: every student a LoRA (checked like the main LoRA of an export), student 0's the
        adapter's main weights, and the router that picks one per prompt."""
        info = recipe["students"]
        loras = info.get("lora") if isinstance(info, dict) else None
        if not loras:
            raise RequestError(
                400,
                f"{folder}: this export's students are whole UNets, not LoRAs, so they cannot be served as an "
                "adapter; serve its pipeline/ as --base instead",
            )
        k = info.get("num_students")
        if not isinstance(loras, list) or not all(isinstance(p, str) for p in loras) or k != len(loras):
            raise RequestError(
                400,
                f"{folder}: {RECIPE_FILE}'s students name {k!r} students but list the LoRA folders {loras!r}",
            )
        inside = folder.resolve()
        variants = {}
        for i, lora in enumerate(loras):
            path = _resolve(folder / lora / DIFFUSERS_WEIGHT_NAME, lora)
            if not path.is_relative_to(inside):
                raise RequestError(
                    400, f"{folder}: {RECIPE_FILE} points student {i}'s LoRA outside the export ({lora})"
                )
            self._weights(path)
            variants[lora] = path
        fmt, nbytes = self._weights(variants[loras[0]])
        router = self._load_router(folder, info.get("router") or "pipeline/students", len(loras))
        return Adapter(
            name,
            variants[loras[0]],
            fmt,
            folder,
            nbytes,
            recipe=recipe,
            scheduler_config=self._export_scheduler(folder, recipe),
            variants=variants,
            students=tuple(loras),
            router=router,
        )

    @staticmethod
    def _load_router(folder: Path, subfolder: str, num_students: int):
        """The export's ``StudentRouter`` (fastdiff's copy of the class: the folder's own .py files never run),
        without the students' weights (the adapter serves them from ``lora/``): only its table and centroids."""
        from ..paths import pipeline_module

        path = _resolve(folder / subfolder, subfolder)
        if not path.is_relative_to(folder.resolve()) or not (path / "config.json").is_file():
            raise RequestError(
                400,
                f"{folder}: no student router at {subfolder} (a folder inside the export with config.json)",
            )
        try:
            router = pipeline_module("multi_student").StudentRouter.from_pretrained(
                path, use_safetensors=True, local_files_only=True
            )
        except Exception as e:  # a malformed router folder
            raise RequestError(
                400, f"{folder}: the student router {subfolder} does not load ({type(e).__name__}: {e})"
            ) from None
        if router.config.kind != "lora" or router.config.num_students != num_students:
            raise RequestError(
                400,
                f"{folder}: the router {subfolder} holds {router.config.num_students} students of kind "
                f"{router.config.kind!r}; {RECIPE_FILE} lists {num_students} LoRA students",
            )
        router.lora_weights = [None] * num_students  # routing needs the table and the centroids only
        return router.eval()
