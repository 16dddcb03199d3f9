"""Faults: a run killed (SIGKILL) at a random point of each stage, out of disk space, or stopped by Ctrl-C, then
launched again, ends with the same files as a run that was never interrupted, and nothing in between looks
complete. The faults are injected by tests/faults.py, inside the real ``python -m jdiff.main`` process."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open
from safetensors.numpy import load_file

from conftest import REPO, assert_one_line_error, jdiff_cli
from jdiff.rundir import COMPLETE, is_temporary

FAULTS = REPO / "tests" / "faults.py"
STAGES = ("prior", "train", "generate", "score")
SEED = 2026  # the random points; a failure message names the fault, so it can be replayed


def arguments(model_root: Path) -> list[str]:
    # Each case has its own cache (so the class images are made anew) but shares the tiny model.
    return ["experiment=demo", "engine=torch", "train.steps=6", "infer.steps=2", "prior.images_per_object=2",
            f"model.path={model_root}", "hydra.run.dir=run"]


def with_fault(spec: str, cwd: Path, model_root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(FAULTS), spec, "--", *arguments(model_root)], cwd=cwd,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=600)


def results(cwd: Path) -> dict[str, object]:
    """What a finished run holds, less what differs by nature between two runs (times, logs, Hydra's record)."""
    run_dir = cwd / "run"
    out: dict[str, object] = {}
    for p in sorted(run_dir.rglob("*")):
        rel = p.relative_to(run_dir).as_posix()
        if not p.is_file() or rel.startswith(".hydra/") or rel in ("run.log", ".lock"):
            continue
        data = p.read_bytes()
        if rel in ("COMPLETE", "scores.json"):
            record = json.loads(data)
            record.pop("seconds", None)
            record.pop("stage_seconds", None)
            out[rel] = record
        elif rel == "loss.csv":  # the last column is wall time
            out[rel] = [line.rsplit(",", 1)[0] for line in data.decode().splitlines()]
        elif rel == "config.yaml":  # less the folders and the sweep name (the start time)
            out[rel] = [line for line in data.decode().replace(str(cwd), "<cwd>").splitlines()
                        if not line.startswith("  name: 20")]
        elif rel.endswith(".safetensors"):  # the header's metadata has no fixed order: compare what it holds
            with safe_open(str(p), framework="numpy") as f:
                out[rel] = (f.metadata(), {k: f.get_tensor(k).tobytes() for k in f.keys()})
        else:
            out[rel] = data
    return out


def nothing_looks_complete(cwd: Path) -> None:
    """After a fault: no COMPLETE, and every file in the run folder and the class-image cache is whole."""
    run_dir = cwd / "run"
    assert not (run_dir / COMPLETE).exists()
    for p in list(run_dir.rglob("*")) + list((cwd / "data" / "cache" / "prior").rglob("*")):
        if not p.is_file() or is_temporary(p.name) or p.name in ("run.log", ".lock"):
            continue
        if p.suffix == ".png":
            with Image.open(p) as im:
                im.load()
        elif p.suffix == ".json" or p.name == "FAILED":
            json.loads(p.read_text())
        elif p.suffix == ".safetensors":
            assert all(np.isfinite(v).all() for v in load_file(str(p)).values())


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir):
    """An uninterrupted run, and how many files each stage renames into place and how long it takes."""
    cwd = tmp_path_factory.mktemp("reference")
    done = with_fault("none:count", cwd, tiny_model_dir.parent)
    assert done.returncode == 0, done.stderr[-3000:]
    plan = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(plan["counts"]) == set(STAGES), plan
    return results(cwd), plan


def random_fault(rng: random.Random, stage: str, plan: dict) -> str:
    if rng.random() < 0.5:
        return f"{stage}:kill-write:{rng.randint(1, plan['counts'][stage])}:{rng.choice(['before', 'after'])}"
    return f"{stage}:kill-time:{rng.uniform(0, 0.9 * plan['seconds'][stage]):.3f}"


@pytest.mark.parametrize("stage", STAGES)
def test_a_run_killed_in_any_stage_resumes_to_the_same_files(stage, reference, tmp_path, tiny_model_dir):
    expected, plan = reference
    spec = random_fault(random.Random(f"{SEED}-{stage}"), stage, plan)
    killed = with_fault(spec, tmp_path, tiny_model_dir.parent)
    assert killed.returncode == -9, f"{spec}: {killed.stderr[-2000:]}"
    nothing_looks_complete(tmp_path)
    again = jdiff_cli(arguments(tiny_model_dir.parent), tmp_path)
    assert again.returncode == 0, f"{spec}: {again.stderr[-2000:]}"
    assert results(tmp_path) == expected, spec
    assert not [p for p in (tmp_path / "run").rglob("*") if is_temporary(p.name)], spec


@pytest.mark.parametrize("fault,code,prefix,words", [
    ("full-write", 1, "error:", ["No space left on device", "hydra.run.dir=", "resume"]),
    ("ctrl-c-write", 130, "interrupted:", ["unfinished", "hydra.run.dir=", "resume"]),
])
def test_a_full_disk_or_ctrl_c_is_one_line_and_the_run_resumes(fault, code, prefix, words, reference, tmp_path,
                                                               tiny_model_dir):
    expected, plan = reference
    rng = random.Random(f"{SEED}-{fault}")
    stage = rng.choice(STAGES)
    spec = f"{stage}:{fault}:{rng.randint(1, plan['counts'][stage])}:before"
    stopped = with_fault(spec, tmp_path, tiny_model_dir.parent)
    assert_one_line_error(stopped, *words, code=code, prefix=prefix)
    nothing_looks_complete(tmp_path)
    again = jdiff_cli(arguments(tiny_model_dir.parent), tmp_path)
    assert again.returncode == 0, f"{spec}: {again.stderr[-2000:]}"
    assert results(tmp_path) == expected, spec
