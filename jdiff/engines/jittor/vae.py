"""Stable Diffusion's VAE (diffusers' ``AutoencoderKL``) in Jittor, loading ``<model>/vae/`` by parameter name.

API:
    vae = AutoencoderKL.from_pretrained(model_dir / "vae", allow_pickle=False)
    mean, std = vae.encode(pixels)     # pixels (B, 3, H, W) in [-1, 1]; the diagonal Gaussian posterior
    pixels = vae.decode(latents)       # unscaled latents (B, C, H/f, W/f) -> (B, 3, H, W)
    vae.scaling_factor, vae.shift_factor, vae.latent_channels, vae.downsampling_factor

Scaling is the caller's: the UNet's latents are ``(mean + std * noise - shift_factor) * scaling_factor``.

The architecture: an encoder (conv_in; per level ``layers_per_block`` ResNet blocks and, except at the last
level, a stride-2 convolution padded at the bottom-right; a mid block ResNet, single-head self-attention,
ResNet; GroupNorm, SiLU, conv_out to 2 x latent channels), ``quant_conv`` (1x1), and mirrored
``post_quant_conv`` and decoder (``layers_per_block + 1`` ResNet blocks per level, nearest 2x upsampling).
Old checkpoints name the mid-block attention ``query/key/value/proj_attn``; they load as ``to_q/to_k/to_v/
to_out.0``, as diffusers renames them.
"""

from __future__ import annotations

from pathlib import Path

import jittor as jt
from jittor import nn

from jdiff.engines.base import EngineError
from jdiff.engines.jittor.blocks import (Conv2d, Downsample2D, GroupNorm, ResnetBlock2D, Upsample2D, attention,
                                         channels_first, channels_last, silu)
from jdiff.engines.jittor.weights import build_from_folder

# diffusers' defaults for the config keys SD checkpoints may leave out
DEFAULTS = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D"],
    "block_out_channels": [64],
    "layers_per_block": 1,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "scaling_factor": 0.18215,
    "shift_factor": None,
    "use_quant_conv": True,
    "use_post_quant_conv": True,
    "mid_block_add_attention": True,
}
EPS = 1e-6  # diffusers' VAE hard-codes this for every norm
DEPRECATED_ATTENTION_NAMES = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.", ".proj_attn.": ".to_out.0."}


def modern_attention_name(name: str) -> str:
    for old, new in DEPRECATED_ATTENTION_NAMES.items():
        name = name.replace(old, new)
    return name


class VAEAttention(nn.Module):
    """Self-attention over the pixels of a feature map, with a residual connection (the VAE mid block's)."""

    def __init__(self, channels: int, groups: int, head_dim: int):
        super().__init__()
        self.heads = channels // head_dim
        self.group_norm = GroupNorm(groups, channels, eps=EPS, affine=True)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels), nn.Dropout(0.0)])

    def execute(self, x: jt.Var) -> jt.Var:
        batch, channels, height, width = x.shape
        tokens = channels_last(self.group_norm(x))

        def heads(t):
            return t.reshape(batch, -1, self.heads, channels // self.heads).transpose(0, 2, 1, 3)

        out = attention(heads(self.to_q(tokens)), heads(self.to_k(tokens)), heads(self.to_v(tokens)), upcast=True)
        out = out.transpose(0, 2, 1, 3).reshape(batch, height * width, channels)
        out = self.to_out[1](self.to_out[0](out))
        return channels_first(out, height, width) + x


class MidBlock(nn.Module):
    def __init__(self, channels: int, groups: int, add_attention: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(channels, channels, None, groups, eps=EPS) for _ in range(2)])
        self.attentions = nn.ModuleList([VAEAttention(channels, groups, channels)] if add_attention else [])

    def execute(self, x: jt.Var) -> jt.Var:
        x = self.resnets[0](x)
        if len(self.attentions):
            x = self.attentions[0](x)
        return self.resnets[1](x)


class DownEncoderBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, layers: int, groups: int, downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList([
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, None, groups, eps=EPS)
            for i in range(layers)
        ])
        self.downsamplers = nn.ModuleList([Downsample2D(out_channels, padding=0)] if downsample else [])

    def execute(self, x: jt.Var) -> jt.Var:
        for resnet in self.resnets:
            x = resnet(x)
        for down in self.downsamplers:
            x = down(x)
        return x


class UpDecoderBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, layers: int, groups: int, upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList([
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, None, groups, eps=EPS)
            for i in range(layers)
        ])
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)] if upsample else [])

    def execute(self, x: jt.Var) -> jt.Var:
        for resnet in self.resnets:
            x = resnet(x)
        for up in self.upsamplers:
            x = up(x)
        return x


class Encoder(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        channels, groups, levels = c["block_out_channels"], c["norm_num_groups"], len(c["block_out_channels"])
        self.conv_in = Conv2d(c["in_channels"], channels[0], 3, padding=1)
        self.down_blocks = nn.ModuleList([
            DownEncoderBlock(channels[max(i - 1, 0)], channels[i], c["layers_per_block"], groups, i < levels - 1)
            for i in range(levels)
        ])
        self.mid_block = MidBlock(channels[-1], groups, c["mid_block_add_attention"])
        self.conv_norm_out = GroupNorm(groups, channels[-1], eps=EPS)
        self.conv_out = Conv2d(channels[-1], 2 * c["latent_channels"], 3, padding=1)

    def execute(self, x: jt.Var) -> jt.Var:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        return self.conv_out(silu(self.conv_norm_out(self.mid_block(x))))


class Decoder(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        channels, groups = list(reversed(c["block_out_channels"])), c["norm_num_groups"]
        self.conv_in = Conv2d(c["latent_channels"], channels[0], 3, padding=1)
        self.mid_block = MidBlock(channels[0], groups, c["mid_block_add_attention"])
        self.up_blocks = nn.ModuleList([
            UpDecoderBlock(channels[max(i - 1, 0)], channels[i], c["layers_per_block"] + 1, groups,
                           i < len(channels) - 1)
            for i in range(len(channels))
        ])
        self.conv_norm_out = GroupNorm(groups, channels[-1], eps=EPS)
        self.conv_out = Conv2d(channels[-1], c["out_channels"], 3, padding=1)

    def execute(self, z: jt.Var) -> jt.Var:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(silu(self.conv_norm_out(x)))


class AutoencoderKL(nn.Module):
    def __init__(self, config: dict):
        super().__init__()
        c = {**DEFAULTS, **config}
        check_supported(c)
        self.config = c
        self.encoder = Encoder(c)
        self.decoder = Decoder(c)
        latent = c["latent_channels"]
        self.quant_conv = Conv2d(2 * latent, 2 * latent, 1) if c["use_quant_conv"] else None
        self.post_quant_conv = Conv2d(latent, latent, 1) if c["use_post_quant_conv"] else None

    @classmethod
    def from_pretrained(cls, folder: Path, allow_pickle: bool = False) -> "AutoencoderKL":
        return build_from_folder(cls, folder, allow_pickle, rename=modern_attention_name)

    @property
    def scaling_factor(self) -> float:
        return float(self.config["scaling_factor"])

    @property
    def shift_factor(self) -> float:
        return float(self.config["shift_factor"] or 0.0)

    @property
    def latent_channels(self) -> int:
        return int(self.config["latent_channels"])

    @property
    def downsampling_factor(self) -> int:
        return 2 ** (len(self.config["block_out_channels"]) - 1)

    def encode(self, pixels: jt.Var) -> tuple[jt.Var, jt.Var]:
        """Mean and standard deviation of the latent posterior (log-variance clamped to [-30, 20])."""
        moments = self.encoder(pixels)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = jt.chunk(moments, 2, dim=1)
        return mean, jt.exp(0.5 * logvar.clamp(-30.0, 20.0))

    def decode(self, latents: jt.Var) -> jt.Var:
        if self.post_quant_conv is not None:
            latents = self.post_quant_conv(latents)
        return self.decoder(latents)

    def execute(self, pixels: jt.Var) -> jt.Var:
        return self.decode(self.encode(pixels)[0])


def check_supported(c: dict) -> None:
    wrong = [f"{key}={c[key]}" for key, allowed in (
        ("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D"), ("act_fn", "silu"),
    ) if any(v != allowed for v in ([c[key]] if isinstance(c[key], str) else c[key]))]
    if wrong:
        raise EngineError(f"the Jittor VAE builds Stable Diffusion's AutoencoderKL; this config has "
                          f"{', '.join(wrong)}.")
