"""Bad inputs in a user's style folder: each one is refused with one StyleDataError naming the file or value and
the fix (never a traceback, lost objects or a silently wrong result), and harmless OS clutter is ignored."""

from __future__ import annotations

import codecs
import json
import logging
import os
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jdiff.data import (
    MAX_NAME_BYTES,
    MAX_NAME_CHARS,
    StyleDataError,
    check_object_names,
    image_file_name,
    load_rgb,
    load_style,
    name_problem,
    read_prompt_objects,
)
from test_data import make_style, random_rgb, style_error



def with_prompts(root: Path, prompts, objects=("sun", "wheat_field")) -> Path:
    return make_style(root, objects=objects, prompts=prompts)


def prompt_error(root: Path, prompts, objects=("sun", "wheat_field")) -> str:
    with_prompts(root, prompts, objects)
    return style_error(root)


# -- object names -----------------------------------------------------------------------------------------


def test_names_saved_as_one_file_are_refused(tmp_path):
    message = prompt_error(tmp_path, {"0": "a/b", "1": "a_b", "2": "Lion"})
    assert "'a/b' and 'a_b'" in message and "a_b.png" in message and "prompt.json" in message
    assert "Lion" not in message


@pytest.mark.parametrize("pair", [("Hat", "hat"), ("DOLPHIN", "dolphin"), ("a:b", "A?B")])
def test_names_differing_only_in_case_are_refused(tmp_path, pair):
    message = prompt_error(tmp_path, dict(enumerate(pair)))
    assert all(repr(name) in message for name in pair)
    assert "Windows and macOS" in message or "both would be saved" in message


def test_unicode_normalisation_forms_are_one_file_on_macos(tmp_path):
    nfc, nfd = unicodedata.normalize("NFC", "Café"), unicodedata.normalize("NFD", "Café")
    assert nfc != nfd
    message = prompt_error(tmp_path, {"0": nfc, "1": nfd})
    assert repr(nfc) in message and repr(nfd) in message


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("..", "starts with '.'"),
        (".", "starts with '.'"),
        (".hidden", "starts with '.'"),
        ("...", "starts with '.'"),
        ("end.", "ends with '.'"),
        ("Dol\tphin", "control character"),
        ("a\nb", "control character"),
        ("bell\x07", "control character"),
        ("del\x7f", "control character"),
        ("CON", "device name"),
        ("con", "device name"),
        ("Nul", "device name"),
        ("aux.txt", "device name"),
        ("COM1", "device name"),
        ("lpt9", "device name"),
        ("PRN.tar.gz", "device name"),
        ("x" * 300, "too long"),
    ],
)
def test_unsafe_object_names_are_refused(tmp_path, name, fragment):
    message = prompt_error(tmp_path, {"0": "Lion", "1": name})
    assert repr(name) in message and fragment in message
    assert f"at most {MAX_NAME_CHARS} characters and {MAX_NAME_BYTES} UTF-8 bytes" in message  # the rule and fix
    assert "Rename" in message and "'Lion'" not in message


@pytest.mark.parametrize("name", ["COM10", "CONSOLE", "Con Air", "nullify", "a.b", "Dolphin", "wheat field",
                                  "Straße", "你好", "Café", "a*b", "x" * (MAX_NAME_CHARS - 4)])
def test_safe_object_names_are_accepted(tmp_path, name):
    with_prompts(tmp_path, {"0": name})
    assert load_style(tmp_path, "00").prompt_objects == (name,)
    assert name_problem(name) is None


def test_name_length_limit_counts_characters_and_utf8_bytes():
    assert len(image_file_name("x" * (MAX_NAME_CHARS - 4))) == MAX_NAME_CHARS
    assert name_problem("x" * (MAX_NAME_CHARS - 3)) is not None  # 101 characters with .png
    three_bytes = "你" * 66  # 70 characters, but 202 UTF-8 bytes with .png
    assert len(image_file_name(three_bytes)) < MAX_NAME_CHARS
    assert "202 UTF-8 bytes" in name_problem(three_bytes)
    assert name_problem("你" * 65) is None  # 199 bytes


def test_every_bad_name_is_listed_in_one_message(tmp_path):
    message = prompt_error(tmp_path, {"0": "CON", "1": "..", "2": "a/b", "3": "a_b", "4": "Lion", "5": "lion"})
    for fragment in ("'CON'", "'..'", "'a/b' and 'a_b'", "'Lion' and 'lion'"):
        assert fragment in message
    assert message.count("\n  ") == 4


def test_reference_image_names_are_checked(tmp_path):
    folder = make_style(tmp_path, objects=("sun", "CON", "___"))
    message = style_error(tmp_path)
    assert "images/CON.png" in message and "device name" in message
    assert "images/___.png" in message and "empty" in message
    assert str(folder) in message


@pytest.mark.skipif(os.name == "nt" or not hasattr(os, "fsencode"), reason="POSIX file names are bytes")
def test_reference_file_name_in_another_encoding(tmp_path):
    folder = make_style(tmp_path)
    latin1 = os.fsencode(folder / "images") + b"/caf\xe9.png"  # "café" in Latin-1: not UTF-8
    try:
        Image.fromarray(random_rgb(2)).save(os.fsdecode(latin1))
    except OSError:
        pytest.skip("the file system refuses non-UTF-8 names")
    message = style_error(tmp_path)
    assert "not UTF-8" in message and "images/caf" in message


def test_reference_and_prompt_object_sharing_a_class_folder_are_refused(tmp_path):
    # a reference a:b.png (object 'a:b') and a prompt object 'a/b' would share the class-image folder a_b/
    message = prompt_error(tmp_path, {"0": "a/b"}, objects=("sun", "a:b"))
    assert "'a:b' and 'a/b'" in message and "images/a:b.png" in message and "prompt.json" in message
    assert "class-image folder a_b/" in message


def test_reference_object_differing_in_case_from_a_prompt_object_is_fine(tmp_path):
    # Common in real sets (dolphin.jpg, "Dolphin"): their image files are apart, only the class images would meet.
    with_prompts(tmp_path, {"0": "Dolphin"}, objects=("dolphin", "sun"))
    style = load_style(tmp_path, "00")
    assert style.objects == ("dolphin", "sun") and style.prompt_objects == ("Dolphin",)


def test_same_object_as_reference_and_prompt_is_fine(tmp_path):
    with_prompts(tmp_path, {"0": "sun", "1": "wheat field"})
    assert load_style(tmp_path, "00").prompt_objects == ("sun", "wheat field")


def test_check_object_names_takes_plain_lists():
    # what the prior code would pass: the objects that get class-image folders
    check_object_names(["Dolphin", "wheat field", "Hat", "hat"])  # reference and prompt objects may differ in case
    with pytest.raises(StyleDataError, match=r"'\.\.'"):
        check_object_names(["Dolphin", ".."])
    with pytest.raises(StyleDataError, match="class-image folder a_b/"):
        check_object_names(["a/b", "a:b"])
    with pytest.raises(StyleDataError, match="one file on Windows and macOS"):
        check_object_names([], ["Hat", "hat"])


# -- images -----------------------------------------------------------------------------------------------


def test_decompression_bomb_is_named_with_its_size(tmp_path, monkeypatch):
    folder = make_style(tmp_path)  # 64x64 images: 4096 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    message = style_error(tmp_path)
    assert str(folder / "images" / "sun.png") in message
    assert "4,096 pixels" in message and "2,000" in message and "Resize it" in message
    with pytest.raises(StyleDataError, match="too large"):
        load_rgb(folder / "images" / "sun.png")


def test_image_just_under_the_bomb_limit_loads(tmp_path, monkeypatch):
    make_style(tmp_path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2048)  # 4096 = 2 x limit: Pillow only warns
    with pytest.warns(Image.DecompressionBombWarning):
        assert len(load_style(tmp_path, "00").image_paths) == 2


def _frames(colours) -> list[Image.Image]:
    return [Image.fromarray(np.full((64, 64, 3), c, np.uint8)) for c in colours]


def test_animated_gif_uses_the_first_frame_and_warns(tmp_path, caplog):
    folder = make_style(tmp_path)
    frames = _frames([(255, 0, 0), (0, 0, 255), (0, 255, 0)])
    gif = folder / "images" / "flag.gif"
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=100)
    with caplog.at_level(logging.WARNING, logger="jdiff.data"):
        style = load_style(tmp_path, "00")
    assert gif in style.image_paths and "flag" in style.objects
    warnings = [r.getMessage() for r in caplog.records if "flag.gif" in r.getMessage()]
    assert len(warnings) == 1 and "3 frames" in warnings[0] and "first" in warnings[0]
    first = load_rgb(gif)
    assert first.shape == (64, 64, 3) and (np.abs(first.astype(int) - (255, 0, 0)).max(axis=-1) <= 8).all()


def test_still_gif_is_accepted_quietly(tmp_path, caplog):
    folder = make_style(tmp_path)
    _frames([(10, 200, 30)])[0].save(folder / "images" / "leaf.GIF")
    with caplog.at_level(logging.WARNING, logger="jdiff.data"):
        style = load_style(tmp_path, "00")
    assert "leaf" in style.objects
    assert not any("leaf" in r.getMessage() for r in caplog.records)


def test_animated_png_warns(tmp_path, caplog):
    folder = make_style(tmp_path)
    frames = _frames([(0, 0, 0), (255, 255, 255)])
    frames[0].save(folder / "images" / "blink.png", save_all=True, append_images=frames[1:])
    with caplog.at_level(logging.WARNING, logger="jdiff.data"):
        load_style(tmp_path, "00")
    assert any("blink.png" in r.getMessage() and "2 frames" in r.getMessage() for r in caplog.records)


def test_non_images_are_listed_in_one_warning(tmp_path, caplog):
    folder = make_style(tmp_path)
    (folder / "images" / "notes.txt").write_text("x")
    (folder / "images" / "photo.heic").write_bytes(b"\0" * 10)
    (folder / "images" / "extra").mkdir()
    with caplog.at_level(logging.WARNING, logger="jdiff.data"):
        style = load_style(tmp_path, "00")
    assert len(style.image_paths) == 2
    warnings = [r.getMessage() for r in caplog.records if "notes.txt" in r.getMessage()]
    assert len(warnings) == 1
    assert "photo.heic" in warnings[0] and "extra/" in warnings[0] and ".png" in warnings[0]


def test_only_non_images_are_named_in_the_error(tmp_path):
    folder = make_style(tmp_path, objects=())
    (folder / "images" / "photo.heic").write_bytes(b"\0" * 10)
    message = style_error(tmp_path)
    assert "holds no images" in message and "photo.heic" in message


def test_hidden_files_are_ignored(tmp_path, caplog):
    folder = make_style(tmp_path)
    junk = np.random.default_rng(1).integers(0, 256, 400, dtype=np.uint8).tobytes()
    (folder / "images" / "._sun.png").write_bytes(junk)  # macOS AppleDouble file
    (folder / "images" / ".DS_Store").write_bytes(junk)
    (folder / "images" / "Thumbs.db").write_bytes(junk)
    (folder / "images" / ".ipynb_checkpoints").mkdir()
    Image.fromarray(random_rgb(5)).save(folder / "images" / ".ipynb_checkpoints" / "sun-checkpoint.png")
    (folder / ".DS_Store").write_bytes(junk)
    with caplog.at_level(logging.WARNING, logger="jdiff.data"):
        style = load_style(tmp_path, "00")
    assert [p.name for p in style.image_paths] == ["sun.png", "wheat_field.png"]
    assert not caplog.records


def test_only_hidden_files_is_no_images(tmp_path):
    folder = make_style(tmp_path, objects=())
    Image.fromarray(random_rgb(0)).save(folder / "images" / ".sun.png")
    message = style_error(tmp_path)
    assert "holds no images" in message and ".sun.png" not in message


def test_images_is_a_file(tmp_path):
    folder = tmp_path / "00"
    folder.mkdir()
    (folder / "images").write_text("oops")
    (folder / "prompt.json").write_text('{"0": "Apple"}')
    message = style_error(tmp_path)
    assert str(folder / "images") in message and "is a file, not a folder" in message


def test_images_links_to_a_missing_folder(tmp_path):
    folder = tmp_path / "00"
    folder.mkdir()
    (folder / "images").symlink_to(tmp_path / "elsewhere")
    (folder / "prompt.json").write_text('{"0": "Apple"}')
    message = style_error(tmp_path)
    assert str(folder / "images") in message and "does not exist" in message and "elsewhere" in message


def test_zero_byte_image(tmp_path):
    folder = make_style(tmp_path)
    (folder / "images" / "empty.png").write_bytes(b"")
    message = style_error(tmp_path)
    assert str(folder / "images" / "empty.png") in message and "0 bytes" in message


def test_link_to_a_missing_image(tmp_path):
    folder = make_style(tmp_path)
    link = folder / "images" / "gone.jpg"
    link.symlink_to(tmp_path / "elsewhere" / "gone.jpg")
    message = style_error(tmp_path)
    assert str(link) in message and "does not exist" in message and str(tmp_path / "elsewhere") in message


def test_link_to_an_image_is_followed(tmp_path):
    folder = make_style(tmp_path)
    Image.fromarray(random_rgb(3)).save(tmp_path / "kept.png")
    (folder / "images" / "moon.png").symlink_to(tmp_path / "kept.png")
    assert "moon" in load_style(tmp_path, "00").objects


def _deny(monkeypatch, target: Path) -> None:
    """Reading ``target`` raises PermissionError, as it does for a file without read permission."""
    real_open = Image.open

    def fake_open(fp, *args, **kwargs):
        if Path(fp) == target:
            raise PermissionError(13, "Permission denied", str(target))
        return real_open(fp, *args, **kwargs)

    real_read = Path.read_bytes

    def fake_read(self):
        if self == target:
            raise PermissionError(13, "Permission denied", str(target))
        return real_read(self)

    monkeypatch.setattr(Image, "open", fake_open)
    monkeypatch.setattr(Path, "read_bytes", fake_read)


def test_unreadable_image(tmp_path, monkeypatch):
    folder = make_style(tmp_path)
    target = folder / "images" / "sun.png"
    _deny(monkeypatch, target)
    message = style_error(tmp_path)
    assert str(target) in message and "permission denied" in message and "chmod" in message


def test_unreadable_prompt_json(tmp_path, monkeypatch):
    folder = make_style(tmp_path)
    _deny(monkeypatch, folder / "prompt.json")
    message = style_error(tmp_path)
    assert str(folder / "prompt.json") in message and "Permission denied" in message and "chmod" in message


def test_unlistable_images_folder(tmp_path, monkeypatch):
    folder = make_style(tmp_path)
    real_iterdir = Path.iterdir

    def iterdir(self):
        if self == folder / "images":
            raise PermissionError(13, "Permission denied", str(self))
        return real_iterdir(self)

    monkeypatch.setattr(Path, "iterdir", iterdir)
    message = style_error(tmp_path)
    assert f"cannot list {folder / 'images'}" in message and "Permission denied" in message


def test_extreme_aspect_ratio_is_refused(tmp_path):
    folder = make_style(tmp_path)
    Image.fromarray(random_rgb(4, 2, 3000)).save(folder / "images" / "strip.png")
    message = style_error(tmp_path)
    assert str(folder / "images" / "strip.png") in message and "3000x2" in message and "Crop it" in message


def test_every_broken_image_is_named_in_one_message(tmp_path):
    folder = make_style(tmp_path)
    (folder / "images" / "a.png").write_bytes(b"")
    (folder / "images" / "b.jpg").write_bytes(b"not a jpeg at all")
    message = style_error(tmp_path)
    assert message.startswith("2 images of")
    assert str(folder / "images" / "a.png") in message and str(folder / "images" / "b.jpg") in message


# -- style folders and data.root --------------------------------------------------------------------------


def test_data_root_is_a_file(tmp_path):
    (tmp_path / "styles").write_text("x")
    message = style_error(tmp_path / "styles")
    assert "is a file, not a folder" in message and str(tmp_path / "styles") in message


def test_hidden_folders_are_not_offered_as_styles(tmp_path):
    make_style(tmp_path, "00")
    (tmp_path / ".ipynb_checkpoints").mkdir()
    (tmp_path / "__MACOSX").mkdir()
    message = style_error(tmp_path, "07")
    assert "Available styles in data.root: 00." in message


def test_style_named_with_a_non_ascii_digit(tmp_path):
    make_style(tmp_path, "²")  # "²".isdigit() is true, but int("²") fails
    style = load_style(tmp_path, "²")
    assert style.style_id == "²" and isinstance(style.index, int)


# -- prompt.json ------------------------------------------------------------------------------------------


def write_prompt(tmp_path: Path, data: bytes) -> Path:
    folder = make_style(tmp_path)
    (folder / "prompt.json").write_bytes(data)
    return folder / "prompt.json"


def test_duplicate_keys_are_refused(tmp_path):
    path = write_prompt(tmp_path, b'{"0": "Dolphin", "1": "Lion", "0": "Cat"}')
    message = style_error(tmp_path)
    assert str(path) in message and "key '0'" in message and "'Dolphin'" in message and "'Cat'" in message


def test_duplicate_keys_in_a_nested_object_are_named(tmp_path):
    write_prompt(tmp_path, b'{"0": {"a": 1, "a": 2}}')
    assert "key 'a'" in style_error(tmp_path)


@pytest.mark.parametrize("bom", [codecs.BOM_UTF8, b""])
def test_utf8_with_or_without_bom(tmp_path, bom):
    write_prompt(tmp_path, bom + '{"0": "Café", "1": "Lion"}'.encode())
    assert load_style(tmp_path, "00").prompt_objects == ("Café", "Lion")


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-be"])
def test_utf16_with_bom_is_read(tmp_path, encoding):
    text = '{"0": "Café", "1": "Lion"}'
    data = text.encode(encoding) if encoding == "utf-16" else codecs.BOM_UTF16_BE + text.encode(encoding)
    write_prompt(tmp_path, data)
    assert load_style(tmp_path, "00").prompt_objects == ("Café", "Lion")


def test_non_utf8_bytes(tmp_path):
    path = write_prompt(tmp_path, '{"0": "Café"}'.encode("latin-1"))
    message = style_error(tmp_path)
    assert str(path) in message and "not UTF-8" in message and "Save it as UTF-8" in message


@pytest.mark.parametrize("data", [b"", b"  \n", codecs.BOM_UTF8])
def test_empty_prompt_json(tmp_path, data):
    path = write_prompt(tmp_path, data)
    message = style_error(tmp_path)
    assert str(path) in message and "is empty" in message


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ('{"0": {"name": "Dolphin"}}', "entry '0'"),
        ('{"0": ["Dolphin"]}', "entry '0'"),
        ('{"0": null}', "entry '0'"),
        ('{"0": true}', "entry '0'"),
        ('{"0": 3.5}', "entry '0'"),
        ('["Dolphin", {"x": 1}]', "entry 1"),
        ("null", "JSON object"),
        ("42", "JSON object"),
        ('{"0": "Dolphin"} trailing', "not valid JSON"),
    ],
)
def test_wrong_json_shapes(tmp_path, content, fragment):
    path = write_prompt(tmp_path, content.encode())
    message = style_error(tmp_path)
    assert str(path) in message and fragment in message


def test_keys_that_look_numeric_but_are_not_decimal(tmp_path):
    path = write_prompt(tmp_path, json.dumps({"1": "Lion", "²": "Dolphin", "0": "Cat"}).encode())
    assert read_prompt_objects(path) == ("Cat", "Lion", "Dolphin")


def test_prompt_json_is_a_folder(tmp_path):
    folder = make_style(tmp_path)
    (folder / "prompt.json").unlink()
    (folder / "prompt.json").mkdir()
    message = style_error(tmp_path)
    assert str(folder / "prompt.json") in message and "is a folder" in message


def test_prompt_json_links_to_a_missing_file(tmp_path):
    folder = make_style(tmp_path)
    (folder / "prompt.json").unlink()
    (folder / "prompt.json").symlink_to(tmp_path / "nowhere.json")
    message = style_error(tmp_path)
    assert str(folder / "prompt.json") in message and "does not exist" in message
