"""What a new user sees: the demo, run as the README says, scores with what it can and prints no warnings."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

from conftest import QUICK, REPO

LEFT_OUT = ["dinov2", "lpips", "fid", "clip_iqa", "clip_r"]


def test_the_demo_scores_what_it_can_with_no_warning(tmp_path):
    """No metric weights anywhere (fresh home and caches): the demo scores Hist, names the others in one info line,
    and nothing it prints is a warning; the final score is marked partial and the others are no numbers."""
    home = tmp_path / "home"
    env = {**os.environ, "PYTHONPATH": str(REPO), "HOME": str(home), "HF_HOME": str(home / "hf"),
           "TORCH_HOME": str(home / "torch"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "jdiff.main", *QUICK, "engine=torch", "hydra.run.dir=run"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert "[WARNING]" not in output and "score: skipped" not in output, output[-3000:]
    notes = [line for line in output.splitlines() if "left out" in line]
    assert len(notes) == 1 and "[INFO]" in notes[0], notes
    assert f"scored with hist; left out {', '.join(LEFT_OUT)}" in notes[0]
    scores = json.loads((tmp_path / "run" / "scores.json").read_text())
    assert list(scores["metrics"]) == ["hist"] and math.isfinite(scores["metrics"]["hist"])
    assert list(scores["skipped"]) == LEFT_OUT and "score.allow_download=true" in scores["skipped"]["fid"]
    assert scores["final"]["partial"] and scores["final"]["missing"] == LEFT_OUT
    assert "partial: missing dinov2" in output  # the summary still says so
