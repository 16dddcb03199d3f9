"""The sweep report as a page: the best run marked, links to each run's files, the plots (inline SVG), the
contact sheets carrying the score, and (in headless Chromium, where one is installed) a page that fits a
1400 px window.

The sweep folders are fakes written the way finished runs write theirs: tests/test_report.py's fake_run, then
loss.csv (through jdiff.train's writer), contact_sheet.png (jdiff.contact_sheet), lora.safetensors and run.log.
"""

from __future__ import annotations

import html
import json
import math
import os
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import unquote, urlparse

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from jdiff import pipeline, plots
from jdiff.contact_sheet import BAND_COLOUR, contact_sheet, score_lines
from jdiff.report import (BEST_MARK, LOSS_POINTS, best_run, find_runs, loss_chart, read_loss, score_charts,
                          smooth, write_report)
from jdiff.rundir import LOG, LORA, LOSS, SCORES, SHEET
from jdiff.scoring.final import METRICS
from jdiff.train import LOSS_COLUMNS, write_loss_log
from test_report import fake_run

SVG = "{http://www.w3.org/2000/svg}"
ALL_METRICS = {"dinov2": 0.41, "hist": 0.52, "lpips": 0.33, "fid": 123.4567, "clip_iqa": 0.71, "clip_r": 0.9}


def finish(run: Path, *, steps: int = 0, sheet: bool = False, lora: bool = False, log: bool = True,
           all_metrics: bool = True) -> Path:
    """Add what a finished run writes beside fake_run's files: loss.csv of ``steps`` steps, the contact sheet
    (with the score, as the pipeline draws it after scoring), the adapter and the log."""
    scores = json.loads((run / SCORES).read_text()) if (run / SCORES).is_file() else None
    if scores is not None and all_metrics:
        scores["metrics"] = {**ALL_METRICS, "hist": scores["final"]["value"]}
        scores["final"] = {"value": scores["final"]["value"], "partial": False, "missing": []}
        (run / SCORES).write_text(json.dumps(scores))
    if steps:
        seed = sum(map(ord, run.name))
        rows = [{"step": s, "lr": 1e-4, "loss": 0.3 * math.exp(-s / (40 + seed % 30)) + 0.05 + 0.01 * (s % 3),
                 "style_loss": 0.2, "prior_loss": 0.1, "seconds": 0.1} for s in range(1, steps + 1)]
        write_loss_log(run / LOSS, rows)
    if sheet:
        images = [(p.stem, np.asarray(Image.open(p).convert("RGB"))) for p in sorted((run / "images").glob("*.png"))]
        Image.fromarray(contact_sheet(images, images, "style 00", scores=scores)).save(run / SHEET)
    if lora:
        from safetensors.numpy import save_file

        save_file({"unet.a.lora_A.weight": np.zeros((2, 4), np.float32)}, str(run / LORA))
    if log:
        (run / LOG).write_text(f"[jdiff] run {run.name}\n")
    return run


def styles(tmp_path: Path) -> Path:
    refs = tmp_path / "styles"
    for style in ("00", "01"):
        (refs / style / "images").mkdir(parents=True)
        Image.fromarray(np.full((40, 40, 3), (200, 10, 10), np.uint8)).save(refs / style / "images" / "sun.jpg")
    return refs


@pytest.fixture()
def sweep(tmp_path) -> Path:
    """Three scored runs (1 is the best), a failed one that trained, an unfinished one, and a complete run without
    a score stage; three keys swept (a style id, a rank, a learning rate)."""
    refs, sweep = styles(tmp_path), tmp_path / "sweep"
    run = lambda name, o, **kw: fake_run(sweep, name, o, refs=refs, images=8 if kw.get("status") != "unfinished"
                                         else 0, **kw)
    finish(run("0", ["style=00", "lora.unet_rank=4", "train.lr=1e-4"], final=0.30), steps=120, sheet=True, lora=True)
    finish(run("1", ["style=00", "lora.unet_rank=32", "train.lr=1e-4"], final=0.50), steps=120, sheet=True, lora=True)
    finish(run("2", ["style=01", "lora.unet_rank=4", "train.lr=1e-5"], final=0.20, style="01"), steps=120,
           sheet=True, lora=True)
    finish(run("3", ["style=01", "lora.unet_rank=32", "train.lr=1e-5"], status="failed", style="01",
               failed=json.dumps({"error": "CUDA out of memory while generating <rank 32>"})), steps=80, lora=True)
    finish(run("4", ["style=00", "lora.unet_rank=64", "train.lr=1e-4"], status="unfinished"))
    finish(run("5", ["style=01", "lora.unet_rank=64", "train.lr=1e-4"], style="01"), steps=60, lora=True,
           log=False)  # stages without score: complete, no final score
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    return sweep


class Rows(HTMLParser):
    """The runs table's rows of a report page: data-run, classes, the cells' text, and the links."""

    def __init__(self, page: str):
        super().__init__()
        self.rows: dict[str, dict] = {}
        self.row = self.href = None
        self.cell: list[str] = []
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "tr" and "data-run" in a:
            self.row = {"class": a["class"].split(), "id": a.get("id"), "cells": [], "links": {}, "marks": 0}
            self.rows[a["data-run"]] = self.row
        elif self.row is not None and tag == "td":
            self.cell = []
        elif self.row is not None and tag == "a":
            self.href = a["href"]
        elif self.row is not None and tag == "span" and "best-mark" in a.get("class", ""):
            self.row["marks"] += 1

    def handle_endtag(self, tag):
        if tag == "tr":
            self.row = None
        elif self.row is not None and tag == "td":
            self.row["cells"].append("".join(self.cell).strip())
        elif tag == "a":
            self.href = None

    def handle_data(self, data):
        if self.row is not None:
            self.cell.append(data)
            if self.href is not None:
                self.row["links"][data] = self.href


def svgs(page: str) -> list[ET.Element]:
    """Every plot of the page, parsed as XML (so each is well-formed, as SVG must be)."""
    return [ET.fromstring(s) for s in re.findall(r'<svg class="plot".*?</svg>', page, re.S)]


def series(svg: ET.Element) -> list[str]:
    return [g.get("data-label") for g in svg.iter(f"{SVG}g") if "series" in g.get("class", "").split()]


def legend(svg: ET.Element) -> list[str]:
    return ["".join(t.itertext()) for g in svg.iter(f"{SVG}g") if g.get("class") == "legend-item"
            for t in g.iter(f"{SVG}text")]


def x_ticks(svg: ET.Element) -> list[str]:
    return [t.find(f"{SVG}title").text for t in svg.iter(f"{SVG}text") if t.get("class") == "x-tick"]


def title(svg: ET.Element) -> str:
    return svg.find(f"{SVG}title").text


# -- the best run -------------------------------------------------------------------------------------------

def test_the_best_run_is_marked_in_html_and_markdown(sweep):
    runs = write_report(sweep)
    assert best_run(runs).name == "1"
    page, md = (sweep / "report.html").read_text(), (sweep / "scores.md").read_text()
    rows = Rows(page).rows
    assert sorted(rows) == ["0", "1", "2", "3", "4", "5"]
    assert [name for name, r in rows.items() if "best" in r["class"]] == ["1"]
    assert rows["1"]["class"] == ["complete", "best"] and rows["1"]["marks"] == 1
    assert sum(r["marks"] for r in rows.values()) == 1 and BEST_MARK in rows["1"]["cells"][6]
    assert "Best run: <a href='#run-1'>1</a>, final score 0.5000." in page and rows["1"]["id"] == "run-1"
    assert "Best run: 1, final score 0.5000." in md
    table = [line for line in md.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in table[0].strip("|").split("|")]
    best = header.index("best")
    assert header[best - 1] == "final"
    marks = {line.split(" | ")[1]: line.split(" | ")[best].strip() for line in table[2:8]}
    assert marks == {"1": BEST_MARK, "0": "", "2": "", "3": "", "4": "", "5": ""}


def test_no_run_is_marked_when_none_is_scored_and_ties_go_to_the_first(sweep, tmp_path):
    for name in ("0", "1", "2"):
        (sweep / name / "COMPLETE").unlink()  # left unfinished: a score without COMPLETE never counts
    write_report(sweep)
    page, md = (sweep / "report.html").read_text(), (sweep / "scores.md").read_text()
    assert not [n for n, r in Rows(page).rows.items() if "best" in r["class"] or r["marks"]]
    assert "No complete run has a final score yet." in page and "No complete run has a final score yet." in md
    assert BEST_MARK not in md
    tie = tmp_path / "tie"
    for name in ("7", "8", "9"):
        fake_run(tie, name, [f"lora.unet_rank={name}"], final=0.4 if name != "9" else 0.1)
    assert best_run(find_runs(tie)).name == "7"  # equal scores: the first as sorted (by name)


# -- links ----------------------------------------------------------------------------------------------------

def resolve(sweep: Path, href: str) -> Path:
    url = urlparse(href)
    assert not url.scheme and not url.netloc and not href.startswith("/"), href  # relative to the report
    return sweep / unquote(url.path)


def test_links_are_relative_and_only_to_files_that_exist(sweep, tmp_path):
    write_report(sweep)
    rows = Rows((sweep / "report.html").read_text()).rows
    assert rows["1"]["links"] == {"folder": "1/", "sheet": f"1/{SHEET}", "adapter": f"1/{LORA}", "log": f"1/{LOG}"}
    assert rows["3"]["links"] == {"folder": "3/", "adapter": f"3/{LORA}", "log": f"3/{LOG}"}  # no sheet
    assert rows["4"]["links"] == {"folder": "4/", "log": f"4/{LOG}"}
    assert rows["5"]["links"] == {"folder": "5/", "adapter": f"5/{LORA}"}  # no log
    for row in rows.values():
        for label, href in row["links"].items():
            path = resolve(sweep, href)
            assert (path.is_dir() if label == "folder" else path.is_file()), href
    md = (sweep / "scores.md").read_text()
    assert f"[folder](1/) [sheet](1/{SHEET}) [adapter](1/{LORA}) [log](1/{LOG}) |" in md
    moved = tmp_path / "elsewhere" / "sweep"  # the sweep folder moved with its report: every link still holds
    shutil.move(str(sweep), str(moved))
    for row in Rows((moved / "report.html").read_text()).rows.values():
        assert all(resolve(moved, href).exists() for href in row["links"].values())


def test_a_run_name_that_is_not_a_plain_path_is_percent_encoded(sweep):
    """"a:b" would read as a URL scheme, "#" as a fragment, "&" and quotes as markup."""
    name = "a:b #1 & 'x'"
    finish(fake_run(sweep, name, ["style=00", "lora.unet_rank=8", "train.lr=1e-4"], final=0.9), sheet=True)
    write_report(sweep)
    page = (sweep / "report.html").read_text()
    row = Rows(page).rows[name]
    assert row["links"]["folder"] == "a%3Ab%20%231%20%26%20%27x%27/" and "best" in row["class"]
    assert resolve(sweep, row["links"]["sheet"]) == sweep / name / SHEET
    assert row["id"] == "run-a%3Ab%20%231%20%26%20%27x%27"
    md = (sweep / "scores.md").read_text()
    assert "[folder](a%3Ab%20%231%20%26%20%27x%27/)" in md


# -- plots ----------------------------------------------------------------------------------------------------

def test_the_page_has_a_loss_plot_and_a_score_plot_per_swept_key(sweep):
    write_report(sweep)
    page = (sweep / "report.html").read_text()
    plots_ = svgs(page)
    assert [title(s) for s in plots_] == ["Training loss", "Final score by style", "Final score by lora.unet_rank",
                                          "Final score by train.lr"]
    loss = plots_[0]
    # one line per run with a loss.csv (the unfinished run 4 has none), the best one drawn on top and named so
    assert sorted(series(loss)) == sorted(["run 0: style=00, lora.unet_rank=4, train.lr=1e-4",
                                           f"run 1 {BEST_MARK}: style=00, lora.unet_rank=32, train.lr=1e-4",
                                           "run 2: style=01, lora.unet_rank=4, train.lr=1e-5",
                                           "run 3: style=01, lora.unet_rank=32, train.lr=1e-5",
                                           "run 5: style=01, lora.unet_rank=64, train.lr=1e-4"])
    assert series(loss)[-1].startswith(f"run 1 {BEST_MARK}") and len(legend(loss)) == 5
    for svg in plots_[1:]:
        assert series(svg) == ["a run's final score", "mean per value"] and len(legend(svg)) == 2
    style, rank, lr = plots_[1:]
    assert x_ticks(style) == ["00", "01"]  # a style id is a name, not the numbers 0 and 1
    assert x_ticks(rank)[0] != "4" and "10" in x_ticks(rank)  # numbers, on a (log) number axis
    assert x_ticks(lr) == ["1e-5", "2e-5", "5e-5", "0.0001"]
    for svg in plots_:  # axes, labels
        texts = {t.get("class"): "".join(t.itertext()) for t in svg.iter(f"{SVG}text")}
        assert texts["x-label"] and texts["y-label"] and texts["chart-title"]
        assert svg.find(f".//{SVG}g[@class='axes']") is not None
    points = [c for g in rank.iter(f"{SVG}g") if g.get("data-label") == "a run's final score" for c in g]
    assert len(points) == 3  # the three scored runs; failed, unfinished and unscored ones are not plotted
    assert "<svg" not in (sweep / "scores.md").read_text()


def test_score_charts_axes(sweep):
    runs = find_runs(sweep)
    charts = {c.x_label: c for c in score_charts(runs)}
    assert set(charts) == {"style", "lora.unet_rank (log scale)", "train.lr (log scale)"}
    style, rank = charts["style"], charts["lora.unet_rank (log scale)"]
    assert style.categories == ["00", "01"] and not style.log_x
    assert rank.categories is None and rank.log_x
    assert sorted(rank.series[0].points) == [(4.0, 0.2), (4.0, 0.3), (32.0, 0.5)]
    assert rank.series[1].points == [(4.0, 0.25), (32.0, 0.5)]  # the mean per value
    # a value that is not a number, or a key a run does not set, makes the axis categorical
    fake_run(sweep, "6", ["style=00", "lora.unet_rank=big", "train.lr=1e-4", "+extra=1"], final=0.1)
    charts = {c.title: c for c in score_charts(find_runs(sweep))}
    assert charts["Final score by lora.unet_rank"].categories == ["4", "32", "64", "big"]
    assert charts["Final score by extra"].categories == ["1", "(unset)"]
    assert score_charts([r for r in runs if r.final is None]) == []


def test_plot_text_is_escaped(sweep):
    xss = "<script>alert(1)</script>"
    fake_run(sweep, "h", ["style=00", "lora.unet_rank=4", f"train.lr={xss}", f"+{xss}=\"q\""], final=0.6)
    finish(sweep / "h", steps=10)
    write_report(sweep)
    page = (sweep / "report.html").read_text()
    assert "<script>" not in page
    plots_ = svgs(page)  # still well-formed XML
    lr = next(s for s in plots_ if title(s) == "Final score by train.lr")
    assert xss in x_ticks(lr)  # the text, as text
    assert any(xss in label for label in series(plots_[0]))
    assert f"Final score by {xss}" in [title(s) for s in plots_]
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_long_loss_logs_are_smoothed_and_thinned(tmp_path):
    points = [(float(s), float(s % 2)) for s in range(1, 2001)]
    thin = smooth(points, 40)
    assert len(thin) <= LOSS_POINTS + 1 and thin[-1][0] == 2000.0 and thin[0] == (1.0, 1.0)
    assert all(abs(y - 0.5) < 0.02 for _, y in thin[5:])  # the moving mean of 0, 1, 0, 1...
    assert smooth(points[:10], 1) == points[:10]
    run = fake_run(tmp_path / "sweep", "0", ["lora.unet_rank=4"], final=0.3)
    finish(run, steps=2000)
    chart = loss_chart(find_runs(tmp_path / "sweep"))
    assert chart.title == "Training loss (moving mean over 40 steps)" and len(chart.series[0].points) <= LOSS_POINTS + 1


@pytest.mark.parametrize("text, points, problem", [
    ("step,lr,loss\n1,0.1,0.5\n2,0.1,0.25\n", [(1.0, 0.5), (2.0, 0.25)], None),
    ("step,lr,loss\n1,0.1,0.5\n2,0.1,nan\n3,0.1,inf\n", [(1.0, 0.5)], None),  # a diverged step: not drawn
    ("step,lr,loss\n1,0.1,0.5\n2,0.1,abc\n", [(1.0, 0.5)], "loss.csv: 1 of 2 rows have no number for step or loss"),
    ("", [], "loss.csv is empty"),
    ("a,b\n1,2\n", [], "loss.csv has no step and loss columns"),
    (b"\xff\xfe", [], "loss.csv cannot be read"),
])
def test_read_loss(tmp_path, text, points, problem):
    path = tmp_path / LOSS
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    got, why = read_loss(path)
    assert got == points
    assert (why is None) if problem is None else why.startswith(problem)


def test_a_damaged_loss_log_is_the_runs_problem_and_the_report_goes_on(sweep):
    (sweep / "0" / LOSS).write_text("not,a,loss\n")
    runs = {r.name: r for r in write_report(sweep)}
    assert runs["0"].problem == "loss.csv has no step and loss columns" and runs["0"].final == 0.3
    assert len(series(svgs((sweep / "report.html").read_text())[0])) == 4


def test_the_loss_log_jdiff_writes_is_read_whole(tmp_path):
    rows = [{c: (s if c == "step" else 0.5) for c in LOSS_COLUMNS} for s in range(1, 6)]
    write_loss_log(tmp_path / LOSS, rows)
    assert read_loss(tmp_path / LOSS) == ([(float(s), 0.5) for s in range(1, 6)], None)


def test_nice_axes():
    start, end, ticks = plots.nice_range(0.14, 0.57)
    assert (start, end) == (0.1, 0.6) and ticks == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    assert plots.nice_range(5, 5)[:2] == (4.4, 5.6)  # one value: room around it
    assert [plots.tick_text(t, 0.1) for t in plots.nice_range(0.14, 0.57)[2]] == ["0.1", "0.2", "0.3", "0.4",
                                                                                   "0.5", "0.6"]
    assert plots.tick_text(0.0, 0.1) == "0" and plots.tick_text(2e-5, 1e-5) == "2e-5"
    assert plots.log_ticks(4, 64) == [1, 2, 5, 10, 20, 50, 100]
    assert plots.log_ticks(1e-12, 1e3) == [1e-12, 1e-10, 1e-8, 1e-6, 1e-4, 1e-2, 1, 1e2]  # thinned


def test_a_chart_without_points_says_so():
    svg = ET.fromstring(plots.svg(plots.Chart("empty", "x", "y", [plots.Series("s", [])])))
    assert series(svg) == [] and "no data" in "".join(svg.itertext())


# -- the page's layout, without a browser ---------------------------------------------------------------------

def test_tables_scroll_in_their_own_boxes_and_thumbnails_have_a_fixed_size(sweep):
    write_report(sweep)
    page = (sweep / "report.html").read_text()
    assert page.count("<table") == page.count("<div class='box") == 3  # runs, summary, references
    assert re.search(r"\.box \{[^}]*overflow: auto", page) and "max-width: 100%" in page
    assert re.search(r"\.thumbs img \{ width: 64px; height: 64px;", page)
    assert "<th>lora.<wbr>unet_rank</th>" in page  # a long key may break at its dots
    header = re.search(r"<thead><tr>(.*?)</tr></thead>", page).group(1)
    assert [m for m in METRICS if f"<th>{m}</th>" in header] == list(METRICS)


def test_metrics_no_run_has_get_no_html_column(sweep):
    for name in ("0", "1", "2"):
        scores = json.loads((sweep / name / SCORES).read_text())
        scores["metrics"] = {"hist": scores["final"]["value"]}
        (sweep / name / SCORES).write_text(json.dumps(scores))
    write_report(sweep)
    header = re.search(r"<thead><tr>(.*?)</tr></thead>", (sweep / "report.html").read_text()).group(1)
    assert "<th>hist</th>" in header and "<th>fid</th>" not in header
    assert "| fid |" in (sweep / "scores.md").read_text()  # the Markdown and CSV keep every column


# -- contact sheets ----------------------------------------------------------------------------------------

SCORES_JSON = {"metrics": {"dinov2": 0.41, "hist": 0.5}, "final": {"value": 0.4321, "partial": True,
                                                                   "missing": ["lpips", "fid"]}}


def test_score_lines():
    assert score_lines(SCORES_JSON) == ["final score 0.4321 (partial: no lpips, fid)", "dinov2 0.4100  hist 0.5000"]
    assert score_lines({"final": {"value": -0.0, "partial": False}, "metrics": {}}) == ["final score 0.0000"]
    assert score_lines(None) == [] and score_lines({"final": {"value": float("nan")}}) == []
    assert score_lines({"final": {"value": True}}) == []


def test_a_contact_sheet_carries_the_score_in_a_band_at_the_top():
    tiles = [("Apple", np.full((32, 32, 3), 255, np.uint8)), ("Lion", np.zeros((32, 32, 3), np.uint8))]
    plain = contact_sheet(tiles, tiles, "style 00")
    scored = contact_sheet(tiles, tiles, "style 00", scores=SCORES_JSON)
    band = scored.shape[0] - plain.shape[0]
    assert band > 20 and scored.shape[1] == plain.shape[1]
    assert tuple(scored[1, 1]) == BAND_COLOUR and tuple(plain[1, 1]) == (255, 255, 255)
    assert (scored[:band] < 100).all(axis=2).sum() > 50  # text drawn in the band
    assert np.array_equal(scored[band:], plain)  # below it, the sheet as before
    narrow = contact_sheet(tiles[:1], tiles[:1], "style 00", scores=SCORES_JSON)  # one tile wide: lines wrap
    assert narrow.shape[0] - contact_sheet(tiles[:1], tiles[:1], "style 00").shape[0] > band


class FakeRun:
    """pipeline.Run with stages that only say they ran."""

    calls: list = []
    SCORES = {"final": {"value": 0.42, "partial": False, "missing": []}, "metrics": {"hist": 0.42}}

    def __init__(self, cfg, run_dir):
        self.cfg, self.dir, self.seconds = cfg, run_dir, {}

    def timed(self, stage, fn):
        return fn()

    def train(self):
        self.calls.append("train")

    def generate(self):
        self.calls.append("generate")

    def score(self):
        self.calls.append("score")
        return self.SCORES

    def write_contact_sheet(self, scores=None):
        self.calls.append(("sheet", scores))


@pytest.mark.parametrize("stages, calls", [
    (["train", "generate", "score"], ["train", "generate", ("sheet", None), "score", ("sheet", FakeRun.SCORES)]),
    (["train", "generate"], ["train", "generate", ("sheet", None)]),
])
def test_the_pipeline_draws_the_sheet_again_once_scored(tmp_path, monkeypatch, stages, calls):
    """Drawn after generate (kept if scoring fails), and again with the final score when the score stage ran."""
    monkeypatch.setattr(pipeline, "Run", FakeRun)
    monkeypatch.setattr(FakeRun, "calls", [])
    cfg = OmegaConf.create({"stages": stages, "prior": {"enabled": False}})
    pipeline._run(cfg, tmp_path / "run", 0.0)
    assert FakeRun.calls == calls
    assert json.loads((tmp_path / "run" / "COMPLETE").read_text())["final_score"] == (0.42 if "score" in stages
                                                                                      else None)


def test_run_write_contact_sheet_with_scores(tmp_path):
    image = np.full((64, 64, 3), 128, np.uint8)
    me = SimpleNamespace(cfg=OmegaConf.create({"data": {"resolution": 64}}), dir=tmp_path,
                         style=SimpleNamespace(objects=["sun"], images_at=lambda res: [image], style_id="00"),
                         generated_images=lambda: [("Apple", image)])
    pipeline.Run.write_contact_sheet(me)
    plain = np.asarray(Image.open(tmp_path / SHEET))
    pipeline.Run.write_contact_sheet(me, SCORES_JSON)
    scored = np.asarray(Image.open(tmp_path / SHEET))
    assert scored.shape[0] > plain.shape[0] and tuple(scored[1, 1]) == BAND_COLOUR


# -- in a browser -------------------------------------------------------------------------------------------

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome", "headless_shell",
            "chrome-headless-shell")
WINDOW = (1400, 900)
PROBE = """<script>
(() => {
  const doc = document.documentElement, box = document.querySelector('.box.runs');
  const rect = e => { const r = e.getBoundingClientRect(); return [r.left, r.right, r.width, r.height]; };
  const probe = {
    scrollWidth: doc.scrollWidth, clientWidth: doc.clientWidth, innerWidth: window.innerWidth,
    box: [box.scrollWidth, box.clientWidth, rect(box)[1]],
    best: [...document.querySelectorAll('tr.best')].map(r => r.dataset.run),
    bestMark: [...document.querySelectorAll('tr.best .best-mark')].map(rect),
    links: [...document.querySelectorAll('td.links a')].map(a => [a.closest('tr').dataset.run, a.textContent, a.href]),
    thumbs: [...document.querySelectorAll('td.thumbs img')].map(i => rect(i).slice(2)),
    plots: [...document.querySelectorAll('svg.plot')].map(s => ({
      title: s.querySelector('title').textContent, series: s.querySelectorAll('g.series').length,
      legend: s.querySelectorAll('g.legend-item').length, rect: rect(s)})),
  };
  const out = document.createElement('pre');
  out.id = 'probe';
  out.textContent = JSON.stringify(probe);
  document.body.appendChild(out);
})();
</script>"""


def find_browser() -> str | None:
    given = os.environ.get("JDIFF_CHROMIUM")
    if given:
        return given
    return next((shutil.which(name) for name in BROWSERS if shutil.which(name)), None)


def chromium(browser: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                           "--no-first-run", "--no-default-browser-check", "--disable-extensions", "--mute-audio",
                           f"--user-data-dir={profile}", f"--window-size={WINDOW[0]},{WINDOW[1]}", *args],
                          capture_output=True, text=True, timeout=60)


def probe(browser: str, sweep: Path, profile: Path) -> dict:
    """The report's DOM as Chromium laid it out in the window: a copy of the page beside it (so relative links
    resolve the same) with a script that writes what it measured into the page, read back with --dump-dom."""
    page = (sweep / "report.html").read_text()
    probed = sweep / "probe.html"
    probed.write_text(page.replace("</body>", PROBE + "</body>"))
    proc = chromium(browser, profile, "--dump-dom", probed.as_uri())
    probed.unlink()
    found = re.search(r'<pre id="probe">(.*?)</pre>', proc.stdout, re.S)
    assert found, f"no probe in the dumped page (exit {proc.returncode}): {proc.stderr[-2000:]}"
    return json.loads(html.unescape(found.group(1)))


def wide_sweep(tmp_path: Path) -> Path:
    """Many swept keys with long values: a table wider than the window, whatever is done to it."""
    refs, sweep = styles(tmp_path / "wide"), tmp_path / "wide" / "sweep"
    for i in range(3):
        keys = [f"style=0{i % 2}"] + [f"+option_number_{k}=value_that_is_rather_long_{i}_{k}" for k in range(12)]
        finish(fake_run(sweep, str(i), keys, final=0.1 * (i + 1), refs=refs, images=8), steps=30, sheet=True)
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    return sweep


def test_the_report_in_headless_chromium_fits_a_1400px_window(sweep, tmp_path):
    browser = find_browser()
    if browser is None:
        pytest.skip(f"no Chromium found (looked for {', '.join(BROWSERS)} on PATH and $JDIFF_CHROMIUM); "
                    f"install one: apt-get install -y --no-install-recommends chromium")
    write_report(sweep)
    profile = tmp_path / "profile"

    shot = tmp_path / "shot.png"
    proc = chromium(browser, profile, "--hide-scrollbars", f"--screenshot={shot}", (sweep / "report.html").as_uri())
    assert shot.is_file(), proc.stderr[-2000:]
    with Image.open(shot) as im:
        assert im.size == WINDOW
        assert len(set(im.convert("RGB").resize((50, 50)).getdata())) > 10  # a page was drawn, not a blank

    dom = probe(browser, sweep, profile)
    width = dom["clientWidth"]
    assert dom["innerWidth"] == WINDOW[0] and width >= WINDOW[0] - 20  # less a scrollbar, if drawn
    assert dom["scrollWidth"] <= width  # no horizontal scrolling of the page
    assert dom["box"][0] <= dom["box"][1]  # a sweep like this one fits without even scrolling its table
    assert dom["best"] == ["1"] and len(dom["bestMark"]) == 1
    left, right, w, h = dom["bestMark"][0]
    assert w > 0 and h > 0 and 0 <= left and right <= width  # the marker is drawn, inside the window
    assert {(run, label) for run, label, _ in dom["links"]} >= {("1", "folder"), ("1", "sheet"), ("1", "adapter"),
                                                               ("1", "log"), ("3", "adapter"), ("4", "log")}
    for run, label, href in dom["links"]:  # as the browser resolved them: files beside the report
        path = Path(unquote(urlparse(href).path))
        assert path.is_relative_to(sweep / run) and path.exists(), (run, label, href)
    assert dom["thumbs"] and all(size == [64, 64] for size in dom["thumbs"])  # fixed, not squeezed
    assert [(p["title"], p["series"], p["legend"]) for p in dom["plots"]] == [
        ("Training loss", 5, 5), ("Final score by style", 2, 2), ("Final score by lora.unet_rank", 2, 2),
        ("Final score by train.lr", 2, 2)]
    assert all(p["rect"][2] > 300 and p["rect"][1] <= width for p in dom["plots"])

    wide_dir = wide_sweep(tmp_path)
    write_report(wide_dir)
    wide = probe(browser, wide_dir, profile)
    assert wide["box"][0] > wide["box"][1]  # the table scrolls inside its box...
    assert wide["scrollWidth"] <= wide["clientWidth"] and wide["box"][2] <= wide["clientWidth"]  # ...not the page
    assert wide["best"] == ["2"] and all(size == [64, 64] for size in wide["thumbs"])
