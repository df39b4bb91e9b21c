"""Image sources for ViT profiling: local image folders and COCO 2017 validation (tensorflow-datasets).

Images become ``pixel_values [n, 3, size, size]`` float32 as ViT image
processors make them: RGB, resized (bilinear) to ``size x size``, rescaled (by
1/255) and normalised with the checkpoint's own statistics (``ImageStats.of``: its
``preprocessor_config.json``; ``mean = std = 0.5``, google/vit-*'s, when it has none).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Iterator, Optional, Sequence, Tuple

import numpy as np

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
PROCESSOR_FILE = "preprocessor_config.json"


@dataclasses.dataclass(frozen=True)
class ImageStats:
    """How pixels become a ViT's inputs: ``(pixel * rescale - mean) / std`` per RGB channel."""

    mean: Tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: Tuple[float, float, float] = (0.5, 0.5, 0.5)
    rescale: float = 1 / 255

    @classmethod
    def of(cls, checkpoint_dir) -> "ImageStats":
        """The statistics a checkpoint's ``preprocessor_config.json`` states (``image_mean``, ``image_std``,
        ``do_normalize``, ``do_rescale``, ``rescale_factor``, as transformers' ``ViTImageProcessor`` reads
        them); the defaults when ``checkpoint_dir`` is None or has no such file."""
        path = None if checkpoint_dir is None else Path(checkpoint_dir) / PROCESSOR_FILE
        if path is None or not path.is_file():
            return cls()
        try:
            cfg = json.loads(path.read_text())
            normalize, rescale = cfg.get("do_normalize", True), cfg.get("do_rescale", True)
            mean = tuple(float(v) for v in cfg.get("image_mean", cls.mean)) if normalize else (0.0,) * 3
            std = tuple(float(v) for v in cfg.get("image_std", cls.std)) if normalize else (1.0,) * 3
            stats = cls(mean, std, float(cfg.get("rescale_factor", 1 / 255)) if rescale else 1.0)
        except (ValueError, TypeError, AttributeError) as e:
            raise ValueError(f"{path} does not hold image statistics transformers can read ({e})") from e
        if len(stats.mean) != 3 or len(stats.std) != 3 or not all(s > 0 for s in stats.std):
            raise ValueError(f"{path}: image_mean and image_std need 3 values each (std > 0); got {stats}")
        return stats


def preprocess(images: Sequence, size: int, stats: ImageStats = ImageStats()) -> np.ndarray:
    """PIL images or HWC uint8 arrays -> ``[n, 3, size, size]`` float32."""
    from PIL import Image
    out = []
    for img in images:
        if not isinstance(img, Image.Image):
            img = Image.fromarray(np.asarray(img, np.uint8))
        arr = np.asarray(img.convert("RGB").resize((size, size), Image.BILINEAR), np.float32)
        arr = arr * np.float32(stats.rescale)
        arr = (arr - np.asarray(stats.mean, np.float32)) / np.asarray(stats.std, np.float32)
        out.append(arr.transpose(2, 0, 1))
    return np.stack(out)


def image_folder(path, size: int, *, limit: Optional[int] = None, batch_size: int = 16,
                 stats: ImageStats = ImageStats()) -> Iterator[np.ndarray]:
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
        yield preprocess(images[i:i + batch_size], size, stats)


def coco_validation(size: int, *, limit: int = 500, batch_size: int = 16, data_dir=None,
                    stats: ImageStats = ImageStats()) -> Iterator[np.ndarray]:
    """Batches of COCO 2017 validation images through tensorflow-datasets (``coco/2017``).

    tensorflow-datasets builds every split of ``coco/2017`` at once: the first call downloads about 25 GB
    (train, validation, test and annotations) and needs TensorFlow (``pip install 'radial_jax[coco]'``).
    ``data_dir`` points at a prepared TFDS directory. For the validation images alone, unzip
    ``val2017.zip`` (5,000 images, about 1 GB) and profile that folder (``image_folder``).
    """
    try:
        import tensorflow_datasets as tfds
        ds = tfds.load("coco/2017", split="validation", data_dir=data_dir, shuffle_files=False)
    except Exception as e:
        raise ValueError(
            f"COCO 2017 through tensorflow-datasets is not available ({type(e).__name__}: {e}). It needs "
            "`pip install 'radial_jax[coco]'` and network for the first download, about 25 GB (or data_dir= of a "
            "prepared copy); or profile a folder of images, e.g. COCO's val2017.zip unzipped (1 GB)") from e
    batch = []
    for i, example in enumerate(tfds.as_numpy(ds.take(limit))):
        batch.append(example["image"])
        if len(batch) == batch_size:
            yield preprocess(batch, size, stats)
            batch = []
    if batch:
        yield preprocess(batch, size, stats)
