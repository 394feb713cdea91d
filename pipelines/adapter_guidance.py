"""Adapter guidance (AGD) pipelines for Stable Diffusion and SDXL: classifier-free guidance in ONE UNet forward.

A trained ``GuidanceAdapters`` set (fastdiff's AGD) hooks onto the frozen UNet for the length of a call; each step
runs the UNet once on the conditional batch, and the adapters, fed ``guidance_scale`` and the negative prompt's
embeddings, turn its output into the CFG prediction. Everything else is the stock diffusers pipeline: any scheduler,
LoRAs (``load_lora_weights``: e.g. a step-distilled student), IP-adapters, callbacks.

The negative prompt conditions the adapters, not a second UNet pass: its embeddings (encoded exactly as diffusers
encodes the unconditional branch: zeros for an empty SDXL negative prompt, "" for SD) are the adapters' negative
tokens, as during training, where each trajectory's CFG used either no negative prompt or a sampled one.

This file is self-contained (torch + diffusers). An AGD export folder carries it, with the adapters' module in
``adapters/``, so either of these loads the folder:

    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)

    # with fastdiff installed, its own copy of the class (no code from the folder runs):
    pipe = fastdiff.pipelines.StableDiffusionXLAdapterGuidancePipeline.from_pretrained(folder)
"""

import importlib
import importlib.util
import inspect
import json
import os
import shutil

from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import logging

logger = logging.get_logger(__name__)

PIPELINE_MODULE = "adapter_guidance"  # this file's name inside an export folder
ADAPTERS_MODULE = "guidance_adapters"  # the adapters' module file inside <folder>/adapters/
FASTDIFF_ADAPTERS = "fastdiff.models.adapters"  # the same class when fastdiff is installed


class _AdapterGuidance:
    """What both pipelines add to the stock ones: the adapters component and one-forward guidance."""

    _exclude_from_cpu_offload = ["adapters"]  # run inside the UNet's forward: kept on the execution device

    @property
    def do_classifier_free_guidance(self):
        return (
            False  # the adapters guide: the stock loop runs the UNet once per step on the conditional batch
        )

    def _check_guidance(self, guidance_scale):
        cfg = self.adapters.config
        if not cfg.w_min <= guidance_scale <= cfg.w_max:
            logger.warning(
                f"guidance_scale={guidance_scale} is outside the range the adapters were trained on "
                f"[{cfg.w_min}, {cfg.w_max}]: expect them to extrapolate"
            )

    def _run(self, guidance_scale, negative_embeds, num_images_per_prompt, call):
        self._check_guidance(guidance_scale)
        negative = negative_embeds.repeat_interleave(num_images_per_prompt or 1, dim=0)
        self.adapters.set_guidance(guidance_scale, negative)
        with self.adapters.attached(self.unet):
            return call()

    # --- loading and saving -----------------------------------------------------------------------------------
    @classmethod
    def load_config(cls, *args, **kwargs):
        """An export's model_index.json names this file (for ``trust_remote_code``); loading through this class
        itself uses this class and fastdiff's adapters module instead, so no code from the folder runs."""
        out = super().load_config(*args, **kwargs)
        config = out[0] if isinstance(out, tuple) else out
        if isinstance(config.get("_class_name"), list):
            config["_class_name"] = cls.__name__
        entry = config.get("adapters")
        if isinstance(entry, list) and entry[0] == ADAPTERS_MODULE:
            if importlib.util.find_spec("fastdiff") is None:
                raise ImportError(
                    "loading an AGD folder through the pipeline class needs fastdiff installed; otherwise use "
                    "DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)"
                )
            importlib.import_module(FASTDIFF_ADAPTERS)  # diffusers resolves the component from sys.modules
            config["adapters"] = [FASTDIFF_ADAPTERS, entry[1]]
        return out

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save as diffusers does, plus this file and the adapters' module, so the folder loads on its own."""
        super().save_pretrained(save_directory, *args, **kwargs)
        shutil.copyfile(
            inspect.getsourcefile(type(self)), os.path.join(save_directory, f"{PIPELINE_MODULE}.py")
        )
        shutil.copyfile(
            inspect.getsourcefile(type(self.adapters)),
            os.path.join(save_directory, "adapters", f"{ADAPTERS_MODULE}.py"),
        )
        index_path = os.path.join(save_directory, "model_index.json")
        with open(index_path) as f:
            index = json.load(f)
        index["_class_name"] = [PIPELINE_MODULE, type(self).__name__]
        index["adapters"] = [ADAPTERS_MODULE, type(self.adapters).__name__]
        with open(index_path, "w") as f:
            json.dump(index, f, indent=2, sort_keys=True)


class StableDiffusionXLAdapterGuidancePipeline(_AdapterGuidance, StableDiffusionXLPipeline):
    """SDXL with AGD adapters: ``pipe(prompt, guidance_scale=w, negative_prompt=...)`` runs one UNet call per step.

    Args:
        adapters: the trained ``GuidanceAdapters`` of this UNet; the other components are SDXL's.
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
        adapters: ModelMixin,
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
        self.register_modules(adapters=adapters)

    def __call__(
        self,
        prompt=None,
        prompt_2=None,
        guidance_scale: float = 5.0,
        negative_prompt=None,
        negative_prompt_2=None,
        num_images_per_prompt: int = 1,
        prompt_embeds=None,
        negative_prompt_embeds=None,
        pooled_prompt_embeds=None,
        negative_pooled_prompt_embeds=None,
        cross_attention_kwargs=None,
        clip_skip=None,
        **kwargs,
    ):
        """StableDiffusionXLPipeline's call; ``guidance_scale`` and the negative prompt go to the adapters."""
        prompt_embeds, negative_embeds, pooled_prompt_embeds, _ = self.encode_prompt(
            prompt=prompt,
            prompt_2=prompt_2,
            device=self._execution_device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=True,
            negative_prompt=negative_prompt,
            negative_prompt_2=negative_prompt_2,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds,
            negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
            lora_scale=(cross_attention_kwargs or {}).get("scale"),
            clip_skip=clip_skip,
        )
        return self._run(
            guidance_scale,
            negative_embeds,
            num_images_per_prompt,
            lambda: super(StableDiffusionXLAdapterGuidancePipeline, self).__call__(
                prompt_embeds=prompt_embeds,
                pooled_prompt_embeds=pooled_prompt_embeds,
                guidance_scale=guidance_scale,
                num_images_per_prompt=num_images_per_prompt,
                cross_attention_kwargs=cross_attention_kwargs,
                **kwargs,
            ),
        )


class StableDiffusionAdapterGuidancePipeline(_AdapterGuidance, StableDiffusionPipeline):
    """Stable Diffusion (1.x/2.x) with AGD adapters: one UNet call per step.

    Args:
        adapters: the trained ``GuidanceAdapters`` of this UNet; the other components are Stable Diffusion's.
    """

    def __init__(
        self,
        vae,
        text_encoder,
        tokenizer,
        unet,
        scheduler,
        adapters: ModelMixin,
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
        self.register_modules(adapters=adapters)

    def __call__(
        self,
        prompt=None,
        guidance_scale: float = 7.5,
        negative_prompt=None,
        num_images_per_prompt: int = 1,
        prompt_embeds=None,
        negative_prompt_embeds=None,
        cross_attention_kwargs=None,
        clip_skip=None,
        **kwargs,
    ):
        """StableDiffusionPipeline's call; ``guidance_scale`` and the negative prompt go to the adapters."""
        prompt_embeds, negative_embeds = self.encode_prompt(
            prompt,
            self._execution_device,
            1,
            True,
            negative_prompt,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            lora_scale=(cross_attention_kwargs or {}).get("scale"),
            clip_skip=clip_skip,
        )
        return self._run(
            guidance_scale,
            negative_embeds,
            num_images_per_prompt,
            lambda: super(StableDiffusionAdapterGuidancePipeline, self).__call__(
                prompt_embeds=prompt_embeds,
                guidance_scale=guidance_scale,
                num_images_per_prompt=num_images_per_prompt,
                cross_attention_kwargs=cross_attention_kwargs,
                **kwargs,
            ),
        )


__all__ = ["StableDiffusionAdapterGuidancePipeline", "StableDiffusionXLAdapterGuidancePipeline"]
