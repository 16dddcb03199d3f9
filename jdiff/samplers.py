"""The samplers: diffusers' DDIMScheduler and PNDMScheduler step for step, in plain arithmetic, for any engine.

The sampling loop (:func:`jdiff.generate.denoise`) asks an engine for a sampler (``engine.make_sampler``); the
Jittor engine uses these, the torch engine wraps diffusers' schedulers in the same interface:

    timesteps = sampler.set_timesteps(steps)           # noisy to clean
    timesteps = sampler.skip(k)                        # img2img: the steps after the first k (see img2img_skip)
    latents = sampler.add_noise(clean, noise, t)       # the forward process at timestep t
    latents = noise * sampler.init_noise_sigma
    model_input = sampler.scale_model_input(latents, t)
    latents = sampler.step(model_output, t, latents)

``step``, ``add_noise`` and ``scale_model_input`` use only ``*``, ``+``, ``-`` and ``/`` with Python floats,
so they work on numpy arrays, torch tensors and Jittor Vars alike; the coefficients are computed in float32
from ``jdiff.schedule``'s ``alphas_cumprod``, as diffusers does.

``sampler="model"`` takes the class named by ``scheduler/scheduler_config.json``: DDIMScheduler (SD 2.1) or
PNDMScheduler (SD 1.5, SD 2.1-base; their configs set ``skip_prk_steps``, which makes it PLMS: a linear
multistep method over the last four noise predictions). ``"ddim"`` uses DDIM with that config whatever
class it names. Supported config options: timestep_spacing leading (the default), trailing or linspace;
steps_offset; set_alpha_to_one; prediction_type epsilon or v_prediction. Options that change the result
and are not implemented (DDIM's clip_sample, thresholding, rescale_betas_zero_snr; PNDM's Runge-Kutta
warm-up) are refused with a message rather than silently ignored.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from jdiff.engines.base import EngineError
from jdiff.schedule import betas_to_alphas_cumprod

ONE = np.float32(1.0)


def img2img_skip(steps: int, strength: float) -> int:
    """SDEdit: with ``strength`` s, only the last int(steps * s) of ``steps`` sampling steps run, from the encoded
    image noised to the first of their timesteps (the rule of diffusers' img2img pipeline); the number skipped."""
    return max(steps - min(int(steps * strength), steps), 0)


def make_sampler(scheduler_config: dict, sampler: str = "model", prediction_type: Optional[str] = None) -> "Sampler":
    if sampler == "model":
        name = scheduler_config.get("_class_name", "DDIMScheduler")
    else:
        name = {"ddim": "DDIMScheduler"}.get(sampler, sampler)
    if name not in SAMPLERS:
        asked = f"the model's scheduler config names {name}" if sampler == "model" else f"infer.sampler={sampler}"
        raise EngineError(f"{asked}, but the Jittor engine samples with {' or '.join(SAMPLERS)} only; "
                          f"set infer.sampler=ddim, or use engine=torch.")
    return SAMPLERS[name](scheduler_config, prediction_type)


class Sampler:
    """What DDIM and PNDM share: the noise schedule, the timestep spacing, the forward process."""

    order = 1
    init_noise_sigma = 1.0
    set_alpha_to_one_default: bool

    def __init__(self, config: dict, prediction_type: Optional[str] = None):
        self.prediction_type = prediction_type or config.get("prediction_type", "epsilon")
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise EngineError(f"prediction_type={self.prediction_type!r}: the Jittor samplers handle epsilon and "
                              f"v_prediction.")
        self.spacing = config.get("timestep_spacing", "leading")
        if self.spacing not in ("leading", "trailing", "linspace"):
            raise EngineError(f"timestep_spacing={self.spacing!r} in the scheduler config is unknown.")
        self.steps_offset = int(config.get("steps_offset", 0))
        self.alphas_cumprod = betas_to_alphas_cumprod(config)
        self.num_train_timesteps = len(self.alphas_cumprod)
        # the alpha_bar "before" timestep 0, used by the last step
        alpha_to_one = config.get("set_alpha_to_one", self.set_alpha_to_one_default)
        self.final_alpha_cumprod = ONE if alpha_to_one else self.alphas_cumprod[0]
        self.num_inference_steps: Optional[int] = None
        self.timesteps = np.arange(self.num_train_timesteps)[::-1].astype(np.int64)

    def spaced_timesteps(self, steps: int) -> np.ndarray:
        """``steps`` timesteps from noisy to clean, spread as the config's timestep_spacing says."""
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
        return timesteps.astype(np.int64)

    def set_timesteps(self, steps: int) -> np.ndarray:
        self.timesteps = self.spaced_timesteps(steps)
        return self.timesteps

    def skip(self, steps: int) -> np.ndarray:
        """The timesteps after the first ``steps`` sampling steps (img2img starts there)."""
        return self.timesteps[steps * self.order:]

    def scale_model_input(self, sample, timestep: int):
        return sample

    def add_noise(self, clean, noise, timestep: int):
        alpha = self.alphas_cumprod[int(timestep)]
        return float(np.sqrt(alpha)) * clean + float(np.sqrt(ONE - alpha)) * noise

    def alpha_before(self, timestep: int) -> np.float32:
        return self.alphas_cumprod[timestep] if timestep >= 0 else self.final_alpha_cumprod

    def step_size(self) -> int:
        if self.num_inference_steps is None:
            raise RuntimeError("call set_timesteps before step")
        return self.num_train_timesteps // self.num_inference_steps


class DDIMSampler(Sampler):
    """Deterministic DDIM (eta = 0)."""

    set_alpha_to_one_default = True

    def __init__(self, config: dict, prediction_type: Optional[str] = None):
        for key in ("clip_sample", "thresholding", "rescale_betas_zero_snr"):
            # clip_sample is on in diffusers when the config leaves it out; SD's configs turn it off
            if config.get(key, key == "clip_sample"):
                raise EngineError(f"the scheduler config sets {key}=true, which the Jittor DDIM sampler does not "
                                  f"implement; use engine=torch for this model.")
        super().__init__(config, prediction_type)

    def step(self, model_output, timestep: int, sample):
        timestep = int(timestep)
        alpha, alpha_prev = self.alphas_cumprod[timestep], self.alpha_before(timestep - self.step_size())
        sqrt_alpha, sqrt_beta = float(np.sqrt(alpha)), float(np.sqrt(ONE - alpha))
        if self.prediction_type == "epsilon":
            original = (sample - sqrt_beta * model_output) / sqrt_alpha
            epsilon = model_output
        else:
            original = sqrt_alpha * sample - sqrt_beta * model_output
            epsilon = sqrt_alpha * model_output + sqrt_beta * sample
        return float(np.sqrt(alpha_prev)) * original + float(np.sqrt(ONE - alpha_prev)) * epsilon


class PNDMSampler(Sampler):
    """PNDM without its Runge-Kutta warm-up (``skip_prk_steps``), i.e. PLMS: each step extrapolates the noise
    from the last four predictions (Adams-Bashforth); the first step is taken twice, the second time with the
    mean of two predictions. Hence ``steps + 1`` model evaluations, with the second timestep repeated."""

    set_alpha_to_one_default = False

    def __init__(self, config: dict, prediction_type: Optional[str] = None):
        if not config.get("skip_prk_steps", False):
            raise EngineError("the scheduler config asks for PNDM with Runge-Kutta warm-up steps "
                              "(skip_prk_steps=false), which the Jittor engine does not implement; set "
                              "infer.sampler=ddim, or use engine=torch.")
        super().__init__(config, prediction_type)
        self.history: list = []

    def set_timesteps(self, steps: int) -> np.ndarray:
        spaced = self.spaced_timesteps(steps)
        self.timesteps = np.concatenate([spaced[:2], spaced[1:]])
        self.history, self.first_sample, self.counter = [], None, 0
        return self.timesteps

    def step(self, model_output, timestep: int, sample):
        timestep, size = int(timestep), self.step_size()
        prev = timestep - size
        if self.counter == 1:  # the first step again, from the same sample, with the averaged prediction
            prev, timestep = timestep, timestep + size
            model_output = (model_output + self.history[-1]) / 2
            sample = self.first_sample
        else:
            self.history = self.history[-3:] + [model_output]
            e = self.history[::-1]  # newest first
            if len(e) == 1:
                self.first_sample = sample
            elif len(e) == 2:
                model_output = (3 * e[0] - e[1]) / 2
            elif len(e) == 3:
                model_output = (23 * e[0] - 16 * e[1] + 5 * e[2]) / 12
            else:
                model_output = (1 / 24) * (55 * e[0] - 59 * e[1] + 37 * e[2] - 9 * e[3])
        self.counter += 1
        return self.previous_sample(sample, timestep, prev, model_output)

    def previous_sample(self, sample, timestep: int, prev: int, model_output):
        """Formula (9) of the PNDM paper: x_prev from x_t and the noise estimate."""
        alpha, alpha_prev = self.alphas_cumprod[timestep], self.alpha_before(prev)
        beta, beta_prev = ONE - alpha, ONE - alpha_prev
        if self.prediction_type == "v_prediction":
            model_output = float(np.sqrt(alpha)) * model_output + float(np.sqrt(beta)) * sample
        sample_coeff = float(np.sqrt(alpha_prev / alpha))
        denominator = alpha * np.sqrt(beta_prev) + np.sqrt(alpha * beta * alpha_prev)
        return sample_coeff * sample - float(alpha_prev - alpha) * model_output / float(denominator)


SAMPLERS = {"DDIMScheduler": DDIMSampler, "PNDMScheduler": PNDMSampler}
