"""Training-time augmentations on uint8 RGB arrays: enlarge-then-crop, horizontal flip, small rotation."""

from __future__ import annotations

import numpy as np
from PIL import Image

from jdiff.data import resize_short_side


def _enlarged_side(resolution: int, crop_scale: float) -> int:
    return max(resolution, round(resolution * crop_scale))


def enlarged(image: np.ndarray, resolution: int, crop_scale: float = 1.0) -> Image.Image:
    """The image with its shorter side at ``crop_scale`` x ``resolution`` (at least the resolution): what
    ``augment`` cuts its views from. It is the same at every step, so a training loop makes it once per image
    (resizing is most of a view's cost)."""
    return resize_short_side(image, _enlarged_side(resolution, crop_scale))


def augment(image: np.ndarray | Image.Image, resolution: int, rng: np.random.Generator, *, crop_scale: float = 1.0,
            random_crop: bool = False, hflip: float = 0.0, rotate_degrees: float = 0.0) -> np.ndarray:
    """One training view of a reference image (a uint8 array, or ``enlarged(image, resolution, crop_scale)``
    made beforehand), ``resolution`` x ``resolution``.

    The image's shorter side is scaled to ``crop_scale`` x the resolution and a square of the resolution is
    cut from it (at random, or centred), so a square image keeps 96% of its width at the default 1.04 instead
    of the no-op crop of the challenge baseline. Rotation happens on the enlarged image, with the borders
    filled by reflection, so no black corners enter the crop.
    """
    if isinstance(image, Image.Image):
        big, short = image, _enlarged_side(resolution, crop_scale)
        if min(big.size) != short:
            raise ValueError(f"augment: the image given is {big.size[0]}x{big.size[1]}, but at resolution "
                             f"{resolution} and crop_scale {crop_scale} its shorter side must be {short}: make it "
                             "with enlarged() and the same settings")
    else:
        big = enlarged(image, resolution, crop_scale)
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
    """uint8 HWC (or a batch, BHWC) -> float32 CHW (BCHW), contiguous, in [-1, 1]: the VAE's input range."""
    channels_first = image.transpose(2, 0, 1) if image.ndim == 3 else image.transpose(0, 3, 1, 2)
    out = np.empty(channels_first.shape, np.float32)
    np.divide(channels_first, 127.5, out=out, dtype=np.float32)  # one pass: cast, divide, lay out
    out -= 1.0
    return out
