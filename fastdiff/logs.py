"""What a run prints: fastdiff's own lines (one per checkpoint, export, resume), its one training progress bar, and
the other libraries' warnings, without their progress bars, INFO chatter and notices that ask nothing of the user."""

from __future__ import annotations

import logging
import re
from contextlib import contextmanager

# Library notices that are not actionable in a fastdiff run, matched on the message:
NOISE = re.compile(
    "|".join(
        [
            # transformers without torchvision: the image processors fall back to PIL, which is what fastdiff uses
            r"requires torchvision \(not installed\); falling back to",
            # diffusers' dtype cast of a model with no modules to keep in float32 (an empty list)
            r"that should be kept in float32: \[\]",
            # a UNet-only LoRA loaded into a pipeline that also has text encoders
            r"^No LoRA keys associated to .*text_encoder",
            # a scheduler built from another scheduler's config ignores the keys it does not have
            r"were passed to \w*Scheduler, but are not expected and will be ignored",
        ]
    )
)


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not NOISE.search(record.getMessage())


def setup_logging(main_process: bool = True) -> None:
    """fastdiff's logger at INFO (WARNING on the other ranks), accelerate's at WARNING (its INFO lists every file
    of every checkpoint), and a plain ``%(message)s`` handler on the root logger where none is configured.
    diffusers and transformers keep their own loggers, at WARNING unless set otherwise."""
    logging.basicConfig(format="%(message)s")  # no-op where the root logger already has a handler
    logging.getLogger("fastdiff").setLevel(logging.INFO if main_process else logging.WARNING)
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # ACCELERATE_LOG_LEVEL still sets its modules'


@contextmanager
def quiet_libraries():
    """For the length of the block: diffusers' and transformers' progress bars off (pipeline loading, weight
    loading, shard writing) and their ``NOISE`` notices dropped; both as they were afterwards."""
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    libraries = [diffusers_logging, transformers_logging]
    bars_on = [lib.is_progress_bar_enabled() for lib in libraries]
    drop = _DropNoise()  # one per block: a nested block removes only its own
    handlers = [h for name in ("diffusers", "transformers") for h in logging.getLogger(name).handlers]
    for lib in libraries:
        lib.disable_progress_bar()
    for handler in handlers:
        handler.addFilter(drop)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(drop)
        for lib, on in zip(libraries, bars_on):
            if on:
                lib.enable_progress_bar()
