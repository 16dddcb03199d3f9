"""Shared fixtures: Hydra composition the way the CLI does it, and a tiny model built once per session."""

from __future__ import annotations

import os
from pathlib import Path

# Triton kernels (the torch engine's engine.group_norm=triton) run in Triton's CPU interpreter in the tests. Triton
# reads this when it defines a kernel, its own library functions included, so it is set before anything imports
# triton (torch's compiler does, for one).
os.environ["TRITON_INTERPRET"] = "1"

import pytest
from hydra import compose, initialize_config_dir

from jdiff.config import ScoreConfig, register_configs

CONF = Path(__file__).resolve().parents[1] / "conf"
# The demo made shorter still: every stage runs, in a few seconds.
QUICK = ["experiment=demo", "train.steps=4", "infer.steps=3", "prior.images_per_object=1"]


def compose_config(overrides: list[str], root: Path):
    """Compose ``conf/config.yaml`` with overrides, rooted in ``root`` (its data/cache is used)."""
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=list(overrides))
    cfg.paths.root = str(root)
    return cfg


@pytest.fixture(scope="session")
def jdiff_root(tmp_path_factory) -> Path:
    """A project root shared by the session: its cache holds the tiny model and the demo styles."""
    return tmp_path_factory.mktemp("jdiff_root")


@pytest.fixture(scope="session")
def tiny_model_dir(jdiff_root) -> Path:
    from jdiff.tiny_model import ensure_tiny_model

    return ensure_tiny_model(jdiff_root / "data" / "cache" / "models", seed=0)


@pytest.fixture(scope="session")
def tiny_metrics(jdiff_root) -> Path:
    """Tiny random-weight models of every metric, in their real file formats."""
    from jdiff.scoring.tiny_models import ensure_tiny_metric_models

    return ensure_tiny_metric_models(jdiff_root / "data" / "cache" / "metric_models")


def settings_for(folder: Path, **changes) -> ScoreConfig:
    """A ScoreConfig on the CPU pointing every metric at the tiny models of ``folder``; ``changes`` on top."""
    from jdiff.scoring.tiny_models import tiny_score_overrides

    cfg = ScoreConfig(device="cpu", batch_size=4)
    for override in tiny_score_overrides(folder):
        key, value = override.split("=", 1)
        setattr(cfg, key.split(".", 1)[1], value)
    for key, value in changes.items():
        setattr(cfg, key, value)
    return cfg


# -- the command line as users run it ---------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]


def jdiff_cli(args: list[str], cwd: Path, module: str = "jdiff.main", timeout: float = 600):
    """``python -m <module> args`` in ``cwd``, with this checkout's jdiff; the finished process."""
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder``, by relative path, with its bytes."""
    folder = Path(folder)
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_one_line_error(done, *words: str, code: int = 2, prefix: str = "error:") -> str:
    """The process ended with ``code``, printed no traceback, and exactly one ``prefix`` line naming ``words``."""
    output = done.stdout + done.stderr
    assert "Traceback" not in output, output[-3000:]
    assert done.returncode == code, output[-3000:]
    lines = [line for line in done.stderr.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1, done.stderr[-3000:]
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]
