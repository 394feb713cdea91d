"""TSCD's room: the method (``method``) and its reward term (``reward``)."""

from .method import (
    TSCD,
    TSCDConfig,
    check_segment_edges,
    edge_of,
    prev_timesteps,
    segment_edges,
    solver_timesteps,
    stage_segments,
    x0_eps,
)

__all__ = [
    "TSCD",
    "TSCDConfig",
    "check_segment_edges",
    "edge_of",
    "prev_timesteps",
    "segment_edges",
    "solver_timesteps",
    "stage_segments",
    "x0_eps",
]
