"""Finding the metric models' weights: a local folder or file, the Hugging Face cache, or torch's hub cache.

Nothing is downloaded unless ``score.allow_download=true``. When weights are missing, the metric is
skipped with a :class:`MetricUnavailable` message that says how to get them, and the run records the
metrics it could compute (the final score is then marked partial).

Two kinds of weights:

* transformers models (CLIP, DINOv2): a folder, or a hub id such as ``facebook/dinov2-base`` looked up
  in the Hugging Face cache (``huggingface-cli download <id>`` puts it there);
* single weight files (the LPIPS SqueezeNet and its linear head, the FID Inception network): a path, or a
  bare file name looked up in torch's hub cache (``~/.cache/torch/hub/checkpoints/``), where torchvision,
  torchmetrics and torch-fidelity keep the very same files; CLIP-IQA's ``RN50.pt`` in ``~/.cache/clip/``,
  where OpenAI's clip package and piq keep it.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Optional


class MetricUnavailable(RuntimeError):
    """A metric cannot run here (usually: its weights are not on disk); the message says how to fix it."""

    def __init__(self, metric: str, reason: str):
        super().__init__(f"{metric}: {reason}")
        self.metric = metric
        self.reason = reason


def pick_device(device: str):
    """The torch device for ``score.device`` (auto: the GPU when there is one)."""
    from jdiff.devices import DeviceError, torch_device
    from jdiff.validate import ConfigError

    try:
        return torch_device(device, "score.device")
    except DeviceError as err:
        raise ConfigError(str(err)) from err


def _offline(allow_download: bool) -> bool:
    return not allow_download or os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")


def looks_like_hub_id(spec: str) -> bool:
    return not spec.startswith((".", "/", "~")) and spec.count("/") == 1


def hub_folder(metric: str, key: str, spec: str, allow_download: bool,
               files: tuple[str, ...] = ("*.json", "*.txt", "*.safetensors")) -> Path:
    """The local folder of a transformers model given as a folder or a hub id (``key`` names the config key);
    a download fetches only ``files``."""
    path = Path(os.path.expanduser(spec))
    if path.is_dir():
        return path
    if not looks_like_hub_id(spec):
        raise MetricUnavailable(metric, f"{key}={spec}: no such folder. Point it at a model folder or a hub id.")
    from huggingface_hub import snapshot_download

    offline = _offline(allow_download)
    try:
        return Path(snapshot_download(spec, local_files_only=offline,
                                      allow_patterns=list(files)))
    except Exception as err:  # huggingface_hub raises several unrelated types for "not available"
        how = (f"not in the Hugging Face cache and downloads are off. Get it once with `huggingface-cli download "
               f"{spec}`, set {key}=/path/to/folder, or pass score.allow_download=true"
               if offline else f"the download failed ({type(err).__name__}: {err})")
        raise MetricUnavailable(metric, f"{key}={spec}: {how}.") from err


def weight_file(metric: str, key: str, spec: str, url: str, allow_download: bool,
                cache: Optional[Path] = None) -> Path:
    """A weights file given as a path or as a file name in ``cache`` (default: torch's hub cache),
    downloaded from ``url`` into that cache only when downloads are allowed."""
    path = Path(os.path.expanduser(spec))
    if path.is_file():
        return path
    if path.name != spec:  # a path, not a bare file name: nothing to look up
        raise MetricUnavailable(metric, f"{key}={spec}: no such file.")
    import torch

    folder = Path(torch.hub.get_dir()) / "checkpoints" if cache is None else cache.expanduser()
    cached = folder / spec
    if cached.is_file():
        return cached
    if _offline(allow_download):
        raise MetricUnavailable(
            metric, f"{key}={spec}: not in {cached.parent} and downloads are off. Download {url} there, set "
                    f"{key}=/path/to/{spec}, or pass score.allow_download=true.")
    cached.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(url, str(cached), progress=False)
    except Exception as err:
        raise MetricUnavailable(metric, f"{key}={spec}: downloading {url} failed ({err}).") from err
    return cached


def load_state_dict(metric: str, path: Path) -> dict:
    """A ``.pth`` state dict, read without running pickled code."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise MetricUnavailable(metric, f"cannot read {path} as a PyTorch state dict ({err}).") from err
    if not isinstance(state, dict):
        raise MetricUnavailable(metric, f"{path} holds a {type(state).__name__}, not a state dict.")
    return state


def fingerprint(*paths: Path) -> str:
    """A short key for weights on disk: names, sizes and modification times of the files (folders walked)."""
    h = hashlib.sha256()
    for root in paths:
        files = sorted(Path(root).rglob("*")) if Path(root).is_dir() else [Path(root)]
        for f in files:
            if f.is_file():
                st = f.stat()
                h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:16]
