"""LoRA helpers: named adapters in shared-base mode, requires_grad bookkeeping, exports that plain diffusers loads."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from fastdiff.models.denoiser import UNetDenoiser
from fastdiff.models.lora import (
    UNET_LORA_TARGETS,
    LoRAFormatError,
    adapter_metadata,
    adapter_parameters,
    adapter_state_dict,
    add_adapter,
    lora_config,
    save_lora,
    unique_parameter_bytes,
    use_adapter,
    validate_lora_file,
)
from fastdiff.models.tiny import TEXT_HIDDEN, tiny_pipeline, tiny_unet


def _inputs(family, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([10, 700])
    if family == "sdxl":
        kw = {
            "encoder_hidden_states": torch.randn(2, 7, 2 * TEXT_HIDDEN, generator=g),
            "added_cond_kwargs": {
                "text_embeds": torch.randn(2, TEXT_HIDDEN, generator=g),
                "time_ids": torch.rand(2, 6, generator=g),
            },
        }
    else:
        kw = {"encoder_hidden_states": torch.randn(2, 7, TEXT_HIDDEN, generator=g)}
    return x, t, kw


def _run(unet, family, seed=0):
    x, t, kw = _inputs(family, seed)
    return unet(x, t, **kw, return_dict=False)[0]


def _randomize(unet, name, seed):
    """Give an adapter nonzero lora_B so it changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter_parameters(unet, name):
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def _lora_flags(unet):
    return {n: p.requires_grad for n, p in unet.named_parameters() if "lora_" in n}


def _state(unet):
    layer = next(m for m in unet.modules() if hasattr(m, "active_adapters") and hasattr(m, "lora_A"))
    return list(layer.active_adapters), not layer.disable_adapters


@pytest.fixture
def two_adapters():
    """An SDXL-shaped tiny UNet, its bare output, and adapters 'a' and 'b' with nonzero lora_B."""
    unet = tiny_unet("sdxl")
    with torch.no_grad():
        base = _run(unet, "sdxl")
    add_adapter(unet, "a", rank=4, alpha=4)
    add_adapter(unet, "b", rank=4, alpha=2)
    _randomize(unet, "a", 1)
    _randomize(unet, "b", 2)
    return unet, base


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_targets_are_real_module_names(family):
    unet = tiny_unet(family)
    names = [n for n, _ in unet.named_modules()]
    for target in UNET_LORA_TARGETS:
        assert any(n.endswith("." + target) for n in names), target
    add_adapter(unet, "s", rank=2, alpha=2)
    wrapped = {n for n, m in unet.named_modules() if hasattr(m, "lora_A")}
    for target in UNET_LORA_TARGETS:
        assert any(n.endswith("." + target) for n in wrapped), target


def test_new_adapter_is_noop_and_config():
    unet = tiny_unet("sd15")
    with torch.no_grad():
        base = _run(unet, "sd15")
    params = add_adapter(unet, "s", rank=8, alpha=2)
    assert params and all(p.requires_grad for p in params)
    assert all(not p.requires_grad for n, p in unet.named_parameters() if "lora_" not in n)  # base frozen
    with torch.no_grad():
        torch.testing.assert_close(_run(unet, "sd15"), base, rtol=0, atol=0)
    cfg = lora_config(rank=8, alpha=2)
    assert (cfg.r, cfg.lora_alpha, cfg.init_lora_weights) == (8, 2, "gaussian")
    with pytest.raises(ValueError, match="init"):
        lora_config(init="pissa")
    with pytest.raises(ValueError, match="reserved"):
        add_adapter(unet, "*")


def test_adding_adapter_keeps_flags_and_active_state():
    unet = tiny_unet("sdxl")
    a = add_adapter(unet, "a", rank=4, alpha=4)
    b = add_adapter(unet, "b", rank=4, alpha=4)
    assert all(p.requires_grad for p in a + b)  # peft's add would have frozen "a"
    assert _state(unet) == (["a"], True)  # the first adapter stays active
    for p in a[::2]:
        p.requires_grad_(False)
    before = {id(p): p.requires_grad for p in a + b}
    c = add_adapter(unet, "c", rank=2, alpha=2, targets=["to_q", "to_v"])
    assert {id(p): p.requires_grad for p in a + b} == before
    assert len(c) < len(a) and all(p.requires_grad for p in c)
    with use_adapter(unet, None):  # added while disabled: stays disabled like the rest
        add_adapter(unet, "d", rank=2, alpha=2, targets=["conv_in"])
        assert all(m.disable_adapters for m in unet.modules() if hasattr(m, "lora_A"))
    assert all(
        m.active_adapters == ["a"] and not m.disable_adapters for m in unet.modules() if hasattr(m, "lora_A")
    )


def test_use_adapter_restores_flags_and_state(two_adapters):
    unet, _ = two_adapters
    for i, p in enumerate(adapter_parameters(unet, "b")):
        p.requires_grad_(i % 3 == 0)  # an arbitrary pattern the trainer chose
    flags = _lora_flags(unet)
    outer = _state(unet)
    with use_adapter(unet, "b"):
        assert _state(unet) == (["b"], True)
        assert _lora_flags(unet) == flags
        with use_adapter(unet, None):
            assert _state(unet)[1] is False
            assert _lora_flags(unet) == flags
            with use_adapter(unet, "a"):
                assert _state(unet) == (["a"], True)
                assert _lora_flags(unet) == flags
            assert _state(unet)[1] is False
        assert _state(unet) == (["b"], True)
        assert _lora_flags(unet) == flags
    assert _state(unet) == outer and _lora_flags(unet) == flags
    with pytest.raises(RuntimeError), use_adapter(unet, None):
        raise RuntimeError("boom")
    assert _state(unet) == outer and _lora_flags(unet) == flags
    with pytest.raises(ValueError, match="no adapter"), use_adapter(unet, "nope"):
        pass


def test_gradients_reach_only_the_active_adapter(two_adapters):
    unet, _ = two_adapters
    for p in adapter_parameters(unet, "a") + adapter_parameters(unet, "b"):
        p.requires_grad_(True)
    with use_adapter(unet, "a"):
        _run(unet, "sdxl").square().mean().backward()
    grads_a = [p.grad for p in adapter_parameters(unet, "a")]
    assert all(g is not None for g in grads_a) and any(g.abs().sum() > 0 for g in grads_a)
    assert all(p.grad is None for p in adapter_parameters(unet, "b"))
    assert all(p.grad is None for n, p in unet.named_parameters() if "lora_" not in n)


def test_gradient_checkpointing_backward_inside_block():
    grads = []
    for checkpointing in (False, True):
        unet = tiny_unet("sdxl")
        add_adapter(unet, "a", rank=4, alpha=4)
        add_adapter(unet, "b", rank=4, alpha=4)
        _randomize(unet, "a", 1)
        _randomize(unet, "b", 2)
        if checkpointing:
            unet.enable_gradient_checkpointing()
        unet.train()
        with use_adapter(unet, "a"):
            _run(unet, "sdxl").square().mean().backward()  # the recompute must see adapter "a" too
        grads.append(torch.cat([p.grad.flatten() for p in adapter_parameters(unet, "a")]))
    torch.testing.assert_close(grads[1], grads[0])


def test_disabled_adapters_are_the_base_unet(two_adapters):
    unet, base = two_adapters
    with torch.no_grad():
        with use_adapter(unet, None):
            torch.testing.assert_close(_run(unet, "sdxl"), base, rtol=0, atol=0)
        with use_adapter(unet, "a"):
            out_a = _run(unet, "sdxl")
        with use_adapter(unet, "b"):
            out_b = _run(unet, "sdxl")
    assert (out_a - base).abs().max() > 1e-3 and (out_a - out_b).abs().max() > 1e-3


def test_star_and_bare_unet():
    unet = tiny_unet("sd15")
    with use_adapter(unet, "*"), use_adapter(unet, None):
        pass
    with pytest.raises(ValueError, match="no adapter"), use_adapter(unet, "a"):
        pass
    add_adapter(unet, "a", rank=2, alpha=2)
    with use_adapter(unet, "*"):
        assert _state(unet) == (["a"], True)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_save_lora_reloads_in_plain_diffusers(family, tmp_path):
    pipe = tiny_pipeline(family)
    unet = pipe.unet
    add_adapter(unet, "student", rank=8, alpha=2)  # rank != alpha: scale 0.25, not diffusers' default 1
    add_adapter(unet, "fake", rank=4, alpha=4)
    _randomize(unet, "student", 3)
    _randomize(unet, "fake", 4)
    with torch.no_grad(), use_adapter(unet, "student"):
        ref = _run(unet, family)

    sd = adapter_state_dict(unet, "student")
    assert any(".attn1.to_q.lora_A.weight" in k for k in sd) and not any("lora.down" in k for k in sd)
    meta = adapter_metadata(unet, "student")
    assert (meta["r"], meta["lora_alpha"]) == (8, 2)

    paths = save_lora(tmp_path, unet, "student", type(pipe))
    assert paths == {
        "diffusers": tmp_path / "pytorch_lora_weights.safetensors",
        "kohya": tmp_path / "kohya_lora.safetensors",
    }
    kohya = load_file(paths["kohya"])
    assert all(k.startswith("lora_unet_") for k in kohya)
    assert {v.item() for k, v in kohya.items() if k.endswith(".alpha")} == {2.0}
    assert validate_lora_file(paths["diffusers"], unet) == "diffusers"
    assert validate_lora_file(paths["kohya"], unet) == "kohya"

    for weight_name in (None, "kohya_lora.safetensors"):
        fresh = tiny_pipeline(family)
        fresh.load_lora_weights(tmp_path, **({"weight_name": weight_name} if weight_name else {}))
        n_lora = sum(hasattr(m, "lora_A") for m in fresh.unet.modules())
        assert n_lora == sum("student" in m.lora_A for m in unet.modules() if hasattr(m, "lora_A"))
        if weight_name is None:  # the metadata carried alpha: same scale as in training
            scales = {s for m in fresh.unet.modules() if hasattr(m, "scaling") for s in m.scaling.values()}
            assert scales == {0.25}
        with torch.no_grad():
            torch.testing.assert_close(_run(fresh.unet, family), ref, rtol=0, atol=1e-5)


def test_validate_lora_file_errors(tmp_path):
    def w():
        return torch.zeros(4, 8)

    with pytest.raises(LoRAFormatError, match=r"only \.safetensors"):
        validate_lora_file(tmp_path / "lora.bin")
    with pytest.raises(LoRAFormatError, match="safetensors"):
        validate_lora_file(tmp_path / "lora.ckpt")

    foreign = tmp_path / "foreign.safetensors"
    save_file({"model.layers.0.q_proj.weight": w(), "transformer.blocks.0.attn.lora_A.weight": w()}, foreign)
    with pytest.raises(LoRAFormatError) as err:
        validate_lora_file(foreign)
    msg = str(err.value)
    assert "foreign.safetensors" in msg and "model.layers.0.q_proj.weight" in msg
    assert "transformer.blocks.0.attn.lora_A.weight" in msg and "kohya" in msg and "lora_unet_" in msg
    assert "unet.<module>.lora_A.weight" in msg

    mixed = tmp_path / "mixed.safetensors"
    save_file({"unet.conv_in.lora_A.weight": w(), "lora_unet_conv_in.lora_down.weight": w()}, mixed)
    with pytest.raises(LoRAFormatError, match="mixes"):
        validate_lora_file(mixed)

    def lora_pair(unet, module: str, rank: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
        """lora_A / lora_B weights of the shapes peft gives a rank-``rank`` LoRA on ``unet``'s linear ``module``."""
        base = unet.get_submodule(module)
        return torch.zeros(rank, base.in_features), torch.zeros(base.out_features, rank)

    unet = tiny_unet("sd15")
    good = tmp_path / "good.safetensors"
    proj = "down_blocks.0.resnets.0.time_emb_proj"
    down, up = lora_pair(unet, proj)
    save_file({f"unet.{proj}.lora_A.weight": down, f"unet.{proj}.lora_B.weight": up}, good)
    assert validate_lora_file(good, unet) == "diffusers"
    # shapes are checked against the base whenever it is given: a lora_B one row short is refused, naming its key
    short = tmp_path / "short.safetensors"
    save_file({f"unet.{proj}.lora_A.weight": down, f"unet.{proj}.lora_B.weight": up[:-1].contiguous()}, short)
    assert validate_lora_file(short) == "diffusers"  # no base to check against: the keys' format only
    with pytest.raises(LoRAFormatError, match=rf"'unet\.{proj}\.lora_B\.weight' has shape") as err:
        validate_lora_file(short, unet)
    assert f"needs {tuple(up.shape)}" in str(err.value)
    for fmt, keys in {
        "diffusers": ["unet.mid_block.foo_proj.lora_A.weight", "unet.mid_block.foo_proj.lora_B.weight"],
        "kohya": [
            "lora_unet_mid_block_foo_proj.lora_down.weight",
            "lora_unet_mid_block_foo_proj.lora_up.weight",
        ],
    }.items():
        path = tmp_path / f"{fmt}.safetensors"
        save_file({keys[0]: w(), keys[1]: w().T.contiguous()}, path)
        assert validate_lora_file(path) == fmt  # well-formed keys: fine without a UNet to check against
        with pytest.raises(LoRAFormatError, match="do not exist in this UNet") as err:
            validate_lora_file(path, unet)
        assert keys[0] in str(err.value) and path.name in str(err.value)

    # kohya SDXL files often use the original SGM block names: mapped as diffusers' loader maps them
    sgm = tmp_path / "sgm.safetensors"
    down, up = lora_pair(tiny_unet("sdxl"), "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q")
    for block, ok in [("input_blocks_3_1", True), ("input_blocks_9_1", False)]:
        key = f"lora_unet_{block}_transformer_blocks_0_attn1_to_q"
        save_file({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up}, sgm)
        if ok:
            assert validate_lora_file(sgm, tiny_unet("sdxl")) == "kohya"
        else:
            with pytest.raises(LoRAFormatError, match="down_blocks.4"):
                validate_lora_file(sgm, tiny_unet("sdxl"))


def test_parameter_counting():
    unet = tiny_unet("sdxl")
    total = sum(p.numel() for p in unet.parameters())
    acp = torch.linspace(0.99, 0.01, 1000)
    student = UNetDenoiser(unet, acp, adapter="student")
    teacher = UNetDenoiser(unet, acp, adapter=None)
    nbytes = unique_parameter_bytes(unet)
    assert nbytes == total * 4
    assert unique_parameter_bytes(student, teacher) == nbytes  # one shared UNet counted once
    assert unique_parameter_bytes(student, UNetDenoiser(tiny_unet("sdxl"), acp)) == 2 * nbytes
    lora = add_adapter(unet, "student", rank=4, alpha=4)
    n_lora = sum(p.numel() for p in lora)
    assert sum(p.numel() for p in unet.parameters() if p.requires_grad) == n_lora
    assert sum(p.numel() for p in unet.parameters()) == total + n_lora


def test_adapter_aware_checkpointing_backward_outside_blocks():
    """One backward over forwards of two adapters (DMD2's generator + GAN term) gives the un-checkpointed grads."""
    from fastdiff.models.lora import enable_gradient_checkpointing

    grads = []
    for checkpointing in (False, True):
        unet = tiny_unet("sdxl")
        add_adapter(unet, "a", rank=4, alpha=4)
        add_adapter(unet, "b", rank=4, alpha=4)
        _randomize(unet, "a", 1)
        _randomize(unet, "b", 2)
        if checkpointing:
            enable_gradient_checkpointing(unet)
        unet.train()
        with use_adapter(unet, "a"):
            out_a = _run(unet, "sdxl")
        with use_adapter(unet, "b"):
            out_b = _run(unet, "sdxl")
        (out_a.square().mean() + out_b.abs().mean()).backward()  # outside both blocks
        grads.append(
            torch.cat(
                [p.grad.flatten() for p in adapter_parameters(unet, "a") + adapter_parameters(unet, "b")]
            )
        )
    torch.testing.assert_close(grads[1], grads[0])
