"""MSD's partition of the training conditions into K students' slices, and the routing of a condition to a student.

The partition is over the run's distinct training prompts (items are dataset rows or prompt lines; every item of a
prompt goes where its prompt goes, so the same prompt always reaches the same student):

- ``kmeans``: balanced k-means on the prompts' routing embeddings (unit-length pooled text embeddings, compared by
  cosine): every cluster holds ⌊P/K⌋ or ⌈P/K⌉ prompts (the paper found plain k-means uneven);
- ``classes``: a label per item (``msd.label_column``); the sorted distinct labels are cut into K consecutive blocks
  of as equal a size as they allow (the paper's consecutive class-id blocks); a prompt under two labels of different
  students is an error;
- ``file``: a JSON object ``{prompt: student}`` that names every training prompt.

Routing: a training prompt goes to its student by the table; any other prompt to the student whose centroid (the
k-means centroid, or the mean embedding of the student's prompts) is nearest by cosine.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

PARTITIONS = ("kmeans", "classes", "file")


@dataclass
class Partition:
    """K students' slices of the training items, with the router's table and centroids.

    Args:
        item_student: [n_items] the student of each training item.
        table: training prompt -> student.
        centroids: [K, D] unit-length centroids of the routing embeddings.
    """

    item_student: torch.Tensor
    table: dict[str, int]
    centroids: torch.Tensor

    @property
    def num_students(self) -> int:
        return self.centroids.shape[0]

    def items_of(self, k: int) -> torch.Tensor:
        """The indices of student k's training items."""
        return torch.nonzero(self.item_student == k).flatten()

    def sizes(self) -> list[int]:
        """Training prompts per student."""
        counts = [0] * self.num_students
        for k in self.table.values():
            counts[k] += 1
        return counts

    def route_embeddings(self, embeddings: torch.Tensor) -> torch.Tensor:
        """The student of each unit-length routing embedding [N, D]: the nearest centroid by cosine."""
        sims = embeddings.float().to(self.centroids.device) @ self.centroids.T
        return sims.argmax(dim=1)

    # --- checkpoints ------------------------------------------------------------------------------------------
    def to_tensors(self) -> dict[str, torch.Tensor]:
        table = json.dumps(self.table, sort_keys=True).encode()
        return {
            "msd.item_student": self.item_student.cpu(),
            "msd.centroids": self.centroids.float().cpu(),
            "msd.table": torch.frombuffer(bytearray(table), dtype=torch.uint8).clone(),
        }

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> Partition:
        table = json.loads(bytes(tensors["msd.table"].tolist()).decode())
        return cls(tensors["msd.item_student"].long(), table, tensors["msd.centroids"].float())


def balanced_kmeans(
    x: torch.Tensor, k: int, iters: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Equal-size k-means of unit vectors x [P, D] by cosine: cluster j holds ⌊P/k⌋ + (j < P mod k) points.

    Centroids start k-means++-like (a random point, then each next the point least similar to those chosen);
    each round assigns points in order of regret (best minus second-best similarity), each to its most similar
    cluster with room left, then moves every centroid to its points' normalised mean, until nothing changes.

    Returns:
        ``(assignment [P], centroids [k, D])``.
    """
    p = x.shape[0]
    sizes = torch.tensor([p // k + (j < p % k) for j in range(k)])
    first = int(torch.randint(0, p, (1,), generator=generator))
    chosen = [first]
    for _ in range(1, k):
        sims = (x @ x[chosen].T).max(dim=1).values
        sims[chosen] = float("inf")
        chosen.append(int(sims.argmin()))
    centroids = x[chosen].clone()
    assign = torch.full((p,), -1, dtype=torch.long)
    for _ in range(max(1, iters)):
        sims = x @ centroids.T
        top2 = sims.topk(min(2, k), dim=1).values
        regret = top2[:, 0] - (top2[:, 1] if k > 1 else 0)
        room = sizes.clone()
        new = torch.empty(p, dtype=torch.long)
        for i in torch.argsort(regret, descending=True, stable=True).tolist():
            for j in torch.argsort(sims[i], descending=True, stable=True).tolist():
                if room[j] > 0:
                    new[i], room[j] = j, room[j] - 1
                    break
        centroids = _normalise(torch.stack([x[new == j].mean(0) for j in range(k)]))
        if torch.equal(new, assign):
            break
        assign = new
    return assign, centroids


def _normalise(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def make_partition(
    item_prompts: Sequence[str],
    num_students: int,
    kind: str,
    embed: Callable[[list[str]], torch.Tensor],
    labels: Sequence | None = None,
    table_file: str | None = None,
    kmeans_iters: int = 50,
    seed: int = 0,
) -> Partition:
    """The partition of the training items (one prompt each) among ``num_students`` students.

    Args:
        item_prompts: each training item's prompt.
        num_students: K.
        kind: ``kmeans`` | ``classes`` | ``file`` (module docstring).
        embed: prompts -> unit-length routing embeddings [P, D].
        labels: each item's label (``classes``).
        table_file: the JSON ``{prompt: student}`` file (``file``).

    Raises:
        ValueError: an unknown kind, K < 1, K larger than the distinct prompts (or labels), a student left with no
            prompt, a file that names an unknown student or misses a training prompt, a prompt under two students.
    """
    if kind not in PARTITIONS:
        raise ValueError(f"msd.partition must be one of {', '.join(PARTITIONS)}, got {kind!r}")
    k = int(num_students)
    if k < 1:
        raise ValueError(f"msd.num_students must be at least 1, got {k}")
    prompts = list(dict.fromkeys(item_prompts))
    if k > len(prompts):
        raise ValueError(
            f"msd.num_students={k} is larger than the number of distinct training prompts ({len(prompts)}): "
            "every student needs prompts of its own"
        )
    emb = _embed_all(prompts, embed)
    if kind == "kmeans":
        assign, centroids = balanced_kmeans(emb, k, kmeans_iters, torch.Generator().manual_seed(seed))
        table = {p: int(a) for p, a in zip(prompts, assign)}
    else:
        table = (
            _class_table(item_prompts, labels, k)
            if kind == "classes"
            else _file_table(table_file, prompts, k)
        )
        empty = [j for j in range(k) if j not in set(table.values())]
        if empty:
            raise ValueError(
                f"msd.partition={kind}: student(s) {empty} get no training prompt (an empty partition); "
                f"use fewer students or another partition"
            )
        index = torch.tensor([table[p] for p in prompts])
        centroids = _normalise(torch.stack([emb[index == j].mean(0) for j in range(k)]))
    item_student = torch.tensor([table[p] for p in item_prompts], dtype=torch.long)
    return Partition(item_student, table, centroids)


def _embed_all(prompts: list[str], embed, chunk: int = 256) -> torch.Tensor:
    out = [embed(prompts[i : i + chunk]).float().cpu() for i in range(0, len(prompts), chunk)]
    return _normalise(torch.cat(out))


def _class_table(item_prompts: Sequence[str], labels: Sequence | None, k: int) -> dict[str, int]:
    if labels is None or len(labels) != len(item_prompts):
        raise ValueError("msd.partition=classes needs a label for every training item (msd.label_column)")
    distinct = sorted(set(labels))
    if k > len(distinct):
        raise ValueError(f"msd.num_students={k} is larger than the number of classes ({len(distinct)})")
    student_of = {lab: j * k // len(distinct) for j, lab in enumerate(distinct)}  # consecutive blocks
    table: dict[str, int] = {}
    for prompt, lab in zip(item_prompts, labels):
        s = student_of[lab]
        if table.setdefault(prompt, s) != s:
            raise ValueError(
                f"msd.partition=classes: the prompt {prompt!r} has labels of students {table[prompt]} and {s}; "
                "a prompt must belong to one student"
            )
    return table


def _file_table(path: str | None, prompts: list[str], k: int) -> dict[str, int]:
    if not path:
        raise ValueError("msd.partition=file needs msd.partition_file=<JSON {prompt: student}>")
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"msd.partition_file not found: {file}")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: not JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{file}: expected a JSON object {{prompt: student}}")
    bad = {p: s for p, s in data.items() if not (isinstance(s, int) and 0 <= s < k)}
    if bad:
        p, s = next(iter(bad.items()))
        raise ValueError(
            f"{file}: prompt {p!r} names student {s!r}, unknown with msd.num_students={k} (students 0..{k - 1})"
        )
    missing = [p for p in prompts if p not in data]
    if missing:
        raise ValueError(f"{file} names no student for {len(missing)} training prompt(s), e.g. {missing[:3]}")
    return {p: data[p] for p in prompts}
