"""MSD, multi-student distillation: K DMD2 students, one per slice of the prompts, behind a router."""

from .method import MSD, MSDConfig, check_config, smaller_unet
from .partition import Partition, balanced_kmeans, make_partition

__all__ = [
    "MSD",
    "MSDConfig",
    "Partition",
    "balanced_kmeans",
    "check_config",
    "make_partition",
    "smaller_unet",
]
