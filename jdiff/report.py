"""``python -m jdiff.report <sweep_dir>``: one table of every run of a sweep, in CSV, Markdown and HTML.

Writes into the sweep folder:

    scores.csv    one row per run: its overrides, status, final score, every metric, duration, error
    scores.md     the same table and the per-setting summary, for a terminal or a notebook
    report.html   the same, self-contained: thumbnails of each run's images and of the style references
                  are embedded, so the file can be mailed or archived alone

A run is a sub-folder with Hydra's ``.hydra/`` record. Its status is ``complete`` (COMPLETE written),
``failed`` (a FAILED marker, JSON ``{"error": ...}`` or plain text) or ``unfinished`` (neither: still
running, or killed). Runs are sorted by final score, best first; failed and unfinished runs are listed
after them, never dropped, so the report is right for a sweep in progress or one that crashed.
The per-setting summary gives, for every key that takes more than one value in the sweep, the mean final
score of the complete runs with each value.
"""

from __future__ import annotations

import argparse
import base64
import csv
import html
import io
import json
import sys
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Optional

from jdiff.files import write_text
from jdiff.scoring.final import METRICS

COMPLETE, FAILED = "COMPLETE", "FAILED"
STATUS_ORDER = {"complete": 0, "failed": 1, "unfinished": 2}
THUMB_SIZE = 72
THUMBS_PER_RUN = 8


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
    error: str = ""
    style: Optional[str] = None
    references: Optional[Path] = None  # the style's reference image folder, from the run's config


def _read_json(path: Path) -> Optional[dict]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _overrides(run_dir: Path) -> dict[str, str]:
    from omegaconf import OmegaConf

    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return {}
    result = {}
    for item in OmegaConf.to_container(OmegaConf.load(path)) or []:
        key, _, value = str(item).partition("=")
        result[key.lstrip("+~")] = value
    return result


def read_run(run_dir: Path) -> RunRecord:
    """What a run folder says about the run, whatever state it was left in."""
    from omegaconf import OmegaConf

    record = RunRecord(name=run_dir.name, path=run_dir, status="unfinished", overrides=_overrides(run_dir))
    if (run_dir / COMPLETE).is_file():
        record.status = "complete"
        record.seconds = (_read_json(run_dir / COMPLETE) or {}).get("seconds")
    elif (run_dir / FAILED).is_file():
        record.status = "failed"
        marker = _read_json(run_dir / FAILED)
        text = (run_dir / FAILED).read_text(encoding="utf-8", errors="replace").strip()
        record.error = str(marker.get("error", "")) if marker is not None else text
        record.seconds = marker.get("seconds") if marker is not None else None
    scores = _read_json(run_dir / "scores.json")
    if scores is not None and record.status == "complete":
        record.metrics = {m: v for m, v in (scores.get("metrics") or {}).items() if m in METRICS}
        final = scores.get("final") or {}
        record.final, record.partial = final.get("value"), bool(final.get("partial"))
    config = run_dir / "config.yaml"
    if config.is_file():
        cfg = OmegaConf.load(config)
        record.style = str(cfg.get("style")) if cfg.get("style") is not None else None
        root = OmegaConf.select(cfg, "data.root")
        if root and record.style:
            record.references = Path(str(root)) / record.style / "images"
    return record


def find_runs(sweep_dir: Path) -> list[RunRecord]:
    runs = [read_run(p) for p in Path(sweep_dir).iterdir() if p.is_dir() and (p / ".hydra").is_dir()]
    return sorted(runs, key=lambda r: (STATUS_ORDER[r.status], -(r.final if r.final is not None else -1e9),
                                       int(r.name) if r.name.isdigit() else 0, r.name))


def swept_keys(runs: list[RunRecord]) -> list[str]:
    """Override keys in the order they were given, first those whose value differs between runs."""
    keys = list(dict.fromkeys(k for r in runs for k in r.overrides))
    varying = [k for k in keys if len({r.overrides.get(k) for r in runs}) > 1]
    return varying + [k for k in keys if k not in varying]


def setting_summary(runs: list[RunRecord]) -> list[dict]:
    """Per value of each key that varies: runs, complete runs, mean and best final score."""
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
    header = ["run", "status", *keys, "final", "partial", *METRICS, "seconds", "error"]
    rows = [[r.name, r.status, *(r.overrides.get(k, "") for k in keys), _num(r.final),
             str(r.partial).lower() if r.final is not None else "", *(_num(r.metrics.get(m)) for m in METRICS),
             _num(r.seconds, 1), r.error] for r in runs]
    return header, rows


def write_csv(runs: list[RunRecord], path: Path) -> None:
    header, rows = table_rows(runs)
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(header)
    writer.writerows(rows)
    write_text(path, out.getvalue())


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _counts(runs: list[RunRecord]) -> str:
    return ", ".join(f"{sum(r.status == s for r in runs)} {s}" for s in STATUS_ORDER)


def markdown(runs: list[RunRecord], sweep_dir: Path) -> str:
    keys = swept_keys(runs)
    header = ["#", "run", "status", *keys, "final", *METRICS, "seconds", "error"]
    lines = [f"# Sweep {sweep_dir}", "", f"{len(runs)} runs: {_counts(runs)}.", "",
             "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for i, r in enumerate(runs, 1):
        cells = [str(i), r.name, r.status, *(r.overrides.get(k, "") for k in keys), _final_text(r),
                 *(_num(r.metrics.get(m)) for m in METRICS), _num(r.seconds, 1), r.error]
        lines.append("| " + " | ".join(_md_cell(c) for c in cells) + " |")
    summary = setting_summary(runs)
    if summary:
        lines += ["", "## Mean final score per setting", "", "| key | value | runs | complete | mean final | best final |",
                  "| --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {s['key']} | {_md_cell(str(s['value']))} | {s['runs']} | {s['complete']} | {_num(s['mean_final'])} "
                  f"| {_num(s['best_final'])} |" for s in summary]
    return "\n".join(lines) + "\n"


def thumbnail(path: Path, size: int = THUMB_SIZE) -> Optional[str]:
    """A small JPEG of an image as a data URI (None when the file cannot be read)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            im.thumbnail((size, size))
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=80)
    except OSError:
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _images(folder: Optional[Path], limit: int) -> list[Path]:
    if folder is None or not folder.is_dir():
        return []
    suffixes = (".png", ".jpg", ".jpeg", ".webp")
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in suffixes)[:limit]


def _thumbs_html(paths: list[Path]) -> str:
    tags = []
    for p in paths:
        uri = thumbnail(p)
        if uri is not None:
            tags.append(f'<img src="{uri}" title="{html.escape(p.stem)}" alt="{html.escape(p.stem)}">')
    return "".join(tags)


CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin-bottom: 2em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f3f3f3; position: sticky; top: 0; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.failed { background: #fdecea; } tr.unfinished { background: #fff8e1; }
.thumbs img { margin: 1px; border: 1px solid #ddd; }
.error { color: #b71c1c; max-width: 30em; white-space: pre-wrap; }
"""


def report_html(runs: list[RunRecord], sweep_dir: Path) -> str:
    keys = swept_keys(runs)
    esc = html.escape
    head = ["#", "run", "status", *keys, "final", *METRICS, "seconds", "images"]
    out = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>Sweep {esc(str(sweep_dir))}</title>",
           f"<style>{CSS}</style></head><body>", f"<h1>Sweep {esc(str(sweep_dir))}</h1>",
           f"<p>{len(runs)} runs: {esc(_counts(runs))}. Written {datetime.now():%Y-%m-%d %H:%M:%S}.</p>",
           "<h2>Runs, best first</h2><table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in head) + "</tr>"]
    for i, r in enumerate(runs, 1):
        cells = [f"<td>{i}</td>", f"<td>{esc(r.name)}</td>", f"<td>{r.status}</td>"]
        cells += [f"<td>{esc(r.overrides.get(k, ''))}</td>" for k in keys]
        cells.append(f"<td class='num'><b>{esc(_final_text(r))}</b></td>")
        cells += [f"<td class='num'>{_num(r.metrics.get(m))}</td>" for m in METRICS]
        cells.append(f"<td class='num'>{_num(r.seconds, 1)}</td>")
        body = _thumbs_html(_images(r.path / "images", THUMBS_PER_RUN))
        if r.error:
            body += f"<div class='error'>{esc(r.error)}</div>"
        cells.append(f"<td class='thumbs'>{body}</td>")
        out.append(f"<tr class='{r.status}'>" + "".join(cells) + "</tr>")
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
            out.append(f"<tr><td>style {esc(style)}</td><td class='thumbs'>{_thumbs_html(_images(folder, 10))}</td></tr>")
        out.append("</table>")
    out.append("</body></html>")
    return "\n".join(out)


def write_report(sweep_dir: Path) -> list[RunRecord]:
    """Write scores.csv, scores.md and report.html into ``sweep_dir``; returns the runs, sorted."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"{sweep_dir} is not a folder. Give a sweep folder such as multirun/<date>/<time>.")
    runs = find_runs(sweep_dir)
    write_csv(runs, sweep_dir / "scores.csv")
    write_text(sweep_dir / "scores.md", markdown(runs, sweep_dir))
    write_text(sweep_dir / "report.html", report_html(runs, sweep_dir))
    return runs


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jdiff.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", type=Path, help="a sweep folder (multirun/<date>/<time>)")
    args = parser.parse_args(argv)
    try:
        runs = write_report(args.sweep_dir)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not runs:
        print(f"warning: {args.sweep_dir} holds no runs (sub-folders with .hydra/)", file=sys.stderr)
    print(markdown(runs, args.sweep_dir))
    print(f"wrote {', '.join(str(args.sweep_dir / n) for n in ('scores.csv', 'scores.md', 'report.html'))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
