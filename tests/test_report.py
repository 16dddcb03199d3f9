"""The sweep report: a fake sweep folder (complete, failed and unfinished runs written as files), and the
Hydra callback at the end of a real tiny multirun."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jdiff.report import main as report_main
from jdiff.report import write_report

REPO = Path(__file__).resolve().parents[1]


def fake_run(sweep: Path, name: str, overrides: list[str], *, final=None, status="complete", failed=None,
             refs: Path = None, style="00", images=2) -> Path:
    run = sweep / name
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (run / "config.yaml").write_text(f"style: '{style}'\ndata:\n  root: {refs}\n")
    (run / "images").mkdir()
    for k in range(images):
        Image.fromarray(np.full((32, 32, 3), 40 * k, np.uint8)).save(run / "images" / f"Object{k}.png")
    if final is not None:
        metrics = {"hist": final, "dinov2": 0.1}
        (run / "scores.json").write_text(json.dumps({"metrics": metrics, "final": {"value": final, "partial": True}}))
    if status == "complete":
        (run / "COMPLETE").write_text(json.dumps({"final_score": final, "seconds": 12.5}))
    if failed is not None:
        (run / "FAILED").write_text(failed)
    return run


@pytest.fixture()
def sweep(tmp_path) -> Path:
    refs = tmp_path / "styles"
    for style in ("00", "01"):
        (refs / style / "images").mkdir(parents=True)
        Image.fromarray(np.full((40, 40, 3), (200, 10, 10), np.uint8)).save(refs / style / "images" / "sun.jpg")
    sweep = tmp_path / "sweep"
    fake_run(sweep, "0", ["style=00", "lora.unet_rank=4"], final=0.30, refs=refs)
    fake_run(sweep, "1", ["style=00", "lora.unet_rank=32"], final=0.50, refs=refs)
    fake_run(sweep, "2", ["style=01", "lora.unet_rank=4"], final=0.20, refs=refs, style="01")
    fake_run(sweep, "3", ["style=01", "lora.unet_rank=32"], status="failed", refs=refs, style="01",
             failed=json.dumps({"error": "CUDA out of memory while training <rank 32>", "seconds": 3.0}))
    fake_run(sweep, "4", ["style=00", "lora.unet_rank=64"], status="unfinished", refs=refs, images=0)
    fake_run(sweep, "5", ["style=01", "lora.unet_rank=64"], status="failed", refs=refs, style="01",
             failed="Traceback: plain-text failure")
    (sweep / "multirun.yaml").write_text("hydra: {}\n")  # Hydra's own file: not a run
    return sweep


def test_csv_lists_every_run_best_first_with_failed_and_unfinished_after(sweep):
    runs = write_report(sweep)
    assert [r.name for r in runs] == ["1", "0", "2", "3", "5", "4"]
    rows = list(csv.DictReader(open(sweep / "scores.csv")))
    assert [r["run"] for r in rows] == ["1", "0", "2", "3", "5", "4"]
    assert [r["status"] for r in rows] == ["complete"] * 3 + ["failed", "failed", "unfinished"]
    assert list(rows[0])[:4] == ["run", "status", "style", "lora.unet_rank"]
    assert rows[0]["lora.unet_rank"] == "32" and rows[0]["final"] == "0.5000" and rows[0]["hist"] == "0.5000"
    assert rows[0]["seconds"] == "12.5" and rows[0]["partial"] == "true" and rows[0]["lpips"] == ""
    assert rows[3]["error"] == "CUDA out of memory while training <rank 32>" and rows[3]["seconds"] == "3.0"
    assert rows[4]["error"] == "Traceback: plain-text failure" and rows[4]["final"] == ""
    assert rows[5]["error"] == "" and rows[5]["seconds"] == ""


def test_markdown_has_the_table_and_the_mean_per_setting(sweep):
    write_report(sweep)
    md = (sweep / "scores.md").read_text()
    assert "6 runs: 3 complete, 2 failed, 1 unfinished." in md
    assert "| 1 | 1 | complete | 00 | 32 | 0.5000 (partial) |" in md
    summary = md.split("## Mean final score per setting")[1]
    # style=00: complete runs 0.30 and 0.50 -> 0.40; style=01: only 0.20 completed
    assert "| style | 00 | 3 | 2 | 0.4000 | 0.5000 |" in summary
    assert "| style | 01 | 3 | 1 | 0.2000 | 0.2000 |" in summary
    assert "| lora.unet_rank | 4 | 2 | 2 | 0.2500 | 0.3000 |" in summary
    assert "| lora.unet_rank | 64 | 2 | 0 |  |  |" in summary


def test_html_is_self_contained_with_thumbnails_and_errors(sweep):
    write_report(sweep)
    page = (sweep / "report.html").read_text()
    srcs = re.findall(r'src="([^"]*)"', page)
    assert srcs and all(s.startswith("data:image/jpeg;base64,") for s in srcs)
    assert len(srcs) == 5 * 2 + 2  # two images for each run that has some, one reference per style
    assert "CUDA out of memory while training &lt;rank 32&gt;" in page
    assert page.index(">1</td>") < page.index(">0</td>")  # best run first
    assert "Mean final score per setting" in page and "Style references" in page


def test_report_command_on_a_partial_sweep_and_a_missing_folder(sweep, tmp_path, capsys):
    assert report_main([str(sweep)]) == 0
    assert "scores.csv" in capsys.readouterr().out
    # a run appears later (the sweep goes on): the report is rewritten with it
    fake_run(sweep, "6", ["style=00", "lora.unet_rank=8"], final=0.9, refs=tmp_path / "styles")
    write_report(sweep)
    assert next(csv.DictReader(open(sweep / "scores.csv")))["run"] == "6"
    assert report_main([str(tmp_path / "nowhere")]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_hydra_callback_writes_the_report_at_the_end_of_a_multirun(jdiff_root, tiny_model_dir, tmp_path):
    sweep = tmp_path / "sweep"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "jdiff.main", "-m", "experiment=demo", "train.steps=2", "infer.steps=2",
         "prior.images_per_object=1", "lora.unet_rank=2,4", "score=hist", f"paths.root={jdiff_root}",
         f"hydra.sweep.dir={sweep}"],
        cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=900)  # a guard against hangs only: with a cold Jittor cache this run compiles for minutes
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader(open(sweep / "scores.csv")))
    assert sorted(r["lora.unet_rank"] for r in rows) == ["2", "4"]
    assert all(r["status"] == "complete" and r["final"] != "" for r in rows)
    assert "lora.unet_rank" in (sweep / "scores.md").read_text()
    assert "data:image/jpeg;base64," in (sweep / "report.html").read_text()
