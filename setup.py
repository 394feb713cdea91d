"""The wheel's files (the metadata is in pyproject.toml): the fastdiff packages, plus the repo's ``pipelines/`` and
the run-time ``assets/`` shipped inside the package as ``fastdiff/pipeline_files/`` and ``fastdiff/assets/`` (read
through ``fastdiff.paths``), never as top-level names. ``assets/bench`` (published tables) stays out."""

from setuptools import find_packages, setup

ASSET_DIRS = ("configs", "eval", "prompts", "teachers")

setup(
    packages=[
        *find_packages(include=["fastdiff", "fastdiff.*"]),
        "fastdiff.pipeline_files",
        *(f"fastdiff.assets.{d}" for d in ASSET_DIRS),
    ],
    package_dir={"fastdiff.pipeline_files": "pipelines", "fastdiff.assets": "assets"},
    package_data={f"fastdiff.assets.{d}": ["**/*"] for d in ASSET_DIRS},
)
