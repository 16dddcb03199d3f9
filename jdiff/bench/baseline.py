"""The baseline every speed path is measured against: the reference DreamBooth-LoRA training script's step and
a plain diffusers img2img pipeline, fp32, written the way that script runs (text encoder and VAE every step, a
loss.item() every step). It is deliberately not jdiff's trainer: it stands for the scripts people use today."""

from __future__ import annotations

from pathlib import Path

import numpy as np

RANK = 32
TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


class Baseline:
    """The reference DreamBooth-LoRA training script's step and a plain diffusers img2img pipeline, fp32."""

    name = "baseline"

    def __init__(self, model_dir: Path, device: str):
        import torch
        from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
        from peft import LoraConfig
        from transformers import CLIPTextModel, CLIPTokenizer

        self.torch, self.device = torch, torch.device(device)
        self.tokenizer = CLIPTokenizer.from_pretrained(model_dir, subfolder="tokenizer")
        self.text_encoder = CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder").to(self.device)
        self.vae = AutoencoderKL.from_pretrained(model_dir, subfolder="vae").to(self.device)
        self.unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet").to(self.device)
        self.scheduler = DDIMScheduler.from_pretrained(model_dir, subfolder="scheduler")
        for model in (self.text_encoder, self.vae, self.unet):
            model.requires_grad_(False)
        self.unet.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights="gaussian",
                                         target_modules=list(TARGETS)))
        self.params = [p for p in self.unet.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)

    def latent_shape(self, resolution: int) -> tuple:
        return (4, resolution // 8, resolution // 8)

    def train_step(self, batch) -> float:
        torch = self.torch
        pixels = torch.from_numpy(batch.pixels).to(self.device)
        latents = self.vae.encode(pixels).latent_dist.sample() * self.vae.config.scaling_factor
        noise = torch.randn_like(latents)
        timesteps = torch.from_numpy(batch.timesteps).to(self.device)
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        ids = self.tokenizer(batch.prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids.to(self.device)
        states = self.text_encoder(ids)[0]
        pred = self.unet(noisy, timesteps, states).sample
        target = (self.scheduler.get_velocity(latents, noise, timesteps)
                  if self.scheduler.config.prediction_type == "v_prediction" else noise)
        pred, prior_pred = pred.chunk(2)
        target, prior_target = target.chunk(2)
        loss = torch.nn.functional.mse_loss(pred, target) + torch.nn.functional.mse_loss(prior_pred, prior_target)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad()
        return loss.item()

    def generate(self, request) -> list:
        from diffusers import StableDiffusionImg2ImgPipeline
        from PIL import Image

        pipe = StableDiffusionImg2ImgPipeline(vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer,
                                              unet=self.unet, scheduler=self.scheduler, safety_checker=None,
                                              feature_extractor=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        init = Image.fromarray(((request.init_image.transpose(1, 2, 0) + 1) * 127.5).astype(np.uint8))
        return list(pipe(prompt=request.prompts, image=init, strength=request.strength,
                         num_inference_steps=request.steps, guidance_scale=request.guidance_scale,
                         output_type="np").images)
