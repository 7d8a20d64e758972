"""Metrics: parity with skimage and piq, edge cases, pairing."""

from __future__ import annotations

import piq
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from gradleak.data import builtin_batch
from gradleak.errors import DataError
from gradleak.metrics import fsim, lpips_available, pair_images, psnr, score_reconstruction, ssim


@pytest.fixture(scope="module")
def pair():
    x = builtin_batch(4, size=64, source="photos").images
    g = torch.Generator().manual_seed(0)
    y = (x + 0.08 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    return x, y


def test_psnr_matches_skimage(pair):
    x, y = pair
    ours = psnr(x, y)
    for i in range(len(x)):
        ref = peak_signal_noise_ratio(x[i].numpy(), y[i].numpy(), data_range=1.0)
        assert abs(float(ours[i]) - ref) < 1e-3


def test_ssim_matches_skimage_gaussian_ssim(pair):
    x, y = pair
    ours = ssim(x, y)
    for i in range(len(x)):
        ref = structural_similarity(x[i].permute(1, 2, 0).numpy(), y[i].permute(1, 2, 0).numpy(), data_range=1.0,
                                    channel_axis=2, gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
        assert abs(float(ours[i]) - ref) < 0.02


def test_fsim_is_the_chromatic_fsim_for_colour_images(pair):
    """A change of colour that keeps luminance (Y of YIQ) leaves FSIM at 1 and lowers FSIM_C: gradleak's FSIM
    of colour images is FSIM_C, as the paper reports (piq's grey FSIM would read this pair as identical)."""
    x, _ = pair
    x = 0.25 + 0.5 * x  # room for the shift below without clipping
    d_red = 0.05
    y = x.clone()
    y[:, 0] += d_red
    y[:, 2] -= d_red * 0.299 / 0.114  # Y = 0.299 R + 0.587 G + 0.114 B is unchanged
    assert (y >= 0).all() and (y <= 1).all()
    grey = piq.fsim(x, y, data_range=1.0, chromatic=False, reduction="none")
    assert torch.allclose(grey, torch.ones_like(grey), atol=1e-3)
    ours = fsim(x, y)
    assert (ours < grey - 0.005).all(), (ours, grey)
    assert torch.allclose(fsim(x, x), torch.ones(len(x)), atol=1e-5)


def test_fsim_falls_as_distortion_grows_and_ignores_the_data_range_scale(pair):
    x, _ = pair
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(x.shape, generator=g)
    scores = [float(fsim(x, (x + s * noise).clamp(0, 1)).mean()) for s in (0.02, 0.08, 0.2)]
    assert scores[0] > scores[1] > scores[2]
    y = (x + 0.08 * noise).clamp(0, 1)
    torch.testing.assert_close(fsim(255 * x, 255 * y, data_range=255.0), fsim(x, y), atol=1e-4, rtol=0)


def test_identical_images_score_perfectly(pair):
    x, _ = pair
    assert torch.allclose(ssim(x, x), torch.ones(len(x)), atol=1e-5)
    assert torch.allclose(fsim(x, x), torch.ones(len(x)), atol=1e-5)
    assert (psnr(x, x) >= 79).all()


def test_reduction_contract(pair):
    x, y = pair
    v = ssim(x, y)
    assert torch.allclose(ssim(x, y, reduction="mean"), v.mean())
    assert torch.allclose(ssim(x, y, reduction="sum"), v.sum())
    with pytest.raises(DataError, match="reduction"):
        ssim(x, y, reduction="max")


def test_shape_mismatch_is_a_clear_error(pair):
    x, y = pair
    with pytest.raises(DataError, match="expected two tensors of one shape"):
        ssim(x, y[:2])


def test_hungarian_pairing_undoes_a_permutation():
    truth = builtin_batch(8).images
    perm = torch.tensor([3, 0, 7, 1, 2, 6, 4, 5])
    order = pair_images(truth[perm], truth)
    assert torch.equal(perm[order], torch.arange(8))


def test_greedy_can_reuse_and_scores_at_least_hungarian():
    truth = builtin_batch(6).images
    recon = torch.cat([truth[:1]] * 6)  # one good reconstruction repeated
    greedy = score_reconstruction(recon, truth, pairing="greedy", with_lpips=False).summary["ssim_mean"]
    hung = score_reconstruction(recon, truth, pairing="hungarian", with_lpips=False).summary["ssim_mean"]
    assert greedy >= hung
    assert score_reconstruction(recon, truth, pairing="greedy", with_lpips=False).pairing == [0] * 6


def test_score_summary_has_the_documented_keys():
    truth = builtin_batch(4).images
    out = score_reconstruction(truth.flip(0), truth, recon_labels=torch.tensor([1, 2, 3, 3]),
                               truth_labels=torch.tensor([3, 2, 1, 0]))
    s = out.summary
    for key in ("ssim_mean", "ssim_std", "fsim_mean", "psnr_mean", "lpips_mean", "label_accuracy", "n_images"):
        assert key in s
    assert s["ssim_mean"] > 0.999 and s["label_accuracy"] == 0.75
    ok, why = lpips_available()
    if not ok:
        assert s["lpips_mean"] is None and "vgg16" in s["lpips_note"].lower()
    assert out.pairing == [3, 2, 1, 0]


def test_peak_memory_is_measured_per_run():
    """`gradleak compare` runs attacks in one process: each run's peak must be its own."""
    from gradleak.reporting.memory import current_memory_mb, peak_memory_mb, reset_peak_memory

    if reset_peak_memory("cpu") != "run":
        pytest.skip("this kernel cannot reset the peak resident set")
    big = torch.ones(64 * 2**20)  # 256 MiB, touched
    high = peak_memory_mb("cpu")
    assert high >= current_memory_mb("cpu") >= 256
    del big
    assert reset_peak_memory("cpu") == "run"
    assert peak_memory_mb("cpu") < high - 200
