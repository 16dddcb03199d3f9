"""LoRA for Jittor linear layers: ``y = base(x) + (alpha / rank) * B(A(x))``, the base layer frozen.

The adapted layer keeps peft's names (``<module>.base_layer``, ``<module>.lora_A``, ``<module>.lora_B``), so
the adapter weights are ``<module>.lora_A.weight`` (rank x in) and ``<module>.lora_B.weight`` (out x rank),
the keys of a diffusers LoRA file (see :mod:`jdiff.lora_file`). Layers are chosen the way peft chooses them:
a linear layer whose name is a target, or ends with ``.`` + a target (``to_q``, ``to_out.0``, ``q_proj``).

The adapter stays float32 when the base model runs in half precision (engine.mixed_precision): its branch
computes in float32 and is added to the base output in the base output's dtype, so the optimizer updates
float32 weights (fp32 master weights) and a float32 model computes exactly as without the casts.
"""

from __future__ import annotations

import jittor as jt
import numpy as np
from jittor import nn

from jdiff.lora_file import Adapter


class LoraLinear(nn.Module):
    def __init__(self, base_layer: nn.Linear, rank: int, alpha: float):
        self.base_layer = base_layer
        self.lora_A = nn.Linear(base_layer.in_features, rank, bias=False)
        self.lora_B = nn.Linear(rank, base_layer.out_features, bias=False)
        self.rank = rank
        self.alpha = float(alpha)
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def execute(self, x):
        base = self.base_layer(x)
        return base + (self.lora_B(self.lora_A(x.float32())) * self.scale).cast(base.dtype)

    def set_weights(self, down: np.ndarray, up: np.ndarray) -> None:
        self.lora_A.weight.assign(jt.array(np.asarray(down, dtype=np.float32)))
        self.lora_B.weight.assign(jt.array(np.asarray(up, dtype=np.float32)))

    def weights(self) -> tuple[np.ndarray, np.ndarray]:
        return self.lora_A.weight.numpy().copy(), self.lora_B.weight.numpy().copy()


def matches(name: str, targets) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def attach_lora(model: nn.Module, targets, rank: int, alpha: float) -> dict[str, LoraLinear]:
    """Wrap every plain linear layer of ``model`` named by ``targets``; returns all adapted layers by name."""
    chosen = [(name, module) for name, module in model.named_modules()
              if type(module) is nn.Linear and matches(name, targets)]
    parents = dict(model.named_modules())
    for name, module in chosen:
        parent_name, _, child = name.rpartition(".")
        # Sequential (ModuleList) children are set by their index name, other modules by attribute
        setattr(parents[parent_name], child, LoraLinear(module, rank, alpha))
    return lora_layers(model)


def lora_layers(model: nn.Module) -> dict[str, LoraLinear]:
    return {name: module for name, module in model.named_modules() if isinstance(module, LoraLinear)}


def adapter_linears(model: nn.Module) -> list[nn.Linear]:
    """The A and B linear layers of every adapter, in the order of ``lora_parameters``."""
    return [linear for layer in lora_layers(model).values() for linear in (layer.lora_A, layer.lora_B)]


def lora_parameters(model: nn.Module) -> list:
    return [linear.weight for linear in adapter_linears(model)]


def adapter_of(layers: dict[str, LoraLinear], rank: int, alpha: float) -> Adapter:
    return Adapter(rank, alpha, {name: layer.weights() for name, layer in layers.items()})
