"""fastdiff.paths from a checkout: the repo's assets and pipeline files, pipeline modules imported once."""

from pathlib import Path

import pytest

from fastdiff import paths

REPO = Path(__file__).resolve().parents[1]


def test_a_checkout_reads_its_own_assets_and_pipelines():
    assert paths.ASSETS == REPO / "assets"
    assert paths.asset("configs", "digits_dmd2.yaml").is_file()
    assert paths.pipeline_file("adapter_guidance") == REPO / "pipelines" / "adapter_guidance.py"


def test_pipeline_module_is_imported_once_under_fastdiff():
    from fastdiff.pipelines import StableDiffusionXLAdapterGuidancePipeline

    module = paths.pipeline_module("adapter_guidance")
    assert module is paths.pipeline_module("adapter_guidance")
    assert module.__name__ == "fastdiff.pipeline_files.adapter_guidance"
    assert module.StableDiffusionXLAdapterGuidancePipeline is StableDiffusionXLAdapterGuidancePipeline


@pytest.mark.parametrize(
    "name", ["no_such_pipeline", "../pipelines/adapter_guidance", "adapter_guidance.py", ""]
)
def test_unknown_pipeline_names_raise_import_error(name):
    with pytest.raises(ImportError):
        paths.pipeline_module(name)
    with pytest.raises(ImportError):
        paths.pipeline_file(name)
