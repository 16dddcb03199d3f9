"""Sweeps with broken runs in them: a diverging run fails alone and the sweep goes on; a relaunch reruns runs whose
COMPLETE is damaged and never touches finished ones; the report lists every run, damaged ones with what is
wrong with them."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from conftest import assert_one_line_error, jdiff_cli, snapshot
from jdiff import rundir
from jdiff.rundir import COMPLETE, FAILED, JOB


ONE_FAILED = "1 of the sweep's 2 runs did not complete (1 failed)"


def sweep(cwd: Path, cache: Path, name: str, *extra: str, ended: str = ONE_FAILED):
    done = jdiff_cli(["-m", "experiment=demo", "engine=torch", "train.steps=3", "infer.steps=2",
                      "prior.images_per_object=1", f"paths.cache={cache}", "gpus=[]", "n_jobs=1", f"sweep.name={name}",
                      "train.lr=1e30,1e-3", *extra], cwd)
    assert "Traceback (most recent call last)" not in done.stdout, done.stderr[-3000:]
    # the diverging run fails: the sweep says so in its last line, and its exit code is 1
    assert done.returncode == 1 and ended in done.stderr.splitlines()[-1], done.stderr[-3000:]
    return done


def runs(sweep_dir: Path) -> dict[str, Path]:
    return {("diverging" if "1e+30" in p.name else "good"): p for p in sweep_dir.iterdir() if p.is_dir()}


def report_rows(sweep_dir: Path) -> dict[str, dict]:
    with open(sweep_dir / "scores.csv", newline="") as f:
        return {("diverging" if "1e+30" in row["run"] else "good"): row for row in csv.DictReader(f)}


@pytest.fixture(scope="module")
def swept(tmp_path_factory, jdiff_root, tiny_model_dir) -> tuple[Path, Path]:
    cwd = tmp_path_factory.mktemp("swept")
    cache = jdiff_root / "data" / "cache"
    sweep(cwd, cache, "lr")
    return cwd, cache


def test_a_diverging_run_fails_alone_and_the_sweep_goes_on(swept):
    cwd, _ = swept
    found = runs(cwd / "multirun" / "lr")
    failure = json.loads((found["diverging"] / FAILED).read_text())
    assert failure["type"] == "TrainingDiverged" and "train.lr" in failure["error"]
    assert not (found["diverging"] / COMPLETE).exists() and not (found["diverging"] / "scores.json").exists()
    assert rundir.inspect(found["good"]).status == "complete"
    rows = report_rows(cwd / "multirun" / "lr")
    assert rows["diverging"]["status"] == "failed" and rows["diverging"]["final"] == ""
    assert rows["good"]["status"] == "complete" and rows["good"]["final"] != ""


@pytest.mark.parametrize("damage", ["", "{\"final_sc", "[1, 2]"])
def test_a_relaunch_reruns_a_run_whose_complete_is_damaged(swept, tmp_path, damage):
    cwd, cache = swept
    shutil.copytree(cwd / "multirun" / "lr", tmp_path / "multirun" / "lr")
    found = runs(tmp_path / "multirun" / "lr")
    started = json.loads((found["good"] / JOB).read_text())["started"]
    (found["good"] / COMPLETE).write_text(damage)
    assert rundir.inspect(found["good"]).status == "broken"
    done = sweep(tmp_path, cache, "lr")
    assert "running it again" in done.stdout + done.stderr
    state = rundir.inspect(found["good"])
    assert state.status == "complete" and state.final_score is not None
    assert json.loads((found["good"] / JOB).read_text())["started"] > started


def test_one_damaged_run_never_stops_the_relaunch_or_the_report(swept, tmp_path):
    cwd, cache = swept
    shutil.copytree(cwd / "multirun" / "lr", tmp_path / "multirun" / "lr")
    found = runs(tmp_path / "multirun" / "lr")
    good = found["good"]
    (good / "scores.json").write_text(json.dumps({"metrics": {"hist": "high"}, "final": {"value": None}}))
    (good / "config.yaml").write_text("style: [unclosed\n")
    (good / ".hydra" / "overrides.yaml").write_text("{not: a list}\n")
    before = snapshot(good)
    sweep(tmp_path, cache, "lr", ended="2 of the sweep's 2 runs did not complete (1 failed, 1 broken)")
    assert snapshot(good) == before  # a finished run is skipped, damaged or not
    rows = report_rows(tmp_path / "multirun" / "lr")
    assert rows["good"]["status"] == "broken"
    assert "scores.json" in rows["good"]["problem"] and "config.yaml" in rows["good"]["problem"]
    assert rows["diverging"]["status"] == "failed"
    assert (tmp_path / "multirun" / "lr" / "report.html").is_file()


def test_a_sweep_never_writes_into_a_folder_of_somebody_elses(tmp_path, jdiff_root):
    (tmp_path / "scores.csv").write_text("mine")
    done = jdiff_cli(["-m", "experiment=demo", "engine=torch", "gpus=[]", "sweep.name=..", "style=00"], tmp_path)
    assert_one_line_error(done, str(tmp_path), "scores.csv", "sweep.name")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scores.csv"] and (tmp_path / "scores.csv").read_text() == "mine"


@pytest.mark.parametrize("extra,words", [(["n_jobs=0"], ["n_jobs=0"]), (["gpus=[0,0]"], ["gpus"])])
def test_a_sweep_with_bad_placement_is_refused_before_it_starts(tmp_path, extra, words):
    done = jdiff_cli(["-m", "experiment=demo", "engine=torch", "sweep.name=p", "seed=1,2", *extra], tmp_path)
    assert_one_line_error(done, *words)
    assert not (tmp_path / "multirun").exists()


def test_the_report_adds_nothing_to_a_run_folder_or_over_a_users_file(swept, tmp_path):
    cwd, _ = swept
    run = runs(cwd / "multirun" / "lr")["good"]
    before = snapshot(run)
    assert_one_line_error(jdiff_cli([run], tmp_path, module="jdiff.report"), "one run's folder")
    assert snapshot(run) == before
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "report.html").write_text("my page")
    assert_one_line_error(jdiff_cli([folder], tmp_path, module="jdiff.report"), "not a report jdiff wrote")
    assert (folder / "report.html").read_text() == "my page"
