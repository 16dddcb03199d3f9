"""The Jittor engine: jdiff's native Stable Diffusion (UNet, VAE, CLIP text encoder, DDIM) in Jittor.

It loads the same diffusers-format folder as the torch engine, by parameter name, and does the same
arithmetic in the same order, so the two engines given the same weights and random numbers agree within
float tolerance (tests/test_jittor_engine.py). Random numbers never come from Jittor: the core passes every
noise array in. LoRA files are the torch engine's (and diffusers') format, in both directions.

Mixed precision (``mixed_precision=fp16``): the UNet, VAE and text encoder run in float16, the LoRA adapters
stay float32 (see :mod:`jdiff.engines.jittor.lora`), and the loss and the sampler's arithmetic are float32.
The model inputs are cast to the model's dtype at the entry points below, so no float32 tensor promotes the
network back to float32 (Jittor computes a float32-float16 operation in float32).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import numpy as np

from jdiff.engines.base import Engine, EngineError, GenerateRequest, OptimizerSettings, TrainBatch
from jdiff.engines.jittor.env import import_jittor, use_device

jt = import_jittor()  # before the modules below import Jittor: they find its environment set

from jdiff.engines.jittor.lora import LoraLinear, adapter_of, attach_lora, lora_layers, lora_parameters  # noqa: E402
from jdiff.engines.jittor.sampler import make_sampler  # noqa: E402
from jdiff.engines.jittor.text_encoder import CLIPTextModel  # noqa: E402
from jdiff.engines.jittor.unet import UNet2DConditionModel  # noqa: E402
from jdiff.engines.jittor.vae import AutoencoderKL  # noqa: E402
from jdiff.lora_file import save_adapters  # noqa: E402
from jdiff.schedule import read_scheduler_config  # noqa: E402

log = logging.getLogger(__name__)

DTYPES = {"no": "float32", "fp16": "float16"}


class DynamicLossScale:
    """Loss scaling for float16 training: the loss is multiplied by ``scale`` before the backward pass so small
    gradients do not underflow float16, and the gradients are divided by it again before clipping and the
    optimizer step. When a gradient comes out inf or nan, the step is skipped and the scale halved; after
    ``growth_interval`` good steps in a row it doubles (torch's GradScaler's policy)."""

    def __init__(self, scale: float = 2.0 ** 15, growth_interval: int = 200):
        self.scale = scale
        self.growth_interval = growth_interval
        self.good_steps = 0

    def backward(self, optimizer: "jt.optim.Optimizer", loss: "jt.Var") -> bool:
        """The unscaled gradients of ``loss`` into ``optimizer``; False (nothing to step) when they overflowed."""
        optimizer.backward(loss * self.scale)
        grads = [g for group in optimizer.param_groups for g in group["grads"]]
        for g in grads:
            g.update(g / self.scale)
        # any inf or nan makes the sum inf or nan; one reduction over all gradients (one kernel, not one a tensor)
        if not np.isfinite(jt.concat([g.flatten() for g in grads]).sum().item()):
            optimizer.zero_grad()
            optimizer.n_step -= 1  # Jittor counts steps in backward(); AdamW's bias correction must see taken ones
            self.scale /= 2
            self.good_steps = 0
            log.info("fp16 gradients overflowed: step skipped, loss scale now %g", self.scale)
            return False
        self.good_steps += 1
        if self.good_steps == self.growth_interval:
            self.scale *= 2
            self.good_steps = 0
        return True


class JittorEngine(Engine):
    name = "jittor"

    def __init__(self, model_dir: Path, *, device: str = "auto", mixed_precision: str = "no",
                 prediction_type: Optional[str] = None, allow_pickle: bool = False):
        if mixed_precision not in DTYPES:
            raise EngineError(f"engine.mixed_precision={mixed_precision}: the Jittor engine runs in float32 (no) or "
                              "fp16; use one of those, or engine=torch for bf16.")
        use_device(jt, device)
        self.dtype = DTYPES[mixed_precision]
        self.model_dir = Path(model_dir)
        self.scheduler_config = read_scheduler_config(self.model_dir)
        self._prediction_type = prediction_type or self.scheduler_config.get("prediction_type", "epsilon")
        from transformers import CLIPTokenizer

        try:
            self.tokenizer = CLIPTokenizer.from_pretrained(self.model_dir, subfolder="tokenizer")
        except (OSError, EnvironmentError) as err:
            raise EngineError(f"cannot load the tokenizer from {self.model_dir / 'tokenizer'}: {err}") from err
        self.text_encoder = CLIPTextModel.from_pretrained(self.model_dir / "text_encoder", allow_pickle)
        self.vae = AutoencoderKL.from_pretrained(self.model_dir / "vae", allow_pickle)
        self.unet = UNet2DConditionModel.from_pretrained(self.model_dir / "unet", allow_pickle)
        if self.dtype == "float16":  # the base weights only: adapters are added later, in float32
            for model in (self.text_encoder, self.vae, self.unet):
                model.float16()
        self.loss_scale = DynamicLossScale() if self.dtype == "float16" else None
        self.optimizer: Optional[jt.optim.AdamW] = None
        self.lora_settings: dict[str, tuple[int, float]] = {}  # prefix -> (rank, alpha) of attached adapters

    # -- shapes and settings ------------------------------------------------------------------------------

    @property
    def prediction_type(self) -> str:
        return self._prediction_type

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        factor = self.vae.downsampling_factor
        return (self.vae.latent_channels, resolution // factor, resolution // factor)

    # -- LoRA --------------------------------------------------------------------------------------------

    def _models(self):
        return {"unet": self.unet, "text_encoder": self.text_encoder}

    def _attach(self, prefix: str, targets, rank: int, alpha: float) -> dict[str, LoraLinear]:
        return attach_lora(self._models()[prefix], targets, rank, alpha)

    def _set_adapter(self, layer: LoraLinear, down: np.ndarray, up: np.ndarray) -> None:
        layer.set_weights(down, up)

    def save_lora(self, path: Path, extra_metadata: Optional[dict] = None) -> None:
        adapters = {prefix: adapter_of(lora_layers(self._models()[prefix]), rank, alpha)
                    for prefix, (rank, alpha) in self.lora_settings.items()}
        save_adapters(path, adapters, extra_metadata)

    # -- training -----------------------------------------------------------------------------------------

    def setup_training(self, settings: OptimizerSettings) -> None:
        """AdamW over the adapters only (torch's formula: decoupled weight decay, bias correction, eps outside
        the square root); the text encoder's adapters get ``text_encoder_lr_ratio`` times the learning rate."""
        self.settings = settings
        groups = []
        for prefix, ratio in (("unet", 1.0), ("text_encoder", settings.text_encoder_lr_ratio)):
            params = lora_parameters(self._models()[prefix])
            for p in params:
                p.start_grad()
            if params:
                groups.append({"params": params, "lr": settings.lr * ratio, "lr_ratio": ratio})
        if not groups:
            raise EngineError("no LoRA adapters to train: call add_lora first")
        self.trainable = [p for g in groups for p in g["params"]]
        self.optimizer = jt.optim.AdamW(groups, lr=settings.lr, eps=settings.eps, betas=settings.betas,
                                        weight_decay=settings.weight_decay)

    def encode_prompts(self, prompts: list[str]) -> jt.Var:
        ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="np").input_ids
        return self.text_encoder(jt.array(ids.astype(np.int32)))

    def _states_without_gradients(self, prompts: list[str]) -> list[jt.Var]:
        with jt.no_grad():
            states = self.encode_prompts(prompts)
        return [states[i].stop_grad() for i in range(len(prompts))]

    def _stack(self, states: list[jt.Var]) -> jt.Var:
        return jt.stack(states)

    def encode_images(self, pixels: np.ndarray, posterior_noise: np.ndarray) -> jt.Var:
        """A sample of the VAE posterior, mean + std * noise, scaled into the UNet's latent space."""
        mean, std = self.vae.encode(jt.array(pixels).cast(self.dtype))
        return (mean.float32() + std.float32() * jt.array(posterior_noise) - self.vae.shift_factor) \
            * self.vae.scaling_factor

    def loss_terms(self, batch: TrainBatch) -> jt.Var:
        """Per-sample MSE between the UNet's prediction and its target (noise, or v)."""
        with jt.no_grad():
            latents = self.encode_images(batch.pixels, batch.posterior_noise)
        states = self.training_prompt_states(batch.prompts)
        noise = jt.array(batch.noise)
        a = jt.array(batch.signal).reshape(-1, 1, 1, 1)
        s = jt.array(batch.noise_level).reshape(-1, 1, 1, 1)
        noisy = a * latents + s * noise
        pred = self.unet(noisy.cast(self.dtype), jt.array(batch.timesteps), states).float32()
        target = noise if self.prediction_type == "epsilon" else a * noise - s * latents
        return ((pred - target) ** 2).mean(dims=(1, 2, 3))

    def train_step(self, batch: TrainBatch, lr: float) -> np.ndarray:
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group["lr_ratio"]
        per_sample = self.loss_terms(batch)
        loss = (per_sample * jt.array(batch.weights)).sum()
        if self.loss_scale is None:
            self.optimizer.backward(loss)
        elif not self.loss_scale.backward(self.optimizer, loss):
            return per_sample.numpy()  # overflow: no step this time, a smaller scale next time
        if self.settings.max_grad_norm > 0:
            self.optimizer.clip_grad_norm(self.settings.max_grad_norm)
        self.optimizer.step()
        return per_sample.numpy()

    # -- sampling -----------------------------------------------------------------------------------------

    def generate(self, request: GenerateRequest) -> list[np.ndarray]:
        with jt.no_grad():
            return self._generate(request)

    def _generate(self, req: GenerateRequest) -> list[np.ndarray]:
        n = len(req.prompts)
        sampler = make_sampler(self.scheduler_config, req.sampler, self.prediction_type)
        cond = self.encode_prompts(req.prompts)
        if req.origin_prompts is not None and req.origin_scale > 0:
            cond = cond + req.origin_scale * (self.encode_prompts(req.origin_prompts) - cond)
        guided = req.guidance_scale > 1.0
        states = jt.concat([self.encode_prompts([req.negative_prompt] * n), cond]) if guided else cond
        noise = jt.array(req.noise)
        if req.init_image is None:
            timesteps = sampler.set_timesteps(req.steps)
            latents = noise * sampler.init_noise_sigma
        else:  # img2img (SDEdit): noise the encoded init image to the strength's timestep, denoise from there
            timesteps = sampler.img2img_timesteps(req.steps, req.strength)
            latents = self.encode_images(np.repeat(req.init_image[None], n, axis=0), req.init_posterior_noise)
            latents = sampler.add_noise(latents, noise, timesteps[0])
        for t in timesteps:
            model_input = jt.concat([latents, latents]) if guided else latents
            model_input = sampler.scale_model_input(model_input, t)
            pred = self.unet(model_input.cast(self.dtype), jt.array([int(t)]), states).float32()
            if guided:
                uncond, text = pred[:n], pred[n:]
                pred = uncond + req.guidance_scale * (text - uncond)
            latents = sampler.step(pred, t, latents)
            latents.sync()  # run each step as it comes, not as one graph over all steps
        images = self.vae.decode((latents / self.vae.scaling_factor + self.vae.shift_factor).cast(self.dtype))
        images = (images.float32() * 0.5 + 0.5).clamp(0, 1).transpose(0, 2, 3, 1).numpy()
        return [(im * 255).round().astype(np.uint8) for im in images]
