"""``python -m jdiff.report <sweep_dir>``: one table of every run of a sweep, in CSV, Markdown and HTML.

Writes into the sweep folder:

    scores.csv    one row per run: its overrides, status, final score, every metric, duration, error, problem
    scores.md     the same table and the per-setting summary, for a terminal or a notebook
    report.html   the same, self-contained: thumbnails of each run's images and of the style references
                  are embedded, so the file can be mailed or archived alone

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

    report.html   every value is HTML-escaped (& < > and quotes): a browser would otherwise run it.
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
import os
import re
import sys
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Optional

from jdiff import rundir
from jdiff.files import write_text
from jdiff.rundir import (COMPLETE, CONFIG, FAILED, HYDRA, IMAGES, SCORES, finite_number, read_config, read_json,
                          read_overrides)
from jdiff.scoring.final import METRICS

STATUS_ORDER = {"complete": 0, "failed": 1, "broken": 2, "unfinished": 3}
REPORT_FILES = ("scores.csv", "scores.md", "report.html")
THUMB_SIZE = 72
THUMBS_PER_RUN = 8
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
    return record


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


def setting_summary(runs: list[RunRecord]) -> list[dict]:
    """Per value of each key that varies: runs, complete runs, mean and best final score. Runs whose overrides
    cannot be read are left out: what they were run with is not known."""
    runs = [r for r in runs if r.settings_known]
    rows = []
    for key in [k for k in swept_keys(runs) if len({r.overrides.get(k) for r in runs}) > 1]:
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


def _counts(runs: list[RunRecord]) -> str:
    counts = {s: sum(r.status == s for r in runs) for s in STATUS_ORDER}
    return ", ".join(f"{n} {s}" for s, n in counts.items() if n or s != "broken")


def markdown(runs: list[RunRecord], sweep_dir: Path) -> str:
    keys = swept_keys(runs)
    header = ["#", "run", "status", *keys, "final", *METRICS, "seconds", "error", "problem"]
    lines = [f"# Sweep {_md_cell(sweep_dir)}", "", f"{len(runs)} runs: {_counts(runs)}.", "",
             _md_row(header), "|" + " --- |" * len(header)]
    for i, r in enumerate(runs, 1):
        lines.append(_md_row([i, r.name, r.status, *(r.overrides.get(k, "") for k in keys), _final_text(r),
                              *(_num(r.metrics.get(m)) for m in METRICS), _num(r.seconds, 1), r.error, r.problem]))
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


def _thumbs_html(thumbs: list[tuple[str, str]]) -> str:
    esc = html.escape
    return "".join(f'<img src="{uri}" title="{esc(name)}" alt="{esc(name)}">' for name, uri in thumbs)


CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin-bottom: 2em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f3f3f3; position: sticky; top: 0; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.failed { background: #fdecea; } tr.broken { background: #f3e5f5; } tr.unfinished { background: #fff8e1; }
.thumbs img { margin: 1px; border: 1px solid #ddd; }
.error, .problem { color: #b71c1c; max-width: 30em; white-space: pre-wrap; }
"""


def report_html(runs: list[RunRecord], sweep_dir: Path) -> str:
    keys = swept_keys(runs)
    esc = html.escape
    head = ["#", "run", "status", *keys, "final", *METRICS, "seconds", "problem", "images"]
    out = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>Sweep {esc(str(sweep_dir))}</title>",
           f"<style>{CSS}</style></head><body>", f"<h1>Sweep {esc(str(sweep_dir))}</h1>",
           f"<p>{len(runs)} runs: {esc(_counts(runs))}. Written {datetime.now():%Y-%m-%d %H:%M:%S}.</p>",
           "<h2>Runs, best first</h2><table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in head) + "</tr>"]
    for i, r in enumerate(runs, 1):
        cells = [f"<td>{i}</td>", f"<td>{esc(r.name)}</td>", f"<td>{esc(r.status)}</td>"]
        cells += [f"<td>{esc(r.overrides.get(k, ''))}</td>" for k in keys]
        cells.append(f"<td class='num'><b>{esc(_final_text(r))}</b></td>")
        cells += [f"<td class='num'>{_num(r.metrics.get(m))}</td>" for m in METRICS]
        cells.append(f"<td class='num'>{_num(r.seconds, 1)}</td>")
        cells.append(f"<td class='problem'>{esc(r.problem)}</td>")
        body = _thumbs_html(r.thumbs)
        if r.error:
            body += f"<div class='error'>{esc(r.error)}</div>"
        cells.append(f"<td class='thumbs'>{body}</td>")
        out.append(f"<tr class='{esc(r.status)}'>" + "".join(cells) + "</tr>")
    out.append("</table>")
    summary = setting_summary(runs)
    if summary:
        out.append("<h2>Mean final score per setting</h2><table><tr><th>key</th><th>value</th><th>runs</th>"
                   "<th>complete</th><th>mean final</th><th>best final</th></tr>")
        for s in summary:
            out.append(f"<tr><td>{esc(s['key'])}</td><td>{esc(str(s['value']))}</td><td class='num'>{s['runs']}</td>"
                       f"<td class='num'>{s['complete']}</td><td class='num'>{_num(s['mean_final'])}</td>"
                       f"<td class='num'>{_num(s['best_final'])}</td></tr>")
        out.append("</table>")
    styles = {r.style: r.references for r in runs if r.style is not None}
    if styles:
        out.append("<h2>Style references</h2><table>")
        for style, folder in sorted(styles.items()):
            thumbs, _ = _thumbs(folder, 10)  # references that cannot be read are not the sweep's problem
            out.append(f"<tr><td>style {esc(style)}</td><td class='thumbs'>{_thumbs_html(thumbs)}</td></tr>")
        out.append("</table>")
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


SWEEP_FILES = ("multirun.yaml", "optimization_results.yaml", *REPORT_STARTS)  # Hydra's, Optuna's and the report


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
