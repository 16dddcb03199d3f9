"""Tests for the Hist colour-histogram metric (jdiff.scoring.hist)."""

from __future__ import annotations


import cv2
import numpy as np
import pytest

from jdiff.scoring.hist import (
    HSV_BINS,
    RGB_BINS,
    hist_correlation,
    hist_score,
    hsv_histogram,
    rgb_histogram,
)

# Channel values that put pixels exactly on (or next to) the hue/S/V cuts.
EDGE_VALUES = np.array([0, 3, 4, 10, 50, 51, 84, 85, 150, 151, 178, 179, 200, 204, 240, 255], np.uint8)


def _noise(rng: np.random.Generator, h: int = 48, w: int = 40, lo: int = 0, hi: int = 256) -> np.ndarray:
    return rng.integers(lo, hi, (h, w, 3), dtype=np.uint8)


def _gradient(rng: np.random.Generator, h: int = 40, w: int = 56) -> np.ndarray:
    """A smooth, natural-looking image (few colours dominate)."""
    y, x = np.mgrid[0:h, 0:w]
    a, b, c = rng.uniform(0.5, 3.0, 3)
    img = np.stack([128 + 127 * np.sin(a * x / w + c), 128 + 127 * np.cos(b * y / h), 255 * x / w * y / h], -1)
    return img.astype(np.uint8)


def _palette(rng: np.random.Generator, h: int = 32, w: int = 32) -> np.ndarray:
    return rng.choice(EDGE_VALUES, (h, w, 3))


def _image_set(seed: int, n: int = 4) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    makers = [_noise, _gradient, _palette]
    return [makers[i % 3](rng) for i in range(n)]


# ---------------------------------------------------------------------------
# Independent OpenCV computation of the same definition
# ---------------------------------------------------------------------------

HUE_CUTS_DEG = [20, 40, 75, 155, 190, 270, 295, 315]


def _cv_rgb_hist(img: np.ndarray) -> np.ndarray:
    hist = cv2.calcHist([img], [0, 1, 2], None, [16, 16, 16], [0, 256, 0, 256, 0, 256])
    return cv2.normalize(hist, None, alpha=1, norm_type=cv2.NORM_L1).ravel()


def _cv_hsv_hist(img: np.ndarray) -> np.ndarray:
    hsv = cv2.cvtColor(img.astype(np.float32) / 255.0, cv2.COLOR_RGB2HSV)  # H in degrees, S, V in [0,1]
    # float32 HSV is off by ~1e-5 from the exact value; true values of uint8
    # pixels that are not on a cut are >= 1/255 deg (H) and >= 1/2550 (S, V)
    # away from it, so rounding snaps exact-cut values back onto the cut
    # without moving anything else across one.
    h = np.round(hsv[..., 0].astype(np.float64), 3)
    s = np.round(hsv[..., 1].astype(np.float64), 4)
    v = np.round(hsv[..., 2].astype(np.float64), 4)
    hue_bin = np.digitize(h, HUE_CUTS_DEG) % 8  # 0 and 8 are both the red bin
    sat_bin = np.digitize(s, [0.2, 0.7])
    val_bin = np.digitize(v, [0.2, 0.7])
    index = (hue_bin * 9 + sat_bin * 3 + val_bin).astype(np.float32)
    hist = cv2.calcHist([index], [0], None, [72], [0, 72])
    return cv2.normalize(hist, None, alpha=1, norm_type=cv2.NORM_L1).ravel()


def _cv_hist_score(generated: list[np.ndarray], references: list[np.ndarray]) -> float:
    ref_rgb = np.mean([_cv_rgb_hist(r) for r in references], axis=0).astype(np.float32)
    ref_hsv = np.mean([_cv_hsv_hist(r) for r in references], axis=0).astype(np.float32)
    scores = [
        0.5
        * (
            cv2.compareHist(_cv_rgb_hist(g), ref_rgb, cv2.HISTCMP_CORREL)
            + cv2.compareHist(_cv_hsv_hist(g), ref_hsv, cv2.HISTCMP_CORREL)
        )
        for g in generated
    ]
    return float(np.mean(scores))


# ---------------------------------------------------------------------------
# Histogram bins
# ---------------------------------------------------------------------------


def test_histogram_shapes_and_normalisation() -> None:
    img = _image_set(0, 1)[0]
    rgb, hsv = rgb_histogram(img), hsv_histogram(img)
    assert rgb.shape == (RGB_BINS,) == (4096,) and rgb.dtype == np.float64
    assert hsv.shape == (HSV_BINS,) == (72,) and hsv.dtype == np.float64
    assert rgb.sum() == pytest.approx(1.0) and hsv.sum() == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("pixel", "rgb_bin"),
    [
        ((0, 0, 0), 0),
        ((15, 15, 15), 0),  # still the first bin on every channel
        ((16, 31, 32), 1 * 256 + 1 * 16 + 2),
        ((255, 0, 0), 15 * 256),
        ((240, 0, 40), 15 * 256 + 2),
        ((240, 40, 0), 15 * 256 + 2 * 16),
        ((255, 255, 255), 4095),
    ],
)
def test_rgb_bin_of_single_pixel(pixel: tuple[int, int, int], rgb_bin: int) -> None:
    hist = rgb_histogram(np.array([[pixel]], np.uint8))
    assert hist[rgb_bin] == 1.0


# bin = hue_bin*9 + sat_bin*3 + val_bin
@pytest.mark.parametrize(
    ("pixel", "hsv_bin", "why"),
    [
        ((255, 0, 0), 8, "pure red: hue 0, S=1, V=1"),
        ((240, 0, 40), 8, "hue exactly 350 wraps into the red bin"),
        ((240, 40, 0), 8, "hue exactly 10 is the red bin too"),
        ((255, 84, 0), 8, "hue 19.76 < 20"),
        ((255, 85, 0), 1 * 9 + 8, "hue exactly 20 opens bin 1"),
        ((200, 0, 150), 8, "hue exactly 315 is red again"),
        ((200, 0, 151), 7 * 9 + 8, "hue 314.7 is the last bin [295, 315)"),
        ((0, 255, 0), 3 * 9 + 8, "green 120 in [75, 155)"),
        ((0, 0, 255), 5 * 9 + 8, "blue 240 in [190, 270)"),
        ((0, 0, 0), 0, "black: H=S=V=0"),
        ((50, 50, 50), 0, "grey V=0.196 < 0.2"),
        ((51, 51, 51), 1, "grey V exactly 0.2 opens value band 1"),
        ((178, 178, 178), 1, "grey V=0.698 < 0.7"),
        ((179, 179, 179), 2, "grey V=0.702 >= 0.7"),
        ((255, 205, 205), 2, "S=0.196 < 0.2"),
        ((255, 204, 204), 3 + 2, "S exactly 0.2 opens saturation band 1"),
        ((10, 4, 4), 3, "S=0.6, dark"),
        ((10, 3, 3), 6, "S exactly 0.7 opens saturation band 2"),
    ],
)
def test_hsv_bin_of_single_pixel(pixel: tuple[int, int, int], hsv_bin: int, why: str) -> None:
    hist = hsv_histogram(np.array([[pixel]], np.uint8))
    assert np.flatnonzero(hist).tolist() == [hsv_bin], why


def test_known_counts_of_tiny_image() -> None:
    pixels = [(255, 0, 0), (240, 0, 40), (240, 40, 0), (255, 85, 0), (51, 51, 51), (50, 50, 50)]
    img = np.array(pixels, np.uint8).reshape(2, 3, 3)
    hsv = hsv_histogram(img) * len(pixels)
    np.testing.assert_allclose(hsv[[8, 17, 1, 0]], [3, 1, 1, 1])  # red x3 (0, 350, 10 degrees), hue 20, greys
    assert hsv.sum() == pytest.approx(len(pixels))
    rgb = rgb_histogram(img) * len(pixels)
    np.testing.assert_allclose(rgb[[3840, 3842, 3872, 3920, 3 * 256 + 3 * 16 + 3]], [1, 1, 1, 1, 2])


# ---------------------------------------------------------------------------
# Correlation and score
# ---------------------------------------------------------------------------


def test_correlation_matches_opencv() -> None:
    rng = np.random.default_rng(3)
    for _ in range(20):
        a, b = rng.random(72), rng.random(72)
        expected = cv2.compareHist(a.astype(np.float32), b.astype(np.float32), cv2.HISTCMP_CORREL)
        assert hist_correlation(a, b) == pytest.approx(expected, abs=1e-6)
    a = rng.random(72)
    assert hist_correlation(a, a) == pytest.approx(1.0)
    assert hist_correlation(a, -a) == pytest.approx(-1.0)
    assert hist_correlation(a, 3 * a + 1) == pytest.approx(1.0)


def test_correlation_of_flat_histograms() -> None:
    flat, other_flat = np.full(72, 1 / 72), np.full(72, 5.0)
    ramp = np.arange(72, dtype=np.float64)
    # Both flat: 0/0, OpenCV answers 1 and so do we.
    assert cv2.compareHist(flat.astype(np.float32), other_flat.astype(np.float32), cv2.HISTCMP_CORREL) == 1.0
    assert hist_correlation(flat, other_flat) == 1.0
    # Only one flat: no linear relation, 0 (OpenCV's answer here is rounding noise).
    assert hist_correlation(flat, ramp) == 0.0
    assert hist_correlation(ramp, flat) == 0.0


def test_correlation_rejects_mismatched_lengths() -> None:
    with pytest.raises(ValueError, match="equal length"):
        hist_correlation(np.ones(72), np.ones(4096))


def test_identical_sets_score_one() -> None:
    images = _image_set(1, 3)
    for img in images:
        assert hist_score([img], [img]) == pytest.approx(1.0, abs=1e-12)
        assert hist_score([img] * 3, [img] * 2) == pytest.approx(1.0, abs=1e-12)
    # Distinct images are each compared with the set's mean, so less than 1.
    assert hist_score(images, images) < 1.0


def test_pure_red_vs_pure_blue_is_low() -> None:
    red = np.zeros((16, 16, 3), np.uint8)
    red[..., 0] = 255
    blue = np.zeros((16, 16, 3), np.uint8)
    blue[..., 2] = 255
    score = hist_score([blue], [red])
    assert score < 0  # one-hot histograms in different bins correlate slightly negatively
    assert hist_score([red], [red]) == pytest.approx(1.0)


def test_disjoint_colour_noise_is_low() -> None:
    rng = np.random.default_rng(4)

    def reddish() -> np.ndarray:
        img = rng.integers(0, 32, (32, 32, 3), dtype=np.uint8)
        img[..., 0] = rng.integers(192, 256, (32, 32), dtype=np.uint8)  # hue within +-12 deg of red
        return img

    def bluish() -> np.ndarray:
        img = rng.integers(0, 32, (32, 32, 3), dtype=np.uint8)
        img[..., 2] = rng.integers(192, 256, (32, 32), dtype=np.uint8)  # hue within 240 +- 12 deg
        return img

    refs = [reddish() for _ in range(3)]
    assert hist_score([bluish() for _ in range(3)], refs) < 0.1
    # Control: fresh samples of the same distribution correlate strongly.
    assert hist_score([reddish() for _ in range(3)], refs) > 0.5


@pytest.mark.parametrize("seed", [10, 11, 12])
def test_agrees_with_opencv_computation(seed: int) -> None:
    generated = _image_set(seed, 5)
    references = _image_set(seed + 100, 4)
    for img in generated + references:
        np.testing.assert_allclose(rgb_histogram(img), _cv_rgb_hist(img), atol=1e-7)
        np.testing.assert_allclose(hsv_histogram(img), _cv_hsv_hist(img), atol=1e-7)
    assert hist_score(generated, references) == pytest.approx(_cv_hist_score(generated, references), abs=1e-6)


def test_edge_palette_hsv_matches_opencv_per_pixel() -> None:
    """Every combination of cut-edge channel values lands where OpenCV (snapped) puts it."""
    grid = np.stack(np.meshgrid(EDGE_VALUES, EDGE_VALUES, EDGE_VALUES, indexing="ij"), -1).reshape(-1, 1, 3)
    for pixel in grid:
        img = pixel[None]
        assert np.array_equal(hsv_histogram(img), _cv_hsv_hist(img).astype(np.float64)), pixel.tolist()


def test_reference_size_does_not_weigh_references() -> None:
    rng = np.random.default_rng(5)
    ref, other, gen = _gradient(rng, 64, 64), _noise(rng, 64, 64), _palette(rng)
    big = np.repeat(np.repeat(ref, 2, axis=0), 2, axis=1)  # 2x nearest upscale
    np.testing.assert_array_equal(rgb_histogram(big), rgb_histogram(ref))
    np.testing.assert_array_equal(hsv_histogram(big), hsv_histogram(ref))
    assert hist_score([gen], [ref, other]) == pytest.approx(hist_score([gen], [big, other]), abs=1e-12)


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        (np.zeros((8, 8), np.uint8), "HxWx3"),
        (np.zeros((8, 8, 4), np.uint8), "HxWx3"),
        (np.zeros((8, 8, 3), np.float32), "uint8"),
        (np.zeros((0, 8, 3), np.uint8), "empty"),
        ([[[0, 0, 0]]], "numpy array"),
    ],
)
def test_bad_images_raise(bad: object, match: str) -> None:
    good = np.zeros((4, 4, 3), np.uint8)
    with pytest.raises(ValueError, match=match):
        hist_score([bad], [good])  # type: ignore[list-item]
    with pytest.raises(ValueError, match=rf"references\[1\].*{match}"):
        hist_score([good], [good, bad])  # type: ignore[list-item]
    with pytest.raises(ValueError, match=match):
        rgb_histogram(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=match):
        hsv_histogram(bad)  # type: ignore[arg-type]


def test_empty_lists_raise() -> None:
    img = np.zeros((4, 4, 3), np.uint8)
    with pytest.raises(ValueError, match="generated must contain at least one image"):
        hist_score([], [img])
    with pytest.raises(ValueError, match="references must contain at least one image"):
        hist_score([img], [])
