"""The challenge's final-score formula.

    Final   = Style x (Text + Quality)
    Style   = 0.2 x DINOv2 + 0.4 x Hist + 0.4 x (1 - LPIPS)
    Text    = 0.5 x CLIP-R
    Quality = 0.4 x (20 - min(FID, 20)) / 20 + 0.1 x CLIP-IQA

Metrics may be missing (e.g. a metric whose model is not installed). A missing
metric contributes 0 to its term -- for LPIPS the whole ``1 - LPIPS`` term and
for FID the whole FID term -- so a partial score is a lower bound on the full
one (all terms are non-negative for metrics in their usual ranges), and the
missing names are reported so a partial score is never mistaken for a full one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["METRICS", "FID_CAP", "FinalScore", "final_score"]

METRICS: tuple[str, ...] = ("dinov2", "hist", "lpips", "fid", "clip_iqa", "clip_r")
FID_CAP = 20.0


@dataclass(frozen=True)
class FinalScore:
    """Final score with its factors; ``missing`` lists absent metrics in METRICS order."""

    value: float
    style: float
    text: float
    quality: float
    missing: tuple[str, ...] = ()

    @property
    def partial(self) -> bool:
        """True when any metric was missing, i.e. ``value`` is only a lower bound."""
        return bool(self.missing)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (``missing`` as a list, ``partial`` included)."""
        d = asdict(self)
        d["missing"] = list(self.missing)
        d["partial"] = self.partial
        return d


def _clean(metrics: Mapping[str, float | None]) -> tuple[dict[str, float], tuple[str, ...]]:
    """Validate ``metrics``; return the present values as floats and the missing names."""
    unknown = sorted(set(metrics) - set(METRICS))
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; expected a subset of {list(METRICS)}")
    present: dict[str, float] = {}
    for name in METRICS:
        raw = metrics.get(name)
        if raw is None:
            continue
        value = float(raw)
        if not math.isfinite(value):
            raise ValueError(f"metric {name!r} must be a finite number, got {raw!r}")
        present[name] = value
    missing = tuple(name for name in METRICS if name not in present)
    return present, missing


def final_score(metrics: Mapping[str, float | None]) -> FinalScore:
    """Combine the six challenge metrics into the final score.

    ``metrics`` maps names from :data:`METRICS` to values; absent or ``None``
    entries count as missing (contributing 0 to their term). Unknown names and
    non-finite values (NaN, inf) raise ValueError, since silently dropping a
    misspelt metric or propagating NaN would publish a wrong score.
    """
    m, missing = _clean(metrics)

    style = 0.2 * m.get("dinov2", 0.0) + 0.4 * m.get("hist", 0.0)
    if "lpips" in m:
        style += 0.4 * (1.0 - m["lpips"])

    text = 0.5 * m.get("clip_r", 0.0)

    quality = 0.1 * m.get("clip_iqa", 0.0)
    if "fid" in m:
        quality += 0.4 * (FID_CAP - min(m["fid"], FID_CAP)) / FID_CAP

    return FinalScore(
        value=style * (text + quality),
        style=style,
        text=text,
        quality=quality,
        missing=missing,
    )
