"""Reconstruction quality: SSIM, FSIM, PSNR (piq), LPIPS-VGG (lpips, when its weights are local),
one-to-one Hungarian pairing of reconstructions to ground truth, and label accuracy."""

from gradleak.metrics.image import fsim, lpips_available, lpips_vgg, psnr, ssim
from gradleak.metrics.pairing import pair_images, pairwise_ssim
from gradleak.metrics.score import Score, score_reconstruction

__all__ = ["Score", "fsim", "lpips_available", "lpips_vgg", "pair_images", "pairwise_ssim", "psnr",
           "score_reconstruction", "ssim"]
