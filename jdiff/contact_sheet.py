"""A labelled grid of a run's references and generated images, to judge a run at a glance; once the run is
scored, a band at the top carries its final score and metrics (:func:`score_lines`)."""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
from PIL import Image, ImageDraw, ImageFont

TILE = 160
LABEL = 14
SCORE_FONT_SIZE = 16  # the final score's line; the metrics' line is drawn at the labels' size
BAND_PAD = 4
BAND_COLOUR = (236, 242, 250)  # the score band's background


def _row(images: list[tuple[str, np.ndarray]], columns: int) -> Image.Image:
    rows = max(1, math.ceil(len(images) / columns))
    sheet = Image.new("RGB", (columns * TILE, rows * (TILE + LABEL)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (label, image) in enumerate(images):
        x, y = (i % columns) * TILE, (i // columns) * (TILE + LABEL)
        sheet.paste(Image.fromarray(image).resize((TILE, TILE), Image.Resampling.BICUBIC), (x, y + LABEL))
        draw.text((x + 2, y + 1), label[:26], fill="black")
    return sheet


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)  # a scalable font (Pillow >= 10.1 with FreeType)
    except (TypeError, AttributeError, OSError):
        return ImageFont.load_default()


def score_lines(scores: Optional[dict]) -> list[str]:
    """The score band's text for a run's ``scores.json`` content: the final score, then every metric it has.
    [] when there is nothing to show (not scored, or no usable final score)."""
    final = (scores or {}).get("final")
    value = final.get("value") if isinstance(final, dict) else None
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        return []
    missing = [str(m) for m in final.get("missing") or []]
    head = f"final score {value + 0.0:.4f}"  # + 0.0: no "-0.0000"
    if final.get("partial") is True:
        head += f" (partial: no {', '.join(missing)})" if missing else " (partial)"
    metrics = scores.get("metrics")
    shown = [f"{k} {v + 0.0:.4f}" for k, v in (metrics.items() if isinstance(metrics, dict) else ())
             if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
    return [head] + (["  ".join(shown)] if shown else [])


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> list[str]:
    """``text`` in lines no wider than ``width`` pixels, broken at spaces (a word longer than that stays whole)."""
    lines, line = [], ""
    for word in text.split(" "):
        candidate = f"{line} {word}" if line else word
        if line and draw.textlength(candidate, font=font) > width:
            lines.append(line)
            line = word
        else:
            line = candidate
    return lines + [line] if line else lines


def _score_band(lines: list[str], width: int) -> Optional[Image.Image]:
    if not lines:
        return None
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    fonts = [_font(SCORE_FONT_SIZE)] + [ImageFont.load_default()] * (len(lines) - 1)
    wrapped = [(part, font) for text, font in zip(lines, fonts)
               for part in _wrap(measure, text, font, width - 2 * BAND_PAD)]
    heights = [font.getbbox("Ag")[3] + 4 for _, font in wrapped]
    band = Image.new("RGB", (width, sum(heights) + 2 * BAND_PAD), BAND_COLOUR)
    draw = ImageDraw.Draw(band)
    y = BAND_PAD
    for (text, font), h in zip(wrapped, heights):
        draw.text((BAND_PAD, y), text, fill="black", font=font)
        y += h
    return band


def contact_sheet(references: list[tuple[str, np.ndarray]], generated: list[tuple[str, np.ndarray]],
                  title: str, max_columns: int = 10, scores: Optional[dict] = None) -> np.ndarray:
    """References on top, generated images below, each tile labelled with its object; with ``scores`` (a run's
    ``scores.json`` content), a band above them with the final score and the metrics."""
    columns = max(1, min(max_columns, max(len(references), len(generated))))
    parts = [_row(references, columns), _row(generated, columns)]
    width = columns * TILE
    band = _score_band(score_lines(scores), width)
    top = band.height if band is not None else 0
    height = top + sum(p.height for p in parts) + 3 * 18
    sheet = Image.new("RGB", (width, height), "white")
    if band is not None:
        sheet.paste(band, (0, 0))
    draw = ImageDraw.Draw(sheet)
    y = top
    for heading, part in zip((f"{title}: references", "generated"), parts):
        draw.text((4, y + 3), heading, fill="black")
        sheet.paste(part, (0, y + 18))
        y += 18 + part.height
    return np.asarray(sheet)
