"""When a reconstruction counts as recognisable: the thresholds verdicts and reports read."""

RECOGNISABLE_SSIM = 0.5
"""Per-image SSIM from which a reconstruction counts as recognisable. Read from 351 measured pairs
(docs/audit.md, ``examples/recognisable_threshold.py``): from 0.5 on the object of the CIFAR-10 photo
(ship, plane, cat) is recognisable in every pair looked at, and every reconstruction from 0.4 on
picks its private image out of 60 built-in photos by SSIM; at 0.3-0.4 only blobs of the layout and
colours remain (re-identified 80%). 0.6 would call the 0.53-0.58 ship reconstructions unrecognisable,
a false "safe"."""

PARTIAL_SSIM = 0.3
"""Mean SSIM from which coarse structure (layout, colours) is visible."""

__all__ = ["PARTIAL_SSIM", "RECOGNISABLE_SSIM"]
