"""StyleID: training-free style injection ("Style Injection in Diffusion", Chung, Hyun and Heo, CVPR 2024) on
top of jdiff's images, written once for every engine through its primitives (inject=styleid).

For each image jdiff would generate (the content: its prompt, guidance, LoRA and start, as without injection):

1. Style, once per run: the chosen reference image (``inject.style_image``: an index, or ``average``, the
   pixel mean of the references, as init=avg_image uses) is encoded (the VAE posterior's mean) and inverted
   with DDIM (eta 0, empty prompt, no guidance) over ``inversion_steps`` steps; at every step the keys and values
   of the self-attention (attn1) of ``inject.layers`` are kept, by timestep, on the device.
2. Content: its clean latents are inverted the same way, keeping the queries.
3. Start: the inverted content latents, AdaIN-ed to the per-channel mean and standard deviation of the inverted
   style latents (``adain_init``).
4. DDIM from there over the same timesteps, empty prompt, no guidance, where each chosen layer attends with
   query gamma * q_content + (1 - gamma) * q_now to the style's keys and values, its logits multiplied by the
   temperature T: softmax(T q k^T / sqrt(d)) v. T is folded into the query, so the engines' own attention
   (fused kernels included) does the rest.

The inversion and the stylised sampling use the empty prompt, as StyleID does: DDIM inversion reconstructs only
under the conditioning it was run with, and guidance makes it drift; the prompt's content is already in the
content image. The inversion step is the exact inverse of :class:`jdiff.samplers.DDIMSampler`'s step for a
fixed model prediction, the prediction taken at the latent one step less noisy (the usual DDIM-inversion
approximation): for epsilon models the official formula, for v-prediction its v form.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import numpy as np

from jdiff.augment import to_model_range
from jdiff.data import StyleSet, average_style_image
from jdiff.engines.base import Engine, GenerateRequest
from jdiff.samplers import DDIMSampler, make_sampler
from jdiff.validate import ConfigError

log = logging.getLogger(__name__)

STYLEID = "styleid"
AVERAGE = "average"
ADAIN_EPS = 1e-4  # added to the content's standard deviation, as StyleID's start does


def layer_order(name: str) -> tuple:
    """Sort key of a diffusers module name: its numbers as numbers (up_blocks.10 after up_blocks.2)."""
    return tuple(int(p) if p.isdecimal() else p for p in name.split("."))


def default_layers(available: list[str]) -> list[str]:
    """StyleID's choice on SD 2.1 (up_blocks.2.attentions.1-2 and up_blocks.3.attentions.0-2) as a rule for any
    UNet: the attention modules of the decoder's last two levels with attention, less the first of the two."""
    up = sorted((n for n in available if n.startswith("up_blocks.")), key=layer_order)
    levels = sorted({int(n.split(".")[1]) for n in up})
    if len(levels) < 2:
        return up
    earlier, last = levels[-2], levels[-1]
    return [n for n in up if int(n.split(".")[1]) == last
            or (int(n.split(".")[1]) == earlier and int(n.split(".")[3]) >= 1)]


def resolve_layers(available: list[str], layers: Optional[list[str]]) -> list[str]:
    """``inject.layers`` checked against the UNet's attention modules (null: :func:`default_layers`)."""
    if layers is None:
        return default_layers(available)
    missing = [name for name in layers if name not in available]
    if missing or not layers:
        said = f"names {missing[0]}, which this model's UNet does not have" if missing else "is empty"
        raise ConfigError(f"inject.layers={list(layers)} {said}: name attention modules among "
                          f"{', '.join(available)} (or inject.layers=null for StyleID's choice).")
    return list(layers)


def adain(content, style, eps: float = ADAIN_EPS):
    """``content`` (B, C, h, w) with each channel moved to the mean and standard deviation (the unbiased
    estimate, as torch's ``std``) of ``style``'s: (c - mean_c) / (std_c + eps) * std_s + mean_s, StyleID's
    start."""
    def stats(x):
        batch, channels = x.shape[0], x.shape[1]
        flat = x.reshape(batch, channels, -1)
        n = flat.shape[2]
        mean = flat.mean(2).reshape(batch, channels, 1)
        var = ((flat - mean) ** 2).mean(2) * (n / max(n - 1, 1))
        return mean.reshape(batch, channels, 1, 1), (var ** 0.5).reshape(batch, channels, 1, 1)

    mean_c, std_c = stats(content)
    mean_s, std_s = stats(style)
    return (content - mean_c) / (std_c + eps) * std_s + mean_s


def inversion_step(sampler: DDIMSampler, prediction, timestep: int, sample):
    """The latents at ``timestep`` from ``sample``, the latents one DDIM step less noisy, given the model's
    ``prediction`` at ``timestep``: the inverse of ``sampler.step`` for that prediction.

    The DDIM step is x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev) eps with (x0, eps) from x_t and the prediction.
    epsilon: x_t = sqrt(a / a_prev) (x_prev - sqrt(1 - a_prev) eps) + sqrt(1 - a) eps.
    v: x0 = sqrt(a) x_t - sqrt(1 - a) v and eps = sqrt(a) v + sqrt(1 - a) x_t make x_prev = A x_t + B v with
    A = sqrt(a_prev a) + sqrt((1 - a_prev)(1 - a)), B = sqrt(1 - a_prev) sqrt(a) - sqrt(a_prev) sqrt(1 - a),
    so x_t = (x_prev - B v) / A."""
    timestep = int(timestep)
    alpha = float(sampler.alphas_cumprod[timestep])
    alpha_prev = float(sampler.alpha_before(timestep - sampler.step_size()))
    if sampler.prediction_type == "epsilon":  # Python floats: a numpy scalar times a Jittor Var is not a Var
        return (float(np.sqrt(alpha / alpha_prev)) * (sample - float(np.sqrt(1 - alpha_prev)) * prediction)
                + float(np.sqrt(1 - alpha)) * prediction)
    a = float(np.sqrt(alpha_prev * alpha) + np.sqrt((1 - alpha_prev) * (1 - alpha)))
    b = float(np.sqrt(1 - alpha_prev) * np.sqrt(alpha) - np.sqrt(alpha_prev) * np.sqrt(1 - alpha))
    return (sample - b * prediction) / a


@dataclass
class InjectSettings:
    gamma: float = 0.75  # query blend: gamma * q_content + (1 - gamma) * q_now
    temperature: float = 1.5  # the attention logits' multiplier
    inversion_steps: int = 20
    adain_init: bool = True
    layers: Optional[list[str]] = None  # attention modules; None: default_layers


class StyleID:
    """Style injection for one style; :meth:`generate` takes the requests ``Engine.generate`` would."""

    def __init__(self, engine: Engine, settings: InjectSettings, style_pixels: np.ndarray):
        """``style_pixels``: the style image (3, H, W) in [-1, 1], at the resolution of the images."""
        self.engine, self.settings, self.style_pixels = engine, settings, style_pixels
        self.layers = resolve_layers(engine.attention_layers(), settings.layers)
        self.sampler = make_sampler(engine.scheduler_config, "ddim", engine.prediction_type)
        self.timesteps = self.sampler.set_timesteps(settings.inversion_steps)
        self.style: Optional[tuple] = None  # (inverted latents, {(timestep, layer): (k, v)}), made at first use
        # the hook's state: what it keeps or injects now
        self.step: Optional[int] = None
        self.keeping: Optional[tuple[dict, tuple[int, ...]]] = None  # (into, which of q, k, v)
        self.injecting: Optional[tuple[dict, dict]] = None  # (content queries, style keys and values)

    @classmethod
    def from_config(cls, engine: Engine, inject, style: StyleSet, resolution: int) -> "StyleID":
        """From the ``inject`` config group, with the style's reference it names (or their average)."""
        images = style.images_at(resolution)
        if str(inject.style_image) == AVERAGE:
            image = average_style_image(images)
        else:
            index = int(inject.style_image)
            if not 0 <= index < len(images):
                listed = ", ".join(f"{i}: {o}" for i, o in enumerate(style.objects))
                raise ConfigError(f"inject.style_image={index} is invalid: style {style.style_id} has "
                                  f"{len(images)} reference images ({listed}); give an index or average.")
            image = images[index]
        layers = None if inject.layers is None else list(inject.layers)
        settings = InjectSettings(gamma=float(inject.gamma), temperature=float(inject.temperature),
                                  inversion_steps=int(inject.inversion_steps), adain_init=bool(inject.adain_init),
                                  layers=layers)
        made = cls(engine, settings, to_model_range(image))
        log.info("inject=styleid: style image %s, layers %s, %d inversion steps (the injected UNet calls run "
                 "eagerly, not from recorded graphs)", inject.style_image, ", ".join(made.layers),
                 settings.inversion_steps)
        return made

    # -- the hook on the chosen self-attentions ----------------------------------------------------------

    def __call__(self, name: str, q, k, v):
        key = (self.step, name)
        if self.keeping is not None:
            into, which = self.keeping
            into[key] = tuple((q, k, v)[i] for i in which)
            return q, k, v
        if self.injecting is not None:
            queries, keys_values = self.injecting
            q_content, (k_style, v_style) = queries[key][0], keys_values[key][-2:]
            n = q.shape[0]
            if k_style.shape[0] != n:
                k_style, v_style = self.engine.concat([k_style] * n), self.engine.concat([v_style] * n)
            gamma = self.settings.gamma
            return (gamma * q_content + (1 - gamma) * q) * self.settings.temperature, k_style, v_style
        return q, k, v

    # -- the method ----------------------------------------------------------------------------------------

    def empty_prompt(self, n: int):
        return self.engine.encode_prompts([""] * n)

    def invert(self, latents, which: tuple[int, ...]):
        """DDIM inversion of clean ``latents`` (empty prompt); returns the noisiest latents and the chosen
        layers' (q, k, v)[which] by (timestep, layer)."""
        kept = {}
        self.keeping = (kept, which)
        try:
            latents = self._loop(latents, self.timesteps[::-1],
                                 lambda prediction, t, x: inversion_step(self.sampler, prediction, t, x))
        finally:
            self.keeping = None
        return latents, kept

    def sample(self, latents, queries: Optional[dict] = None, keys_values: Optional[dict] = None,
               keep: Optional[dict] = None):
        """DDIM from ``latents`` over the inversion's timesteps (empty prompt). With ``queries`` (content) and
        ``keys_values`` (style) the chosen layers inject them; without, it is the plain reconstruction, whose
        (q, k, v) go into ``keep`` when given."""
        self.injecting = None if queries is None else (queries, keys_values)
        self.keeping = None if keep is None else (keep, (0, 1, 2))
        try:
            return self._loop(latents, self.timesteps, self.sampler.step)
        finally:
            self.injecting = self.keeping = None

    def _loop(self, latents, timesteps, step):
        """One UNet call (empty prompt) and ``step(prediction, t, latents)`` per timestep, the layers hooked."""
        engine = self.engine
        states = self.empty_prompt(latents.shape[0])
        with engine.self_attention_hook(self.layers, self):
            for t in timesteps:
                self.step = int(t)
                prediction = engine.sampling_prediction(latents, t, states)
                latents = engine.step_done(step(prediction, t, latents))
                for (at, _), features in self.keeping[0].items() if self.keeping else ():
                    for tensor in features if at == self.step else ():
                        engine.step_done(tensor)  # Jittor: computed now, not kept as a growing graph
        return latents

    def style_features(self) -> tuple:
        """The style's inverted latents and its keys and values, inverted at the first call and kept."""
        if self.style is None:
            shape = self.engine.latent_shape(self.style_pixels.shape[-1])
            clean = self.engine.encode_images(self.style_pixels[None], np.zeros((1, *shape), np.float32))
            self.style = self.invert(clean, (1, 2))
        return self.style

    def stylise(self, content):
        """Clean stylised latents from clean ``content`` latents (B, C, h, w)."""
        style_latents, keys_values = self.style_features()
        noisy, queries = self.invert(content, (0,))
        start = adain(noisy, style_latents) if self.settings.adain_init else noisy
        return self.sample(start, queries, keys_values)

    def generate(self, request: GenerateRequest) -> list[np.ndarray]:
        """The images ``request`` gives without injection, stylised: uint8 (H, W, 3) arrays, one per prompt."""
        from jdiff.generate import decoded_images, denoise_latents

        with self.engine.sampling():
            content = denoise_latents(self.engine, request)
            return decoded_images(self.engine, self.stylise(content), request.prompts)
