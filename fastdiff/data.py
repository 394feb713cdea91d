"""Training data: prompt lists, image-caption folders and a resumable, stateless batch order.

Everything here is dependency-light (PIL + numpy + torch); Hugging Face ``datasets`` is imported only
when a folder saved by ``Dataset.save_to_disk`` is opened.
"""

from __future__ import annotations

import io
import json
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
CAPTION_KEYS = ("text", "caption", "prompt")
PROMPT_KEYS = ("prompt", "text", "caption")
HF_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
LAYOUTS = (
    "a diffusers imagefolder (images + metadata.jsonl with file_name and text/caption/prompt), "
    "images with same-stem .txt captions, or a folder written by datasets.Dataset.save_to_disk"
)


def _read_jsonl(path: Path) -> list[tuple[int, dict]]:
    """Parse a JSON-lines file into ``(line_number, object)`` pairs, skipping blank lines."""
    rows = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}, line {lineno}: invalid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{path}, line {lineno}: expected a JSON object, got {type(obj).__name__}")
        rows.append((lineno, obj))
    return rows


def load_prompts(path: str | Path) -> list[str]:
    """Load a list of prompts from a text or JSON-lines file.

    Args:
        path: A ``.txt`` file (one prompt per line; blank lines and lines starting with ``#`` are
            skipped) or a ``.jsonl`` file (one object per line; the prompt is taken from key
            ``prompt``, else ``text``, else ``caption``). Surrounding whitespace is stripped.

    Returns:
        The prompts, in file order.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ValueError: On an unknown extension, a bad JSON line or one without a prompt key (the
            message names the file and line), or if no prompt was found.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Prompt file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        lines = (line.strip() for line in path.read_text(encoding="utf-8").splitlines())
        prompts = [line for line in lines if line and not line.startswith("#")]
    elif suffix == ".jsonl":
        prompts = []
        for lineno, obj in _read_jsonl(path):
            key = next((k for k in PROMPT_KEYS if k in obj), None)
            if key is None or not isinstance(obj[key], str):
                raise ValueError(f"{path}, line {lineno}: expected a string under one of {PROMPT_KEYS}")
            if obj[key].strip():
                prompts.append(obj[key].strip())
    else:
        raise ValueError(f"Unsupported prompt file {path}: expected .txt or .jsonl")
    if not prompts:
        raise ValueError(f"No prompts found in {path}")
    return prompts


def _import_datasets():
    try:
        import datasets
    except ImportError as e:
        raise ImportError(
            "Reading a folder saved with datasets.Dataset.save_to_disk needs the Hugging Face "
            "`datasets` package: pip install datasets"
        ) from e
    return datasets


class ImageCaptionDataset(torch.utils.data.Dataset):
    """Image-caption pairs from a local folder, preprocessed like the diffusers training scripts.

    Three layouts are recognised, in this order:

    1. a folder written by ``datasets.Dataset.save_to_disk`` (has ``dataset_info.json``,
       ``state.json`` or ``dataset_dict.json``; a ``DatasetDict`` uses its ``train`` split);
    2. a diffusers imagefolder: images plus ``metadata.jsonl`` rows with ``file_name`` and a caption
       column (``text``, ``caption`` or ``prompt``);
    3. images (searched recursively) with a same-stem ``.txt`` caption beside each; an image without
       one gets the caption ``""``.

    Unreadable images are skipped: item ``i`` then returns the next readable item (``i+1``, ``i+2``,
    ... wrapping around), and each bad file is warned about once and recorded in ``skipped``. With
    ``DataLoader(num_workers>0)`` that record lives in the worker processes.

    Args:
        path: The dataset folder.
        resolution: Output side length; the shorter image side is resized to it (bicubic), then
            a square is cropped.
        center_crop: Crop the centre; if False, crop at a random position (``torch`` RNG).
        random_flip: Flip horizontally with probability 0.5 (``torch`` RNG).
        image_column: Image column of a saved ``datasets`` folder (default: ``image``, else the first
            ``Image`` feature) or file-name key of ``metadata.jsonl`` (default: ``file_name``).
        caption_column: Caption column (default: the first of ``text``, ``caption``, ``prompt``).

    Raises:
        FileNotFoundError: If ``path`` is not a folder.
        ValueError: If it holds no images or no caption column can be found.
    """

    def __init__(
        self,
        path: str | Path,
        resolution: int,
        center_crop: bool = True,
        random_flip: bool = False,
        image_column: str | None = None,
        caption_column: str | None = None,
    ):
        self.root = Path(path)
        if not self.root.is_dir():
            raise FileNotFoundError(f"Dataset folder not found: {self.root}")
        if resolution <= 0:
            raise ValueError(f"resolution must be positive, got {resolution}")
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.skipped: list[str] = []
        self._bad: set[int] = set()
        self._hf = None
        if any((self.root / m).exists() for m in HF_MARKERS):
            self._open_hf(image_column, caption_column)
        elif (self.root / "metadata.jsonl").is_file():
            self._open_imagefolder(image_column or "file_name", caption_column)
        else:
            self._open_caption_files()
        if len(self) == 0:
            raise ValueError(f"No images found in {self.root}; expected {LAYOUTS}")

    # -- layouts -----------------------------------------------------------------------------------

    def _open_hf(self, image_column: str | None, caption_column: str | None) -> None:
        datasets = _import_datasets()
        ds = datasets.load_from_disk(str(self.root))
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds and len(ds) != 1:
                raise ValueError(f"{self.root}: DatasetDict without a 'train' split; splits are {list(ds)}")
            ds = ds["train"] if "train" in ds else next(iter(ds.values()))
        features = ds.features
        if image_column is None:
            image_features = [k for k, f in features.items() if isinstance(f, datasets.Image)]
            image_column = "image" if "image" in features else next(iter(image_features), None)
        if image_column not in features:
            raise ValueError(f"{self.root}: no image column {image_column!r}; columns are {list(features)}")
        if isinstance(features[image_column], datasets.Image):  # decode ourselves, to skip bad images
            ds = ds.cast_column(image_column, datasets.Image(decode=False))
        self._hf = ds
        self.image_column = image_column
        self.caption_column = self._pick_caption_column(list(features), caption_column)

    def _open_imagefolder(self, image_column: str, caption_column: str | None) -> None:
        rows = _read_jsonl(self.root / "metadata.jsonl")
        self.image_column, self.caption_column = image_column, None
        self._items: list[tuple[str, Path, Any]] = []
        self._rows = [row for _, row in rows]
        if not rows:
            return
        self.caption_column = self._pick_caption_column(list(rows[0][1]), caption_column)
        for lineno, row in rows:
            if image_column not in row:
                raise ValueError(f"{self.root / 'metadata.jsonl'}, line {lineno}: no {image_column!r} key")
            name = str(row[image_column])
            self._items.append((name, self.root / name, row.get(self.caption_column)))

    def _open_caption_files(self) -> None:
        self._items = []
        for p in sorted(self.root.rglob("*")):
            rel = p.relative_to(self.root)
            hidden = any(part.startswith(".") for part in rel.parts)
            if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file() and not hidden:
                txt = p.with_suffix(".txt")
                caption = txt.read_text(encoding="utf-8").strip() if txt.is_file() else ""
                self._items.append((rel.as_posix(), p, caption))
        self.image_column = self.caption_column = None

    def _pick_caption_column(self, columns: list[str], caption_column: str | None) -> str:
        if caption_column is None:
            caption_column = next((c for c in CAPTION_KEYS if c in columns), None)
        if caption_column is None or caption_column not in columns:
            raise ValueError(
                f"{self.root}: no caption column (looked for {caption_column or CAPTION_KEYS}); "
                f"columns are {columns}; pass caption_column="
            )
        return caption_column

    # -- access ------------------------------------------------------------------------------------

    @property
    def num_skipped(self) -> int:
        """Number of distinct unreadable images met so far."""
        return len(self.skipped)

    def __len__(self) -> int:
        return len(self._hf) if self._hf is not None else len(self._items)

    def captions(self) -> list[str]:
        """Every item's caption, in item order, without decoding an image."""
        if self._hf is not None:
            return [str(c or "") for c in self._hf[self.caption_column]]
        return [str(c or "") for _, _, c in self._items]

    def column(self, name: str) -> list:
        """Every item's value of a metadata column (a saved dataset's column or a ``metadata.jsonl`` key)."""
        rows = self._hf.column_names if self._hf is not None else getattr(self, "_rows", None)
        if self._hf is not None and name in rows:
            return list(self._hf[name])
        if rows is not None and self._hf is None and rows and all(name in r for r in rows):
            return [r[name] for r in rows]
        raise ValueError(f"{self.root}: no column {name!r} in every item's metadata")

    def _raw(self, i: int) -> tuple[str, Any, Any]:
        """``(display_name, image_source, caption)`` for item ``i``, without decoding the image."""
        if self._hf is None:
            return self._items[i]
        row = self._hf[i]
        image = row[self.image_column]
        name = image.get("path") if isinstance(image, dict) else image if isinstance(image, str) else None
        if isinstance(image, dict):
            image = io.BytesIO(image["bytes"]) if image.get("bytes") else image["path"]
        return name or f"row {i}", image, row.get(self.caption_column)

    def _load(self, source: Any) -> torch.Tensor:
        """Decode an image (path or file object) and preprocess it to a ``[3, res, res]`` tensor."""
        with Image.open(source) as f:
            img = ImageOps.exif_transpose(f).convert("RGB")  # forces a full decode
        res = self.resolution
        w, h = img.size
        scale = res / min(w, h)
        w, h = max(res, round(w * scale)), max(res, round(h * scale))
        img = img.resize((w, h), Image.Resampling.BICUBIC)
        if self.center_crop:
            left, top = round((w - res) / 2), round((h - res) / 2)
        else:
            left = int(torch.randint(0, w - res + 1, ()))
            top = int(torch.randint(0, h - res + 1, ()))
        img = img.crop((left, top, left + res, top + res))
        if self.random_flip and torch.rand(()) < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        x = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)
        return x.float().div(127.5).sub(1.0)

    def __getitem__(self, i: int) -> dict[str, Any]:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for dataset of size {n}")
        for k in range(n):
            j = (i + k) % n
            if j in self._bad:
                continue
            name, source, caption = self._raw(j)
            try:
                pixels = self._load(source)
            except Exception as e:  # any decoder failure means "unreadable"
                self._bad.add(j)
                self.skipped.append(name)
                warnings.warn(f"Skipping unreadable image {name} in {self.root}: {e}", stacklevel=2)
                continue
            if isinstance(caption, (list, tuple)):  # several captions per image: pick one
                caption = caption[int(torch.randint(len(caption), ()))] if caption else ""
            return {"pixel_values": pixels, "prompt": "" if caption is None else str(caption)}
        raise ValueError(f"No readable image in {self.root} ({self.num_skipped} unreadable files skipped)")


# -- resumable batch order -------------------------------------------------------------------------


@lru_cache(maxsize=4)
def _epoch_permutation(num_items: int, seed: int, epoch: int) -> np.ndarray:
    perm = np.random.default_rng([seed, epoch]).permutation(num_items)
    perm.setflags(write=False)
    return perm


def steps_per_epoch(num_items: int, batch_size: int, world_size: int = 1) -> int:
    """Number of optimizer steps in one epoch: ``ceil(num_items / (batch_size * world_size))``."""
    return -(-num_items // (batch_size * world_size))


def sample_indices(
    num_items: int, batch_size: int, step: int, seed: int, rank: int = 0, world_size: int = 1
) -> list[int]:
    """Dataset indices of one rank's batch at one training step, as a pure function.

    Each epoch is a random permutation of ``range(num_items)`` seeded by ``(seed, epoch)`` and walked
    in order, ``batch_size * world_size`` items per step; rank ``r`` takes the ``r``-th block of
    ``batch_size``. The last step of an epoch is filled up by wrapping around to the start of the same
    permutation (as ``DistributedSampler`` pads), so every item is seen at least once per epoch, and
    exactly once when ``num_items`` is divisible by the global batch. Ranks are disjoint within a
    step whenever ``num_items >= batch_size * world_size``. Since nothing depends on earlier calls,
    resuming at step ``s`` reproduces the original run exactly without saving sampler state.

    Args:
        num_items: Dataset size.
        batch_size: Per-rank batch size.
        step: Global training step (0-based).
        seed: Non-negative shuffle seed; keep it fixed across resumes.
        rank: This process's rank, ``0 <= rank < world_size``.
        world_size: Number of data-parallel processes.

    Returns:
        ``batch_size`` indices into the dataset.
    """
    if num_items <= 0 or batch_size <= 0 or world_size <= 0:
        raise ValueError("num_items, batch_size and world_size must be positive")
    if step < 0 or seed < 0 or not 0 <= rank < world_size:
        raise ValueError(f"need step >= 0, seed >= 0 and 0 <= rank < world_size; got {step}, {seed}, {rank}")
    global_batch = batch_size * world_size
    epoch, step_in_epoch = divmod(step, steps_per_epoch(num_items, batch_size, world_size))
    perm = _epoch_permutation(num_items, seed, epoch)
    start = step_in_epoch * global_batch + rank * batch_size
    return [int(perm[p % num_items]) for p in range(start, start + batch_size)]


BUILTIN = {"builtin:digits": "scikit-learn's handwritten digits, train split (fastdiff.digits.data)"}


class DigitsDataset(torch.utils.data.Dataset):
    """The digits train split as image+caption pairs (captions cycle through the prompt paraphrases)."""

    num_skipped = 0
    skipped: list = []

    def __init__(self, resolution: int = 32):
        from .digits.data import TEMPLATES, load_split, prompt_for

        self.images, self.labels = load_split("train", resolution)
        self._prompt = lambda i: prompt_for(int(self.labels[i]), i % len(TEMPLATES))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"pixel_values": self.images[i], "prompt": self._prompt(i)}

    def captions(self) -> list[str]:
        return [self._prompt(i) for i in range(len(self))]

    def column(self, name: str) -> list:
        if name != "label":
            raise ValueError(f"builtin:digits has the column 'label' only, not {name!r}")
        return [int(v) for v in self.labels]


def open_dataset(spec: str, resolution: int):
    """A dataset from a config value: a folder (see ImageCaptionDataset) or a builtin name (``builtin:digits``)."""
    if spec.startswith("builtin:"):
        if spec not in BUILTIN:
            raise ValueError(f"unknown builtin dataset {spec!r}; available: {', '.join(BUILTIN)}")
        return DigitsDataset(resolution)
    return ImageCaptionDataset(spec, resolution)
