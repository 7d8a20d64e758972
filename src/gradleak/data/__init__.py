"""Private batches for experiments: built-in real photos (offline), CIFAR-10/100 and image folders."""

from gradleak.data.sources import (
    BUILTIN_SOURCES,
    Batch,
    builtin_batch,
    cifar_batch,
    folder_batch,
    load_batch,
    public_images,
)

__all__ = ["BUILTIN_SOURCES", "Batch", "builtin_batch", "cifar_batch", "folder_batch", "load_batch", "public_images"]
