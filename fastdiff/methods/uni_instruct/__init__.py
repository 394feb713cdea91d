"""Uni-Instruct: one trainer for the f-divergence family of one-step distillation (``method: uni``).

``divergences``: h(r) = f''(r) r² and its derivatives per f; ``tractable``: the loss whose gradient is the exact
gradient of the expanded divergence; ``method``: the trainer; ``expansion``: the exact 1-D quadrature check."""

from .divergences import DIVERGENCES
from .method import UniConfig, UniInstruct

__all__ = ["DIVERGENCES", "UniConfig", "UniInstruct"]
