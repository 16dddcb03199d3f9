"""Training checkpoints (``train.checkpoint_every``): a run killed mid-training resumes from its last one.

``<run>/checkpoint/`` holds, the same from either engine:

    state.json              {"step": k, "engine": ..., "rows": [the loss rows of steps 1..k]}
    adapter.safetensors     the adapters after step k (the LoRA file format)
    optimizer.safetensors   AdamW's state: ``step`` and ``<adapter key>.exp_avg`` / ``.exp_avg_sq`` per parameter

Batches depend only on (seed, step), so steps k+1... after a resume are the steps an uninterrupted run takes:
the adapter comes out the same (bit for bit on the CPU). A checkpoint is written into a temporary folder and
renamed into place; the run deletes it when it completes.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Optional

import numpy as np

from jdiff.engines.base import Engine
from jdiff.files import save_safetensors, write_json
from jdiff.rundir import CHECKPOINT

log = logging.getLogger(__name__)

STATE, ADAPTER, OPTIMIZER = "state.json", "adapter.safetensors", "optimizer.safetensors"
FILES = (STATE, ADAPTER, OPTIMIZER)


def save(run_dir: Path, engine: Engine, step: int, rows: list[dict]) -> Path:
    """The training state after ``step`` steps as ``run_dir/checkpoint``, replacing the one before."""
    run_dir = Path(run_dir)
    final = run_dir / CHECKPOINT
    tmp = Path(tempfile.mkdtemp(prefix=f".{CHECKPOINT}.", suffix=".tmp", dir=run_dir))
    try:
        engine.save_lora(tmp / ADAPTER)
        state = {key: np.ascontiguousarray(np.atleast_1d(value)) for key, value in engine.optimizer_state().items()}
        save_safetensors(tmp / OPTIMIZER, state)
        write_json(tmp / STATE, {"step": step, "engine": engine.name, "rows": rows})
        old = None
        if final.exists():  # a folder cannot be renamed over a full one: the old one steps aside first
            old = final.rename(run_dir / f".{CHECKPOINT}.{uuid.uuid4().hex[:8]}.tmp")
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("checkpoint at step %d: %s", step, final)
    return final


def read(run_dir: Path, steps: int) -> Optional[dict]:
    """The checkpoint's state.json when ``run_dir`` has a usable one for a run of ``steps`` steps, else None (a
    warning says why when there is one that cannot be used: the run then trains from the start)."""
    folder = Path(run_dir) / CHECKPOINT
    if not folder.is_dir():
        return None
    try:
        state = json.loads((folder / STATE).read_text(encoding="utf-8"))
        step, rows = state["step"], state["rows"]
        ok = (isinstance(step, int) and 1 <= step <= steps and isinstance(rows, list) and len(rows) == step
              and all((folder / name).is_file() for name in FILES))
    except (OSError, ValueError, KeyError, TypeError) as err:
        ok, why = False, f"{type(err).__name__}: {err}"
    else:
        why = "it does not fit this run"
    if not ok:
        log.warning("%s cannot be resumed from (%s); training starts from step 0", folder, why)
        return None
    return state


def restore(run_dir: Path, engine: Engine) -> None:
    """Put the checkpoint's adapters and optimizer state into ``engine`` (after setup_training)."""
    from safetensors.numpy import load_file

    folder = Path(run_dir) / CHECKPOINT
    engine.restore_lora(folder / ADAPTER)
    state = load_file(str(folder / OPTIMIZER))
    state["step"] = state["step"].reshape(())
    engine.load_optimizer_state(state)


def remove(run_dir: Path) -> None:
    shutil.rmtree(Path(run_dir) / CHECKPOINT, ignore_errors=True)
