"""Finding a model's diffusers-format folder: a local path, the Hugging Face cache, or the tiny builder."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from omegaconf import DictConfig

from jdiff.files import inside

REQUIRED = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


class ModelNotFoundError(FileNotFoundError):
    """The weights are not where the config says; the message says how to get them."""


def resolve_model_dir(model: DictConfig, cache: Path | None = None) -> Path:
    """The local folder holding ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``.

    A built model (``model.builder``) goes into a folder under ``model.path``; with ``cache`` (the run's
    paths.cache) a missing ``model.path`` is made only inside it, so that a path meant for real weights never
    makes folders elsewhere."""
    if model.builder is not None:  # "tiny" or "sd21_random": built locally, random weights
        from jdiff.tiny_model import ensure_tiny_model

        check_build_path(model, cache)
        return ensure_tiny_model(Path(os.path.expanduser(model.path)), seed=model.builder_seed,
                                 architecture=model.builder)
    path = Path(os.path.expanduser(model.path))
    if path.is_dir():
        return check_model_dir(path)
    if path.is_absolute() or model.path.startswith((".", "~")) or model.path.count("/") != 1:
        raise ModelNotFoundError(
            f"model.path={model.path}: no such folder. Point model.path at a diffusers-format folder "
            f"(with {', '.join(REQUIRED)}) or at a Hugging Face hub id like stabilityai/stable-diffusion-2-1."
        )
    return check_model_dir(_from_hub(model))


def check_build_path(model: DictConfig, cache: Path | None) -> None:
    """A built model's ``model.path`` exists, or lies inside ``cache`` (where a missing folder may be made)."""
    path = Path(os.path.expanduser(model.path))
    if model.builder is not None and cache is not None and not path.is_dir() and not inside(path, Path(cache)):
        raise ModelNotFoundError(
            f"model.path={model.path} does not exist. model={model.name} builds its random-weight model into a "
            f"folder under model.path, and makes a missing one only inside paths.cache={cache}. For your own "
            f"weights pick a model that loads them (model=sd21 model.path={model.path}); to build here, create "
            f"the folder first.")


def _from_hub(model: DictConfig) -> Path:
    from huggingface_hub import snapshot_download

    offline = not model.allow_download or os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
    try:
        return Path(snapshot_download(
            model.path,
            revision=model.revision,
            local_files_only=offline,
            allow_patterns=["model_index.json", *(f"{c}/*" for c in REQUIRED)],
        ))
    except Exception as err:  # huggingface_hub raises several unrelated types for "not available"
        how = (
            "It is not in the local Hugging Face cache and downloads are off. Download it once with "
            f"`huggingface-cli download {model.path}` (or pass model.allow_download=true), or set "
            "model.path=/path/to/a/diffusers/folder."
            if offline
            else "The download failed; check the hub id, your network and your Hugging Face login."
        )
        raise ModelNotFoundError(f"model.path={model.path}: weights not found. {how} ({type(err).__name__})") from err


def check_model_dir(path: Path) -> Path:
    missing = [c for c in REQUIRED if not (path / c).is_dir()]
    if missing:
        raise ModelNotFoundError(
            f"{path} is not a complete diffusers-format Stable Diffusion folder: missing {', '.join(missing)}/."
        )
    return path


def model_fingerprint(model_dir: Path) -> str:
    """A short key for a model folder: its configs and the names and sizes of its weight files."""
    h = hashlib.sha256()
    for part in REQUIRED:
        for f in sorted((model_dir / part).iterdir()):
            if f.suffix == ".json":
                h.update(f.name.encode() + f.read_bytes())
            elif f.suffix in (".safetensors", ".bin"):
                h.update(f"{f.name}:{f.stat().st_size}".encode())
    return h.hexdigest()[:16]


def cache_key(**parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]
