"""Device strings (``engine.device``, ``score.device``): ``auto``, ``cpu``, ``cuda`` or ``cuda:N``, read in one place."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

FORMS = "auto, cpu, cuda or cuda:N"


class DeviceError(ValueError):
    """A device string that is malformed, or names a device this machine does not have; says which key."""


@dataclass(frozen=True)
class Device:
    kind: str  # auto, cpu, cuda
    index: Optional[int] = None  # cuda:N

    def __str__(self) -> str:
        return self.kind if self.index is None else f"{self.kind}:{self.index}"


def parse_device(value, key: str) -> Device:
    text = str(value).strip()
    if text in ("auto", "cpu", "cuda"):
        return Device(text)
    kind, _, index = text.partition(":")
    if kind == "cuda" and index.isdecimal():
        return Device("cuda", int(index))
    raise DeviceError(f"{key}={value!r} is invalid: use {FORMS}.")


def torch_device(value, key: str):
    """The torch device for a device string (auto: the GPU when PyTorch sees one)."""
    import torch

    device = parse_device(value, key)
    if device.kind == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.kind == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"{key}={device} but PyTorch sees no CUDA GPU here; use {key}=cpu or auto.")
    return torch.device(str(device))


def on_gpu(device, on_a_gpu, otherwise):
    """``on_a_gpu`` when ``device`` (engine.device) is a CUDA GPU: cuda, cuda:N, or auto on a machine that shows one
    (CUDA_VISIBLE_DEVICES, else nvidia-smi); else ``otherwise``. The resolver ``jdiff.on_gpu``: conf/engine/jittor.yaml
    picks its fast path with it."""
    from jdiff.sweep import detect_gpus

    try:
        kind = parse_device(device, "engine.device").kind
    except DeviceError:  # validation names the bad device; the choice here must not fail first
        return otherwise
    return on_a_gpu if kind == "cuda" or (kind == "auto" and detect_gpus()) else otherwise
