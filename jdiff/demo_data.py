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


def write_demo_styles(root: Path) -> Path:
    """Draw the demo style set into ``root`` (replacing nothing that already exists)."""
    root = Path(root)
    if (root / ".complete").exists():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root) + ".lock"):
        if (root / ".complete").exists():
            return root
        tmp = Path(tempfile.mkdtemp(prefix=root.name + ".", dir=root.parent))
        try:
            for style_index, (style_id, (palette, motif, refs, prompts)) in enumerate(DEMO_STYLES.items()):
                images = tmp / style_id / "images"
                images.mkdir(parents=True)
                for k, obj in enumerate(refs):
                    draw_image(palette, motif, seed=100 * style_index + k).save(images / f"{obj}.png")
                prompt = {str(i): name for i, name in enumerate(prompts)}
                (tmp / style_id / "prompt.json").write_text(json.dumps(prompt, indent=2))
            (tmp / ".complete").write_text("demo style set\n")
            mask = os.umask(0)
            os.umask(mask)
            os.chmod(tmp, 0o777 & ~mask)  # mkdtemp made it owner-only; the cache is shared
            if root.exists():  # an incomplete set from an interrupted run
                shutil.rmtree(root)
            os.replace(tmp, root)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
    return root
