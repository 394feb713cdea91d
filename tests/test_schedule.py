"""Schedule math against hand-built (x0, eps, x_t) and against diffusers' own schedulers; scheduler export."""

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
)

from fastdiff import schedule
from fastdiff.export import image_grid
from fastdiff.recipe import Recipe, derive_scheduler, make_scheduler

BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)


@pytest.fixture(scope="module")
def acp():
    return DDPMScheduler(**BETAS).alphas_cumprod.float().clone()


@pytest.fixture(scope="module")
def sample():
    """x0, eps, t (all kinds of noise levels, including both ends) in float64 so round trips are exact."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(6, 4, 8, 8, generator=g, dtype=torch.float64)
    eps = torch.randn(6, 4, 8, 8, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 1, 250, 500, 749, 999])
    return x0, eps, t


def _sdxl_scheduler_config(prediction_type="epsilon") -> dict:
    return dict(
        EulerDiscreteScheduler(
            **BETAS, prediction_type=prediction_type, steps_offset=1, timestep_spacing="leading"
        ).config
    )


def _derive(timesteps, prediction_type="epsilon"):
    """``derive_scheduler``'s (class name, kwargs, derivable) with the scheduler they make from the config."""
    config = _sdxl_scheduler_config(prediction_type)
    name, kwargs, derivable = derive_scheduler(config, timesteps)
    sched = make_scheduler(config, name, kwargs)
    assert type(sched).__name__ == name
    return sched, derivable


# --- parametrisations -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("prediction_type", schedule.PREDICTION_TYPES)
def test_target_round_trips(acp, sample, prediction_type):
    x0, eps, t = sample
    acp64 = acp.double()
    x_t = schedule.add_noise(x0, eps, t, acp64)
    a = acp64[t].sqrt().view(-1, 1, 1, 1)
    s = (1 - acp64[t]).sqrt().view(-1, 1, 1, 1)
    assert torch.allclose(x_t, a * x0 + s * eps)
    target = schedule.target_for(prediction_type, x0, eps, t, acp64)
    expected = {"epsilon": eps, "v_prediction": a * eps - s * x0, "sample": x0}[prediction_type]
    assert torch.allclose(target, expected)
    assert torch.allclose(schedule.to_x0(target, x_t, t, acp64, prediction_type), x0, atol=1e-8)
    assert torch.allclose(schedule.to_eps(target, x_t, t, acp64, prediction_type), eps, atol=1e-8)
    assert torch.allclose(schedule.eps_from_x0(x0, x_t, t, acp64), eps, atol=1e-8)


@pytest.mark.parametrize("fn", [schedule.to_x0, schedule.to_eps])
def test_unknown_prediction_type(acp, sample, fn):
    x0, eps, t = sample
    with pytest.raises(ValueError, match="flow"):
        fn(x0, x0, t, acp, "flow")
    with pytest.raises(ValueError, match="flow"):
        schedule.target_for("flow", x0, eps, t, acp)


def test_add_noise_matches_diffusers(acp):
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(5, 4, 8, 8, generator=g)
    eps = torch.randn(5, 4, 8, 8, generator=g)
    t = torch.tensor([0, 20, 399, 749, 999])
    ref = DDPMScheduler(**BETAS).add_noise(x0, eps, t)
    torch.testing.assert_close(schedule.add_noise(x0, eps, t, acp), ref, atol=1e-5, rtol=1e-5)


def test_alpha_sigma_broadcast(acp):
    like = torch.zeros(3, 4, 5, 5)
    a, s = schedule.alpha_sigma(acp, torch.tensor([0, 500, 999]), like)
    assert a.shape == s.shape == (3, 1, 1, 1)
    torch.testing.assert_close(a**2 + s**2, torch.ones_like(a))


# --- DDIM -------------------------------------------------------------------------------------------------------
def test_ddim_step_to_clean_returns_x0(acp, sample):
    x0, eps, _ = sample
    x0, eps = x0.float(), eps.float()
    out = schedule.ddim_step(x0, eps, torch.tensor(-1), acp)
    assert torch.equal(out, x0)
    # per-sample t_next: the t_next < 0 rows are clean, the others renoised
    t_next = torch.tensor([-1, 499, -1, 0, 999, -1])
    out = schedule.ddim_step(x0, eps, t_next, acp)
    mask = t_next < 0
    assert torch.equal(out[mask], x0[mask])
    torch.testing.assert_close(out[~mask], schedule.add_noise(x0[~mask], eps[~mask], t_next[~mask], acp))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddim_step_matches_diffusers(acp, prediction_type):
    g = torch.Generator().manual_seed(2)
    x_t = torch.randn(2, 4, 8, 8, generator=g)
    model_output = torch.randn(2, 4, 8, 8, generator=g)
    ddim = DDIMScheduler(
        **BETAS,
        prediction_type=prediction_type,
        timestep_spacing="trailing",
        clip_sample=False,
        set_alpha_to_one=False,
    )
    ddim.set_timesteps(4)  # [999, 749, 499, 249]
    t, t_next = 749, 499
    assert ddim.timesteps.tolist()[1:3] == [t, t_next]
    ref = ddim.step(model_output, t, x_t, eta=0.0).prev_sample

    tt = torch.tensor([t, t])
    x0 = schedule.to_x0(model_output, x_t, tt, acp, prediction_type)
    eps = schedule.to_eps(model_output, x_t, tt, acp, prediction_type)
    ours = schedule.ddim_step(x0, eps, torch.tensor(t_next), acp)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 8])
def test_ddim_timesteps_match_trailing_ddim(n):
    ddim = DDIMScheduler(**BETAS, timestep_spacing="trailing")
    ddim.set_timesteps(n)
    assert schedule.ddim_timesteps(n) == ddim.timesteps.tolist()
    assert schedule.ddim_timesteps(n)[0] == 999


def test_snr_monotone_decreasing(acp):
    snr = schedule.snr(acp, torch.arange(1000))
    assert (snr > 0).all()
    assert (snr[1:] < snr[:-1]).all()


# --- exported scheduler -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("timesteps", [[999], [999, 749, 499, 249], [999, 499]])
def test_derive_lcm(timesteps):
    sched, derivable = _derive(timesteps)
    assert isinstance(sched, LCMScheduler)
    assert derivable is True
    sched.set_timesteps(len(timesteps))
    assert sched.timesteps.tolist() == timesteps
    # a fresh copy built from its saved config derives the same timesteps from the step count alone
    fresh = LCMScheduler.from_config(sched.config)
    fresh.set_timesteps(len(timesteps))
    assert fresh.timesteps.tolist() == timesteps


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_derive_single_step_at_399(acp, prediction_type):
    """LCM counting 400 timesteps on the teacher's betas: one step at 399 returns the x0 prediction (LCM's
    boundary condition leaves x_t a weight under 1e-7), and two steps are refused before any UNet call."""
    sched, derivable = _derive([399], prediction_type)
    assert isinstance(sched, LCMScheduler)
    assert derivable is True
    fresh = LCMScheduler.from_config(sched.config)  # what a user gets from the saved folder
    fresh.set_timesteps(1)
    assert fresh.timesteps.tolist() == [399]
    with pytest.raises(ValueError, match="original_steps"):
        LCMScheduler.from_config(sched.config).set_timesteps(2)

    g = torch.Generator().manual_seed(3)
    x_t = torch.randn(2, 4, 8, 8, generator=g)
    model_output = torch.randn(2, 4, 8, 8, generator=g)
    out = fresh.step(model_output, 399, x_t)
    x0 = schedule.to_x0(model_output, x_t, torch.tensor([399, 399]), acp, prediction_type)
    torch.testing.assert_close(out.prev_sample, x0, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("timesteps", [[999, 600, 100], [500, 250], [749, 499]])
def test_derive_not_derivable(timesteps):
    sched, derivable = _derive(timesteps)
    assert derivable is False
    assert isinstance(sched, LCMScheduler)
    sched.set_timesteps(timesteps=timesteps)  # the explicit list still works
    assert sched.timesteps.tolist() == timesteps


def _recipe(timesteps, derivable):
    return {
        "method": "dmd2",
        "num_inference_steps": len(timesteps),
        "guidance_scale": 0.0,
        "timesteps": timesteps,
        "timesteps_derivable": derivable,
        "scheduler": "LCMScheduler",
    }


def _call_kwargs(recipe: dict, steps=None) -> dict:
    return Recipe.from_json(recipe).for_steps(steps).call_kwargs()


def test_pipeline_kwargs():
    assert _call_kwargs(_recipe([999, 749, 499, 249], True)) == {
        "num_inference_steps": 4,
        "guidance_scale": 0.0,
    }
    assert _call_kwargs(_recipe([999, 600, 100], False)) == {
        "num_inference_steps": 3,
        "guidance_scale": 0.0,
        "timesteps": [999, 600, 100],
    }
    # the recorded step count asked for explicitly is the same call
    assert _call_kwargs(_recipe([999, 600, 100], False), 3) == _call_kwargs(_recipe([999, 600, 100], False))


def test_pipeline_kwargs_from_derive_scheduler():
    for timesteps in ([399], [999, 600, 100]):
        _, _, derivable = derive_scheduler(_sdxl_scheduler_config(), timesteps)
        kw = _call_kwargs(_recipe(timesteps, derivable))
        assert ("timesteps" in kw) is (not derivable)


# --- image grid -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("n", "rows", "size"), [(4, 1, (4 * 16, 12)), (4, 2, (2 * 16, 2 * 12)), (5, 2, (3 * 16, 24))]
)
def test_image_grid_shape(n, rows, size):
    images = torch.rand(n, 3, 12, 16)
    grid = image_grid(images, rows=rows)
    assert grid.mode == "RGB"
    assert grid.size == size  # PIL: (width, height)


def test_image_grid_places_images():
    images = torch.zeros(3, 3, 2, 2)
    images[1] = 1.0
    images[2, 0] = 2.0  # clamped to 1
    grid = torch.from_numpy(np.array(image_grid(images, rows=2)))
    assert grid.shape == (4, 4, 3)
    assert (grid[:2, :2] == 0).all()  # image 0: row 0, col 0
    assert (grid[:2, 2:] == 255).all()  # image 1: row 0, col 1
    assert (grid[2:, :2] == torch.tensor([255, 0, 0])).all()  # image 2: row 1, col 0, red channel only
    assert (grid[2:, 2:] == 0).all()  # empty cell


def test_recipe_for_steps_is_the_one_rule_for_step_counts():
    ts = [999, 749, 499, 249]
    recipe = Recipe(
        "dmd2", 4, 0.0, ts, "LCMScheduler", {"original_inference_steps": 4}, step_counts=[1, 2, 3, 4]
    )
    assert recipe.for_steps().call_kwargs() == {"num_inference_steps": 4, "guidance_scale": 0.0}
    assert recipe.for_steps(2).call_kwargs() == {"num_inference_steps": 2, "guidance_scale": 0.0}
    for bad in (0, 5, 8):
        with pytest.raises(ValueError, match=r"samples at \[1, 2, 3, 4\] step\(s\)") as info:
            recipe.for_steps(bad)
        assert f"not {bad}" in str(info.value)
    anything = Recipe("agd", 50, 5.0, list(range(999, 0, -20)), "DDIMScheduler", step_counts=None)
    assert anything.for_steps(7).call_kwargs() == {"num_inference_steps": 7, "guidance_scale": 5.0}
    # a round trip through fastdiff.json keeps the rule
    back = Recipe.from_json(recipe.to_json())
    assert back.allowed_steps() == [1, 2, 3, 4] and back.to_json() == recipe.to_json()


def test_call_extra_reaches_every_step_count_and_survives_fastdiff_json():
    """An upscaler's noise_level: a top-level fastdiff.json key and an argument of every call."""
    from fastdiff.recipe import StepRecipe

    recipe = Recipe(
        "tadsr", 1, 0.0, [999], "LCMScheduler", {"original_inference_steps": 1}, step_counts=[1, 2],
        recipes={2: StepRecipe(2, 0.0, call_extra={"eta": 0.3})}, call_extra={"noise_level": 20},
    )  # fmt: skip
    data = recipe.to_json()
    assert data["noise_level"] == 20 and data["call_extra"] == ["noise_level"]
    back = Recipe.from_json(data)
    assert back.for_steps().call_kwargs() == {
        "num_inference_steps": 1,
        "guidance_scale": 0.0,
        "noise_level": 20,
    }
    assert back.for_steps(2).call_kwargs()["noise_level"] == 20
    assert recipe.for_steps(2).call_kwargs()["eta"] == 0.3
    assert Recipe.from_json(Recipe("dmd2", 1, 0.0, [999], "LCMScheduler").to_json()).call_extra == {}
