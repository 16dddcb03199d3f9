"""The Jittor engine: Stable Diffusion's UNet, VAE and CLIP text encoder as native Jittor modules.

They load the same diffusers-format folders as the torch engine, by parameter name. One file per part:

    env.py           import_jittor(): Jittor's environment (no downloads, CPU mode without a GPU driver)
    weights.py       load_weights(): <model>/<component>/*.safetensors into a module, names and shapes checked
    blocks.py        ResnetBlock2D, Down/Upsample2D, GroupNorm, LayerNorm, attention(): shared by the models
    vae.py           AutoencoderKL
    text_encoder.py  CLIPTextModel (SD 1.x and 2.x)
    sampler.py       DDIM and PNDM (PLMS), matching diffusers' schedulers
    unet.py          UNet2DConditionModel (SD 1.x / 2.x configs)
    lora.py          LoRA on Jittor linear layers, peft's names, jdiff.lora_file's format
    engine.py        JittorEngine: the Engine interface (train, sample, save/load LoRA)
    fast/            the fast paths (fused attention and other kernels, replayed plans, the CUDA 13 patch);
                     the files above read without it

Importing this package does not import Jittor; ``env.import_jittor`` does, on first use.
"""
