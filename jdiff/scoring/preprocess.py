"""Image preparation for the metric models, exactly as their checkers prepared it.

CLIP and DINOv2 read their recipe from the model folder's ``preprocessor_config.json`` (shorter side to
``size``, centre crop to ``crop_size``, scale to [0, 1], normalise with ``image_mean``/``image_std``) and
apply it with PIL, as the transformers image processors the challenge's checker used did. Doing it here
instead of calling the processor classes keeps the numbers independent of the transformers version
(transformers 5 switched its default processors to a torchvision backend with other resampling).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from PIL import Image

# The size the checker resized to for LPIPS (torchvision Resize((256, 256)) on a PIL image).
LPIPS_SIZE = 256


@dataclass(frozen=True)
class ModelImageTransform:
    """Shorter side to ``short_side``, centre crop ``crop`` (height, width), normalise per channel."""

    short_side: int
    crop: tuple[int, int]
    resample: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    rescale: float = 1 / 255

    @classmethod
    def from_folder(cls, folder: Path) -> "ModelImageTransform":
        """Read ``preprocessor_config.json`` of a transformers model folder (CLIP, DINOv2)."""
        path = Path(folder) / "preprocessor_config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: the folder is not a complete image model")
        cfg = json.loads(path.read_text())
        size = cfg.get("size", 224)
        short = size["shortest_edge"] if isinstance(size, dict) else int(size)
        crop = cfg.get("crop_size", short) if cfg.get("do_center_crop", True) else short
        crop_hw = (crop["height"], crop["width"]) if isinstance(crop, dict) else (int(crop), int(crop))
        return cls(
            short_side=short,
            crop=crop_hw,
            resample=int(cfg.get("resample", Image.Resampling.BICUBIC)),
            mean=tuple(cfg["image_mean"]),
            std=tuple(cfg["image_std"]),
            rescale=float(cfg.get("rescale_factor", 1 / 255)),
        )

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """uint8 HxWx3 RGB -> float32 3xHxW, ready for the model."""
        h, w = image.shape[:2]
        # transformers' rule: the shorter side becomes short_side, the longer one int(short_side * long / short)
        if w <= h:
            size = (self.short_side, int(self.short_side * h / w))
        else:
            size = (int(self.short_side * w / h), self.short_side)
        im = Image.fromarray(image).resize(size, resample=self.resample)
        top, left = (im.height - self.crop[0]) // 2, (im.width - self.crop[1]) // 2
        arr = np.asarray(im, dtype=np.float32)[top : top + self.crop[0], left : left + self.crop[1]]
        arr = (arr * np.float32(self.rescale) - np.float32(self.mean)) / np.float32(self.std)
        return np.ascontiguousarray(arr.transpose(2, 0, 1))

    def batch(self, images: Sequence[np.ndarray]) -> np.ndarray:
        return np.stack([self(im) for im in images])


class PretrainedImageModel:
    """A transformers image model (``model_class``) from ``folder``, with the folder's preprocessing, run in
    batches of ``batch_size`` on ``device``."""

    def __init__(self, model_class, folder: Path, device, batch_size: int):
        self.model = model_class.from_pretrained(folder).eval().to(device)
        self.transform = ModelImageTransform.from_folder(folder)
        self.device = device
        self.batch_size = batch_size

    def pixel_batches(self, images: Sequence[np.ndarray]):
        """Model inputs (torch tensors on the device), ``batch_size`` images at a time, in order."""
        import torch

        for start in range(0, len(images), self.batch_size):
            yield torch.from_numpy(self.transform.batch(images[start : start + self.batch_size])).to(self.device)


def batches_by_shape(images: Sequence[np.ndarray], batch_size: int) -> Iterator[tuple[list[int], np.ndarray]]:
    """``(indices, stacked images)``: batches of at most ``batch_size`` images of one shape, for models that
    take images at their own size."""
    by_shape: dict[tuple, list[int]] = {}
    for i, image in enumerate(images):
        by_shape.setdefault(image.shape, []).append(i)
    for indices in by_shape.values():
        for start in range(0, len(indices), batch_size):
            chunk = indices[start : start + batch_size]
            yield chunk, np.stack([images[i] for i in chunk])


def lpips_input(image: np.ndarray) -> np.ndarray:
    """The checker's LPIPS input: bilinear resize to 256x256 (PIL, as torchvision does it), scaled to [-1, 1]."""
    im = Image.fromarray(image).resize((LPIPS_SIZE, LPIPS_SIZE), Image.Resampling.BILINEAR)
    return (np.asarray(im, dtype=np.float32).transpose(2, 0, 1) / 255.0) * 2.0 - 1.0

