"""Uni-Instruct: one trainer for the f-divergence family of one-step distillation (``method: uni``)."""

from .divergences import DIVERGENCES
from .method import UniConfig, UniInstruct

__all__ = ["DIVERGENCES", "UniConfig", "UniInstruct"]
