"""MSD: multi-student distillation (Song et al. 2024, "Multi-student Diffusion Distillation for Better One-step
Generators"). No official code exists; this follows the paper.

K students, each a DMD2 student (``fastdiff.methods.dmd2``: its generator, its own fake score and, with real images,
its own GAN head) trained on its own slice of the training prompts (``partition``); a router sends every prompt to
its student at inference, so NFE stays that of one student. The paper's claims: same-size students beat one student
(ImageNet-64 1-step FID 1.20 with K = 4 vs DMD2's 1.28; distribution matching alone at 20k iterations K = 1/2/4/8 →
2.60/2.49/2.37/2.32), and smaller students (channels reduced) trade little quality for latency.

Schedules (``schedule``), each keeping DMD2's two-time-scale rule per student (its generator updated once every
``dmd2.dfake_gen_update_ratio`` of its critic updates):

    round_robin   iteration s trains student s mod K, with the whole batch from its partition;
    all           every iteration trains every student, on train_batch_size / K prompts of its partition each.

Smaller students (``student_width`` < 1: every block's channels times the width, the teacher's block layout) start
from random weights and are first fitted by teacher score matching (TSM) on noised real images of their partition
for ``tsm_steps`` iterations,

    t ~ U[0, T),  x_t = α_t x + σ_t ε,   L_TSM = ||G(x_t, t, c) - sg(x̂_teacher(x_t, t, c))||²

(the teacher without CFG, at ``tsm_lr``; the critics wait), then DMD2 takes over. Shared-base mode puts all 2K LoRA adapters
(``student_<k>``, ``fake_<k>``) on the one frozen teacher UNet.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field

import torch
from torch import nn

from ... import schedule
from ..base import ExportedStudent, Group, Method, RunContext, randint, randn
from ..critic import gan_wanted
from ..dmd2 import DMD2, DMD2Config, RegressionData, phase_multiplier
from ..dmd2 import check_config as check_dmd2
from ..registry import register
from .partition import PARTITIONS, Partition, make_partition

SCHEDULES = ("round_robin", "all")


def _student_defaults() -> DMD2Config:
    return DMD2Config(student_timesteps=[999])


@dataclass
class MSDConfig:
    """MSD; each student is trained with DMD2's objective and the ``dmd2`` sub-section's settings."""

    num_students: int = 4  # K
    partition: str = "kmeans"  # kmeans | classes | file (fastdiff.methods.msd.partition)
    partition_file: str | None = None  # file: JSON {prompt: student}
    label_column: str = "label"  # classes: the dataset column with each item's class
    kmeans_iters: int = 50
    schedule: str = "round_robin"  # round_robin | all
    student_width: float = 1.0  # < 1: smaller students with this fraction of every block's channels
    tsm_steps: int = 0  # smaller students: iterations of teacher score matching before DMD2
    tsm_lr: float = 1e-4  # the generators' lr during teacher score matching (they start from random weights)
    dmd2: DMD2Config = field(default_factory=_student_defaults)


def check_config(c: MSDConfig) -> None:
    """Refuse settings that cannot run, before any model is loaded."""
    if c.partition not in PARTITIONS:
        raise ValueError(f"msd.partition must be one of {', '.join(PARTITIONS)}, got {c.partition!r}")
    if c.schedule not in SCHEDULES:
        raise ValueError(f"msd.schedule must be one of {', '.join(SCHEDULES)}, got {c.schedule!r}")
    if c.num_students < 1:
        raise ValueError(f"msd.num_students must be at least 1, got {c.num_students}")
    if not 0 < c.student_width <= 1:
        raise ValueError(f"msd.student_width must be in (0, 1], got {c.student_width}")
    smaller = c.student_width < 1
    if smaller and c.tsm_steps < 1:
        raise ValueError(
            "msd.student_width < 1 starts students from random weights: set msd.tsm_steps (teacher score matching)"
        )
    if not smaller and c.tsm_steps:
        raise ValueError("msd.tsm_steps applies to smaller students only (msd.student_width < 1)")
    if smaller and c.dmd2.generator != "full":
        raise ValueError("smaller students are whole UNets: set msd.dmd2.generator=full")
    d = c.dmd2
    full = [n for n, kind in (("generator", d.generator), ("fake_score", d.fake_score)) if kind == "full"]
    if smaller:
        full = [n for n in full if n != "generator"]  # a smaller generator is never a copy of the teacher
    if d.shared_base and c.num_students > 1 and full:
        raise ValueError(
            f"msd.dmd2.shared_base puts every student's LoRA adapters on the teacher's UNet, so a full "
            f"{' and '.join(full)} (a copy of that UNet) would carry earlier students' adapters: use LoRA networks "
            "(msd.dmd2.generator=lora, msd.dmd2.fake_score=lora) or msd.dmd2.shared_base=false"
        )
    check_dmd2(d)


def smaller_unet(unet, width: float):
    """A randomly initialised UNet with the teacher's block layout and ``width`` times its channels."""
    from diffusers import UNet2DConditionModel

    cfg = dict(unet.config)
    groups = cfg.get("norm_num_groups") or 32
    channels = [max(groups, round(c * width / groups) * groups) for c in cfg["block_out_channels"]]
    heads = cfg.get("num_attention_heads") or cfg.get("attention_head_dim")
    per_block = heads if isinstance(heads, (list, tuple)) else [heads] * len(channels)
    bad = [(c, h) for c, h in zip(channels, per_block) if h and c % h]
    if bad:
        raise ValueError(
            f"msd.student_width={width}: block channels {channels} do not split into heads {per_block}"
        )
    cfg["block_out_channels"] = channels
    return UNet2DConditionModel.from_config({k: v for k, v in cfg.items() if not k.startswith("_")})


def _generator_due(k: int, K: int, T: int, ratio: int, every: bool, step: int) -> bool:
    if step < T:
        return every or step % K == k
    u = step - T
    return (u % ratio == 0) if every else (u % K == k and (u // K) % ratio == 0)


def _critic_due(k: int, K: int, T: int, every: bool, step: int) -> bool:
    return step >= T and (every or (step - T) % K == k)


def _rows(x, rows: torch.Tensor):
    return None if x is None else x[rows.to(x.device if isinstance(x, torch.Tensor) else rows.device)]


@register
class MSD(Method):
    """K DMD2 students, one per slice of the conditions.

    Args:
        students: the K ``DMD2`` students.
        cfg: the msd section.
        route: ``route(cond) -> [N] student ids``; default: text conditions to the nearest centroid of their
            routing embeddings (the analytic tests route class labels).
        partition: the training items' students and the router (None until a checkpoint's state is loaded).
        teacher_score: the teacher's x0 prediction without CFG (teacher score matching of smaller students).
    """

    name = "msd"
    config = MSDConfig

    def __init__(
        self, students, cfg: MSDConfig, partition: Partition | None = None, teacher_score=None, route=None
    ):
        super().__init__()
        check_config(cfg)
        self.students = nn.ModuleList(students)
        self.cfg, self.partition, self.teacher_score, self._route = cfg, partition, teacher_score, route

    def route(self, cond) -> torch.Tensor:
        """The student of each condition."""
        if self._route is not None:
            return self._route(cond)
        if self.partition is None:
            raise RuntimeError("msd: no router yet (train, or load a checkpoint's state)")
        from ...paths import pipeline_module

        emb = pipeline_module("multi_student").route_embedding(cond.prompt_embeds, cond.pooled)
        return self.partition.route_embeddings(emb)

    # --- training ---------------------------------------------------------------------------------------------
    def groups(self) -> list[Group]:
        c, K = self.cfg, len(self.students)
        every, T, ratio = c.schedule == "all", c.tsm_steps, c.dmd2.dfake_gen_update_ratio
        out = []
        for k, s in enumerate(self.students):
            gen, critic = s.groups()
            due = functools.partial(_generator_due, k, K, T, ratio, every)
            phase = gen.lr_multiplier
            if T:  # the generator's updates during teacher score matching run at tsm_lr
                tsm_updates = sum(1 for step in range(T) if due(step))
                phase = functools.partial(phase_multiplier, tsm_updates, c.tsm_lr / c.dmd2.generator_lr)
            out.append(
                dataclasses.replace(gen, name=f"student_{k}.generator", active=due, lr_multiplier=phase)
            )
            out.append(
                dataclasses.replace(
                    critic, name=f"student_{k}.critic", active=functools.partial(_critic_due, k, K, T, every)
                )
            )
        return out

    def batch_indices(self, ctx: RunContext):
        """Student k's turn draws from its partition only: shuffled epochs of its items (seeded by seed + k)."""
        from ...data import sample_indices

        c, run, K = self.cfg, ctx.run, len(self.students)
        if self.partition is None:
            raise RuntimeError("msd: no partition (the prepare stage did not run)")
        items = [self.partition.items_of(k).tolist() for k in range(K)]
        every, accum, T = c.schedule == "all", run.gradient_accumulation_steps, c.tsm_steps
        per_student = run.train_batch_size // K if every else run.train_batch_size
        if every and per_student * K != run.train_batch_size:
            raise ValueError(
                f"msd.schedule=all splits train_batch_size={run.train_batch_size} among {K} students: "
                "use a multiple of msd.num_students"
            )

        def draw(k: int, turn: int, micro: int) -> list[int]:
            pos = sample_indices(
                len(items[k]), per_student, turn * accum + micro, run.seed + k, ctx.rank, ctx.world_size
            )
            return [items[k][i] for i in pos]

        def indices(step: int, micro: int) -> list[int]:
            if every:
                return [i for k in range(K) for i in draw(k, step, micro)]
            return draw((step if step < T else step - T) % K, step // K, micro)

        return indices

    def batch_students(self, batch: dict) -> torch.Tensor:
        """The student of each batch row: by its training item when the batch says which, else by routing."""
        if batch.get("indices") is not None and self.partition is not None:
            return self.partition.item_student[torch.as_tensor(batch["indices"])]
        return self.route(batch["cond"]).cpu()

    def loss(self, group, batch, step, generator):
        head, _, kind = group.partition(".")
        k = int(head.removeprefix("student_"))
        rows = torch.nonzero(self.batch_students(batch) == k).flatten()
        if len(rows) == 0:
            raise RuntimeError(f"msd: student {k}'s update at step {step} got no rows of its partition")
        sub = {"cond": _rows(batch["cond"], rows), "real": _rows(batch.get("real"), rows)}
        if kind == "generator" and step < self.cfg.tsm_steps:
            return {"tsm": self.tsm_loss(k, sub, generator)}
        return self.students[k].loss(kind, sub, step - self.cfg.tsm_steps, generator)

    def tsm_loss(self, k: int, batch: dict, generator: torch.Generator) -> torch.Tensor:
        """Teacher score matching: student k's denoiser against the teacher's on noised real images."""
        real, cond = batch["real"], batch["cond"]
        if real is None or self.teacher_score is None:
            raise ValueError("msd teacher score matching needs real images: set `dataset=<image folder>`")
        student = self.students[k]
        t = randint(0, student.num_train_timesteps, real.shape[0], generator, real.device)
        x_t = schedule.add_noise(real, randn(real.shape, generator, real.device), t, student.alphas_cumprod)
        with torch.no_grad():
            target = self.teacher_score(x_t, t, cond)
        return (student.generator(x_t, t, cond).float() - target.float()).square().mean()

    def extra_state(self) -> dict[str, torch.Tensor]:
        return self.partition.to_tensors() if self.partition is not None else {}

    def load_extra_state(self, tensors: dict[str, torch.Tensor]) -> None:
        saved = Partition.from_tensors(tensors)
        if self.partition is not None and saved.table != self.partition.table:
            raise ValueError(
                "msd: this run's partition differs from the checkpoint's (the training prompts or msd.partition "
                "settings changed); resume with the same data and settings"
            )
        self.partition = saved

    # --- sampling and export ----------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, noise, cond, timesteps=None, generator=None):
        """Each row sampled by its routed student (routing by condition: the router's centroids for text)."""
        ids = self.route(cond).to(noise.device)
        out = torch.empty_like(noise)
        for k in ids.unique().tolist():
            rows = torch.nonzero(ids == k).flatten()
            out[rows] = (
                self.students[k].generate(noise[rows], _rows(cond, rows), timesteps, generator).to(out)
            )
        return out

    def exported_student(self) -> ExportedStudent:
        return self.students[0].exported_student()

    def exported_loras(self) -> dict[str, ExportedStudent]:
        """Each LoRA student as ``lora/student_<k>/`` (diffusers and kohya files)."""
        loras = {f"student_{k}": s.exported_student() for k, s in enumerate(self.students)}
        return {name: e for name, e in loras.items() if e.adapter is not None}

    def recipe(self, scheduler_config: dict):
        recipe = self.students[0].recipe(scheduler_config)
        recipe.method = self.name
        loras = sorted(self.exported_loras())
        recipe.extra["students"] = {
            "num_students": len(self.students),
            "partition": self.cfg.partition,
            "sizes": self.partition.sizes() if self.partition is not None else None,
            "student_width": self.cfg.student_width,
            "router": "pipeline/students",
            "lora": [f"lora/{name}" for name in loras] or None,
        }
        return recipe

    def export_pipeline(self, teacher):
        from .export import build_pipeline

        return build_pipeline(self, teacher)

    def model_card(self, recipe: dict, grid: str) -> str:
        from .export import model_card

        return model_card(recipe, grid)

    # --- construction -----------------------------------------------------------------------------------------
    @classmethod
    def prepare(cls, ctx: RunContext) -> dict:
        """The partition of the training prompts, and DMD2's stage (teacher ODE pairs) when its init asks."""
        c = ctx.config
        check_config(c)
        if ctx.dataset is not None:
            prompts = ctx.dataset.captions()
            labels = ctx.dataset.column(c.label_column) if c.partition == "classes" else None
        else:
            prompts, labels = list(ctx.prompts), None
            if c.partition == "classes":
                raise ValueError(
                    "msd.partition=classes needs a dataset with a label column (dataset=..., msd.label_column)"
                )
        embed = functools.partial(route_embeddings, ctx.teacher, ctx.resolution)
        partition = make_partition(
            prompts,
            c.num_students,
            c.partition,
            embed,
            labels,
            c.partition_file,
            c.kmeans_iters,
            ctx.run.seed,
        )
        pairs = DMD2.prepare(dataclasses.replace(ctx, config=c.dmd2))
        return {"partition": partition, "pairs": pairs}

    @classmethod
    def build(cls, ctx: RunContext) -> MSD:
        c, teacher = ctx.config, ctx.teacher
        check_config(c)
        prepared = ctx.prepared or {}
        pairs: RegressionData | None = prepared.get("pairs")
        with_gan = gan_wanted("msd.dmd2", c.dmd2.gan, ctx.with_real_data)
        regression = lpips = None
        if pairs is not None:
            from .. import ode_pairs

            encode = functools.partial(teacher.encode, resolution=ctx.resolution)
            regression = ode_pairs.pair_sampler(pairs.pairs, encode)
            lpips = ode_pairs.LatentLPIPS(pairs.lpips, teacher.vae) if pairs.lpips is not None else None
        if c.student_width < 1:  # every smaller UNet before any adapter lands on the teacher's
            smaller = [
                smaller_unet(teacher.unet, c.student_width).to(teacher.device) for _ in range(c.num_students)
            ]
        students = []
        for k in range(c.num_students):
            gen = None
            if c.student_width < 1:
                unet = smaller[k].float().requires_grad_(True)
                gen = (teacher.denoiser(unet), dict(unet.named_parameters()))
            students.append(
                DMD2.from_teacher(
                    teacher,
                    c.dmd2,
                    ctx.latent_shape,
                    with_gan,
                    regression,
                    lpips,
                    adapters=(f"student_{k}", f"fake_{k}"),
                    generator=gen,
                    section="msd.dmd2",
                )  # fmt: skip
            )
        teacher_score = teacher.denoiser(teacher.unet, adapter=None if c.dmd2.shared_base else "*")
        return cls(students, c, prepared.get("partition"), teacher_score)


def route_embeddings(teacher, resolution: int, prompts: list[str]) -> torch.Tensor:
    """The routing embeddings of prompts, as the exported pipeline computes them."""
    from ...paths import pipeline_module

    cond = teacher.encode(prompts, resolution)
    return pipeline_module("multi_student").route_embedding(cond.prompt_embeds, cond.pooled)
