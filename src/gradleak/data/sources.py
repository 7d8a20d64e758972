"""Where private batches come from. Nothing is ever downloaded.

Built-in photos come from files that installed packages ship:

* ``foolbox`` ships 20 real CIFAR-10 test images, 20 CIFAR-100 and 20 ImageNet validation images
  in its ``data/`` folder, with the class in the file name (read as files; foolbox is not imported).
* ``scikit-image`` ships colour photographs (``astronaut``, ``chelsea``, ``coffee``, ...).

``source="builtin"`` (the default) gives every real image there is, in this order: the 20 CIFAR-10
images (so a batch of up to 20 is exactly ``source="cifar10"``), the 20 CIFAR-100, the 20 ImageNet
photos (downsampled), the 8 scikit-image colour photos: 68 distinct real images. Beyond 68 come
deterministic crops of the 28 high-resolution photos (ImageNet and scikit-image) at 3 scales and 9
positions, up to 824 images: related views of the same photos, never a repeat.
Labels are each image's own class (CIFAR-10 0-9, CIFAR-100 0-99, ImageNet 0-999, scikit-image
photos 1000-1007) modulo the model's class count.

``source="cifar10"``, ``"cifar100"``, ``"imagenet"`` give one set (20 each) at its native size,
resized for other sizes. ``source="photos"`` gives ImageNet photos and scikit-image photos,
centre-cropped and resized, then crops of them (the same crops, without the CIFAR images).
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from gradleak.errors import ConfigError, DataError
from gradleak.types import Batch

BUILTIN_SOURCES = ("builtin", "cifar10", "cifar100", "imagenet", "photos")
_CROPS_PER_PHOTO = 27
_SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "motorcycle_left", "hubble_deep_field",
                   "retina", "ihc")




def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise DataError(f"built-in photos: expected the package '{package}' to be installed (pip install {package})")
    return Path(spec.origin).parent


def _to_tensor(img: Image.Image, size: int) -> torch.Tensor:
    """Centre-crop to a square and resize to ``size`` (antialiased), as a (3, size, size) tensor."""
    img = img.convert("RGB")
    w, h = img.size
    s = min(w, h)
    img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    if s != size:
        img = img.resize((size, size), Image.Resampling.BICUBIC if size > s else Image.Resampling.LANCZOS)
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


def _foolbox_files(kind: str) -> list[tuple[Path, int]]:
    folder = _package_dir("foolbox") / "data"
    pattern = re.compile(rf"^{kind}_(\d+)_(\d+)\.(png|jpg)$")
    found = []
    for f in sorted(folder.iterdir()):
        m = pattern.match(f.name)
        if m:
            found.append((int(m.group(1)), f, int(m.group(2))))
    if not found:
        raise DataError(f"built-in photos: expected {kind} images in '{folder}', found none")
    return [(f, label) for _, f, label in sorted(found)]


def _crop(img: Image.Image, k: int, size: int) -> Image.Image:
    """The k-th deterministic crop of ``img``: scales 0.8, 0.6, 0.45 at a 3x3 grid of positions."""
    w, h = img.size
    scale = (0.8, 0.6, 0.45)[(k // 9) % 3]
    s = max(size, int(min(w, h) * scale))
    gx, gy = (k % 9) % 3, (k % 9) // 3
    x0 = (w - s) * gx // 2
    y0 = (h - s) * gy // 2
    return img.crop((x0, y0, x0 + s, y0 + s))


def _crops(photos: list[tuple[str, Image.Image, int]], k: int, size: int) -> tuple[str, torch.Tensor, int]:
    """The k-th crop view over ``photos``: crop k // len(photos) of photo k % len(photos)."""
    name, img, label = photos[k % len(photos)]
    j = k // len(photos)
    return f"{name}#crop{j}", _to_tensor(_crop(img, j, size), size), label


def _photos() -> list[tuple[str, Image.Image, int]]:
    out = [(f.name, Image.open(f).convert("RGB"), label) for f, label in _foolbox_files("imagenet")]
    sk = _package_dir("skimage") / "data"
    for i, name in enumerate(_SKIMAGE_PHOTOS):
        f = next((sk / (name + ext) for ext in (".png", ".jpg") if (sk / (name + ext)).is_file()), None)
        if f is None:  # skipping it would renumber every later built-in image: refuse instead
            raise DataError(f"built-in photos: expected scikit-image's photo '{name}' in '{sk}', got none; "
                            "reinstall scikit-image (pip install --force-reinstall scikit-image)")
        img = Image.open(f)
        if img.mode not in ("RGB", "RGBA"):
            raise DataError(f"built-in photos: expected scikit-image's '{f.name}' in colour, got mode {img.mode}")
        out.append((f"skimage:{name}", img.convert("RGB"), 1000 + i))
    return out


def builtin_batch(n: int, *, size: int = 32, source: str = "builtin", num_classes: int = 10,
                  offset: int = 0) -> Batch:
    """A deterministic batch of ``n`` built-in real photos.

    Args:
        n: batch size.
        size: height = width in pixels (8..512).
        source: ``"builtin"`` (68 real images, CIFAR-10 first, then crops of the photos: up to
            824), ``"cifar10"``, ``"cifar100"``, ``"imagenet"`` (20 each) or ``"photos"`` (ImageNet
            and scikit-image photos, then crops of them: up to 784).
        num_classes: labels are the images' classes modulo ``num_classes`` (CIFAR-10 labels are
            unchanged with 10 classes).
        offset: index of the first image, to draw another batch from the same source.

    Returns:
        A :class:`Batch` with images (n, 3, size, size) in [0, 1].

    Raises:
        ConfigError: an unknown source or a size out of range.
        DataError: ``n`` exceeds the images the source has.
    """
    if source not in BUILTIN_SOURCES:
        raise ConfigError(f"unknown built-in source '{source}'; expected one of: {', '.join(BUILTIN_SOURCES)}")
    if not 8 <= size <= 512:
        raise ConfigError(f"image size: expected 8..512 pixels, got {size}")
    if n < 1:
        raise ConfigError(f"batch size: expected a positive integer, got {n}")
    items: list[tuple[str, torch.Tensor, int]] = []
    if source in ("photos", "builtin"):
        photos = _photos()
        whole: list[tuple[str, Image.Image, int]] = []
        if source == "builtin":
            whole = [(f.name, Image.open(f), label) for kind in ("cifar10", "cifar100") for f, label in _foolbox_files(kind)]
        whole += photos
        limit = len(whole) + _CROPS_PER_PHOTO * len(photos)
        if offset + n > limit:
            raise DataError(f"built-in source '{source}': expected at most {limit - offset} images from offset "
                            f"{offset} ({len(whole)} photos and {limit - len(whole)} crops of them), got a request "
                            f"for {n}; use your own data (source='folder', --data folder on the command line) for more")
        for k in range(offset, offset + n):
            if k < len(whole):
                name, img, label = whole[k]
                items.append((name, _to_tensor(img, size), label))
            else:
                items.append(_crops(photos, k - len(whole), size))
    else:
        files = _foolbox_files(source)
        if offset + n > len(files):
            raise DataError(f"built-in source '{source}': expected at most {len(files) - offset} images "
                            f"from offset {offset}, got a request for {n}; use source='photos' for larger batches")
        for f, label in files[offset:offset + n]:
            items.append((f.name, _to_tensor(Image.open(f), size), label))
    images = torch.stack([t for _, t, _ in items])
    labels = torch.tensor([lab % num_classes for _, _, lab in items], dtype=torch.long)
    return Batch(images=images, labels=labels, names=[nm for nm, _, _ in items])


def _select(length: int, n: int, seed: int) -> list[int]:
    if n > length:
        raise DataError(f"dataset: expected at least {n} images, found {length}")
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(length, generator=g)[:n].tolist()


def cifar_batch(root: str | Path, n: int, *, which: str = "cifar10", train: bool = False, seed: int = 0,
                size: int = 32) -> Batch:
    """``n`` images drawn deterministically (``seed``) from a local CIFAR-10/100 copy.

    Args:
        root: the folder holding ``cifar-10-batches-py`` / ``cifar-100-python`` (torchvision's
            on-disk format). Never downloaded.

    Raises:
        DataError: the dataset is not at ``root``.
    """
    from torchvision import datasets

    cls = {"cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100}.get(which)
    if cls is None:
        raise ConfigError(f"unknown dataset '{which}'; expected 'cifar10' or 'cifar100'")
    sub = "cifar-10-batches-py" if which == "cifar10" else "cifar-100-python"
    try:
        ds = cls(str(root), train=train, download=False)
    except RuntimeError:
        raise DataError(f"{which}: expected torchvision's on-disk copy at '{Path(root) / sub}', not found; "
                        f"download it once elsewhere and copy it there") from None
    idx = _select(len(ds), n, seed)
    images = torch.stack([_to_tensor(Image.fromarray(ds.data[i]), size) for i in idx])
    labels = torch.tensor([int(ds.targets[i]) for i in idx], dtype=torch.long)
    return Batch(images=images, labels=labels, names=[f"{which}[{i}]" for i in idx])


def folder_batch(root: str | Path, n: int, *, size: int = 32, seed: int = 0) -> Batch:
    """``n`` images from an image folder (one sub-folder per class, torchvision ``ImageFolder`` layout)."""
    from torchvision.datasets import ImageFolder

    if not Path(root).is_dir():
        raise DataError(f"image folder: expected a directory with one sub-folder per class at '{root}', not found")
    try:
        ds = ImageFolder(str(root))
    except (FileNotFoundError, RuntimeError) as e:
        raise DataError(f"image folder '{root}': expected one sub-folder per class holding images ({e})") from None
    idx = _select(len(ds), n, seed)
    images, labels, names = [], [], []
    for i in idx:
        path, label = ds.samples[i]
        try:
            with Image.open(path) as img:
                images.append(_to_tensor(img, size))
        except (OSError, ValueError, Image.DecompressionBombError) as e:  # truncated, not an image, too large
            raise DataError(f"image folder '{root}': expected readable images, got '{path}' ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:80]})") from None
        labels.append(label)
        names.append(Path(path).name)
    return Batch(images=torch.stack(images), labels=torch.tensor(labels, dtype=torch.long), names=names)


PUBLIC_OFFSET = 528
"""Where a malicious server's public images start in the built-in ``photos`` source: its last 256
crops (crops 500-755 of the photos), which a built-in client batch of up to 568 images does not hold."""


def public_images(size: int, n: int = 256) -> torch.Tensor:
    """The public images a malicious server sets its trap units on (:mod:`gradleak.threat.trap`):
    built-in photo crops no built-in client batch of up to 568 images holds, (n, 3, size, size)."""
    return builtin_batch(n, size=size, source="photos", offset=PUBLIC_OFFSET).images


def load_batch(source: str, n: int, *, size: int = 32, num_classes: int = 10, seed: int = 0,
               root: str | Path | None = None) -> Batch:
    """Dispatch on ``source``: a built-in name, ``"cifar10-dir"``/``"cifar100-dir"`` or ``"folder"`` (with ``root``)."""
    if source in BUILTIN_SOURCES:
        return builtin_batch(n, size=size, source=source, num_classes=num_classes,
                             offset=seed if source in ("photos", "builtin") else 0)
    if source in ("cifar10-dir", "cifar100-dir", "folder"):
        if root is None:
            raise ConfigError(f"data source '{source}': expected root, the folder of the local copy (--data-root on the command line)")
        if source == "folder":
            batch = folder_batch(root, n, size=size, seed=seed)
        else:
            batch = cifar_batch(root, n, which=source[:-4], seed=seed, size=size)
        if int(batch.labels.max()) >= num_classes:
            raise DataError(f"data source '{source}': labels reach {int(batch.labels.max())}, "
                            f"expected fewer than the model's {num_classes} classes")
        return batch
    raise ConfigError(f"unknown data source '{source}'; expected one of: "
                      f"{', '.join(BUILTIN_SOURCES + ('cifar10-dir', 'cifar100-dir', 'folder'))}")
