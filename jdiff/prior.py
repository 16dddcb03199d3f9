"""Class images for prior preservation, generated once by the unadapted model and shared through a cache.

An image is fully determined by the model, the sampling settings, its prompt, its index k and the batch it was
sampled in (float rounding), so it is cached as ``<cache>/prior/<key of model and settings>/<object>/<k>.png``:
runs of other styles that need the same object reuse it, and a larger ``images_per_object`` only adds the
missing indices. Whoever generates (a run, or a sweep's plan on several GPUs, see :mod:`jdiff.prior_plan`)
holds the file lock of every object folder its batch writes into, so each image is made once, by one process,
while other objects' images are made elsewhere at the same time; the others wait and reuse it.

The class set: ``prior.share=object`` gives a run class images of its own style's objects; ``prior.share=sweep``
gives every run the same set, the objects of ``prior.styles`` (a sweep: its own styles; null: every style
under data.root). Either is capped at ``prior.max_objects`` objects: those named by the most styles stay,
ties broken by a seeded shuffle.
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

import numpy as np
from filelock import FileLock
from omegaconf import DictConfig

from jdiff.data import StyleSet, image_file_name, is_hidden, load_rgb, load_style
from jdiff.devices import on_gpu
from jdiff.engines.base import Engine, GenerateRequest
from jdiff.files import save_png, write_json
from jdiff.models import cache_key, model_fingerprint
from jdiff.noise import PRIOR, gaussian, stream, text_key
from jdiff.rundir import is_temporary

log = logging.getLogger(__name__)

GPU_BATCH = 16  # prior.batch_size=null on a GPU: SD 2.1 at 512 px with guidance fits a 24 GB GPU at this size

Item = tuple[str, int]  # (object, k)


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


@dataclass(frozen=True)
class ClassSet:
    """What a run's prior stage uses: the cache folder, its settings, and the objects (in the run's order)."""

    cache_dir: Path
    settings: ClassImageSettings
    objects: tuple[str, ...]
    per_object: int
    share: str
    styles: tuple[str, ...]  # the styles whose objects these are

    @property
    def items(self) -> list[Item]:
        return [(o, k) for o in self.objects for k in range(self.per_object)]

    def record(self) -> dict:
        """What ``class_set.json`` in the run folder holds (the cache folder relative to paths.cache, so that the
        same run anywhere writes the same file)."""
        return {"share": self.share, "styles": list(self.styles), "objects": list(self.objects),
                "images_per_object": self.per_object, "cache": f"{self.cache_dir.parent.name}/{self.cache_dir.name}",
                "settings": asdict(self.settings)}


def class_cache_dir(cache_root: Path, model_dir: Path, settings: ClassImageSettings) -> Path:
    return Path(cache_root) / "prior" / cache_key(model=model_fingerprint(model_dir), **asdict(settings))


def class_image_settings(cfg: DictConfig, prediction_type: str) -> ClassImageSettings:
    return ClassImageSettings(
        template=cfg.prior.template, resolution=cfg.data.resolution, steps=cfg.infer.steps,
        guidance_scale=cfg.infer.guidance_scale, negative_prompt=cfg.infer.negative_prompt,
        sampler=cfg.infer.sampler, seed=cfg.seed, prediction_type=prediction_type,
    )


def prior_batch_size(cfg: DictConfig) -> int:
    """Images per sampling batch: prior.batch_size, or (null) GPU_BATCH on a GPU and infer.batch_size on the CPU.
    Never the GPU's free memory: the batches decide the images' rounding, so a resumed plan needs the same ones."""
    if cfg.prior.batch_size is not None:
        return int(cfg.prior.batch_size)
    return on_gpu(cfg.engine.device, GPU_BATCH, int(cfg.infer.batch_size))


def all_styles(root: Path) -> list[str]:
    """Every style folder under data.root (one holding images/ and prompt.json), by name."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir()
                  if p.is_dir() and not is_hidden(p) and (p / "images").is_dir() and (p / "prompt.json").is_file())


def style_objects(style: StyleSet, with_prompt_objects: bool) -> list[str]:
    objects = list(style.objects) + (list(style.prompt_objects) if with_prompt_objects else [])
    return list(dict.fromkeys(objects))


def capped(per_style: list[list[str]], cap: Optional[int], seed: int) -> list[str]:
    """The union of the styles' objects, or its ``cap`` objects named by the most styles (ties: a shuffle by
    ``seed``); kept in first-seen order."""
    union = list(dict.fromkeys(o for objects in per_style for o in objects))
    if cap is None or len(union) <= cap:
        return union
    count = Counter(o for objects in per_style for o in set(objects))
    kept = set(sorted(union, key=lambda o: (-count[o], text_key(f"{seed}/{o}"), o))[:cap])
    return [o for o in union if o in kept]


def class_set(cfg: DictConfig, style: StyleSet, model_dir: Path, prediction_type: str,
              load: Callable[[str], StyleSet] | None = None) -> ClassSet:
    """The class set of a run of ``cfg`` on ``style`` (``load``: a style by name, for share=sweep)."""
    settings = class_image_settings(cfg, prediction_type)
    prior = cfg.prior
    if prior.share == "sweep":
        root = Path(cfg.data.root)
        styles = [str(s) for s in prior.styles] if prior.styles is not None else all_styles(root)
        load = load or (lambda name: load_style(root, name))
        per_style = [style_objects(load(name), prior.include_prompt_objects) for name in styles]
    else:
        styles = [style.style_id]
        per_style = [style_objects(style, prior.include_prompt_objects)]
    objects = capped(per_style, prior.max_objects, cfg.seed)
    return ClassSet(class_cache_dir(Path(cfg.paths.cache), model_dir, settings), settings, tuple(objects),
                    int(prior.images_per_object), str(prior.share), tuple(styles))


# -- the cache ----------------------------------------------------------------------------------------------------


def image_path(cache_dir: Path, obj: str, k: int) -> Path:
    return Path(cache_dir) / image_file_name(obj)[: -len(".png")] / f"{k:03d}.png"


def missing(cache_dir: Path, items: Iterable[Item]) -> list[Item]:
    return [item for item in items if not image_path(cache_dir, *item).exists()]


def batches(items: list[Item], size: int) -> list[list[Item]]:
    """Fixed slices of a deterministic list, whatever is cached already: an image's float rounding depends on the
    batch it was sampled in, so an interrupted plan resumed makes the very images an uninterrupted one would (a
    batch with some images cached is sampled whole)."""
    return [items[i : i + size] for i in range(0, len(items), size)]


def plan_order(items: Iterable[Item]) -> list[Item]:
    """The order a plan samples a cache folder's images in: by object folder, then k (whatever the runs' order)."""
    return sorted(set(items), key=lambda item: (image_file_name(item[0]), item[0], item[1]))


@contextlib.contextmanager
def object_locks(cache_dir: Path, objects: Iterable[str]):
    """Hold the lock of each object's folder (taken in name order, so two processes never wait on each other)."""
    folders = sorted({image_path(cache_dir, o, 0).parent for o in objects})
    with contextlib.ExitStack() as stack:
        for folder in folders:
            folder.mkdir(parents=True, exist_ok=True)
            stack.enter_context(FileLock(str(folder / ".lock")))
            for leftover in folder.glob(".*.tmp*"):  # a process killed while writing here; none writes now
                if is_temporary(leftover.name):
                    leftover.unlink(missing_ok=True)
        yield


def generate_batch(cache_dir: Path, batch: list[Item], settings: ClassImageSettings, engine: Callable[[], Engine]) -> list[Item]:
    """Sample ``batch`` whole when any of its images is missing, under its object folders' locks; save the missing
    ones. Returns the items this call wrote (none when another process made them meanwhile)."""
    if not missing(cache_dir, batch):
        return []
    with object_locks(cache_dir, [o for o, _ in batch]):
        todo = missing(cache_dir, batch)  # another process may have made them while this one waited
        if not todo:
            return []
        write_json(Path(cache_dir) / "settings.json", asdict(settings))
        eng = engine()
        shape = eng.latent_shape(settings.resolution)
        images = eng.generate(GenerateRequest(
            prompts=[settings.template.format(object=o) for o, _ in batch],
            noise=np.stack([gaussian(stream(settings.seed, PRIOR, text_key(o), k), shape) for o, k in batch]),
            steps=settings.steps,
            guidance_scale=settings.guidance_scale,
            negative_prompt=settings.negative_prompt,
            sampler=settings.sampler,
        ))
        for (o, k), image in zip(batch, images):
            if (o, k) in todo:
                save_png(image_path(cache_dir, o, k), image)
        return todo


def class_images(cache_dir: Path, objects: list[str], per_object: int, settings: ClassImageSettings,
                 engine: Callable[[], Engine], batch_size: int) -> list[ClassImage]:
    """The class images of ``objects`` (in their order), generating those not cached yet: a plan of one run,
    batched like a sweep's (:func:`plan_order`, :func:`batches`)."""
    wanted = [(obj, k) for obj in dict.fromkeys(objects) for k in range(per_object)]
    absent = missing(cache_dir, wanted)
    if absent:
        todo = set(absent)
        chosen = [b for b in batches(plan_order(wanted), batch_size) if todo.intersection(b)]
        log.info("generating %d class images into %s, %d batches of up to %d", len(absent), cache_dir, len(chosen),
                 batch_size)
        from tqdm import tqdm

        for batch in tqdm(chosen, desc="prior", unit="batch"):
            generate_batch(cache_dir, batch, settings, engine)
    else:
        log.info("all %d class images found in %s", len(wanted), cache_dir)
    return [ClassImage(image_path(cache_dir, o, k), settings.template.format(object=o)) for o, k in wanted]


def load_class_images(items: list[ClassImage]) -> list[np.ndarray]:
    return [load_rgb(item.path) for item in items]
