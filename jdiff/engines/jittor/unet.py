"""Stable Diffusion's UNet (diffusers' ``UNet2DConditionModel``, SD 1.x and 2.x configs) as a Jittor module.

Built from a model folder's ``unet/config.json``; every parameter has the name diffusers gives it, so
``unet/diffusion_pytorch_model.safetensors`` loads by name. Read top to bottom:

    time embedding     Timesteps (sinusoidal) -> TimestepEmbedding (linear, SiLU, linear)
    attention          Attention (to_q, to_k, to_v, to_out.0), GEGLU feed-forward, BasicTransformerBlock,
                       Transformer2DModel (GroupNorm, proj_in, blocks, proj_out; linear or 1x1-conv projections)
    blocks             CrossAttnDownBlock2D, DownBlock2D, UNetMidBlock2DCrossAttn, UpBlock2D, CrossAttnUpBlock2D
    the UNet           conv_in, down blocks (keeping the skips), mid block, up blocks (eating the skips),
                       conv_norm_out, SiLU, conv_out

ResNet blocks, down/upsamplers and the attention core come from ``blocks.py`` (shared with the VAE).
Features no SD 1.x/2.x checkpoint uses (class embeddings, added text/time embeddings, other block types)
are refused with a message rather than silently ignored.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import jittor as jt
from jittor import nn

from jdiff.engines.base import EngineError
from jdiff.engines.jittor.blocks import (Conv2d, Downsample2D, GroupNorm, LayerNorm, ResnetBlock2D, Upsample2D,
                                         attention, channels_first, channels_last, silu)
from jdiff.engines.jittor.weights import build_from_folder

# Config keys with the value every SD 1.x/2.x UNet has; anything else needs code this file does not have.
REQUIRED = {
    "act_fn": "silu",
    "time_embedding_type": "positional",
    "resnet_time_scale_shift": "default",
    "class_embed_type": None,
    "addition_embed_type": None,
    "num_class_embeds": None,
    "encoder_hid_dim": None,
    "time_cond_proj_dim": None,
    "timestep_post_act": None,
    "dual_cross_attention": False,
    "only_cross_attention": False,
    "time_embedding_dim": None,
    "attention_type": "default",
}
DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCKS = ("UpBlock2D", "CrossAttnUpBlock2D")
MID_BLOCKS = ("UNetMidBlock2DCrossAttn",)


# -- time embedding ----------------------------------------------------------------------------------------

class Timesteps(nn.Module):
    """Sinusoidal embedding of the (integer or fractional) timestep: frequencies 10000^(-i / (half - shift)),
    sines then cosines, or cosines first with ``flip_sin_to_cos`` (SD's setting)."""

    def __init__(self, num_channels: int, flip_sin_to_cos: bool, freq_shift: float):
        self.num_channels = num_channels
        self.flip_sin_to_cos = flip_sin_to_cos
        self.freq_shift = freq_shift

    def execute(self, timesteps: jt.Var) -> jt.Var:
        half = self.num_channels // 2
        exponent = jt.arange(half).float32() * (-math.log(10000)) / (half - self.freq_shift)
        angles = timesteps.float32()[:, None] * jt.exp(exponent)[None, :]
        sin, cos = jt.sin(angles), jt.cos(angles)
        emb = jt.concat([cos, sin] if self.flip_sin_to_cos else [sin, cos], dim=-1)
        if self.num_channels % 2:
            emb = nn.pad(emb, (0, 1))
        return emb


class TimestepEmbedding(nn.Module):
    def __init__(self, in_channels: int, time_embed_dim: int):
        self.linear_1 = nn.Linear(in_channels, time_embed_dim)
        self.linear_2 = nn.Linear(time_embed_dim, time_embed_dim)

    def execute(self, x: jt.Var) -> jt.Var:
        return self.linear_2(silu(self.linear_1(x)))


# -- attention ---------------------------------------------------------------------------------------------

class Attention(nn.Module):
    """Multi-head attention over tokens (batch, tokens, channels): self-attention when no ``context`` is given,
    cross-attention to the text states otherwise. ``to_out`` is a list so the output layer is ``to_out.0``.
    ``hook``: None, or a function of (q, k, v) giving the q, k, v to attend with (style injection)."""

    hook = None

    def __init__(self, query_dim: int, heads: int, dim_head: int, cross_attention_dim: Optional[int] = None,
                 upcast: bool = False):
        inner = heads * dim_head
        self.heads = heads
        self.upcast = upcast
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(cross_attention_dim or query_dim, inner, bias=False)
        self.to_v = nn.Linear(cross_attention_dim or query_dim, inner, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim)])

    def split_heads(self, x: jt.Var) -> jt.Var:
        batch, tokens, inner = x.shape
        return x.reshape(batch, tokens, self.heads, inner // self.heads).transpose(0, 2, 1, 3)

    def execute(self, x: jt.Var, context: Optional[jt.Var] = None) -> jt.Var:
        context = x if context is None else context
        q, k, v = (self.split_heads(f(y)) for f, y in ((self.to_q, x), (self.to_k, context), (self.to_v, context)))
        if self.hook is not None:  # style injection (Engine.self_attention_hook): record, or swap k and v
            q, k, v = self.hook(q, k, v)
        out = attention(q, k, v, upcast=self.upcast)
        batch, heads, tokens, dim_head = out.shape
        return self.to_out[0](out.transpose(0, 2, 1, 3).reshape(batch, tokens, heads * dim_head))


class GEGLU(nn.Module):
    """One projection to twice the width; half of it, gated by the exact GELU of the other half."""

    def __init__(self, dim_in: int, dim_out: int):
        self.dim_out = dim_out
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def execute(self, x: jt.Var) -> jt.Var:
        h = self.proj(x)
        return h[..., : self.dim_out] * nn.gelu(h[..., self.dim_out:])


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        # diffusers' net is [GEGLU, Dropout, Linear]; the identity in slot 1 keeps the last layer named net.2
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Identity(), nn.Linear(dim * mult, dim))

    def execute(self, x: jt.Var) -> jt.Var:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm residual self-attention, cross-attention to the text, then the GEGLU feed-forward."""

    def __init__(self, dim: int, heads: int, dim_head: int, cross_attention_dim: int, upcast: bool):
        self.norm1 = LayerNorm(dim, eps=1e-5)
        self.attn1 = Attention(dim, heads, dim_head, upcast=upcast)
        self.norm2 = LayerNorm(dim, eps=1e-5)
        self.attn2 = Attention(dim, heads, dim_head, cross_attention_dim=cross_attention_dim, upcast=upcast)
        self.norm3 = LayerNorm(dim, eps=1e-5)
        self.ff = FeedForward(dim)

    def execute(self, x: jt.Var, context: jt.Var) -> jt.Var:
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class Transformer2DModel(nn.Module):
    """Attention over the pixels of a feature map: GroupNorm, project in, transformer blocks on the
    (height * width) tokens, project out, plus the input. SD 2.x projects with linear layers on the tokens,
    SD 1.x with 1x1 convolutions on the map (``use_linear_projection``)."""

    def __init__(self, heads: int, dim_head: int, in_channels: int, num_layers: int, cross_attention_dim: int,
                 norm_num_groups: int, use_linear_projection: bool, upcast: bool):
        inner = heads * dim_head
        self.use_linear_projection = use_linear_projection
        self.norm = GroupNorm(norm_num_groups, in_channels, eps=1e-6, affine=True)
        if use_linear_projection:
            self.proj_in = nn.Linear(in_channels, inner)
            self.proj_out = nn.Linear(inner, in_channels)
        else:
            self.proj_in = Conv2d(in_channels, inner, 1)
            self.proj_out = Conv2d(inner, in_channels, 1)
        self.transformer_blocks = nn.ModuleList([
            BasicTransformerBlock(inner, heads, dim_head, cross_attention_dim, upcast) for _ in range(num_layers)
        ])

    def execute(self, x: jt.Var, context: jt.Var) -> jt.Var:
        height, width = x.shape[2], x.shape[3]
        h = self.norm(x)
        to_map = lambda t: channels_first(t, height, width)
        h = self.proj_in(channels_last(h)) if self.use_linear_projection else channels_last(self.proj_in(h))
        for block in self.transformer_blocks:
            h = block(h, context)
        h = to_map(self.proj_out(h)) if self.use_linear_projection else self.proj_out(to_map(h))
        return h + x


# -- down, mid and up blocks -------------------------------------------------------------------------------

class DownBlock(nn.Module):
    """CrossAttnDownBlock2D (with ``attention``) or DownBlock2D: ResNet (+ transformer) layers, then a
    stride-2 convolution unless it is the last level. Returns the output and every intermediate state, which
    the up path takes as skips."""

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, num_layers: int, groups: int,
                 eps: float, add_downsample: bool, downsample_padding: int, attention: Optional[dict]):
        self.resnets = nn.ModuleList([
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, temb_channels, groups=groups, eps=eps)
            for i in range(num_layers)
        ])
        if attention is not None:
            self.attentions = nn.ModuleList([Transformer2DModel(in_channels=out_channels, **attention)
                                             for _ in range(num_layers)])
        if add_downsample:
            self.downsamplers = nn.ModuleList([Downsample2D(out_channels, padding=downsample_padding)])

    def execute(self, x: jt.Var, temb: jt.Var, context: jt.Var) -> tuple[jt.Var, list[jt.Var]]:
        states = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if hasattr(self, "attentions"):
                x = self.attentions[i](x, context)
            states.append(x)
        if hasattr(self, "downsamplers"):
            x = self.downsamplers[0](x)
            states.append(x)
        return x, states


class MidBlock(nn.Module):
    """UNetMidBlock2DCrossAttn: ResNet, then (transformer, ResNet) per layer."""

    def __init__(self, channels: int, temb_channels: int, groups: int, eps: float, output_scale_factor: float,
                 attention: dict, num_layers: int = 1):
        self.resnets = nn.ModuleList([
            ResnetBlock2D(channels, channels, temb_channels, groups=groups, eps=eps,
                          output_scale_factor=output_scale_factor)
            for _ in range(num_layers + 1)
        ])
        self.attentions = nn.ModuleList([Transformer2DModel(in_channels=channels, **attention)
                                         for _ in range(num_layers)])

    def execute(self, x: jt.Var, temb: jt.Var, context: jt.Var) -> jt.Var:
        x = self.resnets[0](x, temb)
        for attn, resnet in zip(self.attentions, self.resnets[1:]):
            x = resnet(attn(x, context), temb)
        return x


class UpBlock(nn.Module):
    """CrossAttnUpBlock2D (with ``attention``) or UpBlock2D: each layer concatenates one skip (the deepest
    first) to its input, then ResNet (+ transformer); then a 2x upsampling unless it is the last level."""

    def __init__(self, in_channels: int, prev_output_channel: int, out_channels: int, temb_channels: int,
                 num_layers: int, groups: int, eps: float, add_upsample: bool, attention: Optional[dict]):
        self.resnets = nn.ModuleList([
            ResnetBlock2D((prev_output_channel if i == 0 else out_channels)
                          + (in_channels if i == num_layers - 1 else out_channels),
                          out_channels, temb_channels, groups=groups, eps=eps)
            for i in range(num_layers)
        ])
        if attention is not None:
            self.attentions = nn.ModuleList([Transformer2DModel(in_channels=out_channels, **attention)
                                             for _ in range(num_layers)])
        if add_upsample:
            self.upsamplers = nn.ModuleList([Upsample2D(out_channels)])

    def execute(self, x: jt.Var, skips: list[jt.Var], temb: jt.Var, context: jt.Var,
                upsample_size: Optional[tuple[int, int]]) -> jt.Var:
        for i, resnet in enumerate(self.resnets):
            x = resnet(jt.concat([x, skips.pop()], dim=1), temb)
            if hasattr(self, "attentions"):
                x = self.attentions[i](x, context)
        if hasattr(self, "upsamplers"):
            x = self.upsamplers[0](x, upsample_size)
        return x


# -- the UNet ----------------------------------------------------------------------------------------------

def per_level(value, levels: int, key: str) -> list:
    """A config value given once for all levels, or as a list with one entry per level."""
    if isinstance(value, (list, tuple)):
        if len(value) != levels:
            raise EngineError(f"unet/config.json: {key} has {len(value)} entries for {levels} levels.")
        return list(value)
    return [value] * levels


def check_supported(config: dict) -> None:
    for key, expected in REQUIRED.items():
        if config.get(key, expected) != expected:
            raise EngineError(f"unet/config.json sets {key}={config[key]!r}; the Jittor UNet implements SD 1.x/2.x "
                              f"UNets ({key}={expected!r}). Use engine=torch for this model.")
    blocks = list(config["down_block_types"]) + list(config["up_block_types"]) + [config.get("mid_block_type")]
    unknown = [b for b in blocks if b not in DOWN_BLOCKS + UP_BLOCKS + MID_BLOCKS]
    if unknown:
        raise EngineError(f"unet/config.json uses block types {unknown}; the Jittor UNet has {DOWN_BLOCKS + UP_BLOCKS} "
                          f"and {MID_BLOCKS[0]}. Use engine=torch for this model.")
    if isinstance(config.get("cross_attention_dim"), (list, tuple)):
        raise EngineError("unet/config.json: a per-level cross_attention_dim is not supported; use engine=torch.")


class UNet2DConditionModel(nn.Module):
    def __init__(self, config: dict):
        check_supported(config)
        self.config = config
        channels = list(config["block_out_channels"])
        levels = len(channels)
        groups, eps = config.get("norm_num_groups", 32), config.get("norm_eps", 1e-5)
        # SD's "attention_head_dim" is (by a historic misnaming in diffusers) the number of heads per level
        heads = per_level(config.get("num_attention_heads") or config.get("attention_head_dim", 8), levels,
                          "attention_head_dim")
        layers = per_level(config.get("layers_per_block", 2), levels, "layers_per_block")
        depth = per_level(config.get("transformer_layers_per_block", 1), levels, "transformer_layers_per_block")
        temb = channels[0] * 4
        in_kernel, out_kernel = config.get("conv_in_kernel", 3), config.get("conv_out_kernel", 3)

        def attention_settings(level: int, width: int) -> dict:
            return dict(heads=heads[level], dim_head=width // heads[level], num_layers=depth[level],
                        cross_attention_dim=config["cross_attention_dim"], norm_num_groups=groups,
                        use_linear_projection=config.get("use_linear_projection", False),
                        upcast=config.get("upcast_attention", False))

        self.center_input_sample = config.get("center_input_sample", False)
        self.conv_in = Conv2d(config.get("in_channels", 4), channels[0], in_kernel, padding=(in_kernel - 1) // 2)
        self.time_proj = Timesteps(channels[0], config.get("flip_sin_to_cos", True), config.get("freq_shift", 0))
        self.time_embedding = TimestepEmbedding(channels[0], temb)

        self.down_blocks = nn.ModuleList([
            DownBlock(channels[max(i - 1, 0)], channels[i], temb, layers[i], groups, eps,
                      add_downsample=i < levels - 1, downsample_padding=config.get("downsample_padding", 1),
                      attention=attention_settings(i, channels[i]) if kind == "CrossAttnDownBlock2D" else None)
            for i, kind in enumerate(config["down_block_types"])
        ])
        self.mid_block = MidBlock(channels[-1], temb, groups, eps, config.get("mid_block_scale_factor", 1),
                                  attention_settings(levels - 1, channels[-1]))
        # The up path mirrors the down path: up block i works at level (levels - 1 - i).
        self.up_blocks = nn.ModuleList()
        for i, kind in enumerate(config["up_block_types"]):
            level = levels - 1 - i
            self.up_blocks.append(UpBlock(
                in_channels=channels[max(level - 1, 0)], prev_output_channel=channels[min(level + 1, levels - 1)],
                out_channels=channels[level], temb_channels=temb, num_layers=layers[level] + 1, groups=groups,
                eps=eps, add_upsample=level > 0,
                attention=attention_settings(level, channels[level]) if kind == "CrossAttnUpBlock2D" else None,
            ))
        self.conv_norm_out = GroupNorm(groups, channels[0], eps=eps, affine=True)
        self.conv_out = Conv2d(channels[0], config.get("out_channels", 4), out_kernel, padding=(out_kernel - 1) // 2)

    @classmethod
    def from_pretrained(cls, folder: Path, allow_pickle: bool = False) -> "UNet2DConditionModel":
        return build_from_folder(cls, folder, allow_pickle)

    def execute(self, sample: jt.Var, timesteps, encoder_hidden_states: jt.Var) -> jt.Var:
        """The UNet's prediction (noise or v) for ``sample`` (batch, channels, h, w) at ``timesteps`` (one per
        sample, or one for all), attending to ``encoder_hidden_states`` (batch, tokens, cross_attention_dim)."""
        batch = sample.shape[0]
        timesteps = jt.array(timesteps) if not isinstance(timesteps, jt.Var) else timesteps
        timesteps = timesteps.reshape(-1).broadcast((batch,)) if timesteps.numel() == 1 else timesteps
        temb = self.time_embedding(self.time_proj(timesteps).cast(sample.dtype))
        if self.center_input_sample:
            sample = 2 * sample - 1.0

        x = self.conv_in(sample)
        skips = [x]
        for block in self.down_blocks:
            x, states = block(x, temb, encoder_hidden_states)
            skips += states
        x = self.mid_block(x, temb, encoder_hidden_states)
        for block in self.up_blocks:
            taken = len(block.resnets)
            # upsample to the size of the next level's skips: 2x, or 2x minus one where the input was odd
            upsample_size = tuple(skips[-taken - 1].shape[2:]) if len(skips) > taken else None
            x = block(x, skips, temb, encoder_hidden_states, upsample_size)
        return self.conv_out(silu(self.conv_norm_out(x)))
