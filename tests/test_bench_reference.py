"""bench quality's reference metrics (CLIP score, FID, KID) on stand-ins built from config: a tiny random CLIP saved
with save_pretrained, and the full-size FID Inception-v3 with random weights saved as safetensors (0.1 s an image
on one CPU thread)."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from fastdiff.eval import bench_quality
from fastdiff.eval.fid_inception import FIDInceptionV3, load_fid_inception
from fastdiff.eval.reference_metrics import CLIPScore, InceptionReference, to_uint8

REFERENCE_KEYS = {"clip_score", "fid", "kid_mean", "kid_std"}
DIGITS_KEYS = {"fd_digits", "prompt_accuracy", "coverage", "diversity"}


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A random CLIP (2-layer text and vision towers, 32x32 images) with fastdiff's in-memory byte tokenizer."""
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from fastdiff.models.tiny import make_tokenizer

    tokenizer = make_tokenizer()
    vocab = len(tokenizer)
    tower = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4}
    text = {**tower, "vocab_size": vocab, "max_position_embeddings": 77}
    text.update(bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1)
    config = CLIPConfig(
        text_config=text, vision_config={**tower, "image_size": 32, "patch_size": 8}, projection_dim=16
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("clip")
    CLIPModel(config).save_pretrained(folder)
    images = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    """The FID network at full size, He-initialised so that features keep their scale through 94 layers."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    net = FIDInceptionV3()
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    path = tmp_path_factory.mktemp("inception") / "inception.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return path


def _save_images(folder, images01, name="{:03d}.png"):
    folder.mkdir(parents=True, exist_ok=True)
    for i, x in enumerate(to_uint8(images01)):
        Image.fromarray(x.permute(1, 2, 0).numpy()).save(folder / name.format(i))
    return folder


def _smooth_images(n, size=32, seed=0):
    """n random smooth colour images in [0, 1] (noise upsampled from 4x4)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=g)
    return torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)


# ----------------------------------------------------------------------------------------------------- CLIP


def test_clip_score_is_100_relu_cosine_and_prefers_the_matching_prompt(clip_dir):
    """Two images made (by gradient ascent on the pixels) to match one prompt each: each scores higher with its own
    prompt than with the other's, and every score is 100 * max(cos, 0) of the model's own embeddings."""
    from transformers import CLIPModel

    scorer = CLIPScore.load(clip_dir)
    prompts = ["a red apple", "seven blue cubes"]
    model = CLIPModel.from_pretrained(clip_dir, local_files_only=True)
    tokens = scorer.processor.tokenizer(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        text = model(**tokens, pixel_values=torch.zeros(1, 3, 32, 32)).text_embeds
    mean = torch.tensor(scorer.processor.image_processor.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(scorer.processor.image_processor.image_std).view(1, 3, 1, 1)
    images = torch.full((2, 3, 32, 32), 0.5, requires_grad=True)
    opt = torch.optim.Adam([images], lr=0.05)
    for _ in range(100):  # each image towards its prompt and away from the other
        emb = model.get_image_features(pixel_values=(images.clamp(0, 1) - mean) / std)
        emb = emb if isinstance(emb, torch.Tensor) else emb.pooler_output
        cos = torch.nn.functional.normalize(emb, dim=-1) @ text.T  # text_embeds are unit vectors
        loss = (cos.fliplr().diagonal().clamp_min(0) - cos.diagonal()).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    images = images.detach().clamp(0, 1)
    matching = scorer.scores(images, prompts)
    swapped = scorer.scores(images, prompts[::-1])
    assert (matching > swapped).all()
    with torch.no_grad():  # the definition, on the same uint8 images through the processor
        out = scorer.model(
            **scorer.processor(
                text=prompts[::-1], images=list(to_uint8(images)), return_tensors="pt", padding=True
            )
        )
    cos = torch.nn.functional.cosine_similarity(out.image_embeds, out.text_embeds)
    torch.testing.assert_close(swapped, 100 * cos.clamp_min(0), atol=1e-4, rtol=1e-4)
    assert ((swapped >= 0) & (swapped <= 100)).all()


def test_clip_folder_errors(tmp_path, clip_dir):
    with pytest.raises(FileNotFoundError, match="no CLIP model folder"):
        CLIPScore.load(tmp_path / "nowhere")
    unsafe = shutil.copytree(clip_dir, tmp_path / "bin-only")
    (unsafe / "model.safetensors").unlink()
    (unsafe / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(ValueError, match="safetensors"):
        CLIPScore.load(unsafe)


# --------------------------------------------------------------------------------------------- FID and KID


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_a_shift(inception_file, tmp_path):
    real = _smooth_images(8)
    reference = InceptionReference.from_folder(
        load_fid_inception(inception_file), _save_images(tmp_path, real)
    )
    same, shifted = (reference.scores(reference.features((real + s).clamp(0, 1))) for s in (0.0, 0.2))
    assert same.keys() == shifted.keys() == {"fid", "kid_mean", "kid_std"}
    assert abs(same["fid"]) < 1e-4 * shifted["fid"]  # FID(x, x) = 0 up to rounding (torchmetrics' eigvals)
    assert same["kid_mean"] < shifted["kid_mean"] and shifted["kid_std"] >= 0
    # images of any size in the folder; each is resized on its own
    _save_images(tmp_path / "sizes", _smooth_images(2, size=40))
    _save_images(tmp_path / "sizes", _smooth_images(1, size=24), name="small-{}.jpg")
    (tmp_path / "sizes" / "notes.txt").write_text("not an image: skipped")
    mixed = InceptionReference.from_folder(reference.network, tmp_path / "sizes")
    assert mixed.real_features.shape == (3, 2048)


def test_inception_file_errors(inception_file, tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(FileNotFoundError, match="not found"):
        load_fid_inception(tmp_path / "missing.pth")
    (tmp_path / "inception.onnx").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"expected a \.safetensors file or a torch file"):
        load_fid_inception(tmp_path / "inception.onnx")
    (tmp_path / "broken.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_fid_inception(tmp_path / "broken.safetensors")
    save_file({"conv.weight": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not an FID Inception-v3 state dict: keys .* missing"):
        load_fid_inception(tmp_path / "other.safetensors")
    torch.save({"model": np.dtype("float32")}, tmp_path / "pickled.pth")  # needs unpickling beyond tensors
    with pytest.raises(ValueError, match="weights_only=True"):
        load_fid_inception(tmp_path / "pickled.pth")
    # a torch state dict (as pytorch-fid's .pth, fc kept) loads; so does the safetensors file
    state = load_fid_inception(inception_file).state_dict()
    torch.save(
        {**state, "fc.weight": torch.zeros(1008, 2048), "fc.bias": torch.zeros(1008)}, tmp_path / "i.pth"
    )
    assert isinstance(load_fid_inception(tmp_path / "i.pth"), FIDInceptionV3)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "0.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot read image .*0.png"):
        InceptionReference.from_folder(load_fid_inception(inception_file), tmp_path / "bad")
    with pytest.raises(ValueError, match="at least 2 reference images"):
        InceptionReference.from_folder(
            load_fid_inception(inception_file), _save_images(tmp_path / "one", _smooth_images(1))
        )


# ------------------------------------------------------------------------------------------ bench quality


def _export(folder, teacher):
    """An export folder whose pipeline/ is the tiny teacher: a 2-step trailing-DDIM student."""
    from fastdiff.recipe import Recipe

    shutil.copytree(teacher, folder / "pipeline")
    recipe = Recipe(
        "tscd", 2, 0.0, [999, 499], "DDIMScheduler", {"timestep_spacing": "trailing"}, sampler="ddim"
    )
    (folder / "fastdiff.json").write_text(json.dumps({**recipe.to_json(), "lora": None}))
    return str(folder)


def test_run_adds_reference_columns_to_the_digits_rows(tiny_teachers, clip_dir, inception_file, tmp_path):
    reference = InceptionReference.from_folder(
        load_fid_inception(inception_file), _save_images(tmp_path / "real", _smooth_images(6))
    )
    systems = [
        *bench_quality.teacher_systems(tiny_teachers["sdxl"], 2.0, steps=(1,)),
        bench_quality.export_system(_export(tmp_path / "student", tiny_teachers["sdxl"])),
    ]
    rows = bench_quality.run(
        systems, tmp_path / "out", n=4, batch=4, clip=CLIPScore.load(clip_dir), inception=reference
    )
    assert [r["system"] for r in rows] == ["teacher-1", "tscd-2"]
    for row in rows:
        assert DIGITS_KEYS | REFERENCE_KEYS <= row.keys()
        assert 0 <= row["clip_score"] <= 100 and row["fid"] > 0
    table = (tmp_path / "out" / "bench.md").read_text()
    assert all(k in table.splitlines()[0] for k in ["fd_digits", *sorted(REFERENCE_KEYS)])


def test_cli_with_a_prompt_file_scores_clip_fid_kid_without_the_digits_metrics(
    tiny_teachers, clip_dir, inception_file, tmp_path
):
    from fastdiff.cli import main

    (tmp_path / "captions.txt").write_text("A man riding a horse.\nTwo dogs on a beach.\nA red bus.\n")
    _save_images(tmp_path / "coco", _smooth_images(5))
    args = ["bench", "quality", "--teacher", tiny_teachers["sdxl"], "--teacher-steps", "1", "--n", "4"]
    args += ["--batch", "2", "--out", str(tmp_path / "out"), "--prompts", str(tmp_path / "captions.txt")]
    args += ["--clip", str(clip_dir), "--inception", str(inception_file)]
    main([*args, "--reference-images", str(tmp_path / "coco")])
    rows = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert [r["system"] for r in rows] == ["teacher-1"]
    for row in rows:
        assert REFERENCE_KEYS <= row.keys() and not DIGITS_KEYS & row.keys()
        assert row["n"] == 4 and row["fid"] > 0
        assert (tmp_path / "out" / "grids" / f"{row['system']}.png").is_file()
    header = (tmp_path / "out" / "bench.md").read_text().splitlines()[0]
    assert "clip_score" in header and "fid" in header and "fd_digits" not in header


def test_cli_errors_name_the_option(tiny_teachers, clip_dir, inception_file, tmp_path, capsys):
    from fastdiff.cli import main

    (tmp_path / "empty").mkdir()
    base = ["bench", "quality", "--teacher", tiny_teachers["sdxl"], "--teacher-steps", "1", "--n", "2"]
    cases = [
        (["--inception", str(inception_file)], "both --inception FILE and --reference-images DIR"),
        (["--clip", str(tmp_path / "no-clip")], "--clip: no CLIP model folder"),
        (["--prompts", str(tmp_path / "no.txt")], "--prompts: Prompt file not found"),
        (
            ["--inception", str(tmp_path / "x.pth"), "--reference-images", str(tmp_path)],
            "--inception: Inception",
        ),
        (
            ["--inception", str(inception_file), "--reference-images", str(tmp_path / "empty")],
            "--reference-images: no images",
        ),
    ]
    for extra, message in cases:
        with pytest.raises(SystemExit) as e:
            main([*base, *extra, "--out", str(tmp_path / "out")])
        assert message in str(e.value.code) and "\n" not in str(e.value.code)
    assert not (tmp_path / "out" / "bench.json").exists()  # nothing sampled
