"""The sweep report never stops for one damaged run: each case damages one run of a small fake sweep and checks
that every run is still listed, the damaged one with its status and what is wrong, the good ones with their
scores and order; the escaping of each output; and the command's errors (one line, exit code 2, no traceback,
no report file lost)."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import jdiff.files
import jdiff.report
from jdiff.report import main as report_main
from jdiff.report import write_report

REPO = Path(__file__).resolve().parents[1]
GOOD = {"a": 0.30, "b": 0.50, "c": 0.20}  # run name -> final score


def make_run(sweep: Path, name: str, overrides: list[str], *, final=0.4, status="complete", images=2) -> Path:
    run = sweep / name
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text("".join(f"- {json.dumps(o)}\n" for o in overrides))
    (run / "config.yaml").write_text(f"style: '00'\ndata:\n  root: {sweep.parent / 'styles'}\n")
    (run / "images").mkdir()
    for k in range(images):
        Image.fromarray(np.full((16, 16, 3), 40 * k, np.uint8)).save(run / "images" / f"Object{k}.png")
    if final is not None:
        scores = {"metrics": {"hist": final, "dinov2": 0.1}, "final": {"value": final, "partial": True}}
        (run / "scores.json").write_text(json.dumps(scores))
    if status == "complete":
        (run / "COMPLETE").write_text(json.dumps({"final_score": final, "seconds": 12.5}))
    elif status == "failed":
        (run / "FAILED").write_text(json.dumps({"error": "CUDA out of memory", "seconds": 3.0}))
    return run


@pytest.fixture()
def sweep(tmp_path) -> Path:
    """Three good complete runs (a, b, c), a failed one, an unfinished one, and run "x" to damage (complete, 0.9:
    it would be the best)."""
    (tmp_path / "styles" / "00" / "images").mkdir(parents=True)
    Image.fromarray(np.full((20, 20, 3), 200, np.uint8)).save(tmp_path / "styles" / "00" / "images" / "sun.jpg")
    sweep = tmp_path / "sweep"
    for i, (name, final) in enumerate(GOOD.items()):
        make_run(sweep, name, ["style=00", f"lora.unet_rank={4 * (i + 1)}"], final=final)
    make_run(sweep, "f", ["style=00", "lora.unet_rank=64"], final=None, status="failed")
    make_run(sweep, "u", ["style=00", "lora.unet_rank=128"], final=None, status="unfinished", images=0)
    make_run(sweep, "x", ["style=00", "lora.unet_rank=2"], final=0.9)
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    return sweep


def read_csv(sweep: Path) -> list[dict]:
    with open(sweep / "scores.csv", encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def report(sweep: Path) -> tuple[dict, list[dict], str, str]:
    """write_report, checked for what holds in every case; returns the runs by name, CSV rows, Markdown, HTML."""
    runs = write_report(sweep)
    assert sorted(r.name for r in runs) == ["a", "b", "c", "f", "u", "x"]
    good = [r for r in runs if r.name in GOOD]
    assert [r.name for r in good] == ["b", "a", "c"]  # best first
    assert [r.final for r in good] == [0.50, 0.30, 0.20] and all(r.status == "complete" for r in good)
    assert all(not r.problem for r in good)
    assert [r.status for r in runs] == sorted((r.status for r in runs), key=jdiff.report.STATUS_ORDER.get)
    rows = read_csv(sweep)
    assert [r["run"] for r in rows] == [r.name for r in runs]
    md, page = (sweep / "scores.md").read_text(), (sweep / "report.html").read_text()
    return {r.name: r for r in runs}, rows, md, page


def damaged(sweep, status: str, *words: str):
    """Checks run x: its status, a problem naming the file, no score shown, and mentioned in all three files."""
    runs, rows, md, page = report(sweep)
    x = runs["x"]
    assert x.status == status, x
    for word in words:
        assert word in x.problem, x.problem
    row = next(r for r in rows if r["run"] == "x")
    assert row["status"] == status and row["problem"] == x.problem
    assert f"| x | {status} |" in md and words[0] in md
    assert "<td>x</td>" in page and words[0] in page
    if status == "broken":
        assert x.final is None and row["final"] == "" and "0.9000" not in md
        assert [r.name for r in runs.values() if r.status == "complete"] == ["b", "a", "c"]
        assert runs["x"] is list(runs.values())[4]  # after the failed run, before the unfinished one
    return x, row, md, page


# -- damaged markers and scores -------------------------------------------------------------------------------

@pytest.mark.parametrize("text, words", [
    ("", ["COMPLETE", "empty"]),
    ('{"final_score": 0.9, "sec', ["COMPLETE", "not valid JSON"]),
    ("[0.9]", ["COMPLETE", "list"]),
    ("\xff\xfe", ["COMPLETE"]),
])
def test_an_empty_or_truncated_complete_marker_is_broken(sweep, text, words):
    (sweep / "x" / "COMPLETE").write_bytes(text.encode("latin-1"))
    damaged(sweep, "broken", *words)


@pytest.mark.parametrize("text, words", [
    ("{not json", ["scores.json", "not valid JSON"]),
    ("", ["scores.json", "empty"]),
    ('["a"]', ["scores.json", "list"]),
    ('{"metrics": [1], "final": {"value": 0.9}}', ["scores.json", '"metrics"', "list"]),
    ('{"metrics": null, "final": {"value": 0.9}}', ["scores.json", '"metrics"']),
    ('{"metrics": {"hist": "high"}, "final": {"value": 0.9}}', ["scores.json", "hist='high'", "finite"]),
    ('{"metrics": {"hist": NaN}, "final": {"value": 0.9}}', ["scores.json", "hist=nan"]),
    ('{"metrics": {"fid": Infinity}, "final": {"value": 0.9}}', ["scores.json", "fid=inf"]),
    ('{"metrics": {"lpips": true}, "final": {"value": 0.9}}', ["scores.json", "lpips=True"]),
    ('{"metrics": {}, "final": 0.9}', ["scores.json", '"final"', "float"]),
    ('{"metrics": {}}', ["scores.json", '"final" is missing']),
    ('{"metrics": {}, "final": {"value": NaN}}', ["scores.json", "final score is nan"]),
    ('{"metrics": {}, "final": {"value": -Infinity}}', ["scores.json", "final score is -inf"]),
    ('{"metrics": {}, "final": {"partial": false}}', ["scores.json", "final score is missing"]),
    ('{"metrics": {}, "final": {"value": null}}', ["scores.json", "final score is missing"]),
    ('{"metrics": {}, "final": {"value": "0.9"}}', ["scores.json", "final score is '0.9'"]),
    ('{"metrics": {}, "final": {"value": true}}', ["scores.json", "final score is True"]),
])
def test_a_complete_run_with_damaged_scores_is_broken_and_not_ranked(sweep, text, words):
    (sweep / "x" / "scores.json").write_text(text)
    x, row, md, page = damaged(sweep, "broken", *words)
    assert x.metrics == {} and row["hist"] == "" and "nan" not in row["final"].lower()
    assert "NaN" not in md.replace("final score is nan", "") and ">nan<" not in page.lower()


def test_a_missing_scores_file_of_a_scored_run_is_broken(sweep):
    (sweep / "x" / "scores.json").unlink()
    damaged(sweep, "broken", "scores.json is missing", "COMPLETE records a final score (0.9)")


def test_a_nan_final_score_in_complete_alone_is_not_shown(sweep):
    (sweep / "x" / "scores.json").unlink()
    (sweep / "x" / "COMPLETE").write_text('{"final_score": NaN, "seconds": 1}')
    damaged(sweep, "broken", "scores.json is missing", "nan")


def test_a_complete_run_without_a_score_stage_is_complete_and_listed_after_the_scored_ones(sweep):
    (sweep / "x" / "scores.json").unlink()
    (sweep / "x" / "COMPLETE").write_text('{"final_score": null, "seconds": 4}')
    runs, rows, md, _ = report(sweep)
    assert [r for r in runs if runs[r].status == "complete"] == ["b", "a", "c", "x"]
    assert runs["x"].problem == "" and runs["x"].seconds == 4.0 and rows[3]["final"] == ""


def test_a_wrongly_typed_duration_is_left_out_not_a_crash(sweep):
    (sweep / "x" / "COMPLETE").write_text('{"final_score": 0.9, "seconds": "twelve"}')
    runs, rows, _, _ = report(sweep)
    assert runs["x"].status == "complete" and runs["x"].final == 0.9 and rows[0]["seconds"] == ""


def test_unknown_metrics_are_ignored_and_missing_ones_left_blank(sweep):
    (sweep / "x" / "scores.json").write_text('{"metrics": {"hist": 0.5, "clip_r": null, "mine": "x"}, '
                                             '"final": {"value": 0.9, "partial": true}}')
    runs, rows, _, _ = report(sweep)
    assert runs["x"].metrics == {"hist": 0.5} and rows[0]["run"] == "x" and rows[0]["clip_r"] == ""


# -- failed runs -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, error", [
    ("Traceback: plain-text failure\n", "Traceback: plain-text failure"),
    ("", "FAILED is empty"),
    ("   \n", "FAILED is empty"),
    ('{"error": null}', ""),
    ('{"error": 42, "seconds": "3"}', "42"),
    ('"just a string"', '"just a string"'),
])
def test_a_failed_marker_in_any_form_is_a_failed_run_with_its_text(sweep, text, error):
    (sweep / "x" / "COMPLETE").unlink()
    (sweep / "x" / "FAILED").write_text(text)
    runs, rows, md, _ = report(sweep)
    assert runs["x"].status == "failed" and runs["x"].error == error and runs["x"].final is None
    assert runs["x"].seconds is None
    assert [r.name for r in runs.values() if r.status == "failed"] == ["f", "x"]


def test_a_failed_marker_that_is_a_folder_is_broken(sweep):
    (sweep / "x" / "COMPLETE").unlink()
    (sweep / "x" / "FAILED").mkdir()
    damaged(sweep, "broken", "FAILED")


# -- damage that leaves the outcome readable ---------------------------------------------------------------

@pytest.mark.parametrize("text", ["style: [unclosed\n", "a: b: c\n", "- just\n- a list\n", "\tstyle: x\n"])
def test_a_corrupt_config_is_a_problem_but_the_score_stays(sweep, text):
    (sweep / "x" / "config.yaml").write_text(text)
    x, row, md, page = damaged(sweep, "complete", "config.yaml")
    assert x.final == 0.9 and row["final"] == "0.9000" and md.index("| x |") < md.index("| b |")
    assert x.style is None


@pytest.mark.parametrize("text", ["- [unclosed\n", "style: 00\n", "42\n", "- a\n  - b: [\n", "- a\n\tb\n"])
def test_corrupt_overrides_are_a_problem_and_left_out_of_the_summary(sweep, text):
    (sweep / "x" / ".hydra" / "overrides.yaml").write_text(text)
    x, row, md, _ = damaged(sweep, "complete", ".hydra/overrides.yaml")
    assert x.final == 0.9 and x.overrides == {} and not x.settings_known
    summary = md.split("## Mean final score per setting")[1]
    assert "(unset)" not in summary and "| lora.unet_rank | 4 | 1 | 1 | 0.3000 | 0.3000 |" in summary
    assert "| style | " not in summary  # style=00 everywhere else: not swept
    assert md.split("\n\n")[2].splitlines()[0].startswith("| # | run | status | lora.unet_rank | style |")


@pytest.mark.parametrize("data", [b"", b"\x89PNG\r\n\x1a\n truncated", b"not an image at all"])
def test_an_unreadable_image_is_a_problem_and_the_other_thumbnails_stay(sweep, data):
    (sweep / "x" / "images" / "Object1.png").write_bytes(data)
    x, _, _, page = damaged(sweep, "complete", "images/Object1.png", "cannot be read as an image")
    assert x.final == 0.9 and [name for name, _ in x.thumbs] == ["Object0"]
    assert page.count('src="data:image/jpeg;base64,') == 4 * 2 + 1 + 1  # a, b, c, f; x's one; the reference


def test_a_truncated_png_is_a_problem(sweep):
    path = sweep / "x" / "images" / "Object1.png"
    path.write_bytes(path.read_bytes()[:-30])
    damaged(sweep, "complete", "images/Object1.png")


def test_files_of_the_users_own_in_a_run_folder_do_not_change_its_status(sweep):
    (sweep / "x" / "notes.txt").write_text("a good one\n")
    (sweep / "f" / "notes.txt").write_text("why did it fail?\n")
    runs, rows, _, _ = report(sweep)
    assert runs["x"].status == "complete" and runs["x"].final == 0.9 and rows[0]["run"] == "x"
    assert runs["f"].status == "failed" and runs["f"].error == "CUDA out of memory"


def test_a_run_that_has_not_written_anything_yet_is_unfinished(sweep):
    (sweep / "new" / ".hydra").mkdir(parents=True)
    runs = {r.name: r for r in write_report(sweep)}
    assert runs["new"].status == "unfinished" and runs["new"].problem == ""


# -- folders that cannot be read ---------------------------------------------------------------------------

def test_a_run_folder_that_cannot_be_listed_is_broken(sweep, monkeypatch):
    """As the run folder's owner lacking read permission sees it (the tests may run as root, who never does)."""
    real = Path.iterdir

    def iterdir(self):
        if self == sweep / "x":
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "iterdir", iterdir)
    x, _, _, _ = damaged(sweep, "broken", "the run folder cannot be read", "Permission denied",
                         f"chmod -R u+rX {sweep / 'x'}")


def test_an_unforeseen_failure_reading_one_run_lists_it_as_broken(sweep, monkeypatch):
    real = jdiff.report.read_config

    def read_config(run_dir):
        if Path(run_dir).name == "x":
            raise TypeError("something nobody foresaw")
        return real(run_dir)

    monkeypatch.setattr(jdiff.report, "read_config", read_config)
    damaged(sweep, "broken", "TypeError: something nobody foresaw")


def test_several_damaged_runs_at_once_and_the_callback_still_writes_the_report(sweep, capsys):
    (sweep / "x" / "COMPLETE").write_text("")
    (sweep / "a" / ".hydra" / "overrides.yaml").write_text("{")
    (sweep / "b" / "config.yaml").write_text("[")
    (sweep / "c" / "images" / "Object0.png").write_text("")
    (sweep / "f" / "FAILED").write_text("")
    assert end_of_sweep(sweep, capsys)[0] == 1
    rows = read_csv(sweep)
    assert [(r["run"], r["status"], r["final"]) for r in rows] == [
        ("b", "complete", "0.5000"), ("a", "complete", "0.3000"), ("c", "complete", "0.2000"), ("f", "failed", ""),
        ("x", "broken", ""), ("u", "unfinished", "")]
    assert [bool(r["problem"]) for r in rows] == [True, True, True, False, True, False]
    assert "6 runs: 3 complete, 1 failed, 1 broken, 1 unfinished." in (sweep / "scores.md").read_text()


def end_of_sweep(sweep_dir: Path, capsys):
    """SweepReport at the end of a multirun into ``sweep_dir``: the exit code (None: it returned) and stderr."""
    from omegaconf import OmegaConf

    from jdiff.callbacks import SweepReport

    try:
        SweepReport().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep_dir)}}}))
        code = None
    except SystemExit as ended:
        code = ended.code
    return code, capsys.readouterr().err


def test_a_sweep_with_runs_that_did_not_complete_ends_with_exit_code_1_and_says_which(sweep, capsys, monkeypatch):
    monkeypatch.chdir(sweep.parent)
    named = Path("multirun") / "2026-12-04" / "19-19-36"
    named.parent.mkdir(parents=True)
    sweep.rename(named)
    code, err = end_of_sweep(named, capsys)
    assert code == 1 and err.count("\n") == 1 and err.startswith("error: 2 of the sweep's 6 runs did not complete")
    assert "(1 failed, 1 unfinished)" in err and str(named / "report.html") in err
    assert "sweep.name=2026-12-04/19-19-36 runs the failed and unfinished ones again" in err
    assert (named / "report.html").is_file() and len(read_csv(named)) == 6  # the report is written first


def test_a_sweep_outside_multirun_is_named_by_its_folder_to_relaunch(sweep, capsys):
    code, err = end_of_sweep(sweep, capsys)
    assert code == 1 and f"hydra.sweep.dir={sweep} runs the failed and unfinished ones again" in err


def test_a_sweep_whose_runs_all_completed_ends_normally(sweep, capsys):
    for name in ("f", "u"):
        shutil.rmtree(sweep / name)
    assert end_of_sweep(sweep, capsys) == (None, "")


def test_the_counts_leave_out_broken_when_there_is_none(sweep):
    _, _, md, _ = report(sweep)
    assert "6 runs: 4 complete, 1 failed, 1 unfinished." in md


def test_a_sweep_folder_with_a_name_int_cannot_parse(sweep):
    make_run(sweep, "²", ["style=00", "lora.unet_rank=3"], final=0.1)  # "²".isdigit() is True
    assert "²" in [r.name for r in write_report(sweep)]


# -- escaping ----------------------------------------------------------------------------------------------

XSS = "<img src=x onerror=alert(1)>"


def test_markdown_escapes_html_and_table_syntax_the_csv_keeps_values_exact(sweep):
    make_run(sweep, "h", ["style=00", f"lora.unet_rank={XSS}", "+<b>key=<script>alert(1)</script>"], final=0.6)
    make_run(sweep, "p", ["style=00", "lora.unet_rank=a|b", "+<b>key=c\\|d & e"], final=0.7)
    (sweep / "f" / "FAILED").write_text(json.dumps({"error": "line one\nline <two>"}))
    write_report(sweep)
    md = (sweep / "scores.md").read_text()
    assert "<img" not in md and "<script" not in md and "<b>" not in md
    assert "&lt;img src=x onerror=alert(1)&gt;" in md and "&lt;script&gt;alert(1)&lt;/script&gt;" in md
    assert "| &lt;b&gt;key |" in md  # the header too
    assert "| a\\|b |" in md and "| c\\\\\\|d &amp; e |" in md
    assert "line one line &lt;two&gt;" in md
    table = md.split("\n\n")[2].splitlines()  # every row of the runs table has as many cells as its header
    assert len(table) == 2 + 8 and all(len(split_md_row(line)) == len(split_md_row(table[0])) for line in table)
    rows = {r["run"]: r for r in read_csv(sweep)}
    assert rows["h"]["lora.unet_rank"] == XSS and rows["h"]["<b>key"] == "<script>alert(1)</script>"
    assert rows["p"]["lora.unet_rank"] == "a|b" and rows["p"]["<b>key"] == "c\\|d & e"
    assert rows["f"]["error"] == "line one\nline <two>"
    page = (sweep / "report.html").read_text()
    assert "<img src=x" not in page and "<script>" not in page and "&lt;img src=x onerror=alert(1)&gt;" in page


def split_md_row(line: str) -> list[str]:
    """Cells of a GFM table row: a backslash escapes the next character, an unescaped | ends a cell."""
    cells, cell, i = [], "", 1
    while i < len(line):
        if line[i] == "\\":
            cell, i = cell + line[i:i + 2], i + 2
        elif line[i] == "|":
            cells.append(cell.strip())
            cell, i = "", i + 1
        else:
            cell, i = cell + line[i], i + 1
    return cells


@pytest.mark.parametrize("value", ['=HYPERLINK("http://evil","x")', "+cmd|' /C calc'!A0", "-2+3+cmd", "@SUM(A1)",
                                   "\tx", "\r=1", "-", "-inf", "=1"])
def test_csv_neutralises_formulas_in_text(sweep, value):
    make_run(sweep, "e", ["style=00", f"lora.unet_rank={value}"], final=0.1)
    (sweep / "f" / "FAILED").write_text(json.dumps({"error": value}))
    write_report(sweep)
    rows = {r["run"]: r for r in read_csv(sweep)}
    assert rows["e"]["lora.unet_rank"] == "'" + value and rows["f"]["error"] == "'" + value


@pytest.mark.parametrize("value", ["-1", "+4", "-0.5e-3", "1e-4", "-.5", "32", "a=b", "'quoted", " =1"])
def test_csv_keeps_numbers_and_harmless_text_as_they_are(sweep, value):
    make_run(sweep, "e", ["style=00", f"lora.unet_rank={value}"], final=-0.25)
    write_report(sweep)
    rows = {r["run"]: r for r in read_csv(sweep)}
    assert rows["e"]["lora.unet_rank"] == value
    assert rows["e"]["final"] == "-0.2500" and rows["e"]["hist"] == "-0.2500"  # jdiff's numbers stay numbers


def test_csv_neutralises_a_run_name_and_an_override_key(sweep):
    make_run(sweep, "-x=1", ["style=00", "@key=1"], final=0.1)
    write_report(sweep)
    rows = read_csv(sweep)
    assert "'-x=1" in [r["run"] for r in rows] and "'@key" in rows[0]


# -- the command -------------------------------------------------------------------------------------------

def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def test_the_command_lists_damaged_runs_and_exits_0(sweep, capsys):
    (sweep / "x" / "scores.json").write_text("{")
    assert report_main([str(sweep)]) == 0
    out = capsys.readouterr().out
    assert "| x | broken |" in out and "scores.json is not valid JSON" in out and "wrote" in out


def test_a_missing_folder_is_one_error_line_and_exit_2(tmp_path, capsys):
    assert report_main([str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert str(tmp_path / "nowhere") in err and "does not exist" in err and "multirun/<date>/<time>" in err


def test_a_file_is_one_error_line_and_exit_2(tmp_path, capsys):
    (tmp_path / "scores.csv").write_text("run\n")
    assert report_main([str(tmp_path / "scores.csv")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a file" in err and str(tmp_path / "scores.csv") in err
    assert (tmp_path / "scores.csv").read_text() == "run\n"


def test_a_sweep_folder_that_cannot_be_listed_is_one_error_line(sweep, capsys, monkeypatch):
    write_report(sweep)
    before = snapshot(sweep)
    real = Path.iterdir

    def iterdir(self):
        if self == sweep:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "iterdir", iterdir)
    assert report_main([str(sweep)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(sweep) in err and "chmod u+rx" in err
    monkeypatch.undo()
    assert snapshot(sweep) == before


def test_a_read_only_sweep_folder_is_one_error_line_and_keeps_the_old_report(sweep, capsys, monkeypatch):
    write_report(sweep)
    (sweep / "x" / "COMPLETE").write_text("")  # the next report would differ
    before = snapshot(sweep)

    def mkstemp(*args, **kwargs):  # what a read-only folder does to atomic_write, root or not
        raise PermissionError(13, "Permission denied", kwargs.get("dir"))

    monkeypatch.setattr(jdiff.files.tempfile, "mkstemp", mkstemp)
    assert report_main([str(sweep)]) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and captured.err.startswith("error: cannot write the report into ")
    assert str(sweep) in captured.err and "chmod u+w" in captured.err and captured.out == ""
    assert snapshot(sweep) == before


def test_a_report_file_that_cannot_be_replaced_is_an_error_and_leaves_no_temporary_file(sweep, capsys):
    write_report(sweep)
    html_before = (sweep / "report.html").read_bytes()
    (sweep / "scores.md").unlink()
    (sweep / "scores.md").mkdir()  # os.replace cannot put a file there
    assert report_main([str(sweep)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "scores.md" in err and str(sweep) in err
    assert (sweep / "report.html").read_bytes() == html_before
    rows = read_csv(sweep)
    assert rows[0]["run"] == "x" and len(rows) == 6  # written whole before scores.md failed
    assert not [p.name for p in sweep.iterdir() if p.name.endswith((".tmp.csv", ".tmp.md", ".tmp.html"))]


def test_a_folder_without_runs_warns(tmp_path, capsys):
    assert report_main([str(tmp_path)]) == 0
    assert "holds no runs" in capsys.readouterr().err and (tmp_path / "scores.csv").is_file()
    (tmp_path / ".hydra").mkdir()  # the folder of one run, given instead of its sweep's
    assert report_main([str(tmp_path)]) == 0
    assert "the folder of one run" in capsys.readouterr().err


def test_the_command_in_a_process_never_shows_a_traceback(sweep, tmp_path):
    (sweep / "x" / "scores.json").write_text('{"final": {"value": NaN}}')
    (sweep / "a" / ".hydra" / "overrides.yaml").write_text("- [")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "jdiff.report"]
    ok = subprocess.run([*cmd, str(sweep)], env=env, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and "Traceback" not in ok.stderr and "| x | broken |" in ok.stdout
    missing = subprocess.run([*cmd, str(tmp_path / "nowhere")], env=env, capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert missing.stderr.startswith("error: ") and missing.stderr.count("\n") == 1
