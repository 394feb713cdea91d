"""Distillation methods: each registers itself (``registry.register``) with its config section and builder.
``build(ctx)`` turns a run context (config, teacher, data) into the method it names."""

from __future__ import annotations

from .base import ExportedStudent, Group, Method, RunContext


def build(ctx: RunContext) -> Method:
    """The method named by ``ctx.run.method``, built on ``ctx.teacher`` (its ``prepare`` stage already run)."""
    from . import registry

    return registry.get(ctx.run.method).build(ctx)


__all__ = ["ExportedStudent", "Group", "Method", "RunContext", "build"]
