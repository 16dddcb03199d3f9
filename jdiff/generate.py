"""Sampling: the denoising loop of the method (classifier-free guidance, the origin-prompt blend, the img2img
start), written once for every engine, and one image per prompt object of a style, image k's noise depending
only on (seed, k)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from omegaconf import DictConfig
from tqdm import tqdm

from jdiff.augment import to_model_range
from jdiff.data import StyleSet, average_style_image, image_file_name
from jdiff.engines.base import Engine, GenerateRequest, uint8_images
from jdiff.files import save_png
from jdiff.noise import SAMPLE, gaussian, stream
from jdiff.samplers import img2img_skip


def sampling_seed(cfg: DictConfig, style: StyleSet) -> int:
    """The reference method samples style NN with seed + NN."""
    return cfg.seed + style.index


def init_image(cfg: DictConfig, style: StyleSet) -> np.ndarray | None:
    """The image sampling starts from (init.mode=avg_image: the mean of the style's references, (3, H, W) in
    [-1, 1]), or None (pure noise)."""
    if cfg.init.mode != "avg_image":
        return None
    return to_model_range(average_style_image(style.images_at(cfg.data.resolution)))


def generate_images(engine: Engine, cfg: DictConfig, style: StyleSet, out_dir: Path) -> list[Path]:
    """One image per prompt object into ``out_dir``; with inject=styleid each is the image jdiff would make,
    stylised by StyleID's style injection (:mod:`jdiff.inject`) from the style's references."""
    objects = list(style.prompt_objects)
    init = init_image(cfg, style)
    from jdiff.inject import STYLEID, StyleID  # it samples with this module's loop

    make = engine.generate
    if cfg.inject.name == STYLEID:
        make = StyleID.from_config(engine, cfg.inject, style, cfg.data.resolution).generate
    saved = []
    size = cfg.infer.batch_size
    # PNGs are written on a worker thread while the next batch samples (PIL encodes without holding the GIL)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="png") as writer:
        for start in tqdm(range(0, len(objects), size), desc="generate", unit="batch"):
            chunk = objects[start : start + size]
            images = make(sampling_request(engine, cfg, style, chunk, start, init))
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


def denoise(engine: Engine, req: GenerateRequest) -> list[np.ndarray]:
    """Sample ``req``'s images with ``engine``'s primitives (see :class:`jdiff.engines.base.Engine`): uint8 arrays
    (H, W, 3), one per prompt. ``Engine.generate`` runs this inside the engine's sampling context (no gradients,
    its out-of-memory advice). The latents come from :func:`denoise_latents`."""
    return decoded_images(engine, denoise_latents(engine, req), req.prompts)


def decoded_images(engine: Engine, latents, prompts: list[str]) -> list[np.ndarray]:
    """The VAE's images of ``latents`` as uint8 arrays; non-finite images are refused
    (:func:`jdiff.engines.base.uint8_images`)."""
    return uint8_images(engine.decode(latents), prompts, mixed_precision=engine.mixed_precision,
                        alternatives=[m for m in engine.fallback_precisions if m != engine.mixed_precision],
                        adapted=bool(engine.lora_settings))


def denoise_latents(engine: Engine, req: GenerateRequest):
    """The clean latents of ``req``'s images, an engine tensor (B, C, h, w):

    - Text: the prompts' states, blended towards the origin prompts' by ``origin_scale`` (0: the style prompt
      alone, 1: the plain prompt's).
    - Start: pure noise, or (img2img, SDEdit) the init image encoded and noised to the timestep where the last
      int(steps * strength) steps begin.
    - Each step: with guidance > 1 the unconditional (negative-prompt) and conditional predictions come from one
      batch of twice the size, and are mixed as uncond + guidance * (cond - uncond); then the sampler's step.
    """
    n = len(req.prompts)
    sampler = engine.make_sampler(req.sampler)
    timesteps = sampler.set_timesteps(req.steps)
    states = engine.encode_prompts(req.prompts)
    if req.origin_prompts is not None and req.origin_scale > 0:
        states = states + req.origin_scale * (engine.encode_prompts(req.origin_prompts) - states)
    guided = req.guidance_scale > 1.0
    if guided:
        states = engine.concat([engine.encode_prompts([req.negative_prompt] * n), states])
    noise = engine.latents(req.noise)
    if req.init_image is None:
        latents = noise * sampler.init_noise_sigma
    else:
        timesteps = sampler.skip(img2img_skip(req.steps, req.strength))
        init = req.init_image if req.init_image.ndim == 4 else np.repeat(req.init_image[None], n, axis=0)
        clean = engine.encode_images(init, req.init_posterior_noise)
        latents = sampler.add_noise(clean, noise, timesteps[0])
    for t in timesteps:
        model_input = sampler.scale_model_input(engine.concat([latents, latents]) if guided else latents, t)
        prediction = engine.sampling_prediction(model_input, t, states)
        if guided:
            uncond, cond = prediction[:n], prediction[n:]
            prediction = uncond + req.guidance_scale * (cond - uncond)
        latents = engine.step_done(sampler.step(prediction, t, latents))
    return latents
