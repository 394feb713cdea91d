"""Multi-student distillation (MSD) pipelines for Stable Diffusion and SDXL: K one-step students, one per prompt slice.

A ``StudentRouter`` (the pipeline component ``students``) holds the K students and decides which one serves a
prompt: a training prompt found in its table goes to the student trained on it; any other prompt goes to the student
whose centroid (mean routing embedding of its slice) is nearest in cosine similarity. The routing embedding is
``route_embedding`` of the pipeline's own ``encode_prompt`` output, as in training.

Students are either LoRAs of the pipeline's UNet (kind "lora": each a peft adapter ``student_<k>`` on ``unet``) or
whole UNets (kind "unet": student 0 is the pipeline's ``unet``, students 1..K-1 live in the router). A call routes
every prompt, draws the initial noise of the whole batch at once (image i's noise does not depend on the routing),
runs the stock diffusers call once per student on its rows, and returns the images in the input order.

This file is self-contained (torch, diffusers, peft, safetensors). An MSD export folder carries it twice (the
pipeline in the folder root, the router in ``students/``), so either of these loads the folder:

    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)

    # with fastdiff installed, its own copy of the class (no code from the folder runs):
    pipe = fastdiff.pipelines.StableDiffusionXLMultiStudentPipeline.from_pretrained(folder)
"""

import dataclasses
import importlib
import importlib.util
import inspect
import json
import os
import shutil
import warnings
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import logging
from diffusers.utils.torch_utils import randn_tensor
from safetensors.torch import load_file, save_file
from torch import nn

logger = logging.get_logger(__name__)

PIPELINE_MODULE = "multi_student"  # this file's name inside an export folder (root and students/)
LORA_FILE = "lora.safetensors"  # student_<k>/lora.safetensors: one student's peft state dict
KINDS = ("lora", "unet")
PER_PROMPT_KWARGS = (  # call arguments with one entry per prompt: split along with the prompts
    "prompt_2",
    "negative_prompt",
    "negative_prompt_2",
    "negative_prompt_embeds",
    "negative_pooled_prompt_embeds",
)


def route_embedding(prompt_embeds: torch.Tensor, pooled: torch.Tensor | None = None) -> torch.Tensor:
    """The embedding prompts are routed by, [N, D] float32, L2-normalised: the pooled text embedding where the family
    has one (SDXL's ``pooled_prompt_embeds``), else the token embeddings averaged over the sequence (SD)."""
    emb = pooled if pooled is not None else prompt_embeds.mean(1)
    return F.normalize(emb.float(), dim=-1)


def _json_safe(config: dict) -> dict:
    """A LoraConfig dict as JSON can hold it (sets become sorted lists, enums their values)."""

    def default(value):
        if isinstance(value, set):
            return sorted(value)
        return getattr(value, "value", str(value))

    return json.loads(json.dumps(dict(config), default=default))


def _lora_config(config: dict):
    """A peft LoraConfig from a saved dict, keeping only the fields this peft version knows."""
    from peft import LoraConfig

    known = {f.name for f in dataclasses.fields(LoraConfig) if f.init}
    return LoraConfig(**{k: v for k, v in config.items() if k in known})


class StudentRouter(ModelMixin, ConfigMixin):
    """The K students of an MSD export and the rule that picks one per prompt.

    Args:
        num_students: K.
        embedding_dim: D, the size of ``route_embedding``.
        table: training prompt -> id of the student trained on it; it wins over the centroids.
        kind: "lora" (students are LoRAs of the pipeline's UNet) or "unet" (whole UNets; student 0 is the pipeline's).
        lora_configs: kind "lora": each student's peft LoraConfig as a dict.
        num_inference_steps / guidance_scale / step_counts: the call the students were trained for (fastdiff.json's
            keys of the same names): the pipeline's defaults, and the only step counts it runs at. None: no rule.

    State besides the config: the buffer ``centroids`` [K, D] (normalised mean routing embedding of each student's
    prompts; zeros until set), and ``lora_weights`` (kind "lora": K peft state dicts, keys without adapter name,
    e.g. ``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight``) or ``unets`` (kind "unet":
    the K-1 UNets of students 1..K-1).
    """

    @register_to_config
    def __init__(
        self,
        num_students: int,
        embedding_dim: int,
        table: dict | None = None,
        kind: str = "lora",
        lora_configs: list | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        step_counts: list | None = None,
    ):
        super().__init__()
        if num_students < 1:
            raise ValueError(f"num_students must be at least 1, got {num_students}")
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        bad = {p: k for p, k in (table or {}).items() if type(k) is not int or not 0 <= k < num_students}
        if bad:
            raise ValueError(
                f"table entries name no student 0..{num_students - 1}: {dict(list(bad.items())[:5])}"
            )
        if kind == "lora":
            if lora_configs is None or len(lora_configs) != num_students:
                raise ValueError(f"kind 'lora' needs {num_students} lora_configs, got {lora_configs!r:.80}")
            self.register_to_config(lora_configs=[_json_safe(c) for c in lora_configs])
        self.register_buffer("centroids", torch.zeros(num_students, embedding_dim))
        self.lora_weights: list[dict[str, torch.Tensor] | None] = (
            [None] * num_students if kind == "lora" else []
        )
        self.unets = nn.ModuleList()

    @staticmethod
    def adapter_name(k: int) -> str:
        """The peft adapter name of student ``k`` (kind "lora")."""
        return f"student_{k}"

    # --- routing ------------------------------------------------------------------------------------------------
    def route(self, prompts: list[str], embeddings: torch.Tensor) -> list[int]:
        """The student id of each prompt: its table entry if it has one, else the centroid of largest cosine
        similarity to its row of ``embeddings`` ([N, D], as ``route_embedding`` gives)."""
        k, d = self.centroids.shape
        if embeddings.shape != (len(prompts), d):
            raise ValueError(
                f"expected embeddings of shape ({len(prompts)}, {d}), got {tuple(embeddings.shape)}"
            )
        emb = F.normalize(embeddings.float(), dim=-1)
        centroids = F.normalize(self.centroids.float().to(emb.device), dim=-1)
        nearest = (emb @ centroids.T).argmax(1).tolist()
        table = self.config.table or {}
        ids = [table.get(p, n) for p, n in zip(prompts, nearest)]
        if any(not 0 <= i < k for i in ids):
            raise ValueError(f"routing gave student ids outside 0..{k - 1}: {ids}")
        return ids

    # --- students on the pipeline -------------------------------------------------------------------------------
    def attach(self, unet: nn.Module) -> None:
        """Put the students on the pipeline's UNet. Kind "lora": each becomes the peft adapter ``student_<k>``
        (adapters stay disabled: outside ``use`` the UNet is the base model). Kind "unet": checks the K-1 UNets.

        Raises:
            ValueError: a student's weights miss keys of its adapter or carry keys it does not have (named).
        """
        k = self.config.num_students
        if self.config.kind == "unet":
            if len(self.unets) != k - 1:
                raise ValueError(
                    f"kind 'unet' needs {k - 1} UNets for students 1..{k - 1}, got {len(self.unets)}"
                )
            return
        from peft import set_peft_model_state_dict

        for i, (config, weights) in enumerate(zip(self.config.lora_configs, self.lora_weights)):
            if weights is None:
                raise ValueError(f"student {i} has no LoRA weights (set router.lora_weights[{i}])")
            name = self.adapter_name(i)
            if name not in (getattr(unet, "peft_config", None) or {}):
                with warnings.catch_warnings():  # peft warns on every adapter after the first
                    warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
                    unet.add_adapter(_lora_config(config), adapter_name=name)
            result = set_peft_model_state_dict(unet, weights, adapter_name=name)
            tag = f".{name}."
            missing = [m.replace(tag, ".") for m in result.missing_keys if tag in m]
            unexpected = [u.replace(tag, ".") for u in result.unexpected_keys]
            if missing or unexpected:
                with warnings.catch_warnings():  # peft announces the new active adapter
                    warnings.simplefilter("ignore")
                    unet.delete_adapters(name)
                raise ValueError(
                    f"the LoRA weights of student {i} do not fit its adapter: missing keys {missing[:5]}"
                    f"{f' (+{len(missing) - 5})' if len(missing) > 5 else ''}, unexpected keys {unexpected[:5]}"
                    f"{f' (+{len(unexpected) - 5})' if len(unexpected) > 5 else ''}"
                )
        unet.disable_adapters()

    @contextmanager
    def detached(self, unet: nn.Module):
        """The UNet without the student adapters for the length of a block (so that saving it writes the base
        weights), attached again afterwards. Refuses a UNet carrying LoRA adapters of its own."""
        if self.config.kind != "lora":
            yield unet
            return
        names = {self.adapter_name(i) for i in range(self.config.num_students)}
        other = set(getattr(unet, "peft_config", None) or {}) - names
        if other:
            raise ValueError(
                f"the UNet carries other LoRA adapters {sorted(other)}: fuse or unload them first"
            )
        unet.unload_lora()
        try:
            yield unet
        finally:
            self.attach(unet)

    @contextmanager
    def use(self, pipe, k: int):
        """Make student ``k`` the pipeline's denoiser for the length of a block, then restore the UNet's state.

        Kind "lora": only adapter ``student_<k>`` active (and adapters enabled). Kind "unet": ``pipe.unet`` is
        student k's UNet (student 0 is the pipeline's own).
        """
        if not 0 <= k < self.config.num_students:
            raise ValueError(f"no student {k}: the router has {self.config.num_students}")
        if self.config.kind == "unet":
            base = pipe.unet
            if k > 0:
                pipe.unet = self.unets[k - 1]
            try:
                yield pipe.unet
            finally:
                pipe.unet = base
            return
        from peft.tuners.tuners_utils import BaseTunerLayer

        unet = pipe.unet
        layer = next((m for m in unet.modules() if isinstance(m, BaseTunerLayer)), None)
        if layer is None:
            raise ValueError("the students are not attached to this UNet (StudentRouter.attach)")
        active, enabled = list(layer.active_adapters), not layer.disable_adapters
        unet.set_adapter(self.adapter_name(k))
        unet.enable_adapters()
        try:
            yield unet
        finally:
            unet.set_adapter(active)
            if not enabled:
                unet.disable_adapters()

    # --- saving and loading -------------------------------------------------------------------------------------
    def save_pretrained(self, save_directory, safe_serialization: bool = True, **kwargs):
        """The config and centroids as diffusers saves a model, plus each student in ``student_<k>/``: kind "lora"
        its peft state dict (``lora.safetensors``), kind "unet" (k >= 1) its UNet folder. Always safetensors."""
        unets = self._modules.pop("unets")  # saved per student below, not inside the router's weights
        try:
            super().save_pretrained(save_directory, safe_serialization=True, **kwargs)
        finally:
            self._modules["unets"] = unets
        for k, weights in enumerate(self.lora_weights):
            if weights is None:
                raise ValueError(f"student {k} has no LoRA weights to save")
            os.makedirs(os.path.join(save_directory, f"student_{k}"), exist_ok=True)
            save_file(
                {n: t.detach().cpu().contiguous() for n, t in weights.items()},
                os.path.join(save_directory, f"student_{k}", LORA_FILE),
            )
        for k, unet in enumerate(self.unets, start=1):
            unet.save_pretrained(os.path.join(save_directory, f"student_{k}"), safe_serialization=True)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """A saved router folder (local), with its students (safetensors only). Takes diffusers' loading kwargs;
        ``torch_dtype`` also applies to the students' UNets."""
        router = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        folder = os.path.join(str(pretrained_model_name_or_path), kwargs.get("subfolder") or "")
        k = router.config.num_students
        if router.config.kind == "lora":
            router.lora_weights = [
                load_file(os.path.join(folder, f"student_{i}", LORA_FILE)) for i in range(k)
            ]
        else:
            router.unets = nn.ModuleList(
                UNet2DConditionModel.from_pretrained(
                    os.path.join(folder, f"student_{i}"),
                    torch_dtype=kwargs.get("torch_dtype"),
                    use_safetensors=True,
                )
                for i in range(1, k)
            )
        return router


def _take(values: list, order: list[int]):
    """Concatenate per-student outputs (lists, arrays or tensors) and put them in the order ``order``."""
    if all(v is None for v in values):
        return None
    if isinstance(values[0], torch.Tensor):
        return torch.cat(values)[order]
    if isinstance(values[0], np.ndarray):
        return np.concatenate(values)[order]
    flat = [x for v in values for x in v]
    return [flat[i] for i in order]


def _rows(value, rows: list[int]):
    """The entries ``rows`` of a per-prompt (or per-image) argument. A string becomes one per row (the prompts go
    to the stock call as a list, and Stable Diffusion wants a negative prompt of the same type); any other single
    value is shared."""
    if isinstance(value, str):
        return [value] * len(rows)
    if isinstance(value, (list, tuple)):
        return [value[i] for i in rows]
    if isinstance(value, torch.Tensor) and value.ndim > 0:
        return value[rows]
    return value


class _MultiStudent:
    """What both pipelines add to the stock ones: the ``students`` component and per-prompt routing."""

    _exclude_from_cpu_offload = [
        "students"
    ]  # the router (and kind "unet" students) stay on the execution device

    def _encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(prompt_embeds, pooled or None) of ``prompts`` from the family's ``encode_prompt``, without CFG."""
        raise NotImplementedError

    @torch.no_grad()
    def route(self, prompts) -> list[int]:
        """The student id of each prompt (a string or a list of them)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        return self.students.route(prompts, route_embedding(*self._encode(prompts)))

    def _trained_call(self, num_inference_steps, guidance_scale):
        """The call's steps and guidance, the router's recorded ones where None, checked against them."""
        trained = self.students.config
        steps = trained.get("num_inference_steps") if num_inference_steps is None else num_inference_steps
        guidance = trained.get("guidance_scale") if guidance_scale is None else guidance_scale
        counts = trained.get("step_counts")
        if counts and steps not in counts:
            raise ValueError(
                f"num_inference_steps={steps}: these students were trained for {counts} step(s) "
                f"(fastdiff.json: num_inference_steps={trained.get('num_inference_steps')}, step_counts)"
            )
        trained_guidance = trained.get("guidance_scale")
        if guidance is not None and guidance > 1 and trained_guidance is not None and trained_guidance <= 1:
            logger.warning(
                "guidance_scale=%g runs classifier-free guidance (two UNet passes per step) on students trained "
                "without it (fastdiff.json: guidance_scale %g)",
                guidance,
                trained_guidance,
            )
        return steps, guidance

    @torch.no_grad()
    def __call__(
        self,
        prompt=None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        generator=None,
        latents: torch.Tensor | None = None,
        num_images_per_prompt: int = 1,
        output_type: str = "pil",
        return_dict: bool = True,
        **kwargs,
    ):
        """The stock call, each prompt served by its student; images come back in the input order (image j of
        prompt i at index ``i * num_images_per_prompt + j``).

        The initial noise of the whole batch is drawn first from ``generator`` (as the stock pipeline's
        ``prepare_latents`` draws it), so an image's noise does not depend on how the batch splits among the
        students; each student's call then gets its rows of it. ``num_inference_steps`` / ``guidance_scale``: None
        is the call the students were trained for (the router's config); a step count they were not trained for
        is refused, and CFG on students trained without it is warned about. Other keyword arguments go to every
        student's call; per-prompt ones (``negative_prompt`` lists etc.) are split with the prompts.
        """
        num_inference_steps, guidance_scale = self._trained_call(num_inference_steps, guidance_scale)
        if (
            prompt is None
            or kwargs.get("prompt_embeds") is not None
            or kwargs.get("pooled_prompt_embeds") is not None
        ):
            raise ValueError("routing needs the prompt text: pass prompt= (prompt_embeds cannot be routed)")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        n = num_images_per_prompt or 1
        embeds = self._encode(prompts)
        routes = self.students.route(prompts, route_embedding(*embeds))
        total = len(prompts) * n
        if latents is None:
            height = kwargs.get("height") or self.unet.config.sample_size * self.vae_scale_factor
            width = kwargs.get("width") or self.unet.config.sample_size * self.vae_scale_factor
            shape = (
                total,
                self.unet.config.in_channels,
                height // self.vae_scale_factor,
                width // self.vae_scale_factor,
            )
            if isinstance(generator, list) and len(generator) != total:
                raise ValueError(f"got {len(generator)} generators for {total} images")
            latents = randn_tensor(
                shape, generator=generator, device=self._execution_device, dtype=embeds[0].dtype
            )
        elif latents.shape[0] != total:
            raise ValueError(f"latents has {latents.shape[0]} rows for {total} images")
        call = dict(kwargs, num_images_per_prompt=n, output_type=output_type, return_dict=True)
        if num_inference_steps is not None:
            call["num_inference_steps"] = num_inference_steps
        if guidance_scale is not None:
            call["guidance_scale"] = guidance_scale

        outputs, positions = [], []
        for k in sorted(set(routes)):
            rows = [i for i, r in enumerate(routes) if r == k]
            images = [i * n + j for i in rows for j in range(n)]
            sub = {name: _rows(v, rows) if name in PER_PROMPT_KWARGS else v for name, v in call.items()}
            with self.students.use(self, k):
                out = super().__call__(
                    prompt=[prompts[i] for i in rows],
                    latents=latents[images],
                    generator=_rows(generator, images),
                    **sub,
                )
            outputs.append(out)
            positions += images
        order = sorted(range(total), key=positions.__getitem__)
        fields = [f.name for f in dataclasses.fields(outputs[0])]
        merged = type(outputs[0])(**{f: _take([getattr(o, f) for o in outputs], order) for f in fields})
        return merged if return_dict else tuple(getattr(merged, f) for f in fields)

    # --- loading and saving -------------------------------------------------------------------------------------
    @classmethod
    def load_config(cls, *args, **kwargs):
        """An export's model_index.json names this file (for ``trust_remote_code``); loading through this class
        itself uses this class and fastdiff's copy of the router, so no code from the folder runs."""
        out = super().load_config(*args, **kwargs)
        config = out[0] if isinstance(out, tuple) else out
        if isinstance(config.get("_class_name"), list):
            config["_class_name"] = cls.__name__
        entry = config.get("students")
        if isinstance(entry, list) and entry[0] == PIPELINE_MODULE:
            if importlib.util.find_spec("fastdiff") is None:
                raise ImportError(
                    "loading an MSD folder through the pipeline class needs fastdiff installed; otherwise use "
                    "DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)"
                )
            module = importlib.import_module("fastdiff.paths").pipeline_module(PIPELINE_MODULE)
            config["students"] = [module.__name__, entry[1]]  # diffusers resolves it from sys.modules
        return out

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save as diffusers does (the UNet without the student adapters), plus this file in the folder and in
        ``students/``, with model_index.json naming them, so the folder loads on its own."""
        with self.students.detached(self.unet):
            super().save_pretrained(save_directory, *args, **kwargs)
        source = inspect.getsourcefile(type(self))
        for folder in (save_directory, os.path.join(save_directory, "students")):
            shutil.copyfile(source, os.path.join(folder, f"{PIPELINE_MODULE}.py"))
        index_path = os.path.join(save_directory, "model_index.json")
        with open(index_path) as f:
            index = json.load(f)
        index["_class_name"] = [PIPELINE_MODULE, type(self).__name__]
        index["students"] = [PIPELINE_MODULE, type(self.students).__name__]
        with open(index_path, "w") as f:
            json.dump(index, f, indent=2, sort_keys=True)


class StableDiffusionXLMultiStudentPipeline(_MultiStudent, StableDiffusionXLPipeline):
    """SDXL served by K students: ``pipe(prompts, num_inference_steps=1, guidance_scale=0)`` routes each prompt.

    Args:
        students: the ``StudentRouter``; the other components are SDXL's (``unet`` is the students' base).
    """

    def __init__(
        self,
        vae,
        text_encoder,
        text_encoder_2,
        tokenizer,
        tokenizer_2,
        unet,
        scheduler,
        students: ModelMixin,
        image_encoder=None,
        feature_extractor=None,
        force_zeros_for_empty_prompt: bool = True,
        add_watermarker=None,
    ):
        super().__init__(
            vae,
            text_encoder,
            text_encoder_2,
            tokenizer,
            tokenizer_2,
            unet,
            scheduler,
            image_encoder=image_encoder,
            feature_extractor=feature_extractor,
            force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
            add_watermarker=add_watermarker,
        )
        self.register_modules(students=students)
        students.attach(unet)

    def _encode(self, prompts):
        prompt_embeds, _, pooled, _ = self.encode_prompt(
            prompts, device=self._execution_device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        return prompt_embeds, pooled


class StableDiffusionMultiStudentPipeline(_MultiStudent, StableDiffusionPipeline):
    """Stable Diffusion (1.x/2.x) served by K students, routed per prompt.

    Args:
        students: the ``StudentRouter``; the other components are Stable Diffusion's (``unet`` is the students' base).
    """

    _exclude_from_cpu_offload = ["safety_checker", "students"]

    def __init__(
        self,
        vae,
        text_encoder,
        tokenizer,
        unet,
        scheduler,
        students: ModelMixin,
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker: bool = False,
    ):
        super().__init__(
            vae,
            text_encoder,
            tokenizer,
            unet,
            scheduler,
            safety_checker,
            feature_extractor,
            image_encoder=image_encoder,
            requires_safety_checker=requires_safety_checker,
        )
        self.register_modules(students=students)
        students.attach(unet)

    def _encode(self, prompts):
        prompt_embeds, _ = self.encode_prompt(prompts, self._execution_device, 1, False)
        return prompt_embeds, None


__all__ = [
    "StableDiffusionMultiStudentPipeline",
    "StableDiffusionXLMultiStudentPipeline",
    "StudentRouter",
    "route_embedding",
]
