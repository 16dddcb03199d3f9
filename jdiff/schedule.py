"""The diffusion noise schedule and the learning-rate schedule, in numpy, shared by every engine."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np


@dataclass(frozen=True)
class NoiseSchedule:
    alphas_cumprod: np.ndarray  # (T,) float32, as diffusers computes it
    prediction_type: str

    @property
    def num_train_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    @classmethod
    def from_model(cls, model_dir: Path, prediction_type: Optional[str] = None) -> "NoiseSchedule":
        config = read_scheduler_config(model_dir)
        return cls(betas_to_alphas_cumprod(config), prediction_type or config.get("prediction_type", "epsilon"))

    def coefficients(self, timesteps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """sqrt(alpha_bar_t) and sqrt(1 - alpha_bar_t) for each timestep."""
        acp = self.alphas_cumprod[timesteps]
        return np.sqrt(acp).astype(np.float32), np.sqrt(1.0 - acp).astype(np.float32)


def read_scheduler_config(model_dir: Path) -> dict:
    path = Path(model_dir) / "scheduler" / "scheduler_config.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{path} is missing: {model_dir} is not a complete diffusers model folder.") from err


def betas_to_alphas_cumprod(config: dict) -> np.ndarray:
    """The cumulative product of (1 - beta) for the beta schedules Stable Diffusion uses, in float32."""
    n = int(config.get("num_train_timesteps", 1000))
    start, end = float(config.get("beta_start", 0.0001)), float(config.get("beta_end", 0.02))
    kind = config.get("beta_schedule", "linear")
    if config.get("trained_betas"):
        betas = np.asarray(config["trained_betas"], dtype=np.float32)
    elif kind == "linear":
        betas = np.linspace(start, end, n, dtype=np.float32)
    elif kind == "scaled_linear":
        betas = np.linspace(start**0.5, end**0.5, n, dtype=np.float32) ** 2
    else:
        raise ValueError(f"beta_schedule={kind!r} in the model's scheduler config is not supported")
    # torch (so diffusers) accumulates a float32 cumprod in float64 on the CPU; doing the same matches it exactly
    return np.cumprod(1.0 - betas, dtype=np.float64).astype(np.float32)


def learning_rate(step: int, base_lr: float, total_steps: int, schedule: str = "constant", warmup: int = 0) -> float:
    """The learning rate at ``step`` (0-based): linear warm-up, then constant, linear decay or cosine."""
    if warmup and step < warmup:
        return base_lr * (step + 1) / warmup
    if schedule == "constant":
        return base_lr
    progress = (step - warmup) / max(1, total_steps - warmup)
    if schedule == "linear":
        return base_lr * max(0.0, 1.0 - progress)
    if schedule == "cosine":
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    raise ValueError(f"train.lr_schedule={schedule!r} is unknown")
