"""LoRA adapters on disk, in the layout diffusers' ``load_lora_weights`` reads, without any framework.

A file holds, for each adapted linear layer ``M`` of the UNet or text encoder,
``unet.M.lora_A.weight`` (rank x in) and ``unet.M.lora_B.weight`` (out x rank) (``text_encoder.M...``
likewise), and the safetensors metadata ``lora_adapter_metadata``: per prefix the rank, alpha and target
modules, as peft's LoraConfig names them. The update a layer applies is ``(alpha / rank) * B @ A @ x``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file, save_file

from jdiff.files import atomic_write
from jdiff.noise import LORA_INIT, stream, text_key

PREFIXES = ("unet", "text_encoder")
METADATA_KEY = "lora_adapter_metadata"


@dataclass
class Adapter:
    """The adapters of one model (UNet or text encoder): module name -> (A, B)."""

    rank: int
    alpha: float
    layers: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def initial_down_weights(module: str, rank: int, in_features: int, seed: int) -> np.ndarray:
    """A fresh LoRA A matrix, N(0, 1/rank) as in the diffusers DreamBooth-LoRA script, from jdiff's own
    generator so that every engine starts from the same adapter."""
    rng = stream(seed, LORA_INIT, text_key(module))
    return (rng.standard_normal((rank, in_features)) / rank).astype(np.float32)


def module_suffix(module: str) -> str:
    """The short name peft matches a layer by: ``to_q``, ``q_proj``, or ``to_out.0`` for numbered ones."""
    parts = module.split(".")
    return ".".join(parts[-2:]) if parts[-1].isdigit() and len(parts) > 1 else parts[-1]


def save_adapters(path: Path, adapters: dict[str, Adapter], extra_metadata: dict | None = None) -> Path:
    tensors: dict[str, np.ndarray] = {}
    meta: dict[str, object] = {}
    for prefix, adapter in adapters.items():
        if prefix not in PREFIXES:
            raise ValueError(f"unknown adapter prefix {prefix!r}")
        if not adapter.layers:
            continue
        for module, (down, up) in sorted(adapter.layers.items()):
            tensors[f"{prefix}.{module}.lora_A.weight"] = np.ascontiguousarray(down, dtype=np.float32)
            tensors[f"{prefix}.{module}.lora_B.weight"] = np.ascontiguousarray(up, dtype=np.float32)
        meta[f"{prefix}.r"] = adapter.rank
        meta[f"{prefix}.lora_alpha"] = adapter.alpha
        meta[f"{prefix}.target_modules"] = sorted({module_suffix(m) for m in adapter.layers})
    if not tensors:
        raise ValueError("no adapter weights to save")
    metadata = {"format": "pt", METADATA_KEY: json.dumps(meta, sort_keys=True)}
    if extra_metadata:
        metadata["jdiff"] = json.dumps(extra_metadata, sort_keys=True)
    return atomic_write(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def load_adapters(path: Path) -> dict[str, Adapter]:
    """Read a LoRA file written by jdiff or diffusers (peft key layout, optional alpha metadata)."""
    path = Path(path)
    if path.is_dir():
        path = path / "lora.safetensors"
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="numpy") as f:
            metadata = f.metadata() or {}
    except (FileNotFoundError, SafetensorError, OSError) as err:
        raise ValueError(f"cannot read LoRA file {path}: {err}") from err
    meta = json.loads(metadata.get(METADATA_KEY, "{}"))
    adapters: dict[str, Adapter] = {}
    for key, value in tensors.items():
        prefix, _, rest = key.partition(".")
        if prefix not in PREFIXES or not rest.endswith((".lora_A.weight", ".lora_B.weight")):
            raise ValueError(f"{path}: unexpected key {key!r}; expected unet.<module>.lora_A.weight and the like")
        module, which = rest[: -len(".lora_A.weight")], rest[-len("A.weight")]
        adapter = adapters.setdefault(prefix, Adapter(rank=0, alpha=0.0))
        down, up = adapter.layers.get(module, (None, None))
        adapter.layers[module] = (value, up) if which == "A" else (down, value)
    for prefix, adapter in adapters.items():
        for module, (down, up) in adapter.layers.items():
            if down is None or up is None or down.shape[0] != up.shape[1]:
                raise ValueError(f"{path}: {prefix}.{module} needs matching lora_A and lora_B weights")
        ranks = {down.shape[0] for down, _ in adapter.layers.values()}
        if len(ranks) != 1:
            raise ValueError(f"{path}: {prefix} adapters of different ranks {sorted(ranks)} are not supported")
        adapter.rank = ranks.pop()
        adapter.alpha = float(meta.get(f"{prefix}.lora_alpha", adapter.rank))
    return adapters
