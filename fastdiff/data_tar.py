"""WebDataset-style tar shards read at random: which shards a ``dataset=`` value names (a ``.tar`` file, a folder of
them, a brace pattern), a header-only index of each shard's samples, and one member's bytes.

A sample is the group of members sharing a key, the member name up to the first dot of its file name
(``a/000123.jpg`` and ``a/000123.txt`` are sample ``a/000123`` with extensions ``jpg`` and ``txt``), as
WebDataset groups them. Only uncompressed tar files can be read at random. This module knows nothing of images;
``data.TarShardDataset`` decodes them.
"""

from __future__ import annotations

import re
import tarfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

COMPRESSED = (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar.zst")
_KEY_EXT = re.compile(
    r"^((?:.*/|)[^.]+)\.([^/]*)$"
)  # key: the path up to the file name's first dot (WebDataset's)


def expand_braces(pattern: str) -> list[str]:
    """The names a brace pattern stands for, in order: ``{000..002}`` counts (keeping the first bound's zero
    padding), ``{a,b}`` lists alternatives, and several braces multiply, left to right."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if m is None:
        return [pattern]
    body = m.group(1)
    if bounds := re.fullmatch(r"(\d+)\.\.(\d+)", body):
        lo, hi = bounds.groups()
        if int(hi) < int(lo):
            raise ValueError(f"{pattern}: brace range {{{body}}} counts down")
        items = [str(k).zfill(len(lo)) for k in range(int(lo), int(hi) + 1)]
    else:
        items = body.split(",")
    rests = expand_braces(pattern[m.end() :])
    return [pattern[: m.start()] + item + rest for item in items for rest in rests]


def is_shard_spec(spec: str) -> bool:
    """Whether a ``dataset=`` value names tar shards: a brace pattern, a ``.tar`` (or compressed tar) file, or a
    folder holding ``.tar`` files at its top level."""
    path = Path(spec)
    if "{" in spec or spec.lower().endswith((".tar", *COMPRESSED)):
        return True
    return path.is_dir() and any(path.glob("*.tar"))


def find_shards(spec: str) -> list[Path]:
    """The shard files of a ``dataset=`` value, in order: a brace pattern's expansion, one file, or a folder's
    ``.tar`` files sorted by name.

    Raises:
        FileNotFoundError: If a shard does not exist (the message counts the missing ones and names the first).
        ValueError: On a compressed shard (it cannot be read at random) or a folder without ``.tar`` files.
    """
    path = Path(spec)
    if path.is_dir():
        shards = sorted(path.glob("*.tar"))
        if not shards:
            raise ValueError(f"{path}: no .tar shards in this folder")
    else:
        shards = [Path(p) for p in expand_braces(spec)]
    compressed = [p for p in shards if p.name.lower().endswith(COMPRESSED)]
    if compressed:
        raise ValueError(
            f"{compressed[0]}: compressed tar shards cannot be read at random; decompress them (e.g. gunzip) first"
        )
    missing = [p for p in shards if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of {len(shards)} tar shards of {spec} not found, first: {missing[0]}"
        )
    return shards


def index_shard(path: Path, groups: Sequence[Sequence[str]]) -> tuple[list[str], np.ndarray, set[str], bool]:
    """The samples of one shard, from its member headers alone (``tarfile`` reads each header and seeks past the
    data): ``(keys, spans, extensions, truncated)``.

    ``spans[s, g]`` is the ``(byte offset, size)`` in the shard of sample ``s``'s first member whose extension
    (lower-cased) is in ``groups[g]``, or ``(-1, 0)`` where it has none. Samples are in the order their keys first
    appear; a later member with a sample's key and extension replaces the earlier one, as unpacking would.
    ``extensions`` are all the extensions seen; ``truncated`` says that the shard ends inside its last member's
    data (the file was cut short): that member's span runs past the end of the file, and reading it fails.

    Raises:
        ValueError: If a tar header cannot be read (not a tar file, a corrupt header, or a file cut inside a
            header); the message names the shard and the byte where the header starts.
    """
    members: dict[str, dict[str, tuple[int, int]]] = {}
    size = path.stat().st_size
    truncated = False
    try:
        tar = tarfile.open(path, "r:")
    except tarfile.ReadError as e:
        raise ValueError(f"{path}: not a readable uncompressed tar file ({e})") from None
    with tar:
        while True:
            try:
                info = tar.next()
            except tarfile.ReadError as e:
                if tar.offset <= size:  # a broken long-name or pax header
                    raise ValueError(f"{path}: corrupt tar header at byte {tar.offset} ({e})") from None
                truncated, info = True, None  # the last member's data runs past the end of the file
            if info is None:
                break
            named = _KEY_EXT.match(info.name)
            if info.isfile() and named:
                key, ext = named.groups()
                members.setdefault(key, {})[ext.lower()] = (info.offset_data, info.size)
        if (
            not truncated
        ):  # tarfile stops quietly at an unreadable header: what follows the last member must be
            tar.fileobj.seek(tar.offset)  # the end of the file or end-of-archive zeros
            if tar.fileobj.read(tarfile.BLOCKSIZE).strip(b"\0"):
                raise ValueError(
                    f"{path}: corrupt or truncated tar header at byte {tar.offset}; repair or remove this shard"
                )
    spans = np.full((len(members), len(groups), 2), (-1, 0), dtype=np.int64)
    for s, found in enumerate(members.values()):
        for g, exts in enumerate(groups):
            ext = next((e for e in exts if e in found), None)
            if ext is not None:
                spans[s, g] = found[ext]
    extensions = {ext for found in members.values() for ext in found}
    return list(members), spans, extensions, truncated


def read_span(file, offset: int, size: int) -> bytes:
    """``size`` bytes at ``offset`` of an open binary file; a member cut short by the end of the file is an error."""
    file.seek(offset)
    data = file.read(size)
    if len(data) != size:
        raise ValueError(f"truncated tar member: {len(data)} of {size} bytes at byte {offset}")
    return data
