"""The metrics papers report for a text-to-image model, from local model files only (nothing downloads).

- ``CLIPScore``: CLIP score of images and their prompts (Hessel et al. 2021 with w = 100, the scale papers and
  torchmetrics report): 100 * max(cos(E_image, E_text), 0) per pair, averaged over the pairs (torchmetrics' code
  clamps the average instead: the same number unless some cosine is negative). E are the projected embeddings
  of a local CLIP model folder (``transformers`` ``CLIPModel`` + ``CLIPProcessor``, read with
  ``local_files_only=True`` and safetensors weights only, no remote code). Prompts longer than the text tower's
  context (77 tokens for released CLIPs) are truncated.
- ``InceptionReference``: FID and KID against a folder of real images, computed by torchmetrics
  (``FrechetInceptionDistance``, ``KernelInceptionDistance``) on the 2048-d pool features of the FID Inception-v3
  (``fid_inception.load_fid_inception``, weights from a local file).
  FID = ||mu_r - mu_g||^2 + tr(S_r + S_g - 2 (S_r S_g)^(1/2)) between Gaussians fitted to real and generated
  features. KID = the unbiased MMD^2 with the kernel k(x, y) = (x.y / 2048 + 1)^3, over 100 random subsets of
  min(1000, N_real, N_generated) images each (fixed seed); ``kid_mean`` and ``kid_std`` are its mean and standard
  deviation over the subsets. Both are biased by the set sizes: compare numbers computed with the same N.

Images are float [N, 3, H, W] in [0, 1] (diffusers ``output_type="pt"``); both metrics see them as the 8-bit
images a user would save (x * 255 rounded). The reference folder's images are read at their own sizes (PNG, JPEG,
WebP or BMP, converted to RGB; subfolders are not read).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from .fid_inception import resize_like_tensorflow1

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000


def to_uint8(images01: torch.Tensor) -> torch.Tensor:
    """Float images in [0, 1] -> uint8 [0, 255], rounded as when saved to a PNG."""
    return (images01.float().clamp(0, 1) * 255).round().to(torch.uint8)


class CLIPScore:
    """``scores(images01, prompts)``: the per-pair CLIP scores [N] (definition in the module docstring)."""

    def __init__(self, model, processor):
        self.model, self.processor = model.eval(), processor

    @classmethod
    def load(cls, folder: str | Path) -> CLIPScore:
        """A CLIP model folder as ``save_pretrained`` writes it (config, ``model.safetensors``, tokenizer and
        preprocessor files)."""
        from transformers import CLIPModel, CLIPProcessor

        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"no CLIP model folder at {folder} (config.json missing)")
        try:
            model = CLIPModel.from_pretrained(folder, local_files_only=True, use_safetensors=True)
            processor = CLIPProcessor.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError, TypeError, KeyError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(
                f"{folder} is not a loadable CLIP model folder with safetensors weights: {first}"
            ) from None
        return cls(model, processor)

    @torch.no_grad()
    def scores(self, images01: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        from PIL import Image

        if len(prompts) != images01.shape[0]:
            raise ValueError(f"got {len(prompts)} prompts for {images01.shape[0]} images")
        pictures = [Image.fromarray(x.permute(1, 2, 0).numpy()) for x in to_uint8(images01).cpu()]
        max_length = self.model.config.text_config.max_position_embeddings
        inputs = self.processor(
            text=list(prompts),
            images=pictures,
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=max_length,
        )
        device = next(self.model.parameters()).device
        out = self.model(**inputs.to(device))  # image_embeds / text_embeds: projected and L2-normalised
        cos = (out.image_embeds * out.text_embeds).sum(-1)
        return 100 * cos.clamp_min(0).float().cpu()


def image_files(folder: str | Path) -> list[Path]:
    """The image files directly in ``folder``, sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"reference image folder not found: {folder}")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    return files


def read_image(path: Path) -> torch.Tensor:
    """uint8 [3, H, W] RGB of an image file."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            rgb = np.asarray(image.convert("RGB"))
    except (OSError, UnidentifiedImageError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from None
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1)


def _device(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


class _Given(torch.nn.Module):
    """The "feature extractor" handed to torchmetrics: the features are computed once per image (``features``)
    and given to both FID and KID as they are."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


class InceptionReference:
    """FID/KID against a set of real images: ``features(images01)`` of generated batches, then
    ``scores(features)`` -> ``{"fid", "kid_mean", "kid_std"}`` (definitions in the module docstring)."""

    def __init__(self, network, real_features: torch.Tensor):
        try:
            import torchmetrics  # noqa: F401
        except ImportError:
            raise ModuleNotFoundError("FID/KID need torchmetrics: pip install 'fastdiff[metrics]'") from None
        if real_features.shape[0] < 2:
            raise ValueError(f"FID/KID need at least 2 reference images, got {real_features.shape[0]}")
        self.network, self.real_features = network, real_features

    @classmethod
    def from_folder(cls, network, folder: str | Path, batch: int = 32) -> InceptionReference:
        """The features, by ``network`` (``fid_inception.load_fid_inception``), of every image in ``folder``, each
        resized to 299x299 on its own (sizes may differ)."""
        files = image_files(folder)
        feats = []
        for i in range(0, len(files), batch):
            resized = [resize_like_tensorflow1(read_image(p)[None].float()) for p in files[i : i + batch]]
            feats.append(network.trunk(torch.cat(resized).to(_device(network))).cpu())
        return cls(network, torch.cat(feats).double())

    def features(self, images01: torch.Tensor) -> torch.Tensor:
        """[N, 2048] float64 features of float images in [0, 1]."""
        return self.network(to_uint8(images01).to(_device(self.network))).cpu().double()

    def scores(self, features: torch.Tensor) -> dict[str, float]:
        from torchmetrics.image.fid import FrechetInceptionDistance
        from torchmetrics.image.kid import KernelInceptionDistance

        if features.shape[0] < 2:
            raise ValueError(f"FID/KID need at least 2 generated images, got {features.shape[0]}")
        given = _Given(features.shape[1])
        fid = FrechetInceptionDistance(feature=given)
        size = min(KID_SUBSET_SIZE, features.shape[0], self.real_features.shape[0])
        with (
            warnings.catch_warnings()
        ):  # KID's notice that it keeps every feature: ours are 2048 floats an image
            warnings.filterwarnings("ignore", message=".*will save all extracted features")
            kid = KernelInceptionDistance(feature=given, subsets=KID_SUBSETS, subset_size=size)
        for metric in (fid, kid):
            metric.update(self.real_features, real=True)
            metric.update(features, real=False)
        with torch.random.fork_rng():  # KID's subsets are drawn from the global generator: a fixed draw
            torch.manual_seed(0)
            kid_mean, kid_std = kid.compute()
        return {"fid": float(fid.compute()), "kid_mean": float(kid_mean), "kid_std": float(kid_std)}
