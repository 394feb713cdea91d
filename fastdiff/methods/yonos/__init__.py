"""YONOS-SR (scale distillation for one-step super-resolution, then the decoder fine-tune it enables)."""

from .method import YONOS, YONOSConfig

__all__ = ["YONOS", "YONOSConfig"]
