"""Image sources for ViT profiling: local image folders and COCO 2017 validation (tensorflow-datasets).

Images become ``pixel_values [n, 3, size, size]`` float32 as ViT image
processors make them: RGB, resized (bilinear) to ``size x size``, scaled to
[0, 1], normalised with ``mean = std = 0.5`` (google/vit-* checkpoints) unless
other values are given.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")


def preprocess(images: Sequence, size: int, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)) -> np.ndarray:
    """PIL images or HWC uint8 arrays -> ``[n, 3, size, size]`` float32."""
    from PIL import Image
    out = []
    for img in images:
        if not isinstance(img, Image.Image):
            img = Image.fromarray(np.asarray(img, np.uint8))
        arr = np.asarray(img.convert("RGB").resize((size, size), Image.BILINEAR), np.float32) / 255.0
        out.append(((arr - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)).transpose(2, 0, 1))
    return np.stack(out)


def image_folder(path, size: int, *, limit: Optional[int] = None, batch_size: int = 16) -> Iterator[np.ndarray]:
    """Batches of ``pixel_values`` from the images under ``path`` (sorted; recursive).

    Every file is opened and decoded before the first batch is produced, so an
    undecodable image is a ValueError naming it before any work is done.
    """
    from PIL import Image, UnidentifiedImageError
    files = sorted(f for f in Path(path).rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)[:limit]
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {path}")
    images = []
    for f in files:
        try:
            with Image.open(f) as im:
                im.load()
                images.append(im.convert("RGB"))
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"cannot decode image {f}: {e}") from e
    for i in range(0, len(images), batch_size):
        yield preprocess(images[i:i + batch_size], size)


def coco_validation(size: int, *, limit: int = 500, batch_size: int = 16, data_dir=None) -> Iterator[np.ndarray]:
    """Batches of COCO 2017 validation images through tensorflow-datasets (``coco/2017``).

    Preparing COCO needs TensorFlow (``pip install tensorflow-cpu``) and a download of
    about 1 GB the first time; ``data_dir`` points at an existing TFDS directory.
    """
    try:
        import tensorflow_datasets as tfds
        ds = tfds.load("coco/2017", split="validation", data_dir=data_dir, shuffle_files=False)
    except Exception as e:
        raise ValueError(
            f"COCO 2017 through tensorflow-datasets is not available ({type(e).__name__}: {e}). It needs "
            "`pip install tensorflow-cpu` and network for the first download (or data_dir= of a prepared copy); "
            "or profile a local image folder instead") from e
    batch = []
    for i, example in enumerate(tfds.as_numpy(ds.take(limit))):
        batch.append(example["image"])
        if len(batch) == batch_size:
            yield preprocess(batch, size)
            batch = []
    if batch:
        yield preprocess(batch, size)
