"""A labelled grid of a run's references and generated images, to judge a run at a glance."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

TILE = 160
LABEL = 14


def _row(images: list[tuple[str, np.ndarray]], columns: int) -> Image.Image:
    rows = max(1, math.ceil(len(images) / columns))
    sheet = Image.new("RGB", (columns * TILE, rows * (TILE + LABEL)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (label, image) in enumerate(images):
        x, y = (i % columns) * TILE, (i // columns) * (TILE + LABEL)
        sheet.paste(Image.fromarray(image).resize((TILE, TILE), Image.Resampling.BICUBIC), (x, y + LABEL))
        draw.text((x + 2, y + 1), label[:26], fill="black")
    return sheet


def contact_sheet(references: list[tuple[str, np.ndarray]], generated: list[tuple[str, np.ndarray]],
                  title: str, max_columns: int = 10) -> np.ndarray:
    """References on top, generated images below, each tile labelled with its object."""
    columns = max(1, min(max_columns, max(len(references), len(generated))))
    parts = [_row(references, columns), _row(generated, columns)]
    width = columns * TILE
    height = sum(p.height for p in parts) + 3 * 18
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    y = 0
    for heading, part in zip((f"{title}: references", "generated"), parts):
        draw.text((4, y + 3), heading, fill="black")
        sheet.paste(part, (0, y + 18))
        y += 18 + part.height
    return np.asarray(sheet)
