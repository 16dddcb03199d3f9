"""Sampling one image per prompt object of a style; image k's noise depends only on (seed, k)."""

from __future__ import annotations

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
    res = cfg.data.resolution
    shape = engine.latent_shape(res)
    seed = sampling_seed(cfg, style)
    init_image = None
    if cfg.init.mode == "avg_image":
        init_image = to_model_range(average_style_image(style.images_at(res)))
    paths = []
    size = cfg.infer.batch_size
    for start in tqdm(range(0, len(objects), size), desc="generate", unit="batch"):
        chunk = objects[start : start + size]
        keys = range(start, start + len(chunk))
        images = engine.generate(GenerateRequest(
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
        ))
        for obj, image in zip(chunk, images):
            paths.append(save_png(out_dir / image_file_name(obj), image))
    return paths
