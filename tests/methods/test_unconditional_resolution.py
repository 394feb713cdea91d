"""SDXL's size conditioning: at a training resolution other than the teacher's native one, CFG's unconditional branch
must carry the same time ids as the conditional batch (as the official DMD2 code gives both branches the same
add_time_ids); otherwise CFG amplifies the size-conditioning difference by (w - 1). Checked for every method by
recording every UNet call of a loss (or of the sampler, for AGD)."""

import pytest
import torch

from fastdiff.config import load_config
from fastdiff.methods import build
from fastdiff.run import run_context
from fastdiff.teacher import Teacher

OVERRIDES = {
    "dmd2": ["dmd2.guidance_scale=3"],
    "sid": ["sid.generator=lora", "sid.fake_score=lora", "sid.shared_base=true", "sid.guidance=lsg"],
    "tscd": ["tscd.guidance_scale=3"],
    "agd": [],
}


@pytest.mark.parametrize("method", sorted(OVERRIDES))
def test_unconditional_branch_carries_the_batch_resolution(tiny_teachers, method):
    teacher = Teacher(tiny_teachers["sdxl"])
    res = teacher.resolution // 2
    cfg = load_config(
        None,
        [f"teacher={tiny_teachers['sdxl']}", f"method={method}", f"resolution={res}", *OVERRIDES[method]],
    )
    ctx = run_context(cfg, teacher, with_data=False)
    ctx.with_real_data = method == "tscd"  # TSCD trains on real latents
    m = build(ctx)
    seen = []
    hook = teacher.unet.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(kwargs["added_cond_kwargs"]["time_ids"].clone()),
        with_kwargs=True,
    )
    cond = teacher.encode(["a red square", "a blue circle"], res)
    g = torch.Generator().manual_seed(0)
    try:
        if method == "agd":
            m.generate(torch.randn(2, *ctx.latent_shape), cond, timesteps=2, generator=g)
        else:
            batch = {"cond": cond, "real": torch.randn(2, *ctx.latent_shape), "prompts": ["a", "b"]}
            group = m.groups()[0].name if method != "dmd2" else "generator"
            m.loss(group, batch, 0, g)
            m.loss(m.groups()[-1].name, batch, 0, g)
    finally:
        hook.remove()
    assert seen, "no UNet call was recorded"
    expected = cond.time_ids[0]
    assert expected.tolist() == [res, res, 0, 0, res, res]
    for ids in seen:
        assert torch.equal(ids, expected.expand_as(ids).to(ids.dtype)), ids
