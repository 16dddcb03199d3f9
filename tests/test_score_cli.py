"""Scoring outside a run (``python -m jdiff.score`` on a challenge-layout folder) and inside one (the score
stage), with the tiny metric models and with metrics whose weights are missing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import QUICK, compose_config, settings_for
from jdiff.demo_data import DEMO_STYLES, write_demo_styles
from jdiff.pipeline import run
from jdiff.score import main as score_main
from jdiff.scoring import final_score
from jdiff.scoring.scorer import Scorer, StyleImages
from jdiff.scoring.tiny_models import tiny_score_overrides
from test_metrics import smooth_images

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def styles_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("styles")
    write_demo_styles(root)
    return root


@pytest.fixture(scope="module")
def submission(tmp_path_factory) -> Path:
    """A challenge-layout folder: NN/<Object>.png for the demo styles' prompt objects."""
    folder = tmp_path_factory.mktemp("submission")
    for k, (style, spec) in enumerate(DEMO_STYLES.items()):
        objects = spec[3]
        (folder / style).mkdir()
        for obj, image in zip(objects, smooth_images(10 + k, len(objects), 64)):
            Image.fromarray(image).save(folder / style / f"{obj}.png")
    return folder


def test_score_cli_scores_a_challenge_folder(tiny_metrics, styles_root, submission, tmp_path, capsys):
    out = tmp_path / "scores.json"
    code = score_main([str(submission), f"data.root={styles_root}", f"paths.root={tmp_path}", "score.device=cpu",
                       *tiny_score_overrides(tiny_metrics), "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert set(result["per_style"]) == {"00", "01"} and result["per_style"]["00"]["images"] == 3
    assert list(result["metrics"]) == ["dinov2", "hist", "lpips", "fid", "clip_iqa", "clip_r"]
    assert result["skipped"] == {} and not result["final"]["partial"]
    assert result["final"]["value"] == pytest.approx(final_score(result["metrics"]).value)

    # the same numbers as the scorer gives on the same images, objects taken from the file names
    from jdiff.data import load_rgb, load_style

    styles = []
    for sid in ("00", "01"):
        style = load_style(styles_root, sid)
        files = sorted((submission / sid).glob("*.png"))
        styles.append(StyleImages(sid, [(p.stem, load_rgb(p)) for p in files], style.images()))
    direct = Scorer(settings_for(tiny_metrics)).score(styles)
    assert result["metrics"] == pytest.approx(direct.metrics, rel=1e-6)

    assert "final score" in printed and "scored 6 images of 2 styles in" in printed
    for line in printed.splitlines():
        if line.startswith(("00 ", "01 ", "all ")):
            assert len(line.split()) == 2 + 6  # style, images and six metric columns
    assert "all" in printed and f"{result['final']['value']:.4f}" in printed


def test_score_cli_names_a_style_missing_from_the_data_root(styles_root, submission, tmp_path, capsys):
    bad = tmp_path / "bad"
    (bad / "07").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(bad / "07" / "Dolphin.png")
    assert score_main([str(bad), f"data.root={styles_root}", "score=hist"]) == 2
    err = capsys.readouterr().err
    assert "style=07" in err and "00, 01" in err
    assert score_main([str(tmp_path / "nowhere"), f"data.root={styles_root}", "score=hist"]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_score_cli_as_a_command_reports_skipped_metrics(styles_root, submission, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "TORCH_HOME": str(tmp_path / "torch")}
    proc = subprocess.run([sys.executable, "-m", "jdiff.score", str(submission), f"data.root={styles_root}",
                           f"paths.root={tmp_path}", "score.metrics=[hist,lpips]"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((submission / "scores.json").read_text())
    assert list(result["metrics"]) == ["hist"] and result["final"]["partial"]
    assert "squeezenet1_1-b8a52dc0.pth" in result["skipped"]["lpips"]
    assert "skipped lpips" in proc.stdout and "partial: missing" in proc.stdout


def test_score_stage_with_missing_weights_records_the_others(jdiff_root, tiny_metrics, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    run_dir = tmp_path / "run"
    overrides = [o for o in tiny_score_overrides(tiny_metrics) if not o.startswith("score.dinov2_model")]
    run(compose_config(QUICK + ["train.steps=2", "infer.steps=2", "score.device=cpu", *overrides], jdiff_root),
        run_dir)
    scores = json.loads((run_dir / "scores.json").read_text())
    assert set(scores["skipped"]) == {"dinov2"} and "facebook/dinov2-base" in scores["skipped"]["dinov2"]
    assert scores["final"]["partial"] and scores["final"]["missing"] == ["dinov2"]
    assert set(scores["metrics"]) == {"hist", "lpips", "fid", "clip_iqa", "clip_r"}
    assert (run_dir / "COMPLETE").is_file()
