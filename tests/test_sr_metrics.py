"""Y-channel PSNR / SSIM on hand-computable cases, and against scikit-image's reference implementations."""

import math

import pytest
import torch

from fastdiff.sr.metrics import DATA_RANGE, gaussian_window, psnr_y, rgb_to_y, ssim_y


def _grey(value_255: float, size: int = 16, n: int = 1) -> torch.Tensor:
    """An RGB image in [-1, 1] whose three channels are value_255 / 255."""
    return torch.full((n, 3, size, size), value_255 / 127.5 - 1, dtype=torch.float64)


def test_y_of_black_white_and_primaries():
    assert rgb_to_y(_grey(0))[0, 0, 0].item() == pytest.approx(16.0)
    assert rgb_to_y(_grey(255))[0, 0, 0].item() == pytest.approx(235.0)
    red = torch.tensor([1.0, -1.0, -1.0])[:, None, None].expand(3, 2, 2)
    assert rgb_to_y(red)[0, 0].item() == pytest.approx(16 + 65.481)


def test_identical_images():
    x = torch.rand(2, 3, 24, 24) * 2 - 1
    assert torch.isinf(psnr_y(x, x)).all()
    assert torch.allclose(ssim_y(x, x), torch.ones(2, dtype=torch.float64))
    assert psnr_y(x[0], x[0]).shape == (1,)


def test_constant_offset_psnr():
    # grey levels 100 and 110 (of 255) differ by 10 * 219 / 255 in Y everywhere
    diff = 10 * 219 / 255
    expected = 10 * math.log10(DATA_RANGE**2 / diff**2)
    assert psnr_y(_grey(110), _grey(100)).item() == pytest.approx(expected)
    # an offset on a textured image gives the same PSNR (the error does not depend on the content)
    x = torch.rand(1, 3, 16, 16, dtype=torch.float64) * 1.5 - 0.75
    assert psnr_y(x + 20 / 127.5, x).item() == pytest.approx(10 * math.log10(255**2 / (20 * 219 / 255) ** 2))


def test_ssim_of_constant_images_is_the_luminance_term():
    a, b = 16 + 219 * 100 / 255, 16 + 219 * 150 / 255  # their Y values
    c1 = (0.01 * 255) ** 2
    expected = (2 * a * b + c1) / (a * a + b * b + c1)  # no variance: contrast/structure terms are C2/C2
    assert ssim_y(_grey(100), _grey(150)).item() == pytest.approx(expected)


def test_ssim_window():
    w = gaussian_window()
    assert w.shape == (11, 11) and w.sum().item() == pytest.approx(1.0)
    assert w[5, 5] == w.max() and torch.equal(w, w.T)
    with pytest.raises(ValueError, match="at least 11"):
        ssim_y(_grey(1, size=8), _grey(2, size=8))


def test_against_scikit_image():
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    g = torch.Generator().manual_seed(0)
    target = torch.rand(2, 3, 40, 48, generator=g, dtype=torch.float64) * 2 - 1
    pred = (target + 0.2 * torch.randn(target.shape, generator=g, dtype=torch.float64)).clamp(-1, 1)
    for i in range(2):
        yp, yt = rgb_to_y(pred[i]).numpy(), rgb_to_y(target[i]).numpy()
        ref_psnr = peak_signal_noise_ratio(yt, yp, data_range=255)
        ref_ssim = structural_similarity(
            yt, yp, data_range=255, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
        )
        assert psnr_y(pred, target)[i].item() == pytest.approx(ref_psnr, rel=1e-9)
        assert ssim_y(pred, target)[i].item() == pytest.approx(ref_ssim, rel=1e-6)


def test_crop_border_and_shape_checks():
    x, y = _grey(100, size=24), _grey(100, size=24)
    y[..., :4] = 1.0  # a wrong 4-pixel border only
    assert math.isfinite(psnr_y(x, y).item())
    assert math.isinf(psnr_y(x, y, crop_border=4).item())
    with pytest.raises(ValueError, match="shapes differ"):
        psnr_y(x, y[..., :20])
