"""Building blocks shared by the Jittor UNet and VAE, with diffusers' parameter names and semantics.

API:
    ResnetBlock2D(in_channels, out_channels=None, temb_channels=512, groups=32, groups_out=None, eps=1e-6,
                  dropout=0.0, output_scale_factor=1.0)(x, temb=None)
    Downsample2D(channels, out_channels=None, padding=1)(x)
    Upsample2D(channels, out_channels=None)(x, output_size=None)
    attention(q, k, v, bias=None, upcast=False) -> softmax(q k^T / sqrt(d) + bias) v on (batch, heads, tokens, dim)
    GroupNorm(num_groups, num_channels, eps=1e-5, affine=True), LayerNorm(dim, eps=1e-5)
    Conv2d(in_channels, out_channels, kernel_size, stride=1, padding=0): nn.Conv2d, with a faster input
                    gradient for the size-keeping convolutions (see the class)
    channels_last(x) (batch, channels, h, w) -> (batch, h*w, channels); channels_first(t, h, w) the inverse
    silu(x)

Only what Stable Diffusion's configs use is built: SiLU activations, the "default" time-embedding
conditioning (the projected embedding is added between the two convolutions), convolutional down- and
up-sampling. The parameter names are diffusers' (``norm1``, ``conv1``, ``time_emb_proj``, ``norm2``,
``conv2``, ``conv_shortcut``; ``conv`` in the samplers), so ``weights.load_weights`` fills them by name.
"""

from __future__ import annotations

from typing import Optional

import jittor as jt
from jittor import nn

from jdiff.engines.jittor.fast import fused_attention, kernels


def silu(x: jt.Var) -> jt.Var:
    return x * jt.sigmoid(x)


def normalize(x: jt.Var, axes: list[int], eps: float) -> jt.Var:
    """(x - mean) / sqrt(var + eps) over ``axes``, in float32. Two passes (the variance of the centred values),
    as torch does: Jittor's own norms use E[x^2] - E[x]^2, which loses most digits when |mean| >> std."""
    x = x.float32()
    centred = x - x.mean(dims=axes, keepdims=True)
    return centred / jt.sqrt((centred * centred).mean(dims=axes, keepdims=True) + eps)


class GroupNorm(nn.Module):
    """torch.nn.GroupNorm's semantics and parameter names (``weight``, ``bias`` per channel)."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True):
        super().__init__()
        if num_channels % num_groups:
            raise ValueError(f"GroupNorm: {num_channels} channels do not split into {num_groups} groups")
        self.num_groups, self.eps = num_groups, eps
        self.weight = jt.ones(num_channels) if affine else None
        self.bias = jt.zeros(num_channels) if affine else None

    def execute(self, x: jt.Var) -> jt.Var:
        if self.weight is not None and kernels.applies(x) and x.shape[0] * self.num_groups <= kernels.GN_MAX_ROWS:
            return kernels.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        batch, channels = x.shape[0], x.shape[1]
        y = normalize(x.reshape(batch, self.num_groups, -1), [2], self.eps).reshape(x.shape)
        if self.weight is not None:
            per_channel = [1, channels] + [1] * (x.ndim - 2)
            y = y * self.weight.reshape(per_channel) + self.bias.reshape(per_channel)
        return y.cast(x.dtype)


class LayerNorm(nn.Module):
    """torch.nn.LayerNorm over the last dimension, with ``weight`` and ``bias``."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = jt.ones(dim)
        self.bias = jt.zeros(dim)

    def execute(self, x: jt.Var) -> jt.Var:
        return (normalize(x, [x.ndim - 1], self.eps) * self.weight + self.bias).cast(x.dtype)


class Conv2d(nn.Conv2d):
    """Jittor's nn.Conv2d (same parameters and result). A float16 convolution that keeps the size (stride 1, an
    odd square kernel wider than 1x1, padding half of it) takes its input gradient on CUDA as a forward
    convolution instead: the output gradient convolved with the weights flipped in space, input and output
    channels swapped, same padding. The arithmetic is the same; the speed is not. For a backward-data
    convolution Jittor runs cuDNN 9's legacy algorithm search, which picks direct kernels without tensor cores
    at SD 2.1's float16 3x3 shapes (0.5 to 1.6 ms a call on an H100), where the forward search finds tensor-core
    implicit GEMMs: forward and input gradient together 1.6x to 3.3x faster (docs/benchmarks.md, ninth run).
    1x1 kernels and float32 gain nothing there and keep Jittor's own gradient; ``kernels.MODE="fused"`` takes the
    flipped path for every size-keeping convolution (the CPU tests). The weight and bias gradients stay
    Jittor's own."""

    def execute(self, x: jt.Var) -> jt.Var:
        kh, kw = self.kernel_size
        keeps_size = (kh == kw and kh % 2 == 1 and tuple(self.stride) == (1, 1) and tuple(self.dilation) == (1, 1)
                      and tuple(self.padding) == (kh // 2, kh // 2) and self.groups == 1)
        pays = kernels.MODE == "fused" or (kh > 1 and str(x.dtype) == "float16")
        if not (keeps_size and pays and kernels.applies(x)):
            return super().execute(x)
        return SizeKeepingConv(kh // 2)(x, self.weight, *([self.bias] if self.bias is not None else []))


class SizeKeepingConv(jt.Function):
    """conv2d(x, weight, bias, padding) with stride 1; the input gradient by a forward convolution."""

    def __init__(self, padding: int):
        self.padding = padding

    def execute(self, x: jt.Var, weight: jt.Var, bias: Optional[jt.Var] = None) -> jt.Var:
        self.saved = (x, weight, bias)
        return nn.conv2d(x, weight, bias, padding=self.padding)

    def grad(self, dy: Optional[jt.Var]):
        x, weight, bias = self.saved
        if dy is None:
            return (None,) * (2 if bias is None else 3)
        dy = dy.cast(x.dtype)
        flipped = weight.transpose(1, 0, 2, 3)[:, :, ::-1, ::-1]
        dx = nn.conv2d(dy, flipped, padding=self.padding)
        # the weight and bias gradients through Jittor's own convolution; lazy, so only computed when asked for
        # (never in LoRA training, where the convolutions are frozen). A Function's inputs arrive detached.
        weight = weight.clone().start_grad()
        dweight = jt.grad((nn.conv2d(x, weight, padding=self.padding) * dy).sum(), weight)
        if bias is None:
            return dx, dweight
        return dx, dweight, dy.sum(dims=(0, 2, 3)).cast(bias.dtype)


class ResnetBlock2D(nn.Module):
    """GroupNorm, SiLU, conv, (+ time embedding), GroupNorm, SiLU, dropout, conv, plus the skip path (a 1x1 conv
    when the channel count changes), the sum divided by ``output_scale_factor``."""

    def __init__(self, in_channels: int, out_channels: Optional[int] = None, temb_channels: Optional[int] = 512,
                 groups: int = 32, groups_out: Optional[int] = None, eps: float = 1e-6, dropout: float = 0.0,
                 output_scale_factor: float = 1.0):
        super().__init__()
        out_channels = out_channels or in_channels
        self.output_scale_factor = output_scale_factor
        self.norm1 = GroupNorm(groups, in_channels, eps=eps, affine=True)
        self.conv1 = Conv2d(in_channels, out_channels, 3, stride=1, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels) if temb_channels is not None else None
        self.norm2 = GroupNorm(groups_out or groups, out_channels, eps=eps, affine=True)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = Conv2d(out_channels, out_channels, 3, stride=1, padding=1)
        self.conv_shortcut = Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def execute(self, x: jt.Var, temb: Optional[jt.Var] = None) -> jt.Var:
        h = self.conv1(silu(self.norm1(x)))
        if self.time_emb_proj is not None and temb is not None:
            h = h + self.time_emb_proj(silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(silu(self.norm2(h))))
        skip = self.conv_shortcut(x) if self.conv_shortcut is not None else x
        return (skip + h) / self.output_scale_factor


class Downsample2D(nn.Module):
    """A 3x3 convolution with stride 2. The UNet pads 1 on every side; the VAE asks for ``padding=0`` and then
    pads one row and column at the bottom and right only, so odd and even sizes halve the same way."""

    def __init__(self, channels: int, out_channels: Optional[int] = None, padding: int = 1):
        super().__init__()
        self.padding = padding
        self.conv = Conv2d(channels, out_channels or channels, 3, stride=2, padding=padding)

    def execute(self, x: jt.Var) -> jt.Var:
        if self.padding == 0:
            x = nn.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour 2x upsampling (or to ``output_size``, when the UNet's input size is not a multiple of
    its total downsampling), then a 3x3 convolution."""

    def __init__(self, channels: int, out_channels: Optional[int] = None):
        super().__init__()
        self.conv = Conv2d(channels, out_channels or channels, 3, padding=1)

    def execute(self, x: jt.Var, output_size: Optional[tuple[int, int]] = None) -> jt.Var:
        return self.conv(nearest(x, output_size or (x.shape[2] * 2, x.shape[3] * 2)))


def nearest(x: jt.Var, size: tuple[int, int]) -> jt.Var:
    """Nearest-neighbour resize with torch's rule: output pixel i reads input pixel floor(i * in / out)."""
    height, width = x.shape[2], x.shape[3]
    out_h, out_w = size
    if (out_h, out_w) == (2 * height, 2 * width):
        rows, cols = "i2/2", "i3/2"  # the usual case; one expression (one compiled kernel) for every size
    else:
        rows, cols = f"i2*{height}/{out_h}", f"i3*{width}/{out_w}"
    return x.reindex([x.shape[0], x.shape[1], out_h, out_w], ["i0", "i1", rows, cols])


def channels_last(x: jt.Var) -> jt.Var:
    """A feature map (batch, channels, height, width) as tokens (batch, height * width, channels)."""
    return kernels.swap_last_two(x.reshape(x.shape[0], x.shape[1], -1))


def channels_first(tokens: jt.Var, height: int, width: int) -> jt.Var:
    """Tokens (batch, height * width, channels) as a feature map (batch, channels, height, width)."""
    return kernels.swap_last_two(tokens).reshape(tokens.shape[0], tokens.shape[2], height, width)


def attention(q: jt.Var, k: jt.Var, v: jt.Var, bias: Optional[jt.Var] = None, upcast: bool = False) -> jt.Var:
    """Scaled dot-product attention on (batch, heads, tokens, head_dim). ``bias`` is added to the scores (a
    causal mask: -inf above the diagonal). ``upcast`` computes scores and softmax in float32 even for half
    precision inputs (diffusers' ``upcast_attention``, on in SD 2.1), where they would otherwise overflow.
    On CUDA without a bias, the fused kernel runs instead (``fused_attention.MODE`` forces either path); it
    keeps scores, softmax statistics and accumulators in float32, which covers ``upcast`` (the tensor-core
    kernels for float16 round the probabilities to float16 for their product with v, as flash attention does)."""
    if fused_attention.applies(q, bias):
        return fused_attention.attention(q, k, v)
    dtype = q.dtype
    if upcast:
        q, k = q.float32(), k.float32()
    batch, heads, keys, head_dim = k.shape
    k_t = kernels.swap_last_two(k.reshape(batch * heads, keys, head_dim)).reshape(batch, heads, head_dim, keys)
    scores = jt.matmul(q, k_t) * (q.shape[-1] ** -0.5)
    if bias is not None:
        scores = scores + bias
    probs = nn.softmax(scores, dim=-1)
    return jt.matmul(probs.cast(v.dtype) if upcast else probs, v).cast(dtype)
