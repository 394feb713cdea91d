"""fastdiff's custom diffusers pipelines, importable from fastdiff (the files themselves live in ``pipelines/``, each
self-contained so that it can travel inside an export folder; ``fastdiff.paths`` finds them)."""

from .models.adapters import GuidanceAdapters
from .paths import pipeline_module

_adapter_guidance = pipeline_module("adapter_guidance")
StableDiffusionAdapterGuidancePipeline = _adapter_guidance.StableDiffusionAdapterGuidancePipeline
StableDiffusionXLAdapterGuidancePipeline = _adapter_guidance.StableDiffusionXLAdapterGuidancePipeline

_multi_student = pipeline_module("multi_student")
StableDiffusionMultiStudentPipeline = _multi_student.StableDiffusionMultiStudentPipeline
StableDiffusionXLMultiStudentPipeline = _multi_student.StableDiffusionXLMultiStudentPipeline
StudentRouter = _multi_student.StudentRouter

__all__ = [
    "GuidanceAdapters",
    "StableDiffusionAdapterGuidancePipeline",
    "StableDiffusionXLAdapterGuidancePipeline",
    "StableDiffusionMultiStudentPipeline",
    "StableDiffusionXLMultiStudentPipeline",
    "StudentRouter",
]
