"""A small drawn style set for the demo and the tests: two styles, a few images each, a few prompts.

Each style has its own palette and motif so the Hist metric can tell them apart. Deterministic: the same
files every time, drawn with Pillow, written atomically so a half-written set never looks complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from filelock import FileLock
from PIL import Image, ImageDraw

from jdiff.data import StyleDataError
from jdiff.files import inside

DEMO_STYLES = {
    # style id: (palette, motif, reference objects, objects to generate)
    "00": (
        [(232, 93, 4), (250, 163, 7), (255, 214, 10), (157, 2, 8)],
        "discs",
        ["sun", "orange", "fox", "sunflower"],
        ["Apple", "Lion", "Boat"],
    ),
    "01": (
        [(3, 4, 94), (0, 119, 182), (72, 202, 228), (202, 240, 248)],
        "stripes",
        ["wave", "whale", "bottle", "wallet_"],
        ["Fish", "House", "Moon"],
    ),
}
SIZE = 96


def draw_image(palette: list[tuple[int, int, int]], motif: str, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    im = Image.new("RGB", (SIZE, SIZE), palette[-1])
    draw = ImageDraw.Draw(im)
    for k in range(6):
        colour = palette[int(rng.integers(0, len(palette) - 1))]
        if motif == "discs":
            x, y = rng.integers(0, SIZE, size=2)
            r = int(rng.integers(8, 30))
            draw.ellipse((x - r, y - r, x + r, y + r), fill=colour)
        else:
            y = int(rng.integers(0, SIZE))
            draw.rectangle((0, y, SIZE, y + int(rng.integers(4, 16))), fill=colour)
    return im


MARKER = ".complete"
MARKER_TEXT = "demo style set\n"


class DemoDataError(StyleDataError):
    """The demo set cannot go where data.root points; the message names the folder and what to change."""


def is_demo_set(root: Path) -> bool:
    try:
        return (Path(root) / MARKER).read_text(encoding="utf-8") == MARKER_TEXT
    except (OSError, UnicodeDecodeError):
        return False


def check_demo_root(root: Path, cache: Path | None = None) -> None:
    """Raise :class:`DemoDataError` unless the demo set may be drawn into ``root`` (see write_demo_styles)."""
    root = Path(root)
    if is_demo_set(root):
        return
    refuse = ("the demo builder (data.builder=demo, set by experiment=demo) draws its own styles there. To use the "
              "styles in a folder, set data.builder=null; otherwise point data.root at a new or empty folder")
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        names = sorted(p.name for p in root.iterdir()) if root.is_dir() else []
        if names and set(names) <= set(DEMO_STYLES):
            raise DemoDataError(f"data.root={root} holds an unfinished demo set (no {MARKER}); if jdiff made it, "
                                f"delete the folder and run again; {refuse}.")
        shown = ", ".join(names[:5]) if root.is_dir() else "a file"
        raise DemoDataError(f"data.root={root} holds files jdiff did not write ({shown}); {refuse}.")
    if cache is not None and not root.exists() and not inside(root, Path(cache)):
        raise DemoDataError(f"data.root={root} does not exist; {refuse} (the builder makes missing folders only "
                            f"inside paths.cache={cache}; elsewhere create the empty folder first).")


def write_demo_styles(root: Path, cache: Path | None = None) -> Path:
    """Draw the demo style set into ``root``, which must be new or empty: nothing that is there is replaced.

    With ``cache`` (the run's paths.cache), a missing ``root`` is made only inside it: elsewhere the folder
    must exist (empty), so that a mistyped path never creates folders in odd places."""
    root = Path(root)
    if is_demo_set(root):
        return root
    check_demo_root(root, cache)
    root.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root.parent / f".{root.name}.lock")):
        if is_demo_set(root):
            return root
        for stale in root.parent.glob(f".{root.name}.building-*"):  # left by a process killed while drawing
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.building-", dir=root.parent))
        try:
            for style_index, (style_id, (palette, motif, refs, prompts)) in enumerate(DEMO_STYLES.items()):
                images = tmp / style_id / "images"
                images.mkdir(parents=True)
                for k, obj in enumerate(refs):
                    draw_image(palette, motif, seed=100 * style_index + k).save(images / f"{obj}.png")
                prompt = {str(i): name for i, name in enumerate(prompts)}
                (tmp / style_id / "prompt.json").write_text(json.dumps(prompt, indent=2))
            (tmp / MARKER).write_text(MARKER_TEXT)
            mask = os.umask(0)
            os.umask(mask)
            os.chmod(tmp, 0o777 & ~mask)  # mkdtemp made it owner-only; the cache is shared
            os.replace(tmp, root)  # onto a missing or empty folder only (checked above, under the lock)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
    return root

