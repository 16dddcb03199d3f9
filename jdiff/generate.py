"""Sampling one image per prompt object of a style; image k's noise depends only on (seed, k)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from omegaconf import DictConfig
from tqdm import tqdm

from jdiff.augment import to_model_range
from jdiff.data import StyleSet, average_style_image, image_file_name
from jdiff.engines.base import Engine, GenerateRequest
from jdiff.files import save_png
from jdiff.noise import SAMPLE, gaussian, stream


def sampling_seed(cfg: DictConfig, style: StyleSet) -> int:
    """The reference method samples style NN with seed + NN."""
    return cfg.seed + style.index


def generate_images(engine: Engine, cfg: DictConfig, style: StyleSet, out_dir: Path) -> list[Path]:
    objects = list(style.prompt_objects)
    init_image = None
    if cfg.init.mode == "avg_image":
        init_image = to_model_range(average_style_image(style.images_at(cfg.data.resolution)))
    saved = []
    size = cfg.infer.batch_size
    # PNGs are written on a worker thread while the next batch samples (PIL encodes without holding the GIL)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="png") as writer:
        for start in tqdm(range(0, len(objects), size), desc="generate", unit="batch"):
            chunk = objects[start : start + size]
            images = engine.generate(sampling_request(engine, cfg, style, chunk, start, init_image))
            saved += [writer.submit(save_png, out_dir / image_file_name(o), im) for o, im in zip(chunk, images)]
    return [future.result() for future in saved]


def sampling_request(engine: Engine, cfg: DictConfig, style: StyleSet, chunk: list[str], start: int,
                     init_image: np.ndarray | None) -> GenerateRequest:
    """The request for objects ``chunk``, the first being object number ``start`` of the style."""
    shape = engine.latent_shape(cfg.data.resolution)
    seed = sampling_seed(cfg, style)
    keys = range(start, start + len(chunk))
    return GenerateRequest(
        prompts=[cfg.data.infer_template.format(object=o, style=style.style_id) for o in chunk],
        origin_prompts=[cfg.data.origin_template.format(object=o, style=style.style_id) for o in chunk],
        origin_scale=cfg.infer.origin_scale,
        noise=np.stack([gaussian(stream(seed, SAMPLE, k), shape) for k in keys]),
        init_image=init_image,
        init_posterior_noise=np.stack([gaussian(stream(seed, SAMPLE, k, 1), shape) for k in keys])
        if init_image is not None else None,
        strength=cfg.init.strength,
        steps=cfg.infer.steps,
        guidance_scale=cfg.infer.guidance_scale,
        negative_prompt=cfg.infer.negative_prompt,
        sampler=cfg.infer.sampler,
    )
