"""Differentiable reward models for reward-feedback terms (Hyper-SD's human-feedback stage, TSCD ``reward_weight``).

A reward is ``reward(x0_latents, batch) -> scalar`` to maximise: it decodes the latents with the teacher's VAE
(with gradients) and scores the images against the batch's prompts. ``build_reward`` picks one by name:

- ``digits``: log-probability of the prompt's digit under the bundled digit classifier (``assets/eval``);
- a folder holding a ``DigitClassifier`` (its ``config.json`` names the class): the same with that classifier;
- a local CLIP model folder (transformers ``CLIPModel``, safetensors): CLIP score, the cosine similarity of
  image and prompt embeddings;
- ``auto``: ``digits`` for a teacher trained by ``train/teacher.py`` on digits, else an error asking for a model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def decode_with_grad(vae, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents -> images in [0, 1], differentiable (the inverse of ``Teacher.encode_images``)."""
    z = latents / vae.config.scaling_factor
    if getattr(vae.config, "shift_factor", None):
        z = z + vae.config.shift_factor
    img = vae.decode(z.to(vae.dtype), return_dict=False)[0].float()
    return (img / 2 + 0.5).clamp(0, 1)


class DigitsReward:
    """Mean log p(prompt's digit | image) under a ``DigitClassifier``; prompts naming no digit are left out."""

    def __init__(self, vae, classifier):
        self.vae, self.classifier = vae, classifier

    def __call__(self, x0: torch.Tensor, batch: dict) -> torch.Tensor:
        from ...digits.classifier import reward_logprob
        from ...digits.data import label_of

        labels = [label_of(p) for p in batch["prompts"]]
        keep = [i for i, y in enumerate(labels) if y is not None]
        if not keep:
            return x0.sum() * 0.0
        images = decode_with_grad(self.vae, x0[keep])
        return reward_logprob(self.classifier, images, [labels[i] for i in keep]).mean()


class CLIPReward:
    """Mean cosine similarity between CLIP image embeddings of the decoded images and their prompts' embeddings."""

    def __init__(self, vae, model, tokenizer):
        self.vae, self.model, self.tokenizer = vae, model.requires_grad_(False), tokenizer
        self.mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
        self.std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)

    def __call__(self, x0: torch.Tensor, batch: dict) -> torch.Tensor:
        images = decode_with_grad(self.vae, x0)
        size = self.model.config.vision_config.image_size
        images = nn.functional.interpolate(images, size=(size, size), mode="bicubic", align_corners=False)
        images = (images - self.mean.to(images.device)) / self.std.to(images.device)
        tokens = self.tokenizer(
            list(batch["prompts"]), padding="max_length", truncation=True, return_tensors="pt"
        ).to(images.device)
        dtype = next(self.model.parameters()).dtype
        image_emb = self.model.get_image_features(pixel_values=images.to(dtype))
        with torch.no_grad():
            text_emb = self.model.get_text_features(**tokens)
        image_emb = getattr(
            image_emb, "pooler_output", image_emb
        )  # transformers 5 may return an output object
        text_emb = getattr(text_emb, "pooler_output", text_emb)
        return nn.functional.cosine_similarity(image_emb.float(), text_emb.float(), dim=-1).mean()


def _folder_kind(folder: Path) -> str:
    config = folder / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"reward model folder {folder} has no config.json")
    data = json.loads(config.read_text())
    if data.get("_class_name") == "DigitClassifier":
        return "digits"
    if data.get("model_type") == "clip":
        return "clip"
    raise ValueError(
        f"reward model {folder}: config.json is neither a DigitClassifier nor a CLIP model "
        f"(_class_name={data.get('_class_name')!r}, model_type={data.get('model_type')!r})"
    )


def build_reward(spec: str, teacher):
    """The reward named by ``spec`` (see the module docstring), frozen, on the teacher's device."""
    from ...digits.classifier import DEFAULT_PATH, load_classifier

    if spec == "auto":
        if teacher.path is not None and (Path(teacher.path) / "fastdiff_teacher.json").is_file():
            spec = "digits"
        else:
            raise ValueError(
                "reward_weight > 0 needs a reward model for this teacher: set reward_model to 'digits', "
                "a DigitClassifier folder or a local CLIP model folder"
            )
    folder = DEFAULT_PATH if spec == "digits" else Path(spec)
    if not folder.is_dir():
        raise FileNotFoundError(f"reward model not found: {spec!r} is not 'digits', 'auto' or a local folder")
    if _folder_kind(folder) == "digits":
        return DigitsReward(teacher.vae, load_classifier(folder, device=teacher.device))
    from transformers import CLIPModel, CLIPTokenizer

    model = CLIPModel.from_pretrained(str(folder), use_safetensors=True).to(teacher.device).eval()
    return CLIPReward(teacher.vae, model, CLIPTokenizer.from_pretrained(str(folder)))
