"""Training-time augmentations on uint8 RGB arrays: enlarge-then-crop, horizontal flip, small rotation."""

from __future__ import annotations

import numpy as np
from PIL import Image

from jdiff.data import resize_short_side


def augment(image: np.ndarray, resolution: int, rng: np.random.Generator, *, crop_scale: float = 1.0,
            random_crop: bool = False, hflip: float = 0.0, rotate_degrees: float = 0.0) -> np.ndarray:
    """One training view of a reference image, ``resolution`` x ``resolution``.

    The image's shorter side is scaled to ``crop_scale`` x the resolution and a square of the resolution is
    cut from it (at random, or centred), so a square image keeps 96% of its width at the default 1.04 instead
    of the no-op crop of the challenge baseline. Rotation happens on the enlarged image, with the borders
    filled by reflection, so no black corners enter the crop.
    """
    big = resize_short_side(image, max(resolution, round(resolution * crop_scale)))
    # Draw every random number in a fixed order, whatever is enabled, so options do not shift each other.
    angle = rng.uniform(-rotate_degrees, rotate_degrees)
    flip = rng.random() < hflip
    fx, fy = rng.random(2)
    if rotate_degrees > 0:
        big = _rotate_reflect(big, angle)
    w, h = big.size
    if random_crop:
        left, top = int(fx * (w - resolution + 1)), int(fy * (h - resolution + 1))
    else:
        left, top = (w - resolution) // 2, (h - resolution) // 2
    out = np.asarray(big.crop((left, top, left + resolution, top + resolution)), dtype=np.uint8)
    return out[:, ::-1].copy() if flip else out


def _rotate_reflect(im: Image.Image, degrees: float) -> Image.Image:
    w, h = im.size
    pad = int(np.ceil(max(w, h) * 0.5))
    padded = np.pad(np.asarray(im), ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
    rotated = Image.fromarray(padded).rotate(degrees, resample=Image.Resampling.BICUBIC)
    return rotated.crop((pad, pad, pad + w, pad + h))


def to_model_range(image: np.ndarray) -> np.ndarray:
    """uint8 HWC -> float32 CHW in [-1, 1], the VAE's input range."""
    return (image.astype(np.float32) / 127.5 - 1.0).transpose(2, 0, 1)
