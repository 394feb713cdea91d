"""Exports a hub takes: model card front matter, the teacher recorded as given and resolved, which base each LoRA
goes on (a UNet fingerprint), and the hub layout (the export folder itself a loadable diffusers repo)."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from diffusers import DiffusionPipeline

from fastdiff.cli import main
from fastdiff.config import load_config
from fastdiff.export import card_metadata, model_card
from fastdiff.models.lora import check_lora_base, unet_fingerprint
from fastdiff.run import train
from fastdiff.teacher import Teacher, teacher_hub_id

REPO = Path(__file__).resolve().parents[1]
TINY_RECIPE = REPO / "assets/configs/tiny_sdxl_dmd2.yaml"
PROMPT = "a red square"
CALL = dict(num_inference_steps=4, guidance_scale=0.0, output_type="latent")


@pytest.fixture(scope="module")
def run(tiny_teachers, tmp_path_factory):
    """A 2-step tiny DMD2 LoRA run whose teacher was given as a path relative to the working directory."""
    work = tmp_path_factory.mktemp("work")
    shutil.copytree(tiny_teachers["sdxl"], work / "tiny-sdxl")
    overrides = [
        "teacher=tiny-sdxl",
        f"prompts={REPO / 'assets/prompts/sample_prompts.txt'}",
        f"output_dir={work / 'out'}",
        "max_steps=2",
        "checkpointing_steps=2",
    ]
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)
        train(load_config(TINY_RECIPE, [*overrides, "validation_steps=100"]))
    elsewhere = work / "elsewhere"
    elsewhere.mkdir()
    return work, work / "out", elsewhere


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card[4:].split("\n---\n", 1)[0])


def latents(pipe) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    return pipe(PROMPT, **CALL, generator=torch.Generator().manual_seed(0)).images


def test_front_matter_of_every_card(run, tiny_teachers, tmp_path):
    _, out, _ = run
    data = json.loads((out / "fastdiff.json").read_text())
    meta = front_matter((out / "README.md").read_text())
    assert meta["library_name"] == "diffusers" and meta["pipeline_tag"] == "text-to-image"
    assert {"fastdiff", "dmd2", "distillation", "lora"} <= set(meta["tags"])
    assert "base_model" not in meta and "license" not in meta  # a local folder of unknown origin and license

    # the teacher's license from its README front matter; a hub id as given or from a hub cache snapshot
    teacher = tmp_path / "models--stabilityai--sdxl-turbo/snapshots/abc"
    shutil.copytree(tiny_teachers["sdxl"], teacher)
    (teacher / "README.md").write_text("---\nlicense: openrail++\ntags: [x]\n---\n# SDXL\n")
    loaded = Teacher(teacher)
    assert card_metadata(loaded, str(teacher)) == {
        "base_model": "stabilityai/sdxl-turbo",
        "license": "openrail++",
        "pipeline_tag": "text-to-image",
    }
    assert teacher_hub_id("owner/model", teacher) == "owner/model"
    assert teacher_hub_id("./owner/model", tiny_teachers["sdxl"]) is None
    assert card_metadata(Teacher(tiny_teachers["sd-x4"]), "x4")["pipeline_tag"] == "image-to-image"

    # every card (the generic one and the methods' own) opens with the same front matter
    from fastdiff.methods.agd.export import model_card as agd_card
    from fastdiff.methods.msd.export import model_card as msd_card
    from fastdiff.methods.tadsr.method import TADSR

    data["card"] = card_metadata(loaded, str(teacher))
    extra = {
        "w_range": [1.0, 8.0],
        "adapters": {"fraction_of_unet": 0.01, "parameters": 10},
        "students": {"num_students": 2, "lora": ["lora/student_0"], "partition": "kmeans", "sizes": [3, 4]},
        "noise_level": 20,
    }
    cards = {
        "dmd2": model_card,
        "agd": agd_card,
        "msd": msd_card,
        "tadsr": lambda d, g: TADSR.model_card(None, d, g),
    }
    for method, card in cards.items():
        meta = front_matter(card({**data, **extra, "method": method}, "grid.png"))
        assert meta["base_model"] == "stabilityai/sdxl-turbo" and meta["license"] == "openrail++", method
        assert meta["library_name"] == "diffusers" and meta["pipeline_tag"] == "text-to-image", method
        assert {"fastdiff", method, "distillation", "lora"} <= set(meta["tags"]), method


def test_fingerprint_tells_the_teacher_from_the_fused_pipeline(run):
    work, out, _ = run
    data = json.loads((out / "fastdiff.json").read_text())
    base = data["lora_base"]
    assert base["teacher"] == "tiny-sdxl" and base["teacher_path"] == str((work / "tiny-sdxl").resolve())
    assert base["loras"] == ["lora"]
    assert json.loads((out / "lora/fastdiff_lora.json").read_text())["lora_base"] == base
    teacher = DiffusionPipeline.from_pretrained(work / "tiny-sdxl")
    again = DiffusionPipeline.from_pretrained(work / "tiny-sdxl")
    fused = DiffusionPipeline.from_pretrained(out / "pipeline")
    assert unet_fingerprint(teacher.unet) == unet_fingerprint(again.unet) == base["unet_fingerprint"]
    assert unet_fingerprint(fused.unet) != base["unet_fingerprint"]
    check_lora_base(teacher.unet, data, "teacher")
    check_lora_base(fused.unet, {}, "an older export")  # no record: nothing to check
    with pytest.raises(
        ValueError, match=r"^pipeline/: this LoRA was trained on tiny-sdxl .*already has it fused"
    ):
        check_lora_base(fused.unet, data, "pipeline/")
    half = DiffusionPipeline.from_pretrained(out / "pipeline", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="bfloat16"):  # at the precision the pipeline is loaded in
        check_lora_base(half.unet, data, "pipeline/")
    check_lora_base(
        DiffusionPipeline.from_pretrained(work / "tiny-sdxl", dtype=torch.bfloat16).unet, data, "t"
    )


def test_hub_layout_loads_as_a_repo_and_exports_run_from_anywhere(run, monkeypatch, capsys):
    work, out, elsewhere = run
    checkpoint = out / "checkpoints/checkpoint-2"
    monkeypatch.chdir(elsewhere)  # where the teacher as given ("tiny-sdxl") is not a folder
    main(["export", "--checkpoint", str(checkpoint), "--out", "default"])
    main(["export", "--checkpoint", str(checkpoint), "--out", "hub", "--hub-layout"])
    hub, default = elsewhere / "hub", elsewhere / "default"
    assert (hub / "model_index.json").is_file() and not (hub / "pipeline").exists()
    assert {"README.md", "fastdiff.json", "lora", "unet", "scheduler"} <= {p.name for p in hub.iterdir()}
    data = json.loads((hub / "fastdiff.json").read_text())
    assert data["layout"] == "hub" and data["teacher"] == "tiny-sdxl"
    assert data["teacher_path"] == str((work / "tiny-sdxl").resolve())

    pipe = DiffusionPipeline.from_pretrained(hub)
    ours = latents(pipe)
    assert torch.equal(ours, latents(DiffusionPipeline.from_pretrained(default / "pipeline")))
    teacher = DiffusionPipeline.from_pretrained(data["teacher_path"])
    check_lora_base(teacher.unet, data, "hub")
    teacher.load_lora_weights(hub, subfolder="lora")  # the LoRA alongside, on the teacher
    teacher.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    torch.testing.assert_close(latents(teacher), ours, atol=1e-4, rtol=0)

    card = (hub / "README.md").read_text()
    assert 'from_pretrained(".")' in card and 'load_lora_weights(".", subfolder="lora")' in card
    assert '"pipeline"' not in card and "`pipeline/`" not in card
    main(["generate", str(hub), PROMPT, "--out", "sample.png"])  # reads the export through pipeline_dir
    assert (elsewhere / "sample.png").is_file()

    main(
        ["export", "--checkpoint", str(checkpoint), "--out", "default", "--hub-layout"]
    )  # a layout replaces the other
    assert not (default / "pipeline").exists() and (default / "model_index.json").is_file()


def test_a_missing_teacher_names_the_teacher_option(run, monkeypatch, capsys):
    work, out, elsewhere = run
    monkeypatch.chdir(elsewhere)
    moved = work / "moved-teacher"
    (work / "tiny-sdxl").rename(moved)
    try:
        with pytest.raises(SystemExit) as exit_:
            main(["export", "--checkpoint", str(out / "checkpoints/checkpoint-2"), "--out", "lost"])
        assert exit_.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "--teacher" in err and "tiny-sdxl" in err, err
        main(
            [
                "export",
                "--checkpoint",
                str(out / "checkpoints/checkpoint-2"),
                "--out",
                "found",
                "--teacher",
                str(moved),
            ]
        )
        assert json.loads((elsewhere / "found/fastdiff.json").read_text())["teacher"] == str(moved)
    finally:
        moved.rename(work / "tiny-sdxl")
