"""``python -m jdiff.score <images_dir> [overrides]``: score a folder laid out like a challenge submission.

    <images_dir>/00/Dolphin.png
    <images_dir>/00/Bread.png
    <images_dir>/01/...

Each ``NN/`` folder is scored against the reference images of style ``NN`` under ``data.root`` (the
object of an image is its file stem, as the challenge's checker reads it), with the same metrics, models
and averaging as the score stage of a run. Overrides are the usual Hydra ones, e.g.::

    python -m jdiff.score results/ data.root=/data/styles score.device=cuda
    python -m jdiff.score results/ score=hist

Prints a table (one row per style, then the mean and the final score) and the time scoring took, and
writes it all as JSON to ``<images_dir>/scores.json`` (or ``--out``; an existing file there is replaced only
when it holds earlier scores). Hidden files and folders (``.ipynb_checkpoints/``, ``.DS_Store``) are ignored;
whatever else is wrong ends in one line ``error: ...`` and exit status 2, with nothing written.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import unicodedata
from pathlib import Path
from typing import Optional

from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from jdiff.config import explain_composition_error
from jdiff.confdir import CONF_DIR
from jdiff.data import (IMAGE_SUFFIXES, StyleDataError, collisions, image_file_name, is_hidden, list_images, load_rgb,
                        load_style)
from jdiff.files import write_json
from jdiff.rundir import COMPLETE, FAILED
from jdiff.scoring.final import METRICS, final_score
from jdiff.scoring.scorer import ScoreResult, Scorer, StyleImages
from jdiff.validate import ConfigError, validate_config

log = logging.getLogger("jdiff.score")
CONF = CONF_DIR


def compose(overrides: list[str]):
    """The jdiff config with ``overrides``, paths resolved against the working directory."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from jdiff.config import register_configs
    from jdiff.pipeline import resolve_paths

    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = hydra_compose("config", overrides=overrides)
    return resolve_paths(cfg)


def read_submission(images_dir: Path, data_root: Path) -> list[StyleImages]:
    """The styles of a challenge-layout folder, each with its generated images and its references.

    Hidden entries (``.ipynb_checkpoints/``, ``.DS_Store``, ``._Dolphin.png``) are left out; two images of one
    object (``Hat.png`` and ``Hat.jpg``, or ``hat.png``) and two folders of one style (``3/`` and ``03/``) are
    refused.
    """
    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        what = "it is a file" if images_dir.exists() else "it does not exist"
        raise StyleDataError(f"{images_dir} is not a folder ({what}). Give the folder that holds NN/<Object>.png.")
    try:
        folders = sorted(p for p in images_dir.iterdir() if p.is_dir() and not is_hidden(p))
    except OSError as err:
        raise StyleDataError(f"cannot list {images_dir}: {err.strerror}. Check that you can read it.") from err
    styles, seen = [], {}
    for folder in folders:
        files, others = list_images(folder)
        if not files:
            log.warning("skipping %s: it holds no images (%s)", folder, ", ".join(IMAGE_SUFFIXES))
            continue
        if others:
            log.warning("%s: ignoring %s: not images", folder, ", ".join(others))
        same = collisions(files, lambda p: file_key(p.stem))
        if same:
            raise StyleDataError(f"{folder}: {' and '.join(p.name for p in same[0])} are images of one object (the "
                                 f"file stem names it). Keep one of them.")
        style = load_style(data_root, folder.name)
        if style.style_id in seen:
            raise StyleDataError(f"{seen[style.style_id]} and {folder} are both style {style.style_id}. Merge them "
                                 f"into one folder.")
        seen[style.style_id] = folder
        generated = [(p.stem, load_rgb(p)) for p in files]
        stems = {file_key(p.stem) for p in files}
        expected = {file_key(image_file_name(o)[: -len(".png")]): o for o in style.prompt_objects}
        missing = [o for key, o in expected.items() if key not in stems]
        if missing:
            log.warning("style %s: no image for %s (listed in %s)", folder.name, ", ".join(missing),
                        style.folder / "prompt.json")
        extra = [p.name for p in files if file_key(p.stem) not in expected]
        if extra:
            log.warning("style %s: %s not listed in %s; scored with the file stem as the object", folder.name,
                        ", ".join(extra), style.folder / "prompt.json")
        styles.append(StyleImages(style.style_id, generated, style.images()))
    if not styles:
        raise StyleDataError(f"{images_dir} holds no style folders with images. Expected NN/<Object>.png, "
                             f"e.g. {images_dir / '00' / 'Dolphin.png'}.")
    return styles


def file_key(stem: str) -> str:
    """A file stem as a case-insensitive file system (Windows, macOS) compares it."""
    return unicodedata.normalize("NFC", stem).lower()


def check_out(out: Path) -> None:
    """Refuse, before scoring, an ``--out`` that cannot be written or whose file is not an earlier scores file."""
    if out.is_dir():
        raise StyleDataError(f"--out {out} is a folder. Give a file, e.g. --out {out / 'scores.json'}.")
    folder = next(p for p in (out.parent, *out.parent.parents) if p.exists())  # missing folders are made
    if not folder.is_dir():
        raise StyleDataError(f"cannot write the scores to {out}: {folder} is a file, not a folder. Give --out "
                             f"another path.")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise StyleDataError(f"cannot write the scores to {out}: no permission to write in {folder}. Give --out a "
                             f"path in a folder you can write.")
    if (out.parent / COMPLETE).exists() or (out.parent / FAILED).exists():
        raise StyleDataError(f"--out {out} is in the folder of a jdiff run ({out.parent}), whose files jdiff never "
                             f"changes. Give --out a path outside it.")
    if out.exists() and not is_scores_file(out):
        raise StyleDataError(f"{out} exists and is not a scores file, so it is left as it is. Give --out another "
                             f"path, or remove the file.")


def is_scores_file(path: Path) -> bool:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "metrics" in data and "final" in data


def format_table(result: ScoreResult, counts: dict[str, int]) -> str:
    """A plain-text table: one row per style, the mean (FID pooled) and the final score."""
    metrics = [m for m in METRICS if m in result.metrics or any(m in v for v in result.per_style.values())]
    header = f"{'style':<8}{'images':>7}" + "".join(f"{m:>10}" for m in metrics)
    lines = [header, "-" * len(header)]

    def cells(values: dict[str, float]) -> str:
        return "".join(f"{values[m]:>10.4f}" if m in values else f"{'-':>10}" for m in metrics)

    for style, values in result.per_style.items():
        lines.append(f"{style:<8}{counts[style]:>7}" + cells(values))
    lines.append("-" * len(header))
    lines.append(f"{'all':<8}{sum(counts.values()):>7}" + cells(result.metrics))
    final = final_score(result.metrics)
    note = f"  (partial: missing {', '.join(final.missing)})" if final.partial else ""
    lines.append(f"\nfinal score {final.value + 0.0:.4f} = style {final.style:.4f} x (text {final.text:.4f} "
                 f"+ quality {final.quality:.4f}){note}")
    for metric, why in result.skipped.items():
        lines.append(f"  skipped {metric}: {why}")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jdiff.score", description=__doc__.split("\n\n")[0])
    parser.add_argument("images_dir", type=Path, help="folder holding NN/<Object>.png")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. data.root=... score.device=cuda")
    parser.add_argument("--out", type=Path, help="where to write the JSON (default: <images_dir>/scores.json)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        cfg = compose(args.overrides)
        if OmegaConf.is_missing(cfg, "style"):
            cfg.style = "submission"  # the styles are the submission's NN/ folders; validate_config wants one
        validate_config(cfg)
        styles = read_submission(args.images_dir, Path(cfg.data.root))
        out = args.out or args.images_dir / "scores.json"
        check_out(out)
        result = Scorer(cfg.score, Path(cfg.paths.cache)).score(styles)
    except (ConfigError, StyleDataError, HydraException, OmegaConfBaseException, OSError) as err:
        print(f"error: {explain_composition_error(err) or err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: no scores were written", file=sys.stderr)
        return 130
    counts = {s.style_id: len(s.generated) for s in styles}
    print(format_table(result, counts))
    n_images = sum(counts.values())
    print(f"\nscored {n_images} images of {len(styles)} styles in {result.seconds:.1f} s")
    try:
        write_json(out, {
            "images_dir": str(args.images_dir.resolve()),
            "data_root": str(cfg.data.root),
            "metrics": result.metrics,
            "final": final_score(result.metrics).to_dict(),
            "skipped": result.skipped,
            "per_style": {s: {"images": counts[s], **v} for s, v in result.per_style.items()},
            "seconds": round(result.seconds, 3),
        })
    except OSError as err:
        print(f"error: cannot write {out}: {err}. The scores are printed above.", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
