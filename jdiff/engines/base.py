"""The engine interface: the tensor work behind jdiff, in whichever deep-learning framework.

The core hands an engine plain numpy arrays (images, noise, timesteps) and gets numpy back, so both
engines see the same random numbers and can be checked against each other.
"""

from __future__ import annotations

import abc
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from jdiff.lora_file import initial_down_weights, load_adapters


class EngineError(RuntimeError):
    """The engine cannot run (missing weights, out of memory, framework missing); the message says why."""


def out_of_memory(what: str, tries: str, cause: str) -> EngineError:
    """The error for a GPU that ran out of memory while doing ``what``: what to try first, then the usual
    remedies, then the framework's own words (``cause``)."""
    return EngineError(f"out of GPU memory while {what}. Try {tries}, a smaller train.batch_size or "
                       f"infer.batch_size, or a free GPU ({cause})")


@dataclass(frozen=True)
class LoraSpec:
    unet_rank: int
    unet_alpha: float
    unet_targets: tuple[str, ...]
    text_encoder_rank: int = 0
    text_encoder_alpha: float = 1.0
    text_encoder_targets: tuple[str, ...] = ()
    seed: int = 0  # initial A matrices come from jdiff.lora_file.initial_down_weights


@dataclass(frozen=True)
class OptimizerSettings:
    lr: float
    betas: tuple[float, float]
    eps: float
    weight_decay: float
    max_grad_norm: float  # 0: no clipping
    text_encoder_lr_ratio: float


@dataclass
class TrainBatch:
    pixels: np.ndarray  # (B, 3, H, W) float32 in [-1, 1]
    prompts: list[str]
    weights: np.ndarray  # (B,) loss weight of each sample; the step's loss is sum(weights * per-sample MSE)
    timesteps: np.ndarray  # (B,) int64
    signal: np.ndarray  # (B,) sqrt(alpha_bar_t)
    noise_level: np.ndarray  # (B,) sqrt(1 - alpha_bar_t)
    noise: np.ndarray  # (B, C, h, w) the diffusion noise
    posterior_noise: np.ndarray  # (B, C, h, w) the noise of the VAE posterior sample


@dataclass
class GenerateRequest:
    prompts: list[str]
    noise: np.ndarray  # (B, C, h, w) initial latent noise, one per prompt
    steps: int
    guidance_scale: float
    negative_prompt: str = ""
    origin_prompts: Optional[list[str]] = None  # blended in with origin_scale
    origin_scale: float = 0.0
    init_image: Optional[np.ndarray] = None  # (3, H, W) float32 in [-1, 1]: img2img from this image
    init_posterior_noise: Optional[np.ndarray] = None  # (B, C, h, w)
    strength: float = 1.0
    sampler: str = "model"


class Engine(abc.ABC):
    """Loads a diffusers-format folder and does training and sampling for the core."""

    name: str
    lora_settings: dict[str, tuple[int, float]]  # "unet" / "text_encoder" -> (rank, alpha) of the adapters

    @abc.abstractmethod
    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        """(channels, height, width) of the latents of a ``resolution`` px image."""

    @property
    @abc.abstractmethod
    def prediction_type(self) -> str:
        """epsilon or v_prediction: what the UNet is trained to predict."""

    # -- LoRA: the same in every engine, through _attach and _set_adapter ----------------------------------

    @abc.abstractmethod
    def _attach(self, prefix: str, targets, rank: int, alpha: float) -> dict:
        """Put adapters on the layers of ``prefix`` ("unet", "text_encoder") that ``targets`` name; return the
        adapted layers by their name in a LoRA file. Each has ``in_features`` and ``out_features``."""

    @abc.abstractmethod
    def _set_adapter(self, layer, down: np.ndarray, up: np.ndarray) -> None:
        """Copy A (rank x in) and B (out x rank) into one adapted layer."""

    def _attach_new(self, prefix: str, targets, rank: int, alpha: float) -> dict:
        if prefix in self.lora_settings:
            raise EngineError(f"the {prefix} has adapters already; attach one LoRA per engine (load a new engine).")
        layers = self._attach(prefix, targets, rank, alpha)
        if not layers:
            raise EngineError(f"lora targets {list(targets)} match no layer of the {prefix}")
        return layers

    def add_lora(self, spec: LoraSpec) -> None:
        """Attach fresh adapters (B = 0, so the model is unchanged until trained; A from the seed)."""
        plan = {"unet": (spec.unet_targets, spec.unet_rank, spec.unet_alpha)}
        if spec.text_encoder_rank > 0:
            plan["text_encoder"] = (spec.text_encoder_targets, spec.text_encoder_rank, spec.text_encoder_alpha)
        for prefix, (targets, rank, alpha) in plan.items():
            for name, layer in self._attach_new(prefix, targets, rank, alpha).items():
                down = initial_down_weights(name, rank, layer.in_features, spec.seed)
                self._set_adapter(layer, down, np.zeros((layer.out_features, rank), np.float32))
            self.lora_settings[prefix] = (rank, float(alpha))

    def load_lora(self, path: Path) -> None:
        """Attach the adapters stored in a jdiff/diffusers LoRA .safetensors file."""
        try:
            stored = load_adapters(path)
        except ValueError as err:
            raise EngineError(str(err)) from err
        for prefix, adapter in stored.items():
            layers = self._attach_new(prefix, sorted(adapter.layers), adapter.rank, adapter.alpha)
            missing = sorted(set(adapter.layers) - set(layers))
            if missing:
                raise EngineError(f"{path}: the {prefix} has no layer {missing[0]}; was it trained on another model?")
            for name, (down, up) in adapter.layers.items():
                self._set_adapter(layers[name], down, up)
            self.lora_settings[prefix] = (adapter.rank, adapter.alpha)

    @abc.abstractmethod
    def save_lora(self, path: Path) -> None:
        """Write the attached adapters in the format diffusers' load_lora_weights reads."""

    # -- the text states of training batches ------------------------------------------------------------

    @abc.abstractmethod
    def encode_prompts(self, prompts: list[str]):
        """The text encoder's last hidden states for ``prompts``: (B, tokens, width)."""

    @abc.abstractmethod
    def _states_without_gradients(self, prompts: list[str]) -> list:
        """One text-state tensor per prompt, computed outside the autograd graph."""

    @abc.abstractmethod
    def _stack(self, states: list):
        """Tensors of one shape as one batch tensor."""

    def training_prompt_states(self, prompts: list[str]):
        """The text states of a training batch. While the text encoder has no adapter its states never change,
        so each prompt is encoded once and kept."""
        if "text_encoder" in self.lora_settings:
            return self.encode_prompts(prompts)
        kept = self.__dict__.setdefault("_frozen_prompt_states", {})
        missing = [p for p in dict.fromkeys(prompts) if p not in kept]
        if missing:
            kept.update(zip(missing, self._states_without_gradients(missing)))
        return self._stack([kept[p] for p in prompts])

    @abc.abstractmethod
    def setup_training(self, settings: OptimizerSettings) -> None:
        """Freeze everything but the adapters and build the optimizer."""

    @abc.abstractmethod
    def train_step(self, batch: TrainBatch, lr: float) -> np.ndarray:
        """One optimizer step; returns the per-sample losses (B,) before weighting."""

    def start_train_step(self, batch: TrainBatch, lr: float) -> Callable[[], np.ndarray]:
        """Queue one optimizer step; the returned function waits for it and gives its per-sample losses.

        The training loop reads a step's losses only after queuing the next step, so an engine that runs
        asynchronously keeps its device busy while the host prepares the next batch. This default runs the
        step at once."""
        losses = self.train_step(batch, lr)
        return lambda: losses

    @abc.abstractmethod
    def generate(self, request: GenerateRequest) -> list[np.ndarray]:
        """Sample images; returns uint8 (H, W, 3) arrays, one per prompt."""


def triton_interpreting() -> bool:
    """Whether Triton kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1): how tests run them without a
    GPU."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def create_engine(name: str, model_dir: Path, *, device: str = "auto", mixed_precision: str = "no",
                  prediction_type: Optional[str] = None, allow_pickle: bool = False,
                  threads: Optional[int] = None, deterministic: bool = False, compile: str = "no",
                  group_norm: str = "native", channels_last: bool = False) -> Engine:
    """Import the engine only when asked: the core never imports a deep-learning framework itself.

    ``threads``: CPU threads (None: every core this process may use); ``deterministic``: repeatable
    results where the framework has deterministic kernels, at some cost in speed; ``compile``: the
    torch.compile mode of the torch engine's UNet and VAE encoder ("no" for eager, "cuda-graphs"), or the Jittor
    engine's "replay" of recorded execution plans (see jdiff.engines.jittor.replay); ``group_norm`` and
    ``channels_last``: the torch engine's GroupNorm kernels and memory format (see TorchEngine).
    """
    if name == "torch":
        from jdiff.engines.torch.engine import TorchEngine

        return TorchEngine(model_dir, device=device, mixed_precision=mixed_precision,
                           prediction_type=prediction_type, allow_pickle=allow_pickle,
                           threads=threads, deterministic=deterministic, compile=compile,
                           group_norm=group_norm, channels_last=channels_last)
    if name == "jittor":  # Jittor's CPU kernels take no thread or determinism settings from jdiff yet
        from jdiff.engines.jittor.engine import JittorEngine

        return JittorEngine(model_dir, device=device, mixed_precision=mixed_precision,
                            prediction_type=prediction_type, allow_pickle=allow_pickle, compile=compile)
    raise EngineError(f"engine.name={name!r} is not available; use engine=jittor or engine=torch.")
