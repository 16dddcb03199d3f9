"""The DDIM sampler, matching diffusers' ``DDIMScheduler`` step for step, in plain arithmetic.

API:
    sampler = make_sampler(scheduler_config, sampler="model", prediction_type=None)
    timesteps = sampler.set_timesteps(steps)                 # int64 array, also sampler.timesteps
    timesteps = sampler.img2img_timesteps(steps, strength)   # the tail an SDEdit start runs
    latents = sampler.add_noise(clean, noise, timestep)      # the forward process at one timestep
    latents = noise * sampler.init_noise_sigma
    model_input = sampler.scale_model_input(latents, t)
    latents = sampler.step(model_output, t, latents)         # deterministic DDIM (eta = 0)

``step``, ``add_noise`` and ``scale_model_input`` use only ``*``, ``+`` and ``-`` with Python floats, so
they work on numpy arrays and Jittor Vars alike; the coefficients are computed in float32 from
``jdiff.schedule``'s ``alphas_cumprod``, as diffusers does.

``sampler="model"`` takes the class named by ``scheduler/scheduler_config.json`` (SD 2.1's is DDIMScheduler);
``"ddim"`` uses DDIM with that config whatever class it names. Supported config options: timestep_spacing
leading (the default), trailing or linspace; steps_offset; set_alpha_to_one; prediction_type epsilon or
v_prediction. Options that change the result and are not implemented (clip_sample, thresholding,
rescale_betas_zero_snr) are refused with a message rather than silently ignored.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from jdiff.engines.base import EngineError
from jdiff.schedule import betas_to_alphas_cumprod

SUPPORTED = ("DDIMScheduler",)


def make_sampler(scheduler_config: dict, sampler: str = "model", prediction_type: Optional[str] = None) -> "DDIMSampler":
    name = scheduler_config.get("_class_name", "DDIMScheduler") if sampler == "model" else {"ddim": "DDIMScheduler"}.get(sampler)
    if name not in SUPPORTED:
        asked = f"the model's scheduler config names {name}" if sampler == "model" else f"infer.sampler={sampler}"
        raise EngineError(f"{asked}, but the Jittor engine samples with {', '.join(SUPPORTED)} only; "
                          f"set infer.sampler=ddim, or use engine=torch.")
    return DDIMSampler(scheduler_config, prediction_type)


class DDIMSampler:
    order = 1
    init_noise_sigma = 1.0

    def __init__(self, config: dict, prediction_type: Optional[str] = None):
        for key in ("clip_sample", "thresholding", "rescale_betas_zero_snr"):
            # clip_sample is on in diffusers when the config leaves it out; SD's configs turn it off
            if config.get(key, key == "clip_sample"):
                raise EngineError(f"the scheduler config sets {key}=true, which the Jittor sampler does not implement; "
                                  f"use engine=torch for this model.")
        self.prediction_type = prediction_type or config.get("prediction_type", "epsilon")
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise EngineError(f"prediction_type={self.prediction_type!r}: the Jittor sampler handles epsilon and v_prediction.")
        self.spacing = config.get("timestep_spacing", "leading")
        if self.spacing not in ("leading", "trailing", "linspace"):
            raise EngineError(f"timestep_spacing={self.spacing!r} in the scheduler config is unknown.")
        self.steps_offset = int(config.get("steps_offset", 0))
        self.alphas_cumprod = betas_to_alphas_cumprod(config)
        self.num_train_timesteps = len(self.alphas_cumprod)
        self.final_alpha_cumprod = np.float32(1.0) if config.get("set_alpha_to_one", True) else self.alphas_cumprod[0]
        self.num_inference_steps: Optional[int] = None
        self.timesteps = np.arange(self.num_train_timesteps)[::-1].astype(np.int64)

    def set_timesteps(self, steps: int) -> np.ndarray:
        n = self.num_train_timesteps
        if not 0 < steps <= n:
            raise EngineError(f"{steps} sampling steps: the model was trained with {n} timesteps; use 1 to {n}.")
        if self.spacing == "leading":
            timesteps = np.arange(steps)[::-1] * (n // steps) + self.steps_offset
        elif self.spacing == "trailing":
            timesteps = np.round(np.arange(n, 0, -n / steps)) - 1
        else:
            timesteps = np.linspace(0, n - 1, steps).round()[::-1]
        self.num_inference_steps = steps
        self.timesteps = timesteps.astype(np.int64)
        return self.timesteps

    def img2img_timesteps(self, steps: int, strength: float) -> np.ndarray:
        """SDEdit: with ``strength`` s, only the last int(steps * s) timesteps run, from the encoded image noised
        to the first of them (the torch engine's and diffusers' img2img rule)."""
        timesteps = self.set_timesteps(steps)
        kept = min(int(steps * strength), steps)
        return timesteps[max(steps - kept, 0) * self.order:]

    def scale_model_input(self, sample, timestep: int):
        return sample

    def add_noise(self, clean, noise, timestep: int):
        alpha = self.alphas_cumprod[int(timestep)]
        return float(np.sqrt(alpha)) * clean + float(np.sqrt(np.float32(1) - alpha)) * noise

    def step(self, model_output, timestep: int, sample):
        if self.num_inference_steps is None:
            raise RuntimeError("call set_timesteps before step")
        timestep = int(timestep)
        prev = timestep - self.num_train_timesteps // self.num_inference_steps
        alpha = self.alphas_cumprod[timestep]
        alpha_prev = self.alphas_cumprod[prev] if prev >= 0 else self.final_alpha_cumprod
        sqrt_alpha, sqrt_beta = float(np.sqrt(alpha)), float(np.sqrt(np.float32(1) - alpha))
        if self.prediction_type == "epsilon":
            original = (sample - sqrt_beta * model_output) / sqrt_alpha
            epsilon = model_output
        else:
            original = sqrt_alpha * sample - sqrt_beta * model_output
            epsilon = sqrt_alpha * model_output + sqrt_beta * sample
        return float(np.sqrt(alpha_prev)) * original + float(np.sqrt(np.float32(1) - alpha_prev)) * epsilon
