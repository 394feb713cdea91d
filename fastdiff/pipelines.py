"""fastdiff's custom diffusers pipelines, importable from fastdiff (the files themselves live in ``pipelines/``, each
self-contained so that it can travel inside an export folder)."""

from pipelines.adapter_guidance import (
    StableDiffusionAdapterGuidancePipeline,
    StableDiffusionXLAdapterGuidancePipeline,
)

from .models.adapters import GuidanceAdapters

__all__ = [
    "GuidanceAdapters",
    "StableDiffusionAdapterGuidancePipeline",
    "StableDiffusionXLAdapterGuidancePipeline",
]
