"""Class images for prior preservation, generated once by the unadapted model and shared through a cache.

An image is fully determined by the model, the sampling settings, its prompt and its index k, so it is
cached as ``<cache>/prior/<key of model and settings>/<object>/<k>.png``: runs of other styles that need
the same object reuse it, and a larger ``images_per_object`` only adds the missing indices. A file lock
on the folder makes concurrent jobs generate each image once; the others wait and reuse it.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from filelock import FileLock
from tqdm import tqdm

from jdiff.data import image_file_name, load_rgb
from jdiff.engines.base import Engine, GenerateRequest
from jdiff.files import save_png, write_json
from jdiff.models import cache_key, model_fingerprint
from jdiff.noise import PRIOR, gaussian, stream, text_key
from jdiff.rundir import is_temporary

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClassImageSettings:
    template: str
    resolution: int
    steps: int
    guidance_scale: float
    negative_prompt: str
    sampler: str
    seed: int
    prediction_type: str


@dataclass(frozen=True)
class ClassImage:
    path: Path
    prompt: str


def class_cache_dir(cache_root: Path, model_dir: Path, settings: ClassImageSettings) -> Path:
    return Path(cache_root) / "prior" / cache_key(model=model_fingerprint(model_dir), **asdict(settings))


def class_images(cache_dir: Path, objects: list[str], per_object: int, settings: ClassImageSettings,
                 engine: Callable[[], Engine], batch_size: int) -> list[ClassImage]:
    """The class images for ``objects``, generating only those not cached yet."""
    wanted = [(obj, k) for obj in dict.fromkeys(objects) for k in range(per_object)]

    def path(obj: str, k: int) -> Path:
        return cache_dir / image_file_name(obj)[: -len(".png")] / f"{k:03d}.png"

    missing = [item for item in wanted if not path(*item).exists()]
    if missing:
        cache_dir.mkdir(parents=True, exist_ok=True)
        with FileLock(str(cache_dir / ".lock")):
            missing = [item for item in missing if not path(*item).exists()]  # another job may have made them
            for leftover in cache_dir.glob("*/.*.tmp*"):  # a job killed while writing; none writes now
                if is_temporary(leftover.name):
                    leftover.unlink(missing_ok=True)
            if missing:
                log.info("generating %d class images into %s", len(missing), cache_dir)
                write_json(cache_dir / "settings.json", asdict(settings))
                eng = engine()
                shape = eng.latent_shape(settings.resolution)
                # The batches are fixed slices of the wanted list, whatever is cached already: an image's float
                # rounding depends on the batch it was sampled in, so a run resumed after an interruption makes
                # the very images an uninterrupted run would (a batch with some images cached is sampled whole).
                todo = set(missing)
                batches = [wanted[i : i + batch_size] for i in range(0, len(wanted), batch_size)]
                for chunk in tqdm([b for b in batches if todo.intersection(b)], desc="prior", unit="batch"):
                    noise = np.stack([gaussian(stream(settings.seed, PRIOR, text_key(o), k), shape) for o, k in chunk])
                    images = eng.generate(GenerateRequest(
                        prompts=[settings.template.format(object=o) for o, _ in chunk],
                        noise=noise,
                        steps=settings.steps,
                        guidance_scale=settings.guidance_scale,
                        negative_prompt=settings.negative_prompt,
                        sampler=settings.sampler,
                    ))
                    for (o, k), image in zip(chunk, images):
                        if (o, k) in todo:
                            save_png(path(o, k), image)
    else:
        log.info("all %d class images found in %s", len(wanted), cache_dir)
    return [ClassImage(path(o, k), settings.template.format(object=o)) for o, k in wanted]


def load_class_images(items: list[ClassImage]) -> list[np.ndarray]:
    return [load_rgb(item.path) for item in items]
