"""TAD-SR (one-step super-resolution by time-aware distillation): the method and its teacher targets."""

from .method import TADSR, TADSRConfig

__all__ = ["TADSR", "TADSRConfig"]
