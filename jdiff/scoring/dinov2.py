"""DINOv2 style similarity: mean cosine similarity of the ``pooler_output`` (the final-layer-normed CLS
token) of ``facebook/dinov2-base`` over all (generated, reference) pairs, as the checker computes it."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from jdiff.scoring.preprocess import PretrainedImageModel


class Dinov2Features(PretrainedImageModel):
    def __init__(self, folder: Path, device: torch.device, batch_size: int):
        from transformers import Dinov2Model

        super().__init__(Dinov2Model, folder, device, batch_size)

    @torch.no_grad()
    def __call__(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """One pooled feature row per image."""
        rows = [self.model(pixel_values=pixels).pooler_output.float().cpu() for pixels in self.pixel_batches(images)]
        return torch.cat(rows).numpy()


def mean_cosine(generated: np.ndarray, references: np.ndarray) -> float:
    """Mean cosine similarity over all (generated row, reference row) pairs."""
    g = generated / np.linalg.norm(generated, axis=1, keepdims=True)
    r = references / np.linalg.norm(references, axis=1, keepdims=True)
    return float((g @ r.T).mean())
