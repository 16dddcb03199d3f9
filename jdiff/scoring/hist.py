"""The challenge's colour-histogram style metric ("Hist").

Per style, every generated image's colour histogram is compared with the
*mean* histogram of the style's reference images using the Pearson
correlation (OpenCV's ``HISTCMP_CORREL``), and the correlations are averaged
over the generated images. This is done for two histograms and the results
are averaged:

* RGB: 16 bins per channel jointly (16**3 = 4096 bins, ``bin = value // 16``).
* HSV: 72 bins = 8 hue x 3 saturation x 3 value bands, with hand-chosen hue
  cuts (red wraps around 0 degrees) and saturation/value cut at 0.2 and 0.7.

Every histogram is normalised to sum 1 before the references are averaged,
so a large reference image does not outweigh a small one.

Only numpy is used at run time; the tests check agreement with OpenCV.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from fractions import Fraction

import numpy as np

__all__ = [
    "RGB_BINS_PER_CHANNEL",
    "RGB_BINS",
    "HUE_CUTS",
    "SV_CUTS",
    "HSV_BINS",
    "rgb_histogram",
    "hsv_histogram",
    "hist_correlation",
    "hist_score",
]

RGB_BINS_PER_CHANNEL = 16
RGB_BINS = RGB_BINS_PER_CHANNEL**3

# Hue cuts in degrees. Hue >= 315 or < 20 is a single "red" bin (bin 0), so
# the 8 cuts give 8 bins: [315,20) [20,40) [40,75) [75,155) [155,190)
# [190,270) [270,295) [295,315).
HUE_CUTS: tuple[int, ...] = (20, 40, 75, 155, 190, 270, 295, 315)
# Saturation and value cuts: bands <0.2, [0.2,0.7), >=0.7. Kept as exact
# fractions so that band decisions are made in exact integer arithmetic.
SV_CUTS: tuple[Fraction, ...] = (Fraction(1, 5), Fraction(7, 10))
SV_BANDS = len(SV_CUTS) + 1
HSV_BINS = len(HUE_CUTS) * SV_BANDS**2  # 8 * 3 * 3 = 72

# Pixels are processed in chunks so that the integer temporaries stay small
# (cache-resident, reused by the allocator). Whole-image temporaries of a
# 512x512 image are mmap-ed afresh on every operation and the page faults
# made the HSV histogram ~3x slower.
_CHUNK_PIXELS = 1 << 14

Indexer = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


# --------------------------------------------------------------------------
# Exact bin definitions (also used to build the lookup tables)
# --------------------------------------------------------------------------


def _ratio_band(num: np.ndarray, den: np.ndarray | int, cuts: Sequence[Fraction]) -> np.ndarray:
    """Band index of ``num/den`` against ``cuts`` (number of cuts <= the ratio).

    Computed as ``cut.denominator*num >= cut.numerator*den`` so values that sit
    exactly on a cut (e.g. S = 51/255 = 0.2) land deterministically in the
    upper band, which float arithmetic cannot guarantee. A zero numerator
    always gives band 0 (S = 0 for greys and black).
    """
    band = np.zeros(np.broadcast(num, den).shape, dtype=np.int64)
    for cut in cuts:
        band += (num > 0) & (cut.denominator * num >= cut.numerator * den)
    return band


def _hue_bins(r: np.ndarray, g: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Exact hue bin of integer RGB arrays (hexcone hue, red wrapping round 0).

    The hexcone hue is ``120*sector + 60*num/delta`` (mod 360) where
    ``sector`` is 0/1/2 for a max channel R/G/B (R, then G, then B on ties,
    which give the same hue anyway), ``num`` is G-B, B-R or R-G respectively
    and ``delta = max - min``. ``hue*delta`` is therefore an integer and is
    compared with ``cut*delta``, so hues sitting exactly on a cut (RGB
    (255, 85, 0) is exactly 20 degrees) never fall on the wrong side through
    rounding, as they can with float HSV.
    """
    mx = np.maximum(np.maximum(r, g), b)
    delta = mx - np.minimum(np.minimum(r, g), b)
    h_scaled = np.where(  # hue in degrees, times delta
        r == mx,
        60 * (g - b),
        np.where(g == mx, 120 * delta + 60 * (b - r), 240 * delta + 60 * (r - g)),
    )
    h_scaled = np.where(h_scaled < 0, h_scaled + 360 * delta, h_scaled)
    # Number of cuts at or below the hue: 0..8. Both 0 (hue < 20) and 8
    # (hue >= 315) are the red bin, hence the modulo. Greys (delta = 0) compare
    # 0 >= 0 for every cut, giving 8 -> 0, i.e. hue 0 as the definition says.
    count = sum((h_scaled >= cut * delta).astype(np.int64) for cut in HUE_CUTS)
    return count % len(HUE_CUTS)


def _build_hue_lut() -> np.ndarray:
    """Hue bin for every (G-R, B-R) pair, flattened as ``(G-R+255)*511 + (B-R+255)``.

    Hue only depends on channel differences (adding a constant to R, G and B
    leaves it unchanged), so the 511 x 511 difference pairs of uint8 pixels
    cover every colour.
    """
    dg, db = np.meshgrid(np.arange(-255, 256), np.arange(-255, 256), indexing="ij")
    return _hue_bins(np.zeros_like(dg), dg, db).astype(np.uint8).ravel()


def _build_sv_lut() -> np.ndarray:
    """``sat_band*3 + val_band`` for every (max, delta), flattened as ``max*256 + delta``.

    S = delta/max and V = max/255, compared with the cuts exactly.
    """
    mx, delta = np.meshgrid(np.arange(256), np.arange(256), indexing="ij")
    sat = _ratio_band(delta, mx, SV_CUTS)
    val = _ratio_band(mx, 255, SV_CUTS)
    return (sat * SV_BANDS + val).astype(np.uint8).ravel()


# Small exact lookup tables (~330 KB, built at import in well under a second)
# so the per-pixel work is a handful of integer passes and two gathers.
_HUE_LUT = _build_hue_lut()
_SV_LUT = _build_sv_lut()


# --------------------------------------------------------------------------
# Per-pixel bin indexes (uint8 channel planes in, bin indexes out)
# --------------------------------------------------------------------------


def _rgb_index(r: np.ndarray, g: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``(r//16)*256 + (g//16)*16 + b//16``."""
    return (r >> 4).astype(np.int32) << 8 | (g >> 4).astype(np.int32) << 4 | b >> 4


def _hsv_index(r: np.ndarray, g: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``hue_bin*9 + sat_bin*3 + val_bin`` via the exact lookup tables."""
    mx = np.maximum(np.maximum(r, g), b)
    delta = mx - np.minimum(np.minimum(r, g), b)  # uint8, cannot underflow
    r32, g32, b32 = r.astype(np.int32), g.astype(np.int32), b.astype(np.int32)
    hue_index = g32 * 511 + b32 - r32 * 512 + 255 * 512  # (g-r+255)*511 + (b-r+255)
    sv_index = mx.astype(np.int32) << 8 | delta  # mx*256 + delta
    hue_bin = np.take(_HUE_LUT, hue_index)
    return hue_bin * np.uint8(SV_BANDS**2) + np.take(_SV_LUT, sv_index)  # <= 71, fits uint8


def _check_image(image: object, what: str = "image") -> np.ndarray:
    """Return ``image`` or raise ValueError if it isn't a non-empty HxWx3 uint8 array."""
    if not isinstance(image, np.ndarray):
        raise ValueError(f"{what} must be a numpy array, got {type(image).__name__}")
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"{what} must have shape HxWx3 (RGB), got {image.shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"{what} must have dtype uint8, got {image.dtype}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"{what} is empty (shape {image.shape})")
    return image


def _histograms(image: np.ndarray, *specs: tuple[Indexer, int]) -> list[np.ndarray]:
    """Normalised histograms of one image, one per ``(indexer, bins)`` spec.

    Several histograms share one pass over the pixels; each chunk is first
    split into contiguous channel planes, which is much faster than working
    on the interleaved (strided) channels.
    """
    pixels = _check_image(image).reshape(-1, 3)
    counts = [np.zeros(bins, dtype=np.int64) for _, bins in specs]
    for start in range(0, len(pixels), _CHUNK_PIXELS):
        r, g, b = pixels[start : start + _CHUNK_PIXELS].T.copy()
        for total, (indexer, bins) in zip(counts, specs):
            total += np.bincount(indexer(r, g, b), minlength=bins)
    return [c / len(pixels) for c in counts]


# --------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------


def rgb_histogram(image: np.ndarray) -> np.ndarray:
    """Joint RGB histogram of a uint8 HxWx3 RGB image: 4096 bins, sums to 1.

    Bin index is ``(r//16)*256 + (g//16)*16 + b//16``, i.e. the flattened
    layout of ``cv2.calcHist([img], [0, 1, 2], None, [16]*3, [0, 256]*3)``.
    """
    return _histograms(image, (_rgb_index, RGB_BINS))[0]


def hsv_histogram(image: np.ndarray) -> np.ndarray:
    """72-bin HSV histogram (8 hue x 3 saturation x 3 value) of a uint8 RGB image, sums to 1.

    HSV is the standard hexcone model of RGB in [0, 1]: V = max, S =
    (max-min)/max (0 when max is 0), H from the max channel and H = 0 for
    greys. Rather than computing float H, S, V and comparing them with the
    cuts, the bins come from lookup tables computed exactly in integers (see
    ``_hue_bins`` and ``_ratio_band``): the same definition, but immune to
    rounding at the cuts, which real images hit often, and faster.

    Bin index = ``hue_bin*9 + sat_bin*3 + val_bin``.
    """
    return _histograms(image, (_hsv_index, HSV_BINS))[0]


def hist_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two histograms (OpenCV ``HISTCMP_CORREL``).

    ``sum((a-ma)(b-mb)) / sqrt(sum((a-ma)^2) * sum((b-mb)^2))``.

    If a histogram is constant (flat) its variance is 0 and the formula is
    0/0. ``cv2.compareHist`` returns 1 when the denominator is (near) zero,
    but with float data a single flat histogram usually leaves a rounding-size
    denominator and OpenCV then returns ~0 (e.g. float32 1/72 everywhere
    against a ramp gives 0.0). We therefore return 1.0 when both are flat
    (identical in shape; OpenCV agrees) and 0.0 when only one is (no linear
    relation to measure). A real image's histogram is never flat over 4096 or
    72 bins in practice, so this only pins down the degenerate case.
    """
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"histograms must be non-empty and equal length, got {a.size} and {b.size}")
    # Test flatness exactly: subtracting a rounded mean would leave tiny
    # non-zero residuals and give an arbitrary result instead of 0/0.
    a_flat, b_flat = np.ptp(a) == 0, np.ptp(b) == 0
    if a_flat or b_flat:
        return 1.0 if a_flat and b_flat else 0.0
    da = a - a.mean()
    db = b - b.mean()
    return float(np.dot(da, db) / np.sqrt(np.dot(da, da) * np.dot(db, db)))


def _check_images(images: Sequence[np.ndarray], what: str) -> list[np.ndarray]:
    images = list(images)
    if not images:
        raise ValueError(f"{what} must contain at least one image")
    return [_check_image(img, f"{what}[{i}]") for i, img in enumerate(images)]


def hist_score(generated: Sequence[np.ndarray], references: Sequence[np.ndarray]) -> float:
    """Hist metric of one style: mean over ``generated`` of 0.5*(corr_rgb + corr_hsv).

    Each correlation is against the mean of the references' normalised
    histograms. Images are uint8 HxWx3 RGB arrays of any size. All inputs are
    validated before any work is done, so a bad image fails fast.
    """
    generated = _check_images(generated, "generated")
    references = _check_images(references, "references")
    specs = ((_rgb_index, RGB_BINS), (_hsv_index, HSV_BINS))
    ref_hists = [_histograms(img, *specs) for img in references]
    ref_rgb = np.mean([rgb for rgb, _ in ref_hists], axis=0)
    ref_hsv = np.mean([hsv for _, hsv in ref_hists], axis=0)
    scores = []
    for img in generated:
        rgb, hsv = _histograms(img, *specs)
        scores.append(0.5 * (hist_correlation(rgb, ref_rgb) + hist_correlation(hsv, ref_hsv)))
    return float(np.mean(scores))
