"""Where the files fastdiff reads at run time live: the assets (recipes, bundled teacher, classifier, prompts) and
the self-contained pipeline files that exports carry.

In a checkout they are the repo's ``assets/`` and ``pipelines/``; an installed wheel carries copies of them as
``fastdiff/assets/`` and ``fastdiff/pipeline_files/`` (the ``package_dir`` mapping in setup.py).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

_PACKAGE = Path(__file__).resolve().parent
_INSTALLED = (_PACKAGE / "assets").is_dir()  # a checkout keeps them next to the package instead
ASSETS = _PACKAGE / "assets" if _INSTALLED else _PACKAGE.parent / "assets"
PIPELINES = _PACKAGE / "pipeline_files" if _INSTALLED else _PACKAGE.parent / "pipelines"


def asset(*parts: str) -> Path:
    """A path inside the assets folder, e.g. ``asset("configs", "digits_dmd2.yaml")``."""
    return ASSETS.joinpath(*parts)


def pipeline_file(name: str) -> Path:
    """The file of the pipeline module ``name`` (its stem, e.g. "adapter_guidance").

    Raises:
        ModuleNotFoundError: ``name`` is not an identifier or names no pipeline file.
    """
    path = PIPELINES / f"{name}.py"
    if not name.isidentifier() or not path.is_file():
        raise ModuleNotFoundError(f"no fastdiff pipeline file named {name!r} in {PIPELINES}", name=name)
    return path


def pipeline_module(name: str) -> ModuleType:
    """The pipeline module ``name``, imported once as ``fastdiff.pipeline_files.<name>``.

    Raises:
        ModuleNotFoundError: ``name`` is not an identifier or names no pipeline file.
    """
    path = pipeline_file(name)
    module_name = f"{__package__}.pipeline_files.{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module
