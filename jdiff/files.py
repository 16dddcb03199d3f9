"""Writing run outputs so that no reader ever sees a half-written file as complete."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Callable, Optional


def atomic_write(path: Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def write_text(path: Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: Path, data) -> Path:
    return write_text(path, json.dumps(without_negative_zero(data), indent=2, sort_keys=False) + "\n")


def without_negative_zero(data):
    """``data`` with every float -0.0 as 0.0 (a score that rounds to zero from below is not "-0.0")."""
    if isinstance(data, float):
        return data + 0.0
    if isinstance(data, dict):
        return {k: without_negative_zero(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [without_negative_zero(v) for v in data]
    return data


def save_safetensors(path: Path, tensors: dict, metadata: Optional[dict] = None) -> Path:
    """``tensors`` (numpy arrays) as a safetensors file. The bytes are made in memory and written through
    :func:`atomic_write`: safetensors' own file writer puts a temporary ``.tmpXXXXXX`` of its own beside the
    file, which a process killed while writing leaves behind."""
    from safetensors.numpy import save

    data = save(tensors, metadata=metadata)
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def save_png(path: Path, image) -> Path:
    from PIL import Image

    return atomic_write(path, lambda tmp: Image.fromarray(image).save(tmp, format="PNG"))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def inside(path: Path, folder: Path) -> bool:
    """Whether ``path`` is ``folder`` or lies under it (both made absolute; links not followed)."""
    path, folder = Path(os.path.abspath(path)), Path(os.path.abspath(folder))
    return path == folder or folder in path.parents
