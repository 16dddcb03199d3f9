"""Diffusers-format weights into Jittor modules, by parameter name, every name and shape checked.

API:
    read_config(folder) -> dict                      <model>/<component>/config.json
    read_weights(folder, allow_pickle=False) -> {name: numpy array}
    load_weights(module, folder, allow_pickle=False, rename=None)
    build_from_folder(cls, folder, allow_pickle=False, rename=None) -> cls(config), weights loaded, in eval mode

``folder`` is one component's folder (``<model>/vae``, ``<model>/text_encoder``, ...). The weights are the
component's ``.safetensors`` file, as diffusers (``diffusion_pytorch_model.safetensors``) or transformers
(``model.safetensors``) write it, or the shards named by its ``*.safetensors.index.json``. Half-precision
variants (``*.fp16.safetensors``) are not picked up: the full-precision file is the reference.

Pickle ``.bin`` weights are refused unless ``allow_pickle`` (``engine.allow_pickle=true``): unpickling a
file can run arbitrary code, so a downloaded model must not get that chance by default.

``rename`` maps a file's parameter names onto the module's, for the few spellings that differ between
checkpoints of the same architecture (CLIP's ``text_model.`` prefix, the VAE's old attention names).
Values are cast to each parameter's dtype.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from jdiff.engines.base import EngineError

SAFETENSORS_NAMES = ("diffusion_pytorch_model.safetensors", "model.safetensors")
PICKLE_NAMES = ("diffusion_pytorch_model.bin", "pytorch_model.bin")
SHOWN = 5  # how many names an error message lists


def read_config(folder: Path) -> dict:
    path = Path(folder) / "config.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as err:
        raise EngineError(f"{path} is missing: {Path(folder).parent} is not a complete diffusers model "
                          f"folder.") from err


def weight_files(folder: Path, allow_pickle: bool = False) -> list[Path]:
    """The files that hold the component's weights: one file, or the shards of an index."""
    folder = Path(folder)
    for name in SAFETENSORS_NAMES:
        if (folder / (name + ".index.json")).is_file():
            return shard_files(folder / (name + ".index.json"))
        if (folder / name).is_file():
            return [folder / name]
    others = sorted(p for p in folder.glob("*.safetensors") if p.name.count(".") == 1)  # no .fp16. variants
    if len(others) == 1:
        return others
    if others:
        raise EngineError(f"{folder} holds several weight files ({', '.join(p.name for p in others)}) and no "
                          f"index json saying how they fit together; keep one, or add the index.")
    for name in PICKLE_NAMES:
        index = folder / (name + ".index.json")
        files = shard_files(index) if index.is_file() else [folder / name] if (folder / name).is_file() else []
        if files and not allow_pickle:
            raise EngineError(
                f"{folder} has only pickle weights ({files[0].name}). Loading a pickle file can run arbitrary code, "
                f"so jdiff refuses it by default. Convert the weights to .safetensors (for example, load the model "
                f"with diffusers and save_pretrained(..., safe_serialization=True)), or, if you trust the file, "
                f"set engine.allow_pickle=true."
            )
        if files:
            return files
    raise EngineError(f"{folder} has no weights: expected {' or '.join(SAFETENSORS_NAMES)}.")


def shard_files(index: Path) -> list[Path]:
    weight_map = json.loads(index.read_text()).get("weight_map", {})
    if not weight_map:
        raise EngineError(f"{index} has no weight_map; the shard index is broken.")
    return [index.parent / name for name in sorted(set(weight_map.values()))]


def read_weights(folder: Path, allow_pickle: bool = False) -> dict[str, np.ndarray]:
    weights: dict[str, np.ndarray] = {}
    for path in weight_files(folder, allow_pickle):
        if not path.is_file():
            raise EngineError(f"{path} is missing (listed in the shard index of {Path(folder)}).")
        weights.update(read_pickle(path) if path.suffix == ".bin" else read_safetensors(path))
    return weights


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own error types: truncated file, bfloat16 (numpy has none)
        raise EngineError(f"cannot read {path}: {err}. If it is stored in bfloat16, re-save it in float32 "
                          f"or float16.") from err


def read_pickle(path: Path) -> dict[str, np.ndarray]:
    """Only reached with allow_pickle; torch's own loader is the reference reader of its format."""
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True)
    return {name: value.float().numpy() if value.dtype == torch.bfloat16 else value.numpy()
            for name, value in state.items()}


def load_weights(module, folder: Path, allow_pickle: bool = False,
                 rename: Optional[Callable[[str], str]] = None) -> None:
    """Copy the component's weights into ``module``'s parameters; any missing, unexpected or misshapen name
    is an error (all of them listed at once), so a model never runs half-loaded."""
    stored = read_weights(folder, allow_pickle)
    if rename is not None:
        stored = {rename(name): value for name, value in stored.items()}
    params = dict(module.named_parameters())
    missing = sorted(set(params) - set(stored))
    unexpected = sorted(set(stored) - set(params))
    misshapen = [f"{name}: file {tuple(stored[name].shape)}, model {tuple(params[name].shape)}"
                 for name in sorted(set(params) & set(stored))
                 if tuple(stored[name].shape) != tuple(params[name].shape)]
    problems = []
    for label, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshapen)):
        if names:
            more = f", ... ({len(names) - SHOWN} more)" if len(names) > SHOWN else ""
            problems.append(f"{len(names)} {label} ({'; '.join(names[:SHOWN])}{more})")
    if problems:
        raise EngineError(f"the weights in {folder} do not fit the model built from its config.json: "
                          f"{', '.join(problems)}. Is the config from the same checkpoint as the weights?")
    for name, param in params.items():
        param.assign(stored[name].astype(str(param.dtype), copy=False))


def build_from_folder(cls, folder: Path, allow_pickle: bool = False, rename: Optional[Callable[[str], str]] = None):
    """A component built from its folder's config.json, its weights loaded, in eval mode (``from_pretrained``)."""
    module = cls(read_config(folder))
    load_weights(module, folder, allow_pickle, rename=rename)
    module.eval()
    return module
