"""AGD's room: the method (``method``), its trajectory stage (``trajectories``) and its exporter (``export``)."""

from .method import (
    AGD,
    AGDConfig,
    adapters_for,
    cfg_trajectory,
    check_config,
    fresh,
    make_scheduler,
    step_kwargs,
)

__all__ = [
    "AGD",
    "AGDConfig",
    "adapters_for",
    "cfg_trajectory",
    "check_config",
    "fresh",
    "make_scheduler",
    "step_kwargs",
]
