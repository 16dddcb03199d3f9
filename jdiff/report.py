"""``python -m jdiff.report <sweep_dir>``: one table of every run of a sweep, in CSV, Markdown and HTML.

Writes into the sweep folder:

    scores.csv    one row per run: its overrides, status, final score, every metric, duration, error, problem
    scores.md     the same table and the per-setting summary, for a terminal or a notebook, with the best run
                  marked and links to each run's files
    report.html   the same, self-contained: thumbnails of each run's images and of the style references
                  and the plots (inline SVG, jdiff.plots) are embedded, so the file can be mailed or archived
                  alone. It fits a 1366-1440 px window: each table scrolls inside its own box, never the page,
                  and thumbnails keep a fixed size. The best run (highest final score among complete runs)
                  has the row class "best" and a visible marker; each run links to its folder and to those of
                  its contact sheet, adapter and log that exist, by URLs relative to the sweep folder (so it
                  can be moved with its report). The plots: the training loss of every run with a loss.csv,
                  and for each key that varies across the runs, the final score against its value (a numeric
                  axis when every value is a number, log-scaled when they span 10 times or more, otherwise a
                  categorical one) with the mean per value.

A run is a sub-folder with Hydra's ``.hydra/`` record, read through :mod:`jdiff.rundir`. Its status is

    complete     COMPLETE written (and, when it records a final score, a usable scores.json)
    failed       a FAILED marker: JSON ``{"error": ...}``, plain text, or empty
    broken       what the run left cannot be used: an empty or truncated COMPLETE, a scores.json that is not
                 JSON, not an object, or has a metric or final score that is not a finite number (a NaN
                 score is never shown as one), a folder or marker that cannot be read
    unfinished   no marker: still running, or killed

Runs are sorted complete (by final score, best first), failed, broken, unfinished; none is ever dropped, so the
report is right for a sweep in progress or one that crashed, and one damaged run never stops it. The
``problem`` column says what is wrong with a run's files: the above, and damage that leaves the outcome
readable (a corrupt ``config.yaml`` or ``.hydra/overrides.yaml``, an image that cannot be read); such a run
keeps its status, and one whose overrides cannot be read is left out of the per-setting summary, which
gives, for every key that takes more than one value in the sweep, the mean final score of the complete runs
with each value.

What each output escapes, and why: values come from the user (override values, run names, error messages)
and are text, never markup or code.

    report.html   every value is HTML-escaped (& < > and quotes), in the plots' SVG text too: a browser would
                  otherwise run it. Link URLs are percent-encoded: a run named "a:b" or "#1" stays a path.
    scores.md     & < > become HTML entities: Markdown renderers (GitHub, notebooks) pass raw HTML through.
                  | becomes \\| and \\ becomes \\\\ so that a value stays in its table cell, and line breaks
                  become spaces. Printed in a terminal, the entities show as they are.
    scores.csv    data for programs: values are written exactly (the csv module quotes them), except that a
                  cell starting with = + - @ tab or carriage return gets a leading ' so that a spreadsheet
                  shows it as text instead of running it as a formula. A plain number (every number jdiff
                  writes, and an override such as lr=-1e-4) never gets one.
"""

from __future__ import annotations

import argparse
import base64
import csv
import errno
import html
import io
import math
import os
import re
import sys
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Optional
from urllib.parse import quote

from jdiff import plots, rundir
from jdiff.files import write_text
from jdiff.rundir import (COMPLETE, CONFIG, FAILED, HYDRA, IMAGES, LOG, LORA, LOSS, SAMPLE_STEP, SAMPLES, SCORES,
                          SHEET, finite_number, read_config, read_json, read_overrides)
from jdiff.scoring.final import METRICS

STATUS_ORDER = {"complete": 0, "failed": 1, "broken": 2, "unfinished": 3}
REPORT_FILES = ("scores.csv", "scores.md", "report.html")
THUMB_SIZE = 64  # pixels, the longer side; shown at this size, four to a row
THUMBS_PER_RUN = 8
SAMPLE_STEPS_PER_RUN = 8  # train.sample_every's steps shown per run, spread over the training
# What a run's "files" links point to, when the file is there: (label, name in the run folder).
LINKS = (("sheet", SHEET), ("adapter", LORA), ("log", LOG))
LOSS_POINTS = 300  # the most points of one loss curve that go into the report
BEST_MARK = "\u2605 best"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


class ReportError(RuntimeError):
    """The report cannot be written; the message names the folder and what to do."""


@dataclass
class RunRecord:
    name: str
    path: Path
    status: str
    overrides: dict[str, str]
    final: Optional[float] = None
    partial: bool = False
    metrics: dict[str, float] = field(default_factory=dict)
    seconds: Optional[float] = None
    error: str = ""  # the run's own failure message (FAILED)
    style: Optional[str] = None
    references: Optional[Path] = None  # the style's reference image folder, from the run's config
    problems: list[str] = field(default_factory=list)  # what is wrong with the run's files
    settings_known: bool = True  # False when .hydra/overrides.yaml cannot be read
    thumbs: list[tuple[str, str]] = field(default_factory=list)  # (image name, data URI) of its first images
    links: dict[str, str] = field(default_factory=dict)  # label -> URL relative to the sweep folder (see run_links)
    loss: list[tuple[float, float]] = field(default_factory=list)  # (step, loss) from loss.csv
    samples: list[tuple[str, str]] = field(default_factory=list)  # ("step k: name", data URI): train.sample_every's

    @property
    def problem(self) -> str:
        return "; ".join(self.problems)


def _number(value) -> Optional[float]:
    return float(value) if finite_number(value) else None


def _cannot_read(err: OSError, run_dir: Path) -> str:
    path = Path(err.filename) if err.filename else run_dir
    what = "the run folder" if path == run_dir else (path.relative_to(run_dir).as_posix()
                                                      if path.is_relative_to(run_dir) else str(path))
    text = f"{what} cannot be read ({err.strerror or err})"
    if isinstance(err, PermissionError):
        text += f": give read permission (chmod -R u+rX {run_dir})"
    return text


def _read_scores(record: RunRecord, complete: dict) -> Optional[str]:
    """Fill in the final score and metrics of a complete run from scores.json; returns what is wrong, if anything."""
    scores, problem = read_json(record.path / SCORES)
    if problem:
        return problem
    if scores is None:  # no score stage: COMPLETE records no final score either
        recorded = complete.get("final_score")
        if recorded is not None:
            return f"{SCORES} is missing, though {COMPLETE} records a final score ({recorded!r})"
        return None
    metrics = scores.get("metrics", {})
    if not isinstance(metrics, dict):
        return f'{SCORES}: "metrics" is {type(metrics).__name__}, not an object'
    bad = [f"{m}={metrics[m]!r}" for m in METRICS if metrics.get(m) is not None and not finite_number(metrics[m])]
    if bad:
        return f"{SCORES}: metric {', '.join(bad)} is not a finite number"
    final = scores.get("final")
    if not isinstance(final, dict):
        return f'{SCORES}: "final" is {"missing" if final is None else type(final).__name__}, not an object'
    value = final.get("value")
    if not finite_number(value):
        return f"{SCORES}: the final score is {'missing' if value is None else repr(value)}, not a finite number"
    record.final, record.partial = float(value), final.get("partial") is True
    record.metrics = {m: float(metrics[m]) for m in METRICS if metrics.get(m) is not None}
    return None


def read_run(run_dir: Path) -> RunRecord:
    """What a run folder says about the run, whatever state it was left in; never raises for a damaged run."""
    run_dir = Path(run_dir)
    record = RunRecord(name=run_dir.name, path=run_dir, status="unfinished", overrides={})
    try:
        if not os.access(run_dir, os.R_OK | os.X_OK):
            raise PermissionError(errno.EACCES, "Permission denied", str(run_dir))
        state = rundir.inspect(run_dir)
    except OSError as err:  # the folder, or a marker in it, cannot be read
        record.status, record.settings_known = "broken", False
        record.problems.append(_cannot_read(err, run_dir))
        return record
    if state.status == "broken":
        record.status = "broken"
        record.problems.append(state.problem)
    elif state.status == "complete":
        record.status = "complete"
        record.seconds = _number(state.complete.get("seconds"))
        problem = _read_scores(record, state.complete)
        if problem:  # a complete run without a usable score is not ranked among the complete ones
            record.status = "broken"
            record.problems.append(problem)
    elif state.status == "failed":
        record.status = "failed"
        error = state.failure.get("error")
        record.error = "" if error is None else str(error)
        record.seconds = _number(state.failure.get("seconds"))

    overrides, problem = _read(read_overrides, run_dir, {})
    record.overrides = overrides
    if problem:
        record.problems.append(problem)
        record.settings_known = False
    cfg, problem = _read(read_config, run_dir, None)
    if problem:
        record.problems.append(problem)
    if cfg is not None:
        record.style = str(cfg["style"]) if cfg.get("style") is not None else None
        data = cfg.get("data")
        root = data.get("root") if isinstance(data, dict) else None
        if root and record.style:
            record.references = Path(str(root)) / record.style / "images"
    record.thumbs, problems = _thumbs(run_dir / IMAGES, THUMBS_PER_RUN)
    record.problems += problems
    record.samples, problems = sample_strip(run_dir / SAMPLES, SAMPLE_STEPS_PER_RUN)
    record.problems += problems
    record.links = run_links(run_dir)
    record.loss, problem = read_loss(run_dir / LOSS)
    if problem:
        record.problems.append(problem)
    return record


def run_links(run_dir: Path) -> dict[str, str]:
    """The run's folder, and those of its contact sheet, adapter and log that exist, as URLs relative to the
    sweep folder (where the report is), so that the sweep folder can be moved or copied with its report. The
    run's name is percent-encoded whole: a name such as "a:b" or "#1" stays a path."""
    base = quote(run_dir.name, safe="")
    links = {"folder": base + "/"}
    for label, name in LINKS:
        try:
            there = (run_dir / name).is_file()
        except OSError:
            there = False
        if there:
            links[label] = f"{base}/{quote(name)}"
    return links


def read_loss(path: Path) -> tuple[list[tuple[float, float]], Optional[str]]:
    """(step, loss) of each row of a run's loss.csv with a finite loss (a diverged step has none), and what is
    wrong with the file; ([], None) when there is none."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return [], None
    except (OSError, UnicodeDecodeError) as err:
        return [], f"{path.name} cannot be read ({getattr(err, 'strerror', None) or err})"
    try:
        reader = csv.DictReader(io.StringIO(text))
        columns = reader.fieldnames or []
        if "step" not in columns or "loss" not in columns:
            return [], f"{path.name} has no step and loss columns" if text.strip() else f"{path.name} is empty"
        rows = list(reader)
    except csv.Error as err:
        return [], f"{path.name} is not CSV ({err})"
    points, bad = [], 0
    for row in rows:
        step, loss = _float(row.get("step")), _float(row.get("loss"))
        if step is None or loss is None:
            bad += 1
        elif math.isfinite(step) and math.isfinite(loss):  # NaN or inf: a diverged step, not drawn
            points.append((step, loss))
    if bad:
        return points, f"{path.name}: {bad} of {len(rows)} rows have no number for step or loss"
    return points, None


def _float(text) -> Optional[float]:
    try:
        return float(str(text).strip())
    except (TypeError, ValueError):
        return None


def _read(reader, run_dir: Path, empty):
    """``reader(run_dir)`` (one of rundir's, returning (data, problem)), with a folder it cannot enter a problem."""
    try:
        return reader(run_dir)
    except OSError as err:
        return empty, _cannot_read(err, run_dir)


def _broken(run_dir: Path, err: Exception) -> RunRecord:
    return RunRecord(name=run_dir.name, path=run_dir, status="broken", overrides={}, settings_known=False,
                     problems=[f"the run cannot be read ({type(err).__name__}: {err})"])


def _is_run(path: Path) -> bool:
    """A sub-folder with a .hydra/ record, or one that cannot be looked into (it is listed, as broken)."""
    try:
        if not path.is_dir():
            return False
    except OSError:
        return False
    try:
        return (path / HYDRA).is_dir()
    except OSError:
        return True


def _sort_key(r: RunRecord):
    return (STATUS_ORDER[r.status], r.final is None, -(r.final or 0.0),
            int(r.name) if r.name.isdecimal() else 0, r.name)


def find_runs(sweep_dir: Path) -> list[RunRecord]:
    """Every run of the sweep, sorted; raises ReportError when the sweep folder itself cannot be read."""
    sweep_dir = Path(sweep_dir)
    try:
        entries = sorted(sweep_dir.iterdir())
    except OSError as err:
        raise ReportError(f"cannot read the sweep folder {sweep_dir} ({err.strerror or err}): "
                          f"give read permission (chmod u+rx {sweep_dir}) and run again") from err
    runs = []
    for path in entries:
        if _is_run(path):
            try:
                runs.append(read_run(path))
            except Exception as err:  # damage nobody foresaw: the run is listed as broken, the others still reported
                runs.append(_broken(path, err))
    return sorted(runs, key=_sort_key)


def swept_keys(runs: list[RunRecord]) -> list[str]:
    """Override keys in the order they were given, first those whose value differs between runs (whose overrides
    could be read)."""
    keys = list(dict.fromkeys(k for r in runs for k in r.overrides))
    varying = [k for k in keys if len({r.overrides.get(k) for r in runs if r.settings_known}) > 1]
    return varying + [k for k in keys if k not in varying]


def best_run(runs: list[RunRecord]) -> Optional[RunRecord]:
    """The complete run with the highest final score (of several equal, the first in ``runs``), or None."""
    scored = [r for r in runs if r.status == "complete" and r.final is not None]
    return max(scored, key=lambda r: r.final) if scored else None


def varying_keys(runs: list[RunRecord]) -> list[str]:
    """The override keys that take more than one value among the runs whose overrides could be read."""
    known = [r for r in runs if r.settings_known]
    return [k for k in swept_keys(known) if len({r.overrides.get(k) for r in known}) > 1]


def setting_summary(runs: list[RunRecord]) -> list[dict]:
    """Per value of each key that varies: runs, complete runs, mean and best final score. Runs whose overrides
    cannot be read are left out: what they were run with is not known."""
    runs = [r for r in runs if r.settings_known]
    rows = []
    for key in varying_keys(runs):
        for value in dict.fromkeys(r.overrides.get(key) for r in runs):
            group = [r for r in runs if r.overrides.get(key) == value]
            finals = [r.final for r in group if r.final is not None]
            rows.append({"key": key, "value": value if value is not None else "(unset)", "runs": len(group),
                         "complete": sum(r.status == "complete" for r in group),
                         "mean_final": sum(finals) / len(finals) if finals else None,
                         "best_final": max(finals) if finals else None})
    return rows


# -- formatting ---------------------------------------------------------------------------------------------

def _num(value: Optional[float], digits: int = 4) -> str:
    return "" if value is None else f"{value + 0.0:.{digits}f}"  # + 0.0: no "-0.0000"


def _final_text(r: RunRecord) -> str:
    return _num(r.final) + (" (partial)" if r.partial and r.final is not None else "")


def table_rows(runs: list[RunRecord]) -> tuple[list[str], list[list[str]]]:
    keys = swept_keys(runs)
    header = ["run", "status", *keys, "final", "partial", *METRICS, "seconds", "error", "problem"]
    rows = [[r.name, r.status, *(r.overrides.get(k, "") for k in keys), _num(r.final),
             str(r.partial).lower() if r.final is not None else "", *(_num(r.metrics.get(m)) for m in METRICS),
             _num(r.seconds, 1), r.error, r.problem] for r in runs]
    return header, rows


_PLAIN_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def _csv_cell(text: str) -> str:
    """A spreadsheet runs a cell starting with = + - @ (tab, CR) as a formula: such text gets a leading '."""
    if text[:1] in ("=", "+", "-", "@", "\t", "\r") and not _PLAIN_NUMBER.fullmatch(text):
        return "'" + text
    return text


def csv_text(runs: list[RunRecord]) -> str:
    header, rows = table_rows(runs)
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow([_csv_cell(c) for c in header])
    writer.writerows([_csv_cell(c) for c in row] for row in rows)
    return out.getvalue()


def write_csv(runs: list[RunRecord], path: Path) -> None:
    write_text(path, csv_text(runs))


def _md_cell(text: str) -> str:
    # HTML first (Markdown passes raw HTML through), then the backslash (so that a value's own "\|" cannot
    # become an escaped backslash followed by a cell border), then the pipe.
    text = html.escape(str(text), quote=False).replace("\\", "\\\\").replace("|", "\\|")
    return " ".join(text.splitlines())


def _md_row(cells: list) -> str:
    return "| " + " | ".join(_md_cell(c) for c in cells) + " |"


def status_counts(runs: list[RunRecord]) -> dict[str, int]:
    """How many runs have each status, in STATUS_ORDER."""
    return {s: sum(r.status == s for r in runs) for s in STATUS_ORDER}


def _counts(runs: list[RunRecord]) -> str:
    counts = status_counts(runs)
    return ", ".join(f"{n} {s}" for s, n in counts.items() if n or s != "broken")


def _best_text(best: Optional[RunRecord]) -> str:
    if best is None:
        return "No complete run has a final score yet."
    return f"Best run: {best.name}, final score {_final_text(best)}."


def _md_links(r: RunRecord) -> str:
    # The URLs are percent-encoded (run_links): nothing in them is Markdown or HTML syntax.
    return " ".join(f"[{label}]({url})" for label, url in r.links.items())


def markdown(runs: list[RunRecord], sweep_dir: Path) -> str:
    keys = swept_keys(runs)
    best = best_run(runs)
    header = ["#", "run", "status", *keys, "final", "best", *METRICS, "seconds", "error", "problem", "files"]
    lines = [f"# Sweep {_md_cell(sweep_dir)}", "", f"{len(runs)} runs: {_counts(runs)}. {_md_cell(_best_text(best))}",
             "", _md_row(header), "|" + " --- |" * len(header)]
    for i, r in enumerate(runs, 1):
        cells = [i, r.name, r.status, *(r.overrides.get(k, "") for k in keys), _final_text(r),
                 BEST_MARK if r is best else "", *(_num(r.metrics.get(m)) for m in METRICS), _num(r.seconds, 1),
                 r.error, r.problem]
        lines.append(_md_row(cells) + f" {_md_links(r)} |")
    summary = setting_summary(runs)
    if summary:
        lines += ["", "## Mean final score per setting", "",
                  _md_row(["key", "value", "runs", "complete", "mean final", "best final"]), "|" + " --- |" * 6]
        lines += [_md_row([s["key"], s["value"], s["runs"], s["complete"], _num(s["mean_final"]),
                           _num(s["best_final"])]) for s in summary]
    return "\n".join(lines) + "\n"


def _thumbnail(path: Path, size: int = THUMB_SIZE) -> tuple[Optional[str], str]:
    """(a small JPEG of an image as a data URI, "") or (None, why it cannot be read)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            im.thumbnail((size, size))
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=80)
    except Exception as err:  # Pillow raises OSError, ValueError, SyntaxError, DecompressionBombError...
        return None, f"{path.parent.name}/{path.name} cannot be read as an image ({type(err).__name__}: {err})"
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii"), ""


def thumbnail(path: Path, size: int = THUMB_SIZE) -> Optional[str]:
    """A small JPEG of an image as a data URI (None when the file cannot be read)."""
    return _thumbnail(path, size)[0]


def _images(folder: Optional[Path], limit: int) -> tuple[list[Path], str]:
    """The first ``limit`` images in ``folder``, and why the folder cannot be read ("" when it can)."""
    try:
        if folder is None or not folder.is_dir():
            return [], ""
        return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:limit], ""
    except OSError as err:
        return [], f"{folder.name}/ cannot be read ({err.strerror or err})"


def _thumbs(folder: Optional[Path], limit: int) -> tuple[list[tuple[str, str]], list[str]]:
    """(image name, data URI) of the first images in ``folder`` that can be read, and what is wrong with the rest."""
    paths, problem = _images(folder, limit)
    thumbs, problems = [], [problem] if problem else []
    for p in paths:
        uri, problem = _thumbnail(p)
        if uri is None:
            problems.append(problem)
        else:
            thumbs.append((p.stem, uri))
    return thumbs, problems


def sample_strip(folder: Path, limit: int) -> tuple[list[tuple[str, str]], list[str]]:
    """The first image of each of up to ``limit`` sample steps (``samples/step_<k>/``, spread over the run, the
    last one always among them) as ("step k: name", data URI), and what cannot be read."""
    try:
        steps = sorted((int(p.name[5:]), p) for p in folder.iterdir() if p.is_dir() and SAMPLE_STEP.match(p.name))
    except OSError as err:
        return [], ([] if isinstance(err, FileNotFoundError) else [f"{folder.name}/ cannot be read ({err.strerror or err})"])
    if len(steps) > limit:
        steps = [steps[round(i * (len(steps) - 1) / (limit - 1))] for i in range(limit)]
    strip, problems = [], []
    for step, path in steps:
        thumbs, found = _thumbs(path, 1)
        problems += found
        strip += [(f"step {step}: {name}", uri) for name, uri in thumbs]
    return strip, problems


def _thumbs_html(thumbs: list[tuple[str, str]]) -> str:
    esc = html.escape
    return "".join(f'<img src="{uri}" title="{esc(name)}" alt="{esc(name)}">' for name, uri in thumbs)


# -- plots ----------------------------------------------------------------------------------------------------

_ID_LIKE = re.compile(r"[+-]?0\d")  # 00, 01, 007: names (style ids), not amounts


def _is_number(value: Optional[str]) -> bool:
    """An override value that is an amount: a plain number, not one written with a leading zero."""
    if value is None:
        return False
    value = value.strip()
    return bool(_PLAIN_NUMBER.fullmatch(value)) and not _ID_LIKE.match(value) and math.isfinite(float(value))


def score_charts(runs: list[RunRecord]) -> list[plots.Chart]:
    """For each key that varies across the runs: the final score of every scored complete run against the key's
    value, and the mean per value. All numbers: a numeric axis (log when they are positive and span 10 times or
    more: learning rates, ranks); otherwise (names such as style=00 among them) a categorical one with every
    value, "(unset)" for a run that did not set it. [] when no run has a final score."""
    known = [r for r in runs if r.settings_known]
    scored = [r for r in known if r.status == "complete" and r.final is not None]
    if not scored:
        return []
    charts = []
    for key in varying_keys(runs):
        values = [r.overrides.get(key) for r in known]
        numeric = all(_is_number(v) for v in values)
        if numeric:
            position = {v: float(v) for v in values}
            categories = None
            log = min(position.values()) > 0 and max(position.values()) >= 10 * min(position.values())
        else:
            names = sorted({v for v in values if v is not None}, key=lambda v: (0, float(v), v) if _is_number(v)
                           else (1, 0.0, v))  # numbers first, in order: 4 before 32
            categories = names + (["(unset)"] if None in values else [])
            position = {v: float(categories.index(v if v is not None else "(unset)")) for v in values}
            log = False
        points = sorted(((position[r.overrides.get(key)], r.final, r.name) for r in scored), key=lambda p: p[0])
        by_x: dict[float, list[float]] = {}
        for x, y, _ in points:
            by_x.setdefault(x, []).append(y)
        means = [(x, sum(ys) / len(ys)) for x, ys in sorted(by_x.items())]
        charts.append(plots.Chart(
            title=f"Final score by {key}", x_label=key + (" (log scale)" if log else ""), y_label="final score",
            categories=categories, log_x=log,
            series=[plots.Series("a run's final score", [(x, y) for x, y, _ in points], kind="points",
                                 titles=[f"run {name}: {key}={_value_text(categories, x)}, final {y:.4f}"
                                         for x, y, name in points]),
                    plots.Series("mean per value", means, kind="line+points",
                                 titles=[f"{key}={_value_text(categories, x)}: mean {y:.4f} of {len(by_x[x])} runs"
                                         for x, y in means])]))
    return charts


def _value_text(categories: Optional[list[str]], x: float) -> str:
    return categories[int(x)] if categories is not None else f"{x:g}"


def smooth(points: list[tuple[float, float]], window: int, limit: int = LOSS_POINTS) -> list[tuple[float, float]]:
    """The moving mean of the last ``window`` losses at each step, then at most ``limit`` points of it, evenly
    spaced (the last one always kept)."""
    if window > 1:
        total, out = 0.0, []
        for i, (x, y) in enumerate(points):
            total += y - (points[i - window][1] if i >= window else 0.0)
            out.append((x, total / min(i + 1, window)))
        points = out
    if len(points) > limit:
        every = math.ceil(len(points) / limit)
        points = points[::every] + ([points[-1]] if (len(points) - 1) % every else [])
    return points


def loss_chart(runs: list[RunRecord]) -> Optional[plots.Chart]:
    """The training loss of every run that has a loss.csv, one line each, the best run's drawn thicker. Logs of
    200 steps or more are drawn as a moving mean over a 50th of the longest (the title says over how many
    steps). None when no run has one."""
    with_loss = [r for r in runs if r.loss]
    if not with_loss:
        return None
    best, keys = best_run(runs), varying_keys(runs)
    longest = max(len(r.loss) for r in with_loss)
    window = longest // 50 if longest >= 200 else 1
    series = []
    for r in with_loss:
        settings = ", ".join(f"{k}={r.overrides.get(k, '(unset)')}" for k in keys if r.settings_known)
        label = f"run {r.name}" + (f" {BEST_MARK}" if r is best else "") + (f": {settings}" if settings else "")
        series.append(plots.Series(label, smooth(r.loss, window), kind="line", highlight=r is best))
    title = "Training loss" + (f" (moving mean over {window} steps)" if window > 1 else "")
    return plots.Chart(title=title, x_label="step", y_label="loss", series=series)


def charts(runs: list[RunRecord]) -> list[plots.Chart]:
    loss = loss_chart(runs)
    return ([loss] if loss else []) + score_charts(runs)


# -- HTML -----------------------------------------------------------------------------------------------------

CSS = f"""
* {{ box-sizing: border-box; }}
body {{ font-family: system-ui, sans-serif; margin: 1em; color: #222; }}
h1 {{ font-size: 1.5em; overflow-wrap: anywhere; }}
.box {{ max-width: 100%; overflow: auto; margin-bottom: 2em; border: 1px solid #ddd; }}
.box.runs {{ max-height: 85vh; }}
table {{ border-collapse: collapse; font-size: 0.85em; }}
th, td {{ border: 1px solid #ccc; padding: 3px 5px; text-align: left; vertical-align: top; }}
th {{ background: #f3f3f3; position: sticky; top: 0; z-index: 1; }}
td.key, .error, .problem {{ overflow-wrap: anywhere; }}
td.status {{ white-space: nowrap; }}
td.num {{ text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }}
tr.failed {{ background: #fdecea; }} tr.broken {{ background: #f3e5f5; }} tr.unfinished {{ background: #fff8e1; }}
tr.best {{ background: #e8f5e9; outline: 2px solid #2e7d32; outline-offset: -2px; }}
.best-mark {{ display: inline-block; margin-left: 4px; padding: 0 4px; border-radius: 3px; background: #2e7d32;
              color: #fff; font-weight: bold; white-space: nowrap; }}
td.final {{ min-width: 5.6em; }}
td.final .best-mark {{ display: table; margin: 3px 0 0 auto; }}
td.key {{ max-width: 14em; }}
td.thumbs {{ width: {4 * (THUMB_SIZE + 4) + 12}px; }}
.thumbs .grid {{ display: grid; grid-template-columns: repeat(4, {THUMB_SIZE + 2}px); gap: 2px; }}
.thumbs img {{ width: {THUMB_SIZE}px; height: {THUMB_SIZE}px; object-fit: contain; border: 1px solid #ddd;
               background: #fafafa; }}
td.thumbs.refs {{ width: auto; }}
.thumbs.refs .grid {{ grid-template-columns: repeat(10, {THUMB_SIZE + 2}px); }}
.thumbs .grid.samples {{ margin-top: 4px; padding-top: 4px; border-top: 1px dashed #bbb; }}
td.links a {{ display: block; white-space: nowrap; }}
.error, .problem {{ color: #b71c1c; min-width: 12em; max-width: 22em; white-space: pre-wrap; }}
td.problem:empty {{ min-width: 0; }}
.plots {{ display: flex; flex-wrap: wrap; gap: 1em; margin-bottom: 2em; }}
.plots figure {{ margin: 0; flex: 1 1 520px; max-width: 660px; min-width: 0; }}
svg.plot {{ width: 100%; height: auto; border: 1px solid #eee; }}
"""


def _links_html(r: RunRecord) -> str:
    # the URLs are percent-encoded (run_links); escaped all the same
    return "".join(f'<a href="{html.escape(url)}">{html.escape(label)}</a>' for label, url in r.links.items())


def _breakable(text: str) -> str:
    """Escaped, with a line-break opportunity after each dot: lora.unet_rank as a header takes less width."""
    return html.escape(text).replace(".", ".<wbr>")


def _anchor(r: RunRecord) -> str:
    return "run-" + quote(r.name, safe="")


def report_html(runs: list[RunRecord], sweep_dir: Path) -> str:
    keys = swept_keys(runs)
    best = best_run(runs)
    esc = html.escape
    metrics = [m for m in METRICS if any(m in r.metrics for r in runs)]  # a metric no run has: no column
    head = ["#", "run", "status", *keys, "final", *metrics, "seconds", "problem", "files", "images"]
    best_line = esc(_best_text(best))
    if best is not None:
        best_line = (f"Best run: <a href='#{esc(_anchor(best))}'>{esc(best.name)}</a>, final score "
                     f"{esc(_final_text(best))}. <span class='best-mark'>{BEST_MARK}</span> marks its row.")
    out = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>Sweep {esc(str(sweep_dir))}</title>",
           "<meta name='viewport' content='width=device-width, initial-scale=1'>",
           f"<style>{CSS}</style></head><body>", f"<h1>Sweep {esc(str(sweep_dir))}</h1>",
           f"<p>{len(runs)} runs: {esc(_counts(runs))}. Written {datetime.now():%Y-%m-%d %H:%M:%S}.</p>",
           f"<p class='best-line'>{best_line}</p>",
           "<h2>Runs, best first</h2><div class='box runs'><table class='runs'><thead><tr>"
           + "".join(f"<th>{_breakable(h)}</th>" for h in head) + "</tr></thead><tbody>"]
    for i, r in enumerate(runs, 1):
        cells = [f"<td>{i}</td>", f"<td>{esc(r.name)}</td>", f"<td class='status'>{esc(r.status)}</td>"]
        cells += [f"<td class='key'>{esc(r.overrides.get(k, ''))}</td>" for k in keys]
        mark = f" <span class='best-mark'>{BEST_MARK}</span>" if r is best else ""
        cells.append(f"<td class='num final'><b>{esc(_final_text(r))}</b>{mark}</td>")
        cells += [f"<td class='num'>{_num(r.metrics.get(m))}</td>" for m in metrics]
        cells.append(f"<td class='num'>{_num(r.seconds, 1)}</td>")
        cells.append(f"<td class='problem'>{esc(r.problem)}</td>")
        cells.append(f"<td class='links'>{_links_html(r)}</td>")
        body = f"<div class='grid'>{_thumbs_html(r.thumbs)}</div>" if r.thumbs else ""
        if r.samples:  # the adapter during training: train.sample_every's images, first prompt, step by step
            body += f"<div class='grid samples' title='samples during training'>{_thumbs_html(r.samples)}</div>"
        if r.error:
            body += f"<div class='error'>{esc(r.error)}</div>"
        cells.append(f"<td class='thumbs'>{body}</td>")
        classes = r.status + (" best" if r is best else "")
        out.append(f"<tr id='{esc(_anchor(r))}' class='{esc(classes)}' data-run='{esc(r.name)}'>"
                   + "".join(cells) + "</tr>")
    out.append("</tbody></table></div>")
    figures = charts(runs)
    if figures:
        out.append("<h2>Plots</h2><div class='plots'>")
        out += [f"<figure>{plots.svg(c)}</figure>" for c in figures]
        out.append("</div>")
    summary = setting_summary(runs)
    if summary:
        out.append("<h2>Mean final score per setting</h2><div class='box'><table><tr><th>key</th><th>value</th>"
                   "<th>runs</th><th>complete</th><th>mean final</th><th>best final</th></tr>")
        for s in summary:
            out.append(f"<tr><td>{esc(s['key'])}</td><td>{esc(str(s['value']))}</td><td class='num'>{s['runs']}</td>"
                       f"<td class='num'>{s['complete']}</td><td class='num'>{_num(s['mean_final'])}</td>"
                       f"<td class='num'>{_num(s['best_final'])}</td></tr>")
        out.append("</table></div>")
    styles = {r.style: r.references for r in runs if r.style is not None}
    if styles:
        out.append("<h2>Style references</h2><div class='box'><table>")
        for style, folder in sorted(styles.items()):
            thumbs, _ = _thumbs(folder, 10)  # references that cannot be read are not the sweep's problem
            out.append(f"<tr><td>style {esc(style)}</td><td class='thumbs refs'><div class='grid'>"
                       f"{_thumbs_html(thumbs)}</div></td></tr>")
        out.append("</table></div>")
    out.append("</body></html>")
    return "\n".join(out)


def _check_sweep_dir(sweep_dir: Path) -> None:
    hint = "give a sweep folder such as multirun/<date>/<time>"
    try:
        if sweep_dir.is_dir():
            return
        what = "it is a file" if sweep_dir.exists() else "it does not exist"
    except OSError as err:
        what = f"it cannot be reached: {err.strerror or err}"
    raise ReportError(f"{sweep_dir} is not a folder ({what}): {hint}")


# How the start of each report file reads when jdiff wrote it: a file that does not is never replaced.
REPORT_STARTS = {"scores.csv": "run,status,", "scores.md": "# Sweep ", "report.html": "<!DOCTYPE html><html><head>"}


# Hydra's, Optuna's, the class-image plan's (jdiff.prior_plan) and the report
SWEEP_FILES = ("multirun.yaml", "optimization_results.yaml", "class_images.json", *REPORT_STARTS)


def check_sweep_folder(sweep_dir: Path) -> None:
    """A sweep goes only into a new or empty folder, or one of its own: Hydra's multirun.yaml in it, and beside the
    run folders only a sweep's files (the report's written by jdiff)."""
    sweep_dir = Path(os.path.abspath(sweep_dir))  # multirun/.. is the folder above, made or not
    if not sweep_dir.exists() or (sweep_dir.is_dir() and not any(sweep_dir.iterdir())):
        return
    if not sweep_dir.is_dir():
        raise ReportError(f"the sweep folder {sweep_dir} is a file: choose another sweep.name")
    files = sorted(p.name for p in sweep_dir.iterdir() if not p.is_dir() and p.name not in SWEEP_FILES)
    if files or not (sweep_dir / "multirun.yaml").is_file():
        shown = ", ".join(files[:5]) or ", ".join(sorted(p.name for p in sweep_dir.iterdir())[:5])
        raise ReportError(f"the sweep folder {sweep_dir} holds files that are not a jdiff sweep's ({shown}): "
                          f"choose another sweep.name (a sweep goes into multirun/<sweep.name>/)")
    _check_ours(sweep_dir)


def _check_ours(sweep_dir: Path) -> None:
    """The report goes only into a sweep folder, and replaces only report files jdiff wrote."""
    if any((sweep_dir / name).exists() for name in (COMPLETE, FAILED, CONFIG)):
        raise ReportError(f"{sweep_dir} is one run's folder, not a sweep's, and jdiff adds nothing to a run's folder: "
                          f"give the sweep folder that holds it ({sweep_dir.parent})")
    for name, start in REPORT_STARTS.items():
        path = sweep_dir / name
        if path.exists():
            try:
                ours = path.is_file() and path.read_text(encoding="utf-8", errors="replace")[:len(start)] == start
            except OSError:
                ours = False
            if not ours:
                raise ReportError(f"{path} is not a report jdiff wrote, so it is left as it is: move it away, or "
                                  f"give another sweep folder")


def write_report(sweep_dir: Path) -> list[RunRecord]:
    """Write scores.csv, scores.md and report.html into ``sweep_dir``; returns the runs, sorted.

    Raises ReportError (saying what to do) when the sweep folder cannot be read or written; a damaged run never
    stops the report, it is listed with what is wrong with it. Each file is replaced atomically: one that
    cannot be written is left as it was.
    """
    sweep_dir = Path(sweep_dir)
    _check_sweep_dir(sweep_dir)
    _check_ours(sweep_dir)
    runs = find_runs(sweep_dir)
    texts = dict(zip(REPORT_FILES, (csv_text(runs), markdown(runs, sweep_dir), report_html(runs, sweep_dir))))
    for name, text in texts.items():
        try:
            write_text(sweep_dir / name, text)
        except OSError as err:
            again = f"run python -m jdiff.report {sweep_dir} again"
            if isinstance(err, PermissionError) or err.errno == errno.EROFS:
                fix = (f"make it writable (chmod u+w {sweep_dir}), or copy the sweep to a folder you can write to "
                       f"and run python -m jdiff.report on the copy")
            elif err.errno == errno.EISDIR:
                fix = f"move the folder {sweep_dir / name} out of the way and {again}"
            elif err.errno in (errno.ENOSPC, errno.EDQUOT):
                fix = f"free some disk space and {again}"
            else:
                fix = f"fix that and {again}"
            raise ReportError(f"cannot write the report into {sweep_dir} ({name}: {err.strerror or err}): {fix}") \
                from err
    return runs


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jdiff.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", type=Path, help="a sweep folder (multirun/<date>/<time>)")
    args = parser.parse_args(argv)
    try:
        runs = write_report(args.sweep_dir)
    except ReportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not runs:
        single = (args.sweep_dir / HYDRA).is_dir()
        print(f"warning: {args.sweep_dir} holds no runs (sub-folders with .hydra/)"
              + ("; it looks like the folder of one run, not of a sweep" if single else ""), file=sys.stderr)
    print(markdown(runs, args.sweep_dir))
    print(f"wrote {', '.join(str(args.sweep_dir / n) for n in REPORT_FILES)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
