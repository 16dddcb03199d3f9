"""Style sets on disk: reading images the way a user expects, prompts, and the average style image.

A style folder holds ``images/`` (the references; each file stem names the object shown) and
``prompt.json`` (the objects to generate, ``{"0": "Dolphin", ...}``). Everything here is numpy + Pillow.
Whatever is wrong with a user's folder is refused with one StyleDataError naming the file and the fix.
"""

from __future__ import annotations

import codecs
import json
import logging
import os
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Optional

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")
# Not the user's files: left out of every listing without a word (dot files such as .DS_Store, macOS's
# ._photo.jpg and .ipynb_checkpoints/ are caught by their leading dot).
OS_METADATA = ("__MACOSX", "Thumbs.db", "desktop.ini")
# The longest image file name of an object (``Dolphin.png``; its class-image folder is the same less .png):
# well inside what every file system allows (ext4 and APFS 255 bytes, NTFS 255 UTF-16 units).
MAX_NAME_CHARS = 100
MAX_NAME_BYTES = 200  # in UTF-8
WINDOWS_DEVICES = {"CON", "PRN", "AUX", "NUL", *(port + n for port in ("COM", "LPT") for n in "0123456789¹²³")}
MAX_ASPECT = 20  # a reference more elongated than 20:1 shows the model almost nothing in its centre square
EXAMPLE_PROMPTS = '{"0": "Dolphin", "1": "Lighthouse", ...}'


class StyleDataError(ValueError):
    """A style folder, prompt file or image that jdiff cannot use; the message says what to fix."""


def is_hidden(path: Path) -> bool:
    """OS and tool metadata (``.DS_Store``, ``._photo.jpg``, ``.ipynb_checkpoints``, ``Thumbs.db``), not user files."""
    return path.name.startswith(".") or path.name in OS_METADATA


def list_images(folder: Path) -> tuple[list[Path], list[str]]:
    """The image files of ``folder`` by name, and the names of its other entries; hidden ones are left out.

    A link to a missing file with an image suffix counts as an image, so that reading it names the problem.
    """
    try:
        entries = sorted(p for p in Path(folder).iterdir() if not is_hidden(p))
    except OSError as err:
        raise StyleDataError(f"cannot list {folder}: {err.strerror}. Check that it is a folder you can read.") from err
    images, others = [], []
    for p in entries:
        if p.suffix.lower() in IMAGE_SUFFIXES and (p.is_file() or not p.exists()):
            images.append(p)
        else:
            others.append(p.name + ("/" if p.is_dir() else ""))
    return images, others


def read_image(path: Path) -> tuple[np.ndarray, int]:
    """:func:`load_rgb`'s image, and how many frames the file holds (animations and multi-page TIFFs: the first
    is the image)."""
    path = Path(path)
    if path.is_symlink() and not path.exists():
        raise StyleDataError(f"image {path} is a link to {os.readlink(path)}, which does not exist. "
                             f"Fix the link or remove it.")
    if path.is_file() and path.stat().st_size == 0:
        raise StyleDataError(f"image {path} is empty (0 bytes). Replace or remove the file.")
    try:
        with Image.open(path) as im:
            im.load()
            frames = getattr(im, "n_frames", 1)
            im = ImageOps.exif_transpose(im)
    except PermissionError as err:
        raise StyleDataError(f"cannot read image {path}: permission denied. Make it readable (chmod +r) or "
                             f"remove it.") from err
    except Image.DecompressionBombError as err:
        pixels = re.search(r"\((\d+) pixels\)", str(err))
        size = f"{int(pixels[1]):,} pixels" if pixels else str(err)
        raise StyleDataError(f"image {path} is too large to open safely ({size}; Pillow refuses more than "
                             f"{2 * Image.MAX_IMAGE_PIXELS:,}). Resize it, e.g. to 2048 pixels on its longer "
                             f"side.") from err
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise StyleDataError(f"cannot read image {path}: {err}. Replace or remove the file.") from err
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(im, dtype=np.float64)
        scale = 65535.0 if im.mode.startswith("I;16") or arr.max() > 255 else 255.0
        im = Image.fromarray(np.clip(arr / scale * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("RGBA", "LA", "PA"):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, rgba)
    rgb = np.asarray(im.convert("RGB"), dtype=np.uint8)
    if rgb.shape[0] < 1 or rgb.shape[1] < 1:
        raise StyleDataError(f"image {path} is empty ({rgb.shape[1]}x{rgb.shape[0]}). Replace or remove it.")
    return rgb, frames


def load_rgb(path: Path) -> np.ndarray:
    """Read an image as uint8 RGB (H, W, 3), upright and opaque.

    EXIF orientation is applied (phone photos), grayscale and palette images become RGB, transparency is
    composited over white (what image viewers show), 16-bit images are scaled to 8 bits, and of an animation
    the first frame is read.
    """
    return read_image(path)[0]


def resize_short_side(image: np.ndarray, size: int) -> Image.Image:
    """Scale so the shorter side is ``size`` (aspect kept), with a high-quality filter."""
    h, w = image.shape[:2]
    scale = size / min(h, w)
    new = (max(size, round(w * scale)), max(size, round(h * scale)))
    return Image.fromarray(image).resize(new, Image.Resampling.BICUBIC)


def center_square(image: np.ndarray, resolution: int) -> np.ndarray:
    """Shorter side to ``resolution``, then the centred square: how a reference is shown to the model."""
    im = resize_short_side(image, resolution)
    left = (im.width - resolution) // 2
    top = (im.height - resolution) // 2
    return np.asarray(im.crop((left, top, left + resolution, top + resolution)), dtype=np.uint8)


def object_name(stem: str) -> str:
    """``wheat_field`` -> ``wheat field``; stray underscores (``wallet_``) are dropped."""
    return re.sub(r"\s+", " ", stem.replace("_", " ")).strip()


@dataclass(frozen=True)
class StyleSet:
    """One style: its id, reference images with their objects, and the objects to generate."""

    style_id: str
    folder: Path
    image_paths: tuple[Path, ...]
    objects: tuple[str, ...]  # the object of each reference image
    prompt_objects: tuple[str, ...]  # the objects to generate, in prompt.json order

    @property
    def index(self) -> int:
        """A number for the style, used to offset the sampling seed: the folder name when numeric."""
        return int(self.style_id) if self.style_id.isdecimal() else sum(map(ord, self.style_id)) % 1000

    def images(self) -> list[np.ndarray]:
        return [load_rgb(p) for p in self.image_paths]

    def images_at(self, resolution: int) -> list[np.ndarray]:
        return [center_square(im, resolution) for im in self.images()]


def find_style_folder(root: Path, style: str) -> Path:
    root = Path(root)
    if not root.is_dir():
        what = "is a file, not a folder" if root.exists() else "does not exist"
        raise StyleDataError(
            f"data.root={root} {what}. Put style folders there (data/styles/NN/images/*.jpg and "
            f"prompt.json) or point data.root at them."
        )
    candidates = [style]
    if style.isdecimal():
        candidates.append(style.zfill(2))
    for name in candidates:
        if (root / name).is_dir():
            return root / name
    available = sorted(p.name for p in root.iterdir() if p.is_dir() and not is_hidden(p))
    raise StyleDataError(
        f"style={style}: no folder {root / style}. Available styles in data.root: "
        f"{', '.join(available) if available else '(none)'}."
    )


def read_prompt_objects(path: Path) -> tuple[str, ...]:
    path = Path(path)
    if path.is_dir():
        raise StyleDataError(f"{path} is a folder. Make it a file listing the objects to generate: {EXAMPLE_PROMPTS}.")
    if path.is_symlink() and not path.exists():
        raise StyleDataError(f"{path} is a link to {os.readlink(path)}, which does not exist. Fix the link or "
                             f"write the objects to generate there as {EXAMPLE_PROMPTS}.")
    if not path.is_file():
        raise StyleDataError(f"{path} is missing. Write the objects to generate as {EXAMPLE_PROMPTS}.")
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise StyleDataError(f"cannot read {path}: {err.strerror}. Make it readable (chmod +r).") from err
    try:  # UTF-8 with or without a byte order mark; UTF-16 when it has one (Windows' "Unicode")
        text = raw.decode("utf-16" if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)) else "utf-8-sig")
    except UnicodeDecodeError as err:
        raise StyleDataError(f"{path} is not UTF-8 text (byte {err.start} is {raw[err.start:err.start + 1]!r}). "
                             f"Save it as UTF-8.") from err
    if not text.strip():
        raise StyleDataError(f"{path} is empty. Write the objects to generate as {EXAMPLE_PROMPTS}.")
    try:
        data = json.loads(text, object_pairs_hook=lambda pairs: unique_keys(path, pairs))
    except json.JSONDecodeError as err:
        raise StyleDataError(f"{path} is not valid JSON ({err}). Expected {EXAMPLE_PROMPTS}.") from err
    if isinstance(data, list):
        items = list(enumerate(data))
    elif isinstance(data, dict):
        numeric = str.isdecimal  # not isdigit: int() refuses "²"
        items = sorted(data.items(), key=lambda kv: (not numeric(kv[0]), int(kv[0]) if numeric(kv[0]) else 0, kv[0]))
    else:
        raise StyleDataError(f"{path} must hold a JSON object {EXAMPLE_PROMPTS}, not {type(data).__name__}.")
    objects = []
    for key, value in items:
        if not isinstance(value, str) or not value.strip():
            raise StyleDataError(f"{path}: entry {key!r} must be a non-empty object name, got {value!r}.")
        objects.append(value.strip())
    if not objects:
        raise StyleDataError(f"{path} lists no objects. Add at least one, e.g. {{\"0\": \"Dolphin\"}}.")
    if len(set(objects)) != len(objects):
        dupes = sorted({o for o in objects if objects.count(o) > 1})
        raise StyleDataError(f"{path} names {dupes} more than once; each object gets one image file.")
    return tuple(objects)


def unique_keys(path: Path, pairs: list[tuple[str, object]]) -> dict:
    """A JSON object's pairs as a dict, refusing a key given twice (JSON would keep only the last value)."""
    keys = [k for k, _ in pairs]
    for key in dict.fromkeys(k for k in keys if keys.count(k) > 1):
        values = [v for k, v in pairs if k == key]
        raise StyleDataError(f"{path}: key {key!r} is given {len(values)} times ({', '.join(map(repr, values))}); "
                             f"only the last would be kept. Give each object its own key.")
    return dict(pairs)


def image_file_name(obj: str) -> str:
    """The file an object's image is saved as: ``Dolphin.png``; path separators are not allowed."""
    return re.sub(r"[\\/:*?\"<>|]", "_", obj) + ".png"


def name_problem(obj: str) -> Optional[str]:
    """Why ``obj``'s image file, or its class-image folder (the file name less .png), cannot be made on every OS."""
    file = image_file_name(obj)
    stem = file[: -len(".png")]
    if not stem.strip():
        return "it is empty"
    if stem.startswith("."):
        return "it starts with '.' (a hidden file, or the folder itself or its parent)"
    if stem.endswith((".", " ")):
        return "it ends with '.' or a space, which Windows drops"
    if any(unicodedata.category(c) == "Cc" for c in stem):
        return "it holds a control character (a tab, a line break, ...)"
    if any(unicodedata.category(c) == "Cs" for c in stem):
        return "it is not UTF-8 text (a file name in another encoding)"
    device = stem.split(".")[0].rstrip(" ")
    if device.upper() in WINDOWS_DEVICES:
        return f"{device} is a device name on Windows"
    size = len(file.encode("utf-8"))
    if len(file) > MAX_NAME_CHARS or size > MAX_NAME_BYTES:
        return (f"its file name is too long: {len(file)} characters, {size} UTF-8 bytes (at most {MAX_NAME_CHARS} "
                f"and {MAX_NAME_BYTES})")
    return None


def check_object_names(objects: Iterable[str], prompt_objects: Iterable[str] = (),
                       sources: Optional[Mapping[str, Iterable[str]]] = None, where: str = "") -> None:
    """Refuse, in one message, object names that cannot be files on every OS or that would share one.

    ``objects`` and ``prompt_objects`` (the reference images' objects and the objects to generate) each get a
    class-image folder named like their image file; each prompt object also gets an image file. Every name
    must be a safe file name (:func:`name_problem`); two prompt objects must not be saved as one file on a
    case-insensitive file system (Windows, macOS); and two different objects must not share a class-image
    folder. ``sources`` says where each object comes from (``prompt.json``, ``images/Hat.jpg``), for the
    message; ``where`` (the style folder) starts it.
    """
    prompt_objects = list(dict.fromkeys(prompt_objects))  # a text given twice is refused by read_prompt_objects
    union = list(dict.fromkeys([*objects, *prompt_objects]))
    sources = sources or {}

    def named(names: list[str]) -> str:
        origin = ", ".join(dict.fromkeys(s for n in names for s in sources.get(n, ())))
        return " and ".join(map(repr, names)) + (f" ({origin})" if origin else "")

    problems = [f"{named([obj])}: {why}" for obj in union if (why := name_problem(obj))]
    reported: list[set[str]] = []
    same_file = collisions(prompt_objects, lambda o: unicodedata.normalize("NFC", image_file_name(o)).lower())
    for names in same_file:
        files = list(dict.fromkeys(image_file_name(n) for n in names))
        if len(files) == 1:
            problems.append(f"{named(names)}: {'both' if len(names) == 2 else 'all'} would be saved as {files[0]}")
        else:
            problems.append(f"{named(names)}: {' and '.join(files)} are one file on Windows and macOS")
        reported.append(set(names))
    for names in collisions(union, lambda o: unicodedata.normalize("NFC", image_file_name(o))):
        if not any(set(names) <= seen for seen in reported):
            problems.append(f"{named(names)}: they would share the class-image folder "
                            f"{image_file_name(names[0])[: -len('.png')]}/")
    if problems:
        raise StyleDataError(
            f"{where + ': ' if where else ''}object names that cannot be image files on every OS:\n  "
            + "\n  ".join(problems)
            + f"\nRename them (in prompt.json, or the reference image file). An object's file is its name with "
              f"\\/:*?\"<>| as _ and .png added; it may have at most {MAX_NAME_CHARS} characters and "
              f"{MAX_NAME_BYTES} UTF-8 bytes, no control characters, no leading '.' or trailing '.' or space, "
              f"and not be a Windows device name (CON, PRN, AUX, NUL, COM1-9, LPT1-9); objects must not differ "
              f"only in case or in \\/:*?\"<>| against _."
        )


def collisions(names: Iterable[str], key) -> list[list[str]]:
    """The names sharing a ``key`` with another, in groups (first appearance order)."""
    by_key: dict[str, list[str]] = {}
    for name in names:
        by_key.setdefault(key(name), []).append(name)
    return [g for g in by_key.values() if len(g) > 1]


def load_style(root: Path, style: str) -> StyleSet:
    """Find and check a style folder; every image is opened once so a broken file is named now."""
    folder = find_style_folder(root, str(style))
    images_dir = folder / "images"
    if images_dir.is_symlink() and not images_dir.exists():
        raise StyleDataError(f"{images_dir} is a link to {os.readlink(images_dir)}, which does not exist. Fix the "
                             f"link, or make images/ a folder holding the style's reference images.")
    if images_dir.exists() and not images_dir.is_dir():
        raise StyleDataError(f"{images_dir} is a file, not a folder. Make images/ a folder holding the style's "
                             f"reference images.")
    if not images_dir.is_dir():
        raise StyleDataError(f"{folder} has no images/ folder. Put the style's reference images in {images_dir}.")
    paths, others = list_images(images_dir)
    if not paths:
        ignored = f" (ignored: {', '.join(others)})" if others else ""
        raise StyleDataError(
            f"{images_dir} holds no images ({', '.join(IMAGE_SUFFIXES)}){ignored}. Add the style's reference images."
        )
    if others:
        log.warning("%s: ignoring %s: not images (jdiff reads %s)", images_dir, ", ".join(others),
                    ", ".join(IMAGE_SUFFIXES))
    prompt_objects = read_prompt_objects(folder / "prompt.json")
    objects = tuple(object_name(p.stem) for p in paths)
    sources: dict[str, list[str]] = {}
    for obj, p in zip(objects, paths):
        sources.setdefault(obj, []).append(f"images/{p.name}")
    for obj in prompt_objects:
        sources.setdefault(obj, []).append("prompt.json")
    check_object_names(objects, prompt_objects, sources, where=str(folder))
    errors = []
    for p in paths:
        try:
            rgb, frames = read_image(p)
        except StyleDataError as err:
            errors.append(str(err))
            continue
        h, w = rgb.shape[:2]
        if max(h, w) > MAX_ASPECT * min(h, w):
            errors.append(f"image {p} is {w}x{h}, more elongated than {MAX_ASPECT}:1; the model would see only "
                          f"its centre square. Crop it.")
        if frames > 1:
            log.warning("image %s has %d frames; only the first is used", p, frames)
        if min(h, w) < 64:
            log.warning("image %s is only %dx%d; it will be upscaled", p, w, h)
    if len(errors) > 1:
        raise StyleDataError(f"{len(errors)} images of {images_dir} cannot be used:\n  " + "\n  ".join(errors))
    if errors:
        raise StyleDataError(errors[0])
    return StyleSet(
        style_id=folder.name,
        folder=folder,
        image_paths=tuple(paths),
        objects=objects,
        prompt_objects=prompt_objects,
    )


def average_style_image(images: list[np.ndarray]) -> np.ndarray:
    """The pixel mean of equally sized uint8 images, rounded back to uint8."""
    stack = np.stack([im.astype(np.float64) for im in images])
    return np.clip(np.rint(stack.mean(axis=0)), 0, 255).astype(np.uint8)
