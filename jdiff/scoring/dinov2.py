"""DINOv2 style similarity: mean cosine similarity of the ``pooler_output`` (the final-layer-normed CLS
token) of ``facebook/dinov2-base`` over all (generated, reference) pairs, as the checker computes it."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from jdiff.scoring.preprocess import ModelImageTransform


class Dinov2Features:
    def __init__(self, folder: Path, device: torch.device, batch_size: int):
        from transformers import Dinov2Model

        self.model = Dinov2Model.from_pretrained(folder).eval().to(device)
        self.transform = ModelImageTransform.from_folder(folder)
        self.device = device
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """One pooled feature row per image."""
        rows = []
        for start in range(0, len(images), self.batch_size):
            pixels = torch.from_numpy(self.transform.batch(images[start : start + self.batch_size]))
            rows.append(self.model(pixel_values=pixels.to(self.device)).pooler_output.float().cpu())
        return torch.cat(rows).numpy()


def mean_cosine(generated: np.ndarray, references: np.ndarray) -> float:
    """Mean cosine similarity over all (generated row, reference row) pairs."""
    g = generated / np.linalg.norm(generated, axis=1, keepdims=True)
    r = references / np.linalg.norm(references, axis=1, keepdims=True)
    return float((g @ r.T).mean())
