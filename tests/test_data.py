"""Tests for jdiff.data (style folders, image reading), jdiff.augment and jdiff.demo_data."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jdiff.augment import augment, to_model_range
from jdiff.data import (
    StyleDataError,
    average_style_image,
    center_square,
    image_file_name,
    load_rgb,
    load_style,
    object_name,
    read_prompt_objects,
    resize_short_side,
)
from jdiff.demo_data import DEMO_STYLES, write_demo_styles


def random_rgb(seed: int, h: int = 64, w: int = 64) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def make_style(root: Path, style: str = "00", objects=("sun", "wheat_field"), prompts=None) -> Path:
    folder = root / style
    (folder / "images").mkdir(parents=True)
    for k, obj in enumerate(objects):
        Image.fromarray(random_rgb(k)).save(folder / "images" / f"{obj}.png")
    prompts = {"0": "Apple", "1": "Lion"} if prompts is None else prompts
    (folder / "prompt.json").write_text(json.dumps(prompts))
    return folder


def style_error(root: Path, style: str = "00") -> str:
    with pytest.raises(StyleDataError) as info:
        load_style(root, style)
    return str(info.value)


# -- style folders ----------------------------------------------------------------------------------------


def test_load_style_ok(tmp_path):
    folder = make_style(tmp_path, objects=("wheat_field", "sun", "wallet_"))
    (folder / "images" / "notes.txt").write_text("not an image")
    Image.fromarray(random_rgb(9)).save(folder / "images" / "Boat.JPG", format="JPEG")
    style = load_style(tmp_path, "00")
    assert style.style_id == "00" and style.index == 0 and style.folder == folder
    # Sorted by file name, suffixes matched case-insensitively, non-images ignored.
    assert [p.name for p in style.image_paths] == ["Boat.JPG", "sun.png", "wallet_.png", "wheat_field.png"]
    assert style.objects == ("Boat", "sun", "wallet", "wheat field")
    assert style.prompt_objects == ("Apple", "Lion")
    images = style.images_at(32)
    assert len(images) == 4 and all(im.shape == (32, 32, 3) and im.dtype == np.uint8 for im in images)


def test_numeric_style_finds_zero_padded_folder(tmp_path):
    make_style(tmp_path, "03")
    assert load_style(tmp_path, "3").style_id == "03"
    assert load_style(tmp_path, 3).index == 3


def test_missing_style_lists_available(tmp_path):
    make_style(tmp_path, "00")
    make_style(tmp_path, "01")
    message = style_error(tmp_path, "07")
    assert str(tmp_path / "07") in message
    assert "00, 01" in message


def test_missing_root(tmp_path):
    message = style_error(tmp_path / "absent", "00")
    assert "data.root" in message and str(tmp_path / "absent") in message


def test_style_without_images_dir(tmp_path):
    (tmp_path / "00").mkdir()
    (tmp_path / "00" / "prompt.json").write_text('{"0": "Apple"}')
    message = style_error(tmp_path)
    assert "no images/ folder" in message and str(tmp_path / "00" / "images") in message


def test_images_dir_without_images(tmp_path):
    folder = make_style(tmp_path, objects=())
    (folder / "images" / "readme.txt").write_text("x")
    (folder / "images" / "sub.png").mkdir()  # a folder with an image suffix is not an image
    message = style_error(tmp_path)
    assert str(folder / "images") in message and "no images" in message


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ('{"0": "Apple",', "not valid JSON"),
        ("[1, 2]", "entry 0"),
        ('{"0": "Apple", "1": 5}', "entry '1'"),
        ('{"0": "Apple", "1": "  "}', "entry '1'"),
        ("{}", "lists no objects"),
        ('"Apple"', "JSON object"),
        ('{"0": "Apple", "1": "Lion", "2": "Apple"}', "['Apple'] more than once"),
    ],
    ids=["invalid", "list-of-ints", "non-string", "blank", "empty", "string", "duplicate"],
)
def test_broken_prompt_json(tmp_path, content, fragment):
    folder = make_style(tmp_path)
    (folder / "prompt.json").write_text(content)
    message = style_error(tmp_path)
    assert str(folder / "prompt.json") in message
    assert fragment in message


def test_missing_prompt_json(tmp_path):
    folder = make_style(tmp_path)
    (folder / "prompt.json").unlink()
    assert str(folder / "prompt.json") in style_error(tmp_path)


def test_prompt_json_list_of_strings_is_accepted(tmp_path):
    folder = make_style(tmp_path)
    (folder / "prompt.json").write_text('["Fish", " House "]')
    assert load_style(tmp_path, "00").prompt_objects == ("Fish", "House")


def test_read_prompt_objects_numeric_key_order(tmp_path):
    path = tmp_path / "prompt.json"
    names = {str(i): f"obj{i}" for i in (10, 2, 0, 9, 1, 11)}
    path.write_text(json.dumps(names))
    assert read_prompt_objects(path) == ("obj0", "obj1", "obj2", "obj9", "obj10", "obj11")


def test_corrupt_jpg_named(tmp_path):
    folder = make_style(tmp_path)
    bad = folder / "images" / "fox.jpg"
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, 2000, dtype=np.uint8).tobytes())
    message = style_error(tmp_path)
    assert str(bad) in message
    with pytest.raises(StyleDataError, match="fox.jpg"):
        load_rgb(bad)


def test_truncated_png_named(tmp_path):
    folder = make_style(tmp_path)
    good = folder / "images" / "sun.png"
    data = good.read_bytes()
    bad = folder / "images" / "moon.png"
    bad.write_bytes(data[: len(data) // 2])
    message = style_error(tmp_path)
    assert str(bad) in message


def test_empty_image_file_named(tmp_path):
    folder = make_style(tmp_path)
    bad = folder / "images" / "zero.jpg"
    bad.write_bytes(b"")
    assert str(bad) in style_error(tmp_path)


def test_small_image_warns(tmp_path, caplog):
    folder = make_style(tmp_path)
    Image.fromarray(random_rgb(3, 8, 8)).save(folder / "images" / "tiny.png")
    with caplog.at_level(logging.WARNING, logger="jdiff.data"):
        style = load_style(tmp_path, "00")
    assert "tiny" in style.objects
    assert any("tiny.png" in r.getMessage() and "upscaled" in r.getMessage() for r in caplog.records)


# -- load_rgb ---------------------------------------------------------------------------------------------


def test_rgb_roundtrip_exact(tmp_path):
    arr = random_rgb(1, 20, 30)
    Image.fromarray(arr).save(tmp_path / "a.png")
    out = load_rgb(tmp_path / "a.png")
    assert out.dtype == np.uint8 and out.shape == (20, 30, 3)
    np.testing.assert_array_equal(out, arr)


def test_grayscale_becomes_three_equal_channels(tmp_path):
    gray = np.random.default_rng(2).integers(0, 256, (16, 24), dtype=np.uint8)
    Image.fromarray(gray, "L").save(tmp_path / "g.png")
    out = load_rgb(tmp_path / "g.png")
    assert out.shape == (16, 24, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], gray)


def test_rgba_composited_over_white(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[0, 0] = (255, 0, 0, 0)  # fully transparent red
    rgba[0, 1] = (0, 0, 0, 128)  # half-transparent black
    rgba[0, 2] = (0, 255, 0, 255)  # opaque green
    rgba[1:] = (10, 20, 30, 0)  # transparent, dark "hidden" colour
    Image.fromarray(rgba, "RGBA").save(tmp_path / "t.png")
    out = load_rgb(tmp_path / "t.png")
    assert out.shape == (4, 4, 3)
    assert tuple(out[0, 0]) == (255, 255, 255)
    assert all(abs(int(v) - 127) <= 1 for v in out[0, 1])
    assert tuple(out[0, 2]) == (0, 255, 0)
    assert (out[1:] == 255).all()


def test_la_composited_over_white(tmp_path):
    la = np.zeros((2, 2, 2), np.uint8)
    la[..., 0] = 0
    la[0, 0, 1] = 255
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    out = load_rgb(tmp_path / "la.png")
    assert tuple(out[0, 0]) == (0, 0, 0) and tuple(out[1, 1]) == (255, 255, 255)


def _palette_image() -> Image.Image:
    idx = np.array([[0, 1], [2, 1]], np.uint8)
    im = Image.fromarray(idx, "P")
    im.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 9))
    return im


def test_palette_without_transparency(tmp_path):
    _palette_image().save(tmp_path / "p.png")
    out = load_rgb(tmp_path / "p.png")
    assert tuple(out[0, 0]) == (255, 0, 0)
    assert tuple(out[0, 1]) == (0, 255, 0)
    assert tuple(out[1, 0]) == (0, 0, 255)


def test_palette_with_transparency(tmp_path):
    _palette_image().save(tmp_path / "p.png", transparency=0)  # index 0 (red) is transparent
    assert Image.open(tmp_path / "p.png").mode == "P"
    out = load_rgb(tmp_path / "p.png")
    assert tuple(out[0, 0]) == (255, 255, 255)
    assert tuple(out[0, 1]) == (0, 255, 0)
    assert tuple(out[1, 0]) == (0, 0, 255)


def test_palette_gif_with_transparency(tmp_path):
    _palette_image().save(tmp_path / "p.gif", transparency=1)
    # (.gif is a style image suffix too: the first frame of an animation.)
    out = load_rgb(tmp_path / "p.gif")
    assert tuple(out[0, 0]) == (255, 0, 0) and tuple(out[0, 1]) == (255, 255, 255)


def _quadrants() -> np.ndarray:
    """40 wide x 20 high: red | blue over green | white."""
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:10, :20] = (255, 0, 0)
    arr[:10, 20:] = (0, 0, 255)
    arr[10:, :20] = (0, 255, 0)
    arr[10:, 20:] = (255, 255, 255)
    return arr


def _near(pixel, colour, tol=12) -> bool:
    return all(abs(int(a) - b) <= tol for a, b in zip(pixel, colour))


@pytest.mark.parametrize("orientation", [6, 8])
def test_exif_orientation_applied(tmp_path, orientation):
    path = tmp_path / f"o{orientation}.jpg"
    exif = Image.Exif()
    exif[274] = orientation
    Image.fromarray(_quadrants()).save(path, exif=exif, quality=95)
    stored = np.asarray(Image.open(path).convert("RGB"))
    assert stored.shape == (20, 40, 3)  # as stored, unrotated
    out = load_rgb(path)
    assert out.shape == (40, 20, 3)  # 40 rows x 20 cols: upright
    if orientation == 6:  # displayed rotated 90 degrees clockwise
        np.testing.assert_array_equal(out, np.rot90(stored, k=-1))
        expected = {(5, 15): (255, 0, 0), (5, 5): (0, 255, 0), (35, 15): (0, 0, 255), (35, 5): (255, 255, 255)}
    else:  # 8: rotated 90 degrees counter-clockwise
        np.testing.assert_array_equal(out, np.rot90(stored, k=1))
        expected = {(35, 5): (255, 0, 0), (35, 15): (0, 255, 0), (5, 5): (0, 0, 255), (5, 15): (255, 255, 255)}
    for (y, x), colour in expected.items():
        assert _near(out[y, x], colour), (y, x, out[y, x], colour)


def test_sixteen_bit_grayscale_png(tmp_path):
    ramp = np.linspace(0, 65535, 32 * 16).round().astype(np.uint16).reshape(16, 32)
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    out = load_rgb(tmp_path / "g16.png")
    assert out.dtype == np.uint8 and out.shape == (16, 32, 3)
    expected = np.round(ramp / 65535.0 * 255.0)
    assert np.abs(out[..., 0].astype(int) - expected).max() <= 1
    assert out[0, 0, 0] == 0 and out[-1, -1, 0] == 255
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 0] == out[..., 2]).all()


def test_sixteen_bit_twelve_bit_range_stays_dark(tmp_path):
    # 12-bit data in a 16-bit PNG (max 4095 of 65535) is a dark image, not a saturated one.
    ramp = np.linspace(0, 4095, 64).round().astype(np.uint16).reshape(8, 8)
    Image.fromarray(ramp).save(tmp_path / "g12.png")
    out = load_rgb(tmp_path / "g12.png")
    assert out.max() <= 17


def test_cmyk_jpeg(tmp_path):
    Image.new("CMYK", (10, 6), (0, 255, 255, 0)).save(tmp_path / "c.jpg")
    out = load_rgb(tmp_path / "c.jpg")
    assert out.shape == (6, 10, 3)
    assert _near(out[3, 5], (255, 0, 0), tol=20)


# -- resizing ---------------------------------------------------------------------------------------------


def test_center_square_keeps_centre():
    arr = np.zeros((40, 100, 3), np.uint8)  # wide image: blue sides, a red middle stripe
    arr[:, :] = (0, 0, 255)
    arr[:, 30:70] = (255, 0, 0)
    out = center_square(arr, 32)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    # 100x40 -> 80x32, centre crop x in [24, 56): the red stripe (scaled to [24, 56)) fills it.
    assert _near(out[16, 16], (255, 0, 0), tol=2)
    assert _near(out[2, 4], (255, 0, 0), tol=40) and _near(out[30, 28], (255, 0, 0), tol=40)


def test_center_square_tall_image():
    arr = np.zeros((90, 30, 3), np.uint8)
    arr[:30] = (0, 255, 0)
    arr[30:60] = (255, 255, 255)
    arr[60:] = (0, 0, 255)
    out = center_square(arr, 24)
    assert out.shape == (24, 24, 3)
    assert _near(out[12, 12], (255, 255, 255), tol=2)


def test_tiny_image_upscales():
    out = center_square(random_rgb(4, 8, 8), 32)
    assert out.shape == (32, 32, 3)
    # Upscaling a uniform image keeps the colour.
    uniform = np.full((8, 8, 3), (12, 200, 99), np.uint8)
    assert (center_square(uniform, 32) == (12, 200, 99)).all()


def test_resize_short_side_keeps_aspect():
    im = resize_short_side(random_rgb(5, 30, 60), 20)
    assert im.size == (40, 20)
    im = resize_short_side(random_rgb(5, 61, 20), 20)
    assert im.size == (20, 61)


# -- small helpers ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stem", "name"),
    [("wheat_field", "wheat field"), ("wallet_", "wallet"), ("_a__b_", "a b"), ("Dolphin", "Dolphin")],
)
def test_object_name(stem, name):
    assert object_name(stem) == name


def test_image_file_name_has_no_separators():
    assert image_file_name("Dolphin") == "Dolphin.png"
    assert "/" not in image_file_name("a/b") and "\\" not in image_file_name("a\\b")


def test_average_style_image_matches_numpy():
    images = [random_rgb(s, 24, 24) for s in (10, 11, 12)]
    expected = np.rint((images[0].astype(np.float64) + images[1] + images[2]) / 3.0).astype(np.uint8)
    out = average_style_image(images)
    assert out.dtype == np.uint8 and out.shape == (24, 24, 3)
    np.testing.assert_array_equal(out, expected)
    # No uint8 overflow: three white images average to white.
    white = np.full((4, 4, 3), 255, np.uint8)
    assert (average_style_image([white] * 3) == 255).all()


def test_to_model_range():
    arr = np.array([[[0, 255, 127]]], np.uint8)
    out = to_model_range(arr)
    assert out.shape == (3, 1, 1) and out.dtype == np.float32
    np.testing.assert_allclose(out[:, 0, 0], [-1.0, 1.0, 127 / 127.5 - 1.0], atol=1e-6)
    every = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, axis=2)
    batch = to_model_range(np.stack([every, every[::-1]]))  # a batch: BHWC in, BCHW out, each as on its own
    assert batch.shape == (2, 3, 16, 16) and batch.flags.c_contiguous
    np.testing.assert_array_equal(batch[1], to_model_range(every[::-1]))
    np.testing.assert_array_equal(batch[0], (every.astype(np.float32) / 127.5 - 1.0).transpose(2, 0, 1))


# -- augment ------------------------------------------------------------------------------------------------


def test_augment_identity_at_resolution():
    arr = random_rgb(20, 48, 48)
    out = augment(arr, 48, np.random.default_rng(0), crop_scale=1.0, random_crop=False)
    np.testing.assert_array_equal(out, arr)


def test_augment_no_crop_equals_center_square():
    arr = random_rgb(21, 50, 80)
    out = augment(arr, 32, np.random.default_rng(0), crop_scale=1.0, random_crop=False)
    np.testing.assert_array_equal(out, center_square(arr, 32))


def test_augment_hflip_mirrors():
    arr = random_rgb(22, 70, 70)
    kwargs = dict(crop_scale=1.04, random_crop=True)
    plain = augment(arr, 64, np.random.default_rng(5), hflip=0.0, **kwargs)
    flipped = augment(arr, 64, np.random.default_rng(5), hflip=1.0, **kwargs)
    np.testing.assert_array_equal(flipped, plain[:, ::-1])
    assert not np.array_equal(flipped, plain)


def test_augment_options_do_not_shift_random_numbers():
    # Every call draws the same random numbers whatever is enabled: turning flips or rotation on must not
    # change which crop a seed picks, nor the random numbers left for the caller.
    arr = random_rgb(27, 90, 90)
    options = [dict(), dict(hflip=0.5), dict(hflip=1.0), dict(rotate_degrees=10.0), dict(hflip=0.5, rotate_degrees=5.0)]
    nexts = []
    for opts in options:
        rng = np.random.default_rng(11)
        augment(arr, 64, rng, crop_scale=1.2, random_crop=True, **opts)
        nexts.append(rng.random())
    assert len(set(nexts)) == 1
    for seed in range(6):
        plain = augment(arr, 64, np.random.default_rng(seed), crop_scale=1.2, random_crop=True)
        maybe = augment(arr, 64, np.random.default_rng(seed), crop_scale=1.2, random_crop=True, hflip=0.5)
        assert np.array_equal(maybe, plain) or np.array_equal(maybe[:, ::-1], plain)


def _window_offset(big: np.ndarray, crop: np.ndarray) -> tuple[int, int] | None:
    r = crop.shape[0]
    for top in range(big.shape[0] - r + 1):
        for left in range(big.shape[1] - r + 1):
            if np.array_equal(big[top:top + r, left:left + r], crop):
                return left, top
    return None


def test_augment_random_crop_is_sub_window():
    arr = random_rgb(23, 100, 100)
    res = 100
    big = np.asarray(resize_short_side(arr, round(res * 1.04)))
    assert big.shape == (104, 104, 3)
    offsets = []
    for seed in range(24):
        out = augment(arr, res, np.random.default_rng(seed), crop_scale=1.04, random_crop=True)
        assert out.shape == (res, res, 3) and out.dtype == np.uint8
        offset = _window_offset(big, out)
        assert offset is not None, f"seed {seed}: crop is not a window of the enlarged image"
        offsets.append(offset)
    lefts, tops = {o[0] for o in offsets}, {o[1] for o in offsets}
    assert len(set(offsets)) > 4
    assert len(lefts) > 2 and len(tops) > 2
    assert any(left != top for left, top in offsets)  # x and y drawn independently
    assert min(lefts) == 0 or max(lefts) == 4  # reaches the edges of the range


def test_augment_centre_crop_of_enlarged():
    arr = random_rgb(24, 100, 100)
    big = np.asarray(resize_short_side(arr, 104))
    out = augment(arr, 100, np.random.default_rng(0), crop_scale=1.04, random_crop=False)
    np.testing.assert_array_equal(out, big[2:102, 2:102])


def test_augment_same_seed_same_output():
    arr = random_rgb(25, 80, 60)
    kwargs = dict(crop_scale=1.1, random_crop=True, hflip=0.5, rotate_degrees=15.0)
    a = augment(arr, 48, np.random.default_rng(7), **kwargs)
    b = augment(arr, 48, np.random.default_rng(7), **kwargs)
    np.testing.assert_array_equal(a, b)
    outs = {augment(arr, 48, np.random.default_rng(s), **kwargs).tobytes() for s in range(6)}
    assert len(outs) > 1


def test_augment_rotation_changes_image_without_black_corners():
    arr = random_rgb(26, 64, 64)
    kwargs = dict(crop_scale=1.04, random_crop=True)
    plain = augment(arr, 64, np.random.default_rng(3), **kwargs)
    rotated = augment(arr, 64, np.random.default_rng(3), rotate_degrees=20.0, **kwargs)
    assert rotated.shape == (64, 64, 3)
    assert not np.array_equal(plain, rotated)
    colour = (30, 120, 200)
    uniform = np.full((64, 64, 3), colour, np.uint8)
    for seed in range(5):
        out = augment(uniform, 64, np.random.default_rng(seed), rotate_degrees=45.0, **kwargs)
        for y, x in ((0, 0), (0, 63), (63, 0), (63, 63)):
            assert tuple(out[y, x]) == colour, (seed, y, x, out[y, x])
        assert (out == np.array(colour, np.uint8)).all()


def test_augment_rotation_is_about_the_centre():
    arr = np.zeros((64, 64, 3), np.uint8)
    arr[28:36, 28:36] = 255  # a white block in the middle
    out = augment(arr, 64, np.random.default_rng(1), rotate_degrees=30.0)
    assert (out[31:33, 31:33] > 200).all()
    assert (out[:8, :8] < 30).all()


# -- demo data ------------------------------------------------------------------------------------------


def test_demo_styles_loadable_and_idempotent(tmp_path):
    root = tmp_path / "cache" / "demo_styles"
    assert write_demo_styles(root) == root
    assert (root / ".complete").is_file()
    for style_id, (_, _, refs, prompts) in DEMO_STYLES.items():
        style = load_style(root, style_id)
        assert style.prompt_objects == tuple(prompts) and len(style.prompt_objects) > 0
        assert sorted(style.objects) == sorted(object_name(r) for r in refs)
        assert all(im.shape == (64, 64, 3) for im in style.images_at(64))
    assert "wallet" in load_style(root, "01").objects
    # Two styles with different palettes: their average images differ clearly.
    avg = [average_style_image(load_style(root, s).images()).astype(int) for s in ("00", "01")]
    assert np.abs(avg[0] - avg[1]).mean() > 30

    files = sorted(p for p in root.rglob("*") if p.is_file())
    before = {p: p.stat().st_mtime_ns for p in files}
    write_demo_styles(root)
    assert sorted(p for p in root.rglob("*") if p.is_file()) == files
    assert {p: p.stat().st_mtime_ns for p in files} == before
    # No temporary folders left next to the set.
    assert sorted(p.name for p in root.parent.iterdir() if p.is_dir()) == ["demo_styles"]


def test_demo_styles_deterministic_and_never_replace_other_files(tmp_path):
    a = write_demo_styles(tmp_path / "a")
    b = tmp_path / "b"
    (b / "00").mkdir(parents=True)  # not a finished demo set: what is there may be the user's, and is kept
    (b / "00" / "junk.txt").write_text("half-written")
    with pytest.raises(StyleDataError, match="unfinished demo set"):  # only demo style names: say so
        write_demo_styles(b)
    (b / "notes.txt").write_text("mine")
    with pytest.raises(StyleDataError, match="holds files jdiff did not write"):
        write_demo_styles(b)
    assert sorted(p.name for p in b.rglob("*")) == ["00", "junk.txt", "notes.txt"]
    assert (b / "00" / "junk.txt").read_text() == "half-written"
    stale = tmp_path / ".c.building-x"  # left by a process killed while drawing set c
    (stale / "00").mkdir(parents=True)
    c = write_demo_styles(tmp_path / "c")
    assert not stale.exists()
    files_a = {p.relative_to(a): p.read_bytes() for p in a.rglob("*") if p.is_file()}
    files_c = {p.relative_to(c): p.read_bytes() for p in c.rglob("*") if p.is_file()}
    assert files_a == files_c
    assert {p.parts[0] for p in files_a if len(p.parts) > 1} == {"00", "01"}
