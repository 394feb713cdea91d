"""Training data: prompt lists, image-caption datasets, a resumable, stateless batch order, and a loader that
decodes a step's images in worker processes without changing what the step sees.

Everything here is dependency-light (PIL + numpy + torch); Hugging Face ``datasets`` is imported only when a folder
saved by ``Dataset.save_to_disk`` is opened, and ``pyarrow`` only when a ``.parquet`` file is.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import logging
import time
import warnings
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from .data_tar import find_shards, index_shard, is_shard_spec, read_span

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
CAPTION_KEYS = ("text", "caption", "prompt")
IMAGE_KEYS = ("file_name", "image", "image_path", "file", "path")  # image-path columns of a table file
PROMPT_KEYS = ("prompt", "text", "caption")
TABLE_SUFFIXES = (".csv", ".json", ".jsonl", ".parquet")
HF_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
LAYOUTS = (
    "a diffusers imagefolder (images + metadata.jsonl with file_name and text/caption/prompt), "
    "images with same-stem .txt captions, or a folder written by datasets.Dataset.save_to_disk"
)


class DataError(ValueError):
    """A prompt file, caption or dataset that cannot be used as it is: one line naming the file."""


def read_utf8(path: Path) -> str:
    """A text file's contents; a DataError naming the file and the byte when it is not UTF-8."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{path}: not UTF-8 text (byte {e.start}: {e.object[e.start : e.start + 1]!r})"
        ) from None


def _read_jsonl(path: Path) -> list[tuple[int, dict]]:
    """Parse a JSON-lines file into ``(line_number, object)`` pairs, skipping blank lines."""
    rows = []
    for lineno, line in enumerate(read_utf8(path).splitlines(), start=1):
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
        lines = (line.strip() for line in read_utf8(path).splitlines())
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


def read_table(path: Path) -> list[tuple[str, dict]]:
    """The rows of a ``.csv`` (header row), ``.json`` (a list of objects, or JSON lines), ``.jsonl`` or ``.parquet``
    file as ``(where, row)`` pairs, ``where`` naming the file and the row's line (JSON lines, csv) or number."""
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with io.StringIO(read_utf8(path), newline="") as f:
            reader = csv.DictReader(f)
            rows = [(f"{path.name}, line {reader.line_num}", row) for row in reader]
        return rows
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as e:
            raise ImportError(f"Reading {path} needs pyarrow: pip install pyarrow") from e
        return [
            (f"{path.name}, row {i}", row) for i, row in enumerate(pq.read_table(path).to_pylist(), start=1)
        ]
    if suffix == ".json":
        try:
            data = json.loads(read_utf8(path))
        except json.JSONDecodeError:  # JSON lines under a .json name, as datasets' json loader accepts
            data = None
        if isinstance(data, list):
            for i, row in enumerate(data, start=1):
                if not isinstance(row, dict):
                    raise ValueError(f"{path}, item {i}: expected a JSON object, got {type(row).__name__}")
            return [(f"{path.name}, item {i}", row) for i, row in enumerate(data, start=1)]
    return [(f"{path.name}, line {lineno}", row) for lineno, row in _read_jsonl(path)]


def _image_source(value: Any, root: Path) -> Any:
    """The image of a row's image value: a path (relative to ``root``, or absolute), or bytes (the value itself, or
    the ``bytes`` of a ``{"bytes", "path"}`` cell, as ``datasets`` writes image columns to parquet)."""
    if isinstance(value, dict):
        return value["bytes"] if value.get("bytes") else root / str(value.get("path"))
    return value if isinstance(value, (bytes, bytearray)) else root / str(value)


class _DecodedItems(torch.utils.data.Dataset):
    """What the image-caption datasets share: an item is decoded when read and preprocessed like the diffusers
    training scripts (``_load``), and an unreadable item is skipped: item ``i`` then returns the next readable item
    (``i+1``, ``i+2``, ... wrapping around), and each bad item is warned about once and recorded in ``skipped``.

    A subclass sets ``source`` and ``root`` (named in messages) and defines ``__len__``, ``_decode(j) -> (pixels,
    caption)``, which raises on an unreadable item, and ``_describe(j) -> (name, where)`` for its warning (``where``:
    a row, or None)."""

    def __init__(self, resolution: int, center_crop: bool, random_flip: bool):
        if resolution <= 0:
            raise ValueError(f"resolution must be positive, got {resolution}")
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.skipped: list[str] = []
        self._bad: set[int] = set()

    @property
    def num_skipped(self) -> int:
        """Number of distinct unreadable items met so far."""
        return len(self.skipped)

    def _load(self, source: Any) -> torch.Tensor:
        """Decode an image (path, bytes or file object) and preprocess it to a ``[3, res, res]`` tensor."""
        if isinstance(source, (bytes, bytearray)):
            source = io.BytesIO(source)
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
            try:
                pixels, caption = self._decode(j)
            except Exception as e:  # any decoder failure means "unreadable"
                self._bad.add(j)
                name, where = self._describe(j)
                self.skipped.append(name)
                where = f" ({where})" if where is not None else ""
                warnings.warn(f"Skipping unreadable image {name}{where} in {self.root}: {e}", stacklevel=2)
                continue
            if isinstance(caption, (list, tuple)):  # several captions per image: pick one
                caption = caption[int(torch.randint(len(caption), ()))] if caption else ""
            return {"pixel_values": pixels, "prompt": "" if caption is None else str(caption)}
        raise ValueError(f"No readable image in {self.source} ({self.num_skipped} unreadable files skipped)")


class ImageCaptionDataset(_DecodedItems):
    """Image-caption pairs from a local folder or table file, preprocessed like the diffusers training scripts.

    ``path`` may be a ``.csv``, ``.json``, ``.jsonl`` or ``.parquet`` file with an image column (paths relative
    to the file's folder, or absolute; parquet may hold image bytes) and a caption column, or a folder in one of
    three layouts, recognised in this order:

    1. a folder written by ``datasets.Dataset.save_to_disk`` (has ``dataset_info.json``,
       ``state.json`` or ``dataset_dict.json``; a ``DatasetDict`` uses its ``train`` split);
    2. a diffusers imagefolder: images plus ``metadata.jsonl`` rows with ``file_name`` and a caption
       column (``text``, ``caption`` or ``prompt``);
    3. images (searched recursively) with a same-stem ``.txt`` caption beside each; an image without
       one gets the caption ``""``.

    Images are decoded only when an item is read. Unreadable or missing images are skipped: item ``i`` then
    returns the next readable item (``i+1``, ``i+2``, ... wrapping around), and each bad file is warned about
    once (with its row, where it has one) and recorded in ``skipped``. With ``DataLoader(num_workers>0)`` that
    record lives in the worker processes (``StepItemLoader`` brings it back).

    Args:
        path: The dataset folder or table file.
        resolution: Output side length; the shorter image side is resized to it (bicubic), then
            a square is cropped.
        center_crop: Crop the centre; if False, crop at a random position (``torch`` RNG).
        random_flip: Flip horizontally with probability 0.5 (``torch`` RNG).
        image_column: Image column of a saved ``datasets`` folder (default: ``image``, else the first
            ``Image`` feature), file-name key of ``metadata.jsonl`` (default: ``file_name``) or image column of a
            table file (default: the first of ``IMAGE_KEYS``). Not for the ``.txt`` captions layout.
        caption_column: Caption column (default: the first of ``text``, ``caption``, ``prompt``). Not for the
            ``.txt`` captions layout.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ValueError: If it holds no images, a chosen or needed column is missing (the message names the key and
            the columns there are), or a table file cannot be parsed.
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
        self.source = Path(path)
        is_table = self.source.is_file() and self.source.suffix.lower() in TABLE_SUFFIXES
        if not (is_table or self.source.is_dir()):
            raise FileNotFoundError(
                f"Dataset not found: {self.source} (expected a folder or a {'/'.join(TABLE_SUFFIXES)} file)"
                if not self.source.exists()
                else f"Dataset {self.source} is neither a folder nor a {'/'.join(TABLE_SUFFIXES)} file"
            )
        super().__init__(resolution, center_crop, random_flip)
        self.root = self.source.parent if is_table else self.source  # image paths are relative to it
        self._hf = None
        self._where: list[str] | None = None  # each item's row, for messages
        if is_table:
            self._open_rows(read_table(self.source), image_column, IMAGE_KEYS, caption_column)
        elif any((self.root / m).exists() for m in HF_MARKERS):
            self._open_hf(image_column, caption_column)
        elif (self.root / "metadata.jsonl").is_file():
            rows = [
                (f"metadata.jsonl, line {n}", row) for n, row in _read_jsonl(self.root / "metadata.jsonl")
            ]
            self._open_rows(rows, image_column, ("file_name",), caption_column)
        elif image_column is not None or caption_column is not None:
            raise ValueError(
                f"{self.source}: image_column / caption_column choose columns of a table file, metadata.jsonl "
                "or saved datasets folder; this folder has images with .txt captions"
            )
        else:
            self._open_caption_files()
        if len(self) == 0:
            expected = "rows" if is_table else LAYOUTS
            raise ValueError(f"No images found in {self.source}; expected {expected}")

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
        self.image_column = self._pick_column("image", list(features), image_column, ("image",))
        if isinstance(features[self.image_column], datasets.Image):  # decode ourselves, to skip bad images
            ds = ds.cast_column(self.image_column, datasets.Image(decode=False))
        self._hf = ds
        self.caption_column = self._pick_column("caption", list(features), caption_column, CAPTION_KEYS)

    def _open_rows(
        self,
        rows: list[tuple[str, dict]],
        image_column: str | None,
        image_keys: tuple,
        caption_column: str | None,
    ) -> None:
        """Items from ``(where, row)`` pairs (metadata.jsonl or a table file): the image column (default: the first
        of ``image_keys`` in the first row) holds paths relative to ``root`` or absolute (or image bytes)."""
        self._items: list[tuple[str, Any, Any]] = []
        self._rows = [row for _, row in rows]
        self._where = [where for where, _ in rows]
        self.image_column = self.caption_column = None
        if not rows:
            return
        columns = list(rows[0][1])
        self.image_column = self._pick_column("image", columns, image_column, image_keys)
        self.caption_column = self._pick_column("caption", columns, caption_column, CAPTION_KEYS)
        for where, row in rows:
            if self.image_column not in row:
                raise ValueError(
                    f"{self.root / where}: no image column {self.image_column!r}; keys are {list(row)}"
                )
            value = row[self.image_column]
            name = str(value.get("path") or "image bytes") if isinstance(value, dict) else str(value)
            self._items.append((name, _image_source(value, self.root), row.get(self.caption_column)))

    def _open_caption_files(self) -> None:
        self._items = []
        for p in sorted(self.root.rglob("*")):
            rel = p.relative_to(self.root)
            hidden = any(part.startswith(".") for part in rel.parts)
            if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file() and not hidden:
                txt = p.with_suffix(".txt")
                caption = read_utf8(txt).strip() if txt.is_file() else ""
                self._items.append((rel.as_posix(), p, caption))
        self.image_column = self.caption_column = None

    def _pick_column(self, kind: str, columns: list[str], chosen: str | None, defaults: tuple) -> str:
        """The ``kind`` (image / caption) column: ``chosen``, else the first of ``defaults`` present."""
        column = chosen if chosen is not None else next((c for c in defaults if c in columns), None)
        if column is None or column not in columns:
            looked_for = repr(chosen) if chosen is not None else f"one of {list(defaults)}"
            raise ValueError(
                f"{self.source}: no {kind} column {looked_for}; columns are {columns}; "
                f"set {kind}_column=<one of them>"
            )
        return column

    # -- access ------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._hf) if self._hf is not None else len(self._items)

    def captions(self) -> list[str]:
        """Every item's caption, in item order, without decoding an image."""
        if self._hf is not None:
            return [str(c or "") for c in self._hf[self.caption_column]]
        return [str(c or "") for _, _, c in self._items]

    def column(self, name: str) -> list:
        """Every item's value of a metadata column (a saved dataset's column, a ``metadata.jsonl`` key or a table
        file's column)."""
        rows = self._hf.column_names if self._hf is not None else getattr(self, "_rows", None)
        if self._hf is not None and name in rows:
            return list(self._hf[name])
        if rows is not None and self._hf is None and rows and all(name in r for r in rows):
            return [r[name] for r in rows]
        raise ValueError(f"{self.source}: no column {name!r} in every item's metadata")

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

    def _decode(self, j: int) -> tuple[torch.Tensor, Any]:
        _, source, caption = self._raw(j)
        return self._load(source), caption

    def _describe(self, j: int) -> tuple[str, str | None]:
        return self._raw(j)[0], self._where[j] if self._where is not None else None


# -- webdataset tar shards ------------------------------------------------------------------------


IMAGE_MEMBERS = ("jpg", "jpeg", "png", "webp")  # a sample's image member, by default: the first present


class TarShardDataset(_DecodedItems):
    """Image-caption samples of WebDataset-style tar shards, read at random: ``dataset[i]`` seeks to sample ``i``'s
    members in its shard and reads just their bytes, so nothing is unpacked or held in memory but an index.

    ``spec`` is a ``.tar`` file, a folder of them (sorted by name) or a brace pattern such as
    ``/data/train-{000000..000099}.tar`` (``{a,b}`` lists work too). A sample is the members sharing a key
    (``000123.jpg`` + ``000123.txt``; see ``data_tar``). At open every shard is indexed from its tar headers alone
    (about 15 µs a member, each time a run opens the data set; nothing is cached), and the index, per sample its
    shard, key and the byte spans of its image, text and JSON members, is kept in numpy arrays, which DataLoader
    worker processes share without copying.

    Item ``i`` is always the same sample (shards in ``spec`` order, samples in shard order), so the shard and byte
    offset of every sample of every step are a function of the step (``sample_indices``): the step a checkpoint
    holds is all a resumed run needs to continue exactly, with no reader state. This is why the ``webdataset``
    package is not used: its streaming iterator cannot read sample ``i`` at random, and ``tarfile`` indexes a
    shard well enough.

    Members (``image_column`` / ``caption_column`` name member extensions):

    - image: the first member present among ``image_column``'s ``;``-separated extensions (default
      ``jpg;jpeg;png;webp``), decoded, resized and cropped like ``ImageCaptionDataset``'s images;
    - caption: ``caption_column=EXT`` reads the text member ``.EXT``; ``caption_column=EXT:FIELD`` reads ``FIELD``
      of the JSON member ``.EXT`` (a list of captions: one is picked per read); ``caption_column=json`` reads the
      first of ``text``, ``caption``, ``prompt`` in the ``.json`` member. Default: the ``.txt`` member, else as
      ``json``.

    A sample that cannot be read (an undecodable image, no image or caption member, no caption field, a member cut
    short by a truncated shard) is skipped like an unreadable image of ``ImageCaptionDataset``: the next sample is
    used, a warning names it, and ``skipped`` records ``shard/key``. A shard whose last member is cut short is
    also warned about at open. A tar header that cannot be read is an error at open naming the shard and byte:
    the members after it cannot be found, and training on the shard's first part would silently shrink the data
    set, and change every step's batch once the shard is repaired.

    Args:
        spec: The shards: a ``.tar`` file, a folder of them or a brace pattern.
        resolution, center_crop, random_flip: As for ``ImageCaptionDataset``.
        image_column: Image member extensions, ``;``-separated, in order of preference.
        caption_column: ``EXT`` (a text member) or ``EXT:FIELD`` (a field of a JSON member).

    Raises:
        FileNotFoundError: If a shard does not exist.
        ValueError: On a compressed or unreadable shard, a corrupt tar header, or shards in which no sample has an
            image member or a caption member (the message lists the extensions there are).
    """

    def __init__(
        self,
        spec: str | Path,
        resolution: int,
        center_crop: bool = True,
        random_flip: bool = False,
        image_column: str | None = None,
        caption_column: str | None = None,
    ):
        super().__init__(resolution, center_crop, random_flip)
        self.source = self.root = str(spec)
        self.shards = find_shards(self.source)
        self.image_column, self.caption_column = image_column, caption_column
        image_exts = tuple(e.strip().lower() for e in (image_column or ";".join(IMAGE_MEMBERS)).split(";"))
        if caption_column is None:
            text_ext, self._json_ext, self._fields = "txt", "json", CAPTION_KEYS
            self._wanted = ".txt, or text/caption/prompt of .json"
        elif ":" in caption_column or caption_column.lower() == "json":
            ext, _, field = caption_column.partition(":")
            fields = (field,) if field else CAPTION_KEYS
            text_ext, self._json_ext, self._fields = None, ext.lower(), fields
            self._wanted = f"{'/'.join(fields)} of .{ext}"
        else:
            text_ext, self._json_ext, self._fields = caption_column.lower(), "json", ()
            self._wanted = f".{caption_column}"
        groups = (image_exts, (text_ext,) if text_ext else (), (self._json_ext,))

        t0 = time.perf_counter()
        keys, spans, extensions, starts = [], [], set(), [0]
        for shard in self.shards:
            shard_keys, shard_spans, shard_extensions, truncated = index_shard(shard, groups)
            if truncated:
                warnings.warn(f"{shard} is truncated: its last sample will be skipped", stacklevel=2)
            keys += shard_keys
            spans.append(shard_spans)
            extensions |= shard_extensions
            starts.append(starts[-1] + len(shard_keys))
        self._keys = np.array([k.encode() for k in keys], dtype=bytes)
        self._spans = np.concatenate(spans)  # [sample, (image, text, json), (offset, size)]
        self._starts = np.array(starts)  # shard s holds samples starts[s] .. starts[s + 1] - 1
        logger.info(
            "indexed %d samples in %d tar shards in %.1f s",
            len(keys),
            len(self.shards),
            time.perf_counter() - t0,
        )

        has_caption = (self._spans[:, 1, 0] >= 0) | ((self._spans[:, 2, 0] >= 0) & bool(self._fields))
        for kind, found, wanted in (
            ("image", self._spans[:, 0, 0] >= 0, "/".join(image_exts)),
            ("caption", has_caption, self._wanted),
        ):
            if not found.any():
                raise ValueError(
                    f"{self.source}: no sample has its {kind} member ({wanted}); extensions there are "
                    f"{sorted(extensions)}; set {kind}_column=<extension>"
                )

    def __len__(self) -> int:
        return len(self._keys)

    def _shard_of(self, j: int) -> int:
        return int(np.searchsorted(self._starts, j, side="right")) - 1

    def _decode(self, j: int) -> tuple[torch.Tensor, Any]:
        image, _, _ = self._spans[j]
        if image[0] < 0:
            raise ValueError(f"no image member ({self.image_column or ';'.join(IMAGE_MEMBERS)})")
        with self.shards[self._shard_of(j)].open("rb") as f:
            caption = self._caption(f, j)
            return self._load(read_span(f, int(image[0]), int(image[1]))), caption

    def _describe(self, j: int) -> tuple[str, None]:
        return f"{self.shards[self._shard_of(j)].name}/{self._keys[j].decode()}", None

    def _caption(self, f, j: int) -> Any:
        """Sample ``j``'s caption, read from its open shard ``f``; raises if it has none."""
        _, text, meta = self._spans[j]
        if text[0] >= 0:
            return read_span(f, int(text[0]), int(text[1])).decode("utf-8").strip()
        if self._fields and meta[0] >= 0:
            obj = json.loads(read_span(f, int(meta[0]), int(meta[1])))
            field = next((k for k in self._fields if isinstance(obj, dict) and k in obj), None)
            if field is None:
                raise ValueError(f"no caption field {'/'.join(self._fields)} in its .{self._json_ext} member")
            return obj[field]
        raise ValueError(f"no caption member ({self._wanted})")

    def _each_sample(self):
        """``(j, open shard file)`` for every sample in order, each shard opened once."""
        for s, shard in enumerate(self.shards):
            with shard.open("rb") as f:
                for j in range(self._starts[s], self._starts[s + 1]):
                    yield int(j), f

    def captions(self) -> list[str]:
        """Every sample's caption, in order, without decoding an image (``""`` where it has none); this reads one
        member per sample."""
        captions = []
        for j, f in self._each_sample():
            try:
                captions.append(str(self._caption(f, j) or ""))
            except Exception:
                captions.append("")
        return captions

    def column(self, name: str) -> list:
        """Every sample's field ``name`` of its JSON member (``.json``, or ``caption_column``'s ``EXT``)."""
        values = []
        for j, f in self._each_sample():
            _, _, meta = self._spans[j]
            obj = json.loads(read_span(f, int(meta[0]), int(meta[1]))) if meta[0] >= 0 else {}
            if not isinstance(obj, dict) or name not in obj:
                sample, _ = self._describe(j)
                raise ValueError(f"{sample}: no field {name!r} in a .{self._json_ext} member")
            values.append(obj[name])
        return values


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


def open_dataset(
    spec: str, resolution: int, image_column: str | None = None, caption_column: str | None = None
):
    """A dataset from a config value: a folder or table file (see ImageCaptionDataset, which ``image_column`` /
    ``caption_column`` configure), tar shards (see TarShardDataset) or a builtin name (``builtin:digits``)."""
    if spec.startswith("builtin:"):
        if spec not in BUILTIN:
            raise ValueError(f"unknown builtin dataset {spec!r}; available: {', '.join(BUILTIN)}")
        if image_column is not None or caption_column is not None:
            raise ValueError(f"dataset={spec} has no columns to choose: unset image_column / caption_column")
        return DigitsDataset(resolution)
    if is_shard_spec(spec):
        return TarShardDataset(spec, resolution, image_column=image_column, caption_column=caption_column)
    return ImageCaptionDataset(spec, resolution, image_column=image_column, caption_column=caption_column)


# -- decoding in worker processes ------------------------------------------------------------------


def item_seed(seed: int, key: int, position: int, rank: int = 0) -> int:
    """The torch seed for the item at ``position`` of rank ``rank``'s micro-step ``key`` in a run seeded by ``seed``."""
    return int(np.random.SeedSequence([seed, rank, key, position]).generate_state(1, np.uint64)[0] % 2**63)


def load_item(dataset, index: int, seed: int) -> dict:
    """``dataset[index]`` with torch's global RNG seeded by ``seed`` during the call, so that a random crop, flip or
    caption choice is a function of ``seed`` in whichever process loads it; the caller's RNG state is kept."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return dataset[index]


class _Requests(torch.utils.data.Dataset):
    """What the DataLoader workers read: request ``(indices, seeds)`` -> ``(items, skipped)``, the items and the
    names of the images this process found unreadable while loading them."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __getitem__(self, request: tuple[list[int], list[int]]) -> tuple[list[dict], list[str]]:
        indices, seeds = request
        before = len(self.dataset.skipped)
        items = [load_item(self.dataset, i, s) for i, s in zip(indices, seeds)]
        return items, self.dataset.skipped[before:]


class _RequestsFrom:
    """The DataLoader's sampler: the requests ``plan(key)`` of keys ``start, start + 1, ...``, ``start`` read when an
    iteration begins."""

    def __init__(self, plan: Callable):
        self.plan, self.start = plan, 0

    def __iter__(self):
        return map(self.plan, itertools.count(self.start))


def _as_is(batch):
    return batch


class StepItemLoader:
    """The items of micro-step ``key`` (``step * gradient_accumulation_steps + micro``), loaded in this process
    (``num_workers=0``) or decoded ahead in DataLoader worker processes, with the same result either way.

    ``plan(key) -> (indices, seeds)`` is a pure function: the dataset items of the micro-step (``sample_indices``
    or a method's choice) and each one's torch seed (``item_seed``). An item is ``load_item(dataset, index, seed)``,
    a function of its request alone, and the DataLoader hands results back in request order, so workers cannot
    change which items a step sees, their order, or their random crops; and a resumed run, which asks for its
    first step's key first, gets the batch the uninterrupted run got there.

    With workers, one persistent DataLoader streams the requests of keys ``k, k + 1, ...``: each worker decodes
    whole micro-batches, ``prefetch_factor * num_workers`` of them in flight ahead of training. The worker
    processes start once, at the first call, and are reused. A call for the key just served (several parameter
    groups train at one step) returns it again; a call a little ahead of the stream (a step no group trained at)
    drops the batches before it; any other key (the first call, a jump back) restarts the stream at that key.

    Args:
        dataset: A map-style dataset of ``{"pixel_values", "prompt"}`` items with a ``skipped`` list of unreadable
            images (``open_dataset``); names found by workers are added to the main process's list.
        plan: ``plan(key) -> (indices, seeds)``.
        num_workers: Worker processes (0: load in the calling process, when asked).
        prefetch_factor: Micro-batches in flight per worker.
    """

    def __init__(self, dataset, plan: Callable, num_workers: int = 0, prefetch_factor: int = 2):
        if num_workers < 0:
            raise ValueError(f"dataloader_num_workers must be >= 0, got {num_workers}")
        self.dataset, self.plan, self.num_workers = dataset, plan, num_workers
        self._requests = _Requests(dataset)
        self._last: tuple[int, list[int], list[dict]] | None = None  # (key, indices, items) served last
        if num_workers:
            self._sampler = _RequestsFrom(plan)
            self._window = prefetch_factor * num_workers
            self._loader = torch.utils.data.DataLoader(
                self._requests,
                batch_size=None,
                sampler=self._sampler,
                num_workers=num_workers,
                collate_fn=_as_is,
                persistent_workers=True,
                prefetch_factor=prefetch_factor,
                generator=torch.Generator().manual_seed(
                    0
                ),  # worker seeds drawn without touching the global RNG
            )
            self._stream, self._next = None, 0  # the running iteration and the key it yields next

    def __call__(self, key: int) -> tuple[list[int], list[dict]]:
        """``(indices, items)`` of micro-step ``key``."""
        if self._last is None or self._last[0] != key:
            indices, seeds = self.plan(key)
            items = self._from_workers(key) if self.num_workers else self._requests[indices, seeds][0]
            self._last = (key, indices, items)
        return self._last[1], self._last[2]

    def _from_workers(self, key: int) -> list[dict]:
        if self._stream is None or not 0 <= key - self._next < self._window:
            self._sampler.start = self._next = key
            self._stream = iter(self._loader)
        while self._next <= key:
            items, skipped = next(self._stream)
            self._next += 1
            for name in skipped:
                if name not in self.dataset.skipped:
                    self.dataset.skipped.append(name)
        return items
