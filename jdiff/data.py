"""Style sets on disk: reading images the way a user expects, prompts, and the average style image.

A style folder holds ``images/`` (the references; each file stem names the object shown) and
``prompt.json`` (the objects to generate, ``{"0": "Dolphin", ...}``). Everything here is numpy + Pillow.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")


class StyleDataError(ValueError):
    """A style folder, prompt file or image that jdiff cannot use; the message says what to fix."""


def load_rgb(path: Path) -> np.ndarray:
    """Read an image as uint8 RGB (H, W, 3), upright and opaque.

    EXIF orientation is applied (phone photos), grayscale and palette images become RGB, transparency is
    composited over white (what image viewers show), and 16-bit images are scaled to 8 bits.
    """
    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            im = ImageOps.exif_transpose(im)
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
    return rgb


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
        return int(self.style_id) if self.style_id.isdigit() else sum(map(ord, self.style_id)) % 1000

    def images(self) -> list[np.ndarray]:
        return [load_rgb(p) for p in self.image_paths]

    def images_at(self, resolution: int) -> list[np.ndarray]:
        return [center_square(im, resolution) for im in self.images()]


def find_style_folder(root: Path, style: str) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise StyleDataError(
            f"data.root={root} does not exist. Put style folders there (data/styles/NN/images/*.jpg and "
            f"prompt.json) or point data.root at them."
        )
    candidates = [style]
    if style.isdigit():
        candidates.append(style.zfill(2))
    for name in candidates:
        if (root / name).is_dir():
            return root / name
    available = sorted(p.name for p in root.iterdir() if p.is_dir())
    raise StyleDataError(
        f"style={style}: no folder {root / style}. Available styles in data.root: "
        f"{', '.join(available) if available else '(none)'}."
    )


def read_prompt_objects(path: Path) -> tuple[str, ...]:
    if not path.is_file():
        raise StyleDataError(f"{path} is missing. Write the objects to generate as {{\"0\": \"Dolphin\", ...}}.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise StyleDataError(f"{path} is not valid JSON ({err}). Expected {{\"0\": \"Dolphin\", ...}}.") from err
    if isinstance(data, list):
        items = list(enumerate(data))
    elif isinstance(data, dict):
        items = sorted(data.items(), key=lambda kv: (not str(kv[0]).isdigit(), int(kv[0]) if str(kv[0]).isdigit() else 0, str(kv[0])))
    else:
        raise StyleDataError(f"{path} must hold a JSON object {{\"0\": \"Dolphin\", ...}}, not {type(data).__name__}.")
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


def load_style(root: Path, style: str) -> StyleSet:
    """Find and check a style folder; every image is opened once so a broken file is named now."""
    folder = find_style_folder(root, str(style))
    images_dir = folder / "images"
    if not images_dir.is_dir():
        raise StyleDataError(f"{folder} has no images/ folder. Put the style's reference images in {images_dir}.")
    paths = tuple(sorted(p for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()))
    if not paths:
        raise StyleDataError(
            f"{images_dir} holds no images ({', '.join(IMAGE_SUFFIXES)}). Add the style's reference images."
        )
    for p in paths:
        rgb = load_rgb(p)
        if min(rgb.shape[:2]) < 64:
            log.warning("image %s is only %dx%d; it will be upscaled", p, rgb.shape[1], rgb.shape[0])
    prompt_objects = read_prompt_objects(folder / "prompt.json")
    return StyleSet(
        style_id=folder.name,
        folder=folder,
        image_paths=paths,
        objects=tuple(object_name(p.stem) for p in paths),
        prompt_objects=prompt_objects,
    )


def average_style_image(images: list[np.ndarray]) -> np.ndarray:
    """The pixel mean of equally sized uint8 images, rounded back to uint8."""
    stack = np.stack([im.astype(np.float64) for im in images])
    return np.clip(np.rint(stack.mean(axis=0)), 0, 255).astype(np.uint8)


def image_file_name(obj: str) -> str:
    """The file an object's image is saved as: ``Dolphin.png``; path separators are not allowed."""
    return re.sub(r"[\\/:*?\"<>|]", "_", obj) + ".png"
