"""GroupNorm for the torch engine on CUDA, in Triton: statistics split over many blocks, any memory format.

PyTorch's CUDA GroupNorm gives each (sample, group) one block for its statistics. With the two training
images of the reference method that is 64 blocks for the VAE encoder's 512 x 512 maps, a fraction of a
large GPU, and those reductions were 14% of a bf16 training step. It also returns NCHW for channels-last
input, so channels-last convolutions convert back and forth around every norm.

Here each (sample, group) is cut into up to ``TARGET_PROGRAMS / (N * G)`` spans of positions:
1. ``_partial_sums``: each span's sum and sum of squares (fp32, shifted by the group's first value so that a
   large mean does not cancel the variance);
2. ``_normalize``: each span adds up its group's partial sums (a few dozen numbers), then normalizes and
   applies the weight and bias.
The backward pass has the same shape: per-channel partial sums of dy and dy * x_hat, then dx. Tensors are
read through (batch, channel, position) strides, so NCHW and channels-last (NHWC) run without copies and
the output keeps the input's memory format.

The kernels compile on first use (Triton, seconds; cached on disk). Under ``TRITON_INTERPRET=1`` (set before
this module is imported) they run on CPU tensors through Triton's interpreter, which is how the tests check
them without a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from jdiff.engines.options import triton_interpreting

TARGET_PROGRAMS = 1024  # programs per launch to aim for: several waves on the largest GPUs
TILE = 4096  # elements (channels x positions) one program holds at a time
SPAN_CHUNK = 128  # channels-last: spans a per-group kernel adds up at a time


def _next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def strides(x: torch.Tensor) -> tuple[int, int, int] | None:
    """(sample, channel, position) strides when the dims after the channel flatten into one position index
    with one stride: NCHW-contiguous and channels-last tensors do; None for any other layout."""
    if x.dim() < 3:
        return None
    positions = x[0, 0].numel()
    if x.is_contiguous():
        return x.stride(0), x.stride(1), 1
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return x.stride(0), 1, x.shape[1]
    return (x.stride(0), x.stride(1), x.stride(-1)) if positions == 1 else None


def _flattenable(x: torch.Tensor) -> torch.Tensor:
    return x if strides(x) is not None else x.contiguous()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class Plan:
    """How one (N, C, positions) tensor is cut into programs.

    NCHW (``by_group``): a program per (sample, group, span of position tiles); a group's values are one
    contiguous run. Channels-last: a program per (sample, span of positions) covering every channel, so each
    position's channels are one contiguous read; a small kernel per (sample, group) then adds up the spans."""

    def __init__(self, x: torch.Tensor, num_groups: int):
        self.n, self.c = x.shape[:2]
        self.positions = x[0, 0].numel()
        self.groups = num_groups
        self.group_channels = self.c // num_groups
        self.by_group = strides(x)[1] != 1 or self.c == 1
        self.block_c = _next_pow2(self.group_channels)
        if self.by_group:
            self.block_p = min(max(16, TILE // self.block_c), _next_pow2(self.positions))
            rows = self.n * num_groups
        else:
            self.block_all = _next_pow2(self.c)
            self.block_p = min(max(1, TILE // self.block_all), _next_pow2(self.positions))
            rows = self.n
        self.tiles = _cdiv(self.positions, self.block_p)
        splits = min(self.tiles, max(1, _cdiv(TARGET_PROGRAMS, rows)))
        self.tiles_per_split = _cdiv(self.tiles, splits)
        self.splits = _cdiv(self.tiles, self.tiles_per_split)
        self.block_s = _next_pow2(self.splits) if self.by_group else min(_next_pow2(self.splits), SPAN_CHUNK)
        self.grid = (rows, self.splits)
        self.group_grid = (self.n * num_groups,)
        self.count = float(self.group_channels * self.positions)

    def common(self) -> dict:
        if self.by_group:
            return dict(P=self.positions, CG=self.group_channels, G=self.groups, TILES=self.tiles,
                        TILES_PER_SPLIT=self.tiles_per_split, SPLITS=self.splits,
                        BLOCK_C=self.block_c, BLOCK_P=self.block_p)
        return dict(P=self.positions, C=self.c, CG=self.group_channels, G=self.groups, TILES=self.tiles,
                    TILES_PER_SPLIT=self.tiles_per_split, SPLITS=self.splits, BLOCK_P=self.block_p,
                    BLOCK_ALL=self.block_all)

    def per_group(self) -> dict:
        return dict(C=self.c, G=self.groups, CG=self.group_channels, SPLITS=self.splits, BLOCK_S=self.block_s,
                    BLOCK_C=self.block_c)


@triton.jit
def _tile(ptr, start, sc, sp, t, P, CG, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    cs = tl.arange(0, BLOCK_C)
    ps = t * BLOCK_P + tl.arange(0, BLOCK_P)
    mask = (cs < CG)[:, None] & (ps < P)[None, :]
    offsets = start + cs[:, None] * sc + ps[None, :] * sp
    return ptr + offsets, mask

@triton.jit
def _group_start(row, sn, sc, G, CG):
    n = row // G
    g = row % G
    return n.to(tl.int64) * sn + (g * CG).to(tl.int64) * sc


@triton.jit
def _partial_sums(x_ptr, part_ptr, sn, sc, sp, P, CG, G, TILES, TILES_PER_SPLIT, SPLITS,
                  BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    row = tl.program_id(0)
    split = tl.program_id(1)
    start = _group_start(row, sn, sc, G, CG)
    shift = tl.load(x_ptr + start).to(tl.float32)
    acc = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
    first = split * TILES_PER_SPLIT
    for t in range(first, tl.minimum(first + TILES_PER_SPLIT, TILES)):
        ptrs, mask = _tile(x_ptr, start, sc, sp, t, P, CG, BLOCK_C, BLOCK_P)
        d = tl.where(mask, tl.load(ptrs, mask=mask, other=0.0).to(tl.float32) - shift, 0.0)
        acc += d
        acc2 += d * d
    out = part_ptr + (row * SPLITS + split) * 2
    tl.store(out, tl.sum(tl.sum(acc, axis=1), axis=0))
    tl.store(out + 1, tl.sum(tl.sum(acc2, axis=1), axis=0))

@triton.jit
def _normalize(x_ptr, y_ptr, w_ptr, b_ptr, part_ptr, stats_ptr, sn, sc, sp, yn, yc, yp, eps, count,
               P, CG, G, TILES, TILES_PER_SPLIT, SPLITS,
               BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_S: tl.constexpr):
    row = tl.program_id(0)
    split = tl.program_id(1)
    start = _group_start(row, sn, sc, G, CG)
    ks = tl.arange(0, BLOCK_S)
    parts = part_ptr + (row * SPLITS + ks) * 2
    s1 = tl.sum(tl.load(parts, mask=ks < SPLITS, other=0.0), axis=0) / count
    s2 = tl.sum(tl.load(parts + 1, mask=ks < SPLITS, other=0.0), axis=0) / count
    mean = tl.load(x_ptr + start).to(tl.float32) + s1
    rstd = 1.0 / tl.sqrt(tl.maximum(s2 - s1 * s1, 0.0) + eps)
    if split == 0:
        tl.store(stats_ptr + row * 2, mean)
        tl.store(stats_ptr + row * 2 + 1, rstd)
    cs = tl.arange(0, BLOCK_C)
    channel = (row % G) * CG + cs
    w = tl.load(w_ptr + channel, mask=cs < CG, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + channel, mask=cs < CG, other=0.0).to(tl.float32)
    scale = (w * rstd)[:, None]
    offset = (b - mean * w * rstd)[:, None]
    y_start = _group_start(row, yn, yc, G, CG)
    first = split * TILES_PER_SPLIT
    for t in range(first, tl.minimum(first + TILES_PER_SPLIT, TILES)):
        ptrs, mask = _tile(x_ptr, start, sc, sp, t, P, CG, BLOCK_C, BLOCK_P)
        v = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        out, _ = _tile(y_ptr, y_start, yc, yp, t, P, CG, BLOCK_C, BLOCK_P)
        tl.store(out, (v * scale + offset).to(y_ptr.dtype.element_ty), mask=mask)

@triton.jit
def _grad_sums(dy_ptr, x_ptr, stats_ptr, part_ptr, sn, sc, sp, dn, dc, dp, P, CG, G, TILES,
               TILES_PER_SPLIT, SPLITS, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """Per channel of one span: the sums of dy and of dy * x_hat."""
    row = tl.program_id(0)
    split = tl.program_id(1)
    start = _group_start(row, sn, sc, G, CG)
    d_start = _group_start(row, dn, dc, G, CG)
    mean = tl.load(stats_ptr + row * 2)
    rstd = tl.load(stats_ptr + row * 2 + 1)
    acc = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
    first = split * TILES_PER_SPLIT
    for t in range(first, tl.minimum(first + TILES_PER_SPLIT, TILES)):
        ptrs, mask = _tile(x_ptr, start, sc, sp, t, P, CG, BLOCK_C, BLOCK_P)
        d_ptrs, _ = _tile(dy_ptr, d_start, dc, dp, t, P, CG, BLOCK_C, BLOCK_P)
        x_hat = (tl.load(ptrs, mask=mask, other=0.0).to(tl.float32) - mean) * rstd
        dy = tl.load(d_ptrs, mask=mask, other=0.0).to(tl.float32)
        acc += dy
        acc2 += tl.where(mask, dy * x_hat, 0.0)
    cs = tl.arange(0, BLOCK_C)
    out = part_ptr + ((row * SPLITS + split) * BLOCK_C + cs) * 2
    tl.store(out, tl.sum(acc, axis=1))
    tl.store(out + 1, tl.sum(acc2, axis=1))

@triton.jit
def _grad_input(dy_ptr, x_ptr, dx_ptr, w_ptr, stats_ptr, part_ptr, sn, sc, sp, dn, dc, dp, on, oc, op,
                count, P, CG, G, TILES, TILES_PER_SPLIT, SPLITS,
                BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_S: tl.constexpr):
    """dx = rstd * (w * dy - mean_group(w * dy) - x_hat * mean_group(w * dy * x_hat))."""
    row = tl.program_id(0)
    split = tl.program_id(1)
    mean = tl.load(stats_ptr + row * 2)
    rstd = tl.load(stats_ptr + row * 2 + 1)
    cs = tl.arange(0, BLOCK_C)
    w = tl.load(w_ptr + (row % G) * CG + cs, mask=cs < CG, other=0.0).to(tl.float32)
    ks = tl.arange(0, BLOCK_S)
    parts = part_ptr + ((row * SPLITS + ks[:, None]) * BLOCK_C + cs[None, :]) * 2
    kmask = (ks < SPLITS)[:, None] & (cs < CG)[None, :]
    sum_dy = tl.sum(tl.load(parts, mask=kmask, other=0.0), axis=0)
    sum_dy_xhat = tl.sum(tl.load(parts + 1, mask=kmask, other=0.0), axis=0)
    c1 = tl.sum(w * sum_dy, axis=0) / count
    c2 = tl.sum(w * sum_dy_xhat, axis=0) / count
    start = _group_start(row, sn, sc, G, CG)
    d_start = _group_start(row, dn, dc, G, CG)
    o_start = _group_start(row, on, oc, G, CG)
    first = split * TILES_PER_SPLIT
    for t in range(first, tl.minimum(first + TILES_PER_SPLIT, TILES)):
        ptrs, mask = _tile(x_ptr, start, sc, sp, t, P, CG, BLOCK_C, BLOCK_P)
        d_ptrs, _ = _tile(dy_ptr, d_start, dc, dp, t, P, CG, BLOCK_C, BLOCK_P)
        o_ptrs, _ = _tile(dx_ptr, o_start, oc, op, t, P, CG, BLOCK_C, BLOCK_P)
        x_hat = (tl.load(ptrs, mask=mask, other=0.0).to(tl.float32) - mean) * rstd
        dy = tl.load(d_ptrs, mask=mask, other=0.0).to(tl.float32)
        dx = rstd * (w[:, None] * dy - c1 - x_hat * c2)
        tl.store(o_ptrs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


# -- channels-last: programs per (sample, span of positions), every channel at once --------------------------


@triton.jit
def _positions(ptr, start, sp, t, P, C, BLOCK_P: tl.constexpr, BLOCK_ALL: tl.constexpr):
    """A [positions, channels] tile of a channels-last sample (channel stride 1)."""
    ps = t * BLOCK_P + tl.arange(0, BLOCK_P)
    cs = tl.arange(0, BLOCK_ALL)
    mask = (ps < P)[:, None] & (cs < C)[None, :]
    return ptr + start + ps[:, None].to(tl.int64) * sp + cs[None, :], mask


@triton.jit
def _channel_totals(part_ptr, n, g, C, CG, SPLITS, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """The two per-channel partial sums of group g of sample n, added up over the spans: ([BLOCK_C], [BLOCK_C])."""
    cs = tl.arange(0, BLOCK_C)
    t1 = tl.zeros([BLOCK_C], dtype=tl.float32)
    t2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    for k0 in range(0, SPLITS, BLOCK_S):
        ks = k0 + tl.arange(0, BLOCK_S)
        mask = (ks < SPLITS)[:, None] & (cs < CG)[None, :]
        ptrs = part_ptr + ((n * SPLITS + ks[:, None]) * C + g * CG + cs[None, :]) * 2
        t1 += tl.sum(tl.load(ptrs, mask=mask, other=0.0), axis=0)
        t2 += tl.sum(tl.load(ptrs + 1, mask=mask, other=0.0), axis=0)
    return t1, t2


@triton.jit
def _cl_partial_sums(x_ptr, part_ptr, sn, sp, P, C, CG, G, TILES, TILES_PER_SPLIT, SPLITS,
                     BLOCK_P: tl.constexpr, BLOCK_ALL: tl.constexpr):
    n = tl.program_id(0)
    split = tl.program_id(1)
    start = n.to(tl.int64) * sn
    cs = tl.arange(0, BLOCK_ALL)
    shift = tl.load(x_ptr + start + (cs // CG) * CG, mask=cs < C, other=0.0).to(tl.float32)  # group's first value
    acc = tl.zeros([BLOCK_P, BLOCK_ALL], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_P, BLOCK_ALL], dtype=tl.float32)
    first = split * TILES_PER_SPLIT
    for t in range(first, tl.minimum(first + TILES_PER_SPLIT, TILES)):
        ptrs, mask = _positions(x_ptr, start, sp, t, P, C, BLOCK_P, BLOCK_ALL)
        d = tl.where(mask, tl.load(ptrs, mask=mask, other=0.0).to(tl.float32) - shift[None, :], 0.0)
        acc += d
        acc2 += d * d
    out = part_ptr + ((n * SPLITS + split) * C + cs) * 2
    tl.store(out, tl.sum(acc, axis=0), mask=cs < C)
    tl.store(out + 1, tl.sum(acc2, axis=0), mask=cs < C)


@triton.jit
def _cl_statistics(x_ptr, part_ptr, w_ptr, b_ptr, stats_ptr, coef_ptr, sn, eps, count, C, G, CG, SPLITS,
                   BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """Per (sample, group): mean and 1/std, and each channel's scale and offset for _cl_normalize."""
    row = tl.program_id(0)
    n = row // G
    g = row % G
    t1, t2 = _channel_totals(part_ptr, n, g, C, CG, SPLITS, BLOCK_S, BLOCK_C)
    s1 = tl.sum(t1, axis=0) / count
    s2 = tl.sum(t2, axis=0) / count
    mean = tl.load(x_ptr + n.to(tl.int64) * sn + g * CG).to(tl.float32) + s1
    rstd = 1.0 / tl.sqrt(tl.maximum(s2 - s1 * s1, 0.0) + eps)
    tl.store(stats_ptr + row * 2, mean)
    tl.store(stats_ptr + row * 2 + 1, rstd)
    cs = tl.arange(0, BLOCK_C)
    w = tl.load(w_ptr + g * CG + cs, mask=cs < CG, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + g * CG + cs, mask=cs < CG, other=0.0).to(tl.float32)
    out = coef_ptr + (n * C + g * CG + cs) * 2
    tl.store(out, w * rstd, mask=cs < CG)
    tl.store(out + 1, b - mean * w * rstd, mask=cs < CG)


@triton.jit
def _cl_normalize(x_ptr, y_ptr, coef_ptr, sn, sp, yn, yp, P, C, CG, G, TILES, TILES_PER_SPLIT, SPLITS,
                  BLOCK_P: tl.constexpr, BLOCK_ALL: tl.constexpr):
    n = tl.program_id(0)
    split = tl.program_id(1)
    cs = tl.arange(0, BLOCK_ALL)
    scale = tl.load(coef_ptr + (n * C + cs) * 2, mask=cs < C, other=0.0)[None, :]
    offset = tl.load(coef_ptr + (n * C + cs) * 2 + 1, mask=cs < C, other=0.0)[None, :]
    first = split * TILES_PER_SPLIT
    for t in range(first, tl.minimum(first + TILES_PER_SPLIT, TILES)):
        ptrs, mask = _positions(x_ptr, n.to(tl.int64) * sn, sp, t, P, C, BLOCK_P, BLOCK_ALL)
        out, _ = _positions(y_ptr, n.to(tl.int64) * yn, yp, t, P, C, BLOCK_P, BLOCK_ALL)
        v = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        tl.store(out, (v * scale + offset).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _cl_grad_sums(dy_ptr, x_ptr, stats_ptr, part_ptr, sn, sp, dn, dp, P, C, CG, G, TILES, TILES_PER_SPLIT, SPLITS,
                  BLOCK_P: tl.constexpr, BLOCK_ALL: tl.constexpr):
    n = tl.program_id(0)
    split = tl.program_id(1)
    cs = tl.arange(0, BLOCK_ALL)
    group = n * G + cs // CG
    mean = tl.load(stats_ptr + group * 2, mask=cs < C, other=0.0)[None, :]
    rstd = tl.load(stats_ptr + group * 2 + 1, mask=cs < C, other=0.0)[None, :]
    acc = tl.zeros([BLOCK_P, BLOCK_ALL], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_P, BLOCK_ALL], dtype=tl.float32)
    first = split * TILES_PER_SPLIT
    for t in range(first, tl.minimum(first + TILES_PER_SPLIT, TILES)):
        ptrs, mask = _positions(x_ptr, n.to(tl.int64) * sn, sp, t, P, C, BLOCK_P, BLOCK_ALL)
        d_ptrs, _ = _positions(dy_ptr, n.to(tl.int64) * dn, dp, t, P, C, BLOCK_P, BLOCK_ALL)
        x_hat = (tl.load(ptrs, mask=mask, other=0.0).to(tl.float32) - mean) * rstd
        dy = tl.load(d_ptrs, mask=mask, other=0.0).to(tl.float32)
        acc += dy
        acc2 += tl.where(mask, dy * x_hat, 0.0)
    out = part_ptr + ((n * SPLITS + split) * C + cs) * 2
    tl.store(out, tl.sum(acc, axis=0), mask=cs < C)
    tl.store(out + 1, tl.sum(acc2, axis=0), mask=cs < C)


@triton.jit
def _cl_grad_statistics(part_ptr, w_ptr, coef_ptr, count, C, G, CG, SPLITS, BLOCK_S: tl.constexpr,
                        BLOCK_C: tl.constexpr):
    """Per (sample, group): mean_group(w * dy) and mean_group(w * dy * x_hat)."""
    row = tl.program_id(0)
    g = row % G
    t1, t2 = _channel_totals(part_ptr, row // G, g, C, CG, SPLITS, BLOCK_S, BLOCK_C)
    cs = tl.arange(0, BLOCK_C)
    w = tl.load(w_ptr + g * CG + cs, mask=cs < CG, other=0.0).to(tl.float32)
    tl.store(coef_ptr + row * 2, tl.sum(w * t1, axis=0) / count)
    tl.store(coef_ptr + row * 2 + 1, tl.sum(w * t2, axis=0) / count)


@triton.jit
def _cl_grad_input(dy_ptr, x_ptr, dx_ptr, w_ptr, stats_ptr, coef_ptr, sn, sp, dn, dp, on, op, P, C, CG, G, TILES,
                   TILES_PER_SPLIT, SPLITS, BLOCK_P: tl.constexpr, BLOCK_ALL: tl.constexpr):
    n = tl.program_id(0)
    split = tl.program_id(1)
    cs = tl.arange(0, BLOCK_ALL)
    valid = cs < C
    group = n * G + cs // CG
    mean = tl.load(stats_ptr + group * 2, mask=valid, other=0.0)[None, :]
    rstd = tl.load(stats_ptr + group * 2 + 1, mask=valid, other=0.0)[None, :]
    c1 = tl.load(coef_ptr + group * 2, mask=valid, other=0.0)[None, :]
    c2 = tl.load(coef_ptr + group * 2 + 1, mask=valid, other=0.0)[None, :]
    w = tl.load(w_ptr + cs, mask=valid, other=0.0).to(tl.float32)[None, :]
    first = split * TILES_PER_SPLIT
    for t in range(first, tl.minimum(first + TILES_PER_SPLIT, TILES)):
        ptrs, mask = _positions(x_ptr, n.to(tl.int64) * sn, sp, t, P, C, BLOCK_P, BLOCK_ALL)
        d_ptrs, _ = _positions(dy_ptr, n.to(tl.int64) * dn, dp, t, P, C, BLOCK_P, BLOCK_ALL)
        o_ptrs, _ = _positions(dx_ptr, n.to(tl.int64) * on, op, t, P, C, BLOCK_P, BLOCK_ALL)
        x_hat = (tl.load(ptrs, mask=mask, other=0.0).to(tl.float32) - mean) * rstd
        dy = tl.load(d_ptrs, mask=mask, other=0.0).to(tl.float32)
        tl.store(o_ptrs, (rstd * (w * dy - c1 - x_hat * c2)).to(dx_ptr.dtype.element_ty), mask=mask)


def _forward(x: torch.Tensor, plan: Plan, weight: torch.Tensor, bias: torch.Tensor, eps: float):
    dev = x.device
    stats = torch.empty(plan.n * plan.groups * 2, dtype=torch.float32, device=dev)
    y = torch.empty_like(x)
    if plan.by_group:
        parts = torch.empty(plan.grid[0] * plan.splits * 2, dtype=torch.float32, device=dev)
        _partial_sums[plan.grid](x, parts, *strides(x), **plan.common())
        _normalize[plan.grid](x, y, weight, bias, parts, stats, *strides(x), *strides(y), eps, plan.count,
                              BLOCK_S=plan.block_s, **plan.common())
        return y, stats
    (sn, _, sp), (yn, _, yp) = strides(x), strides(y)
    parts = torch.empty(plan.n * plan.splits * plan.c * 2, dtype=torch.float32, device=dev)
    coef = torch.empty(plan.n * plan.c * 2, dtype=torch.float32, device=dev)
    _cl_partial_sums[plan.grid](x, parts, sn, sp, **plan.common())
    _cl_statistics[plan.group_grid](x, parts, weight, bias, stats, coef, sn, eps, plan.count, **plan.per_group())
    _cl_normalize[plan.grid](x, y, coef, sn, sp, yn, yp, **plan.common())
    return y, stats


def _backward(dy: torch.Tensor, x: torch.Tensor, plan: Plan, weight: torch.Tensor, stats: torch.Tensor,
              weight_grads: bool):
    """dx, and (C, 2) per-channel sums of dy and dy * x_hat (the bias and weight gradients) if ``weight_grads``."""
    dev = x.device
    dx = torch.empty_like(x)
    if plan.by_group:
        dy = _flattenable(dy)
        parts = torch.empty(plan.grid[0] * plan.splits * plan.block_c * 2, dtype=torch.float32, device=dev)
        _grad_sums[plan.grid](dy, x, stats, parts, *strides(x), *strides(dy), **plan.common())
        _grad_input[plan.grid](dy, x, dx, weight, stats, parts, *strides(x), *strides(dy), *strides(dx),
                               plan.count, BLOCK_S=plan.block_s, **plan.common())
        parts = parts.view(plan.n, plan.groups, plan.splits, plan.block_c, 2)[..., :plan.group_channels, :]
        return dx, parts.sum(dim=(0, 2)).reshape(-1, 2) if weight_grads else None
    dy = dy.contiguous(memory_format=torch.channels_last) if dy.dim() == 4 else dy.contiguous()
    (sn, _, sp), (dn, _, dp), (on, _, op) = strides(x), strides(dy), strides(dx)
    parts = torch.empty(plan.n * plan.splits * plan.c * 2, dtype=torch.float32, device=dev)
    coef = torch.empty(plan.n * plan.groups * 2, dtype=torch.float32, device=dev)
    _cl_grad_sums[plan.grid](dy, x, stats, parts, sn, sp, dn, dp, **plan.common())
    _cl_grad_statistics[plan.group_grid](parts, weight, coef, plan.count, **plan.per_group())
    _cl_grad_input[plan.grid](dy, x, dx, weight, stats, coef, sn, sp, dn, dp, on, op, **plan.common())
    return dx, parts.view(plan.n, plan.splits, plan.c, 2).sum(dim=(0, 1)) if weight_grads else None


class _GroupNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, num_groups, weight, bias, eps):
        ctx.plan = Plan(x, num_groups)  # the backward pass cuts x the same way
        y, stats = _forward(x, ctx.plan, weight, bias, eps)
        ctx.save_for_backward(x, weight, stats)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, stats = ctx.saved_tensors
        dx, sums = _backward(dy, x, ctx.plan, weight, stats, ctx.needs_input_grad[2] or ctx.needs_input_grad[3])
        dw = db = None
        if sums is not None:
            db, dw = sums[:, 0].to(weight.dtype), sums[:, 1].to(weight.dtype)
        return dx, None, dw, db, None


def group_norm(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None = None,
               bias: torch.Tensor | None = None, eps: float = 1e-5) -> torch.Tensor:
    """``torch.nn.functional.group_norm`` through the Triton kernels (statistics and arithmetic in fp32; the
    output has the input's dtype and memory format)."""
    if x.shape[1] % num_groups:
        raise ValueError(f"{x.shape[1]} channels do not split into {num_groups} groups")
    if weight is None:
        weight = torch.ones(x.shape[1], dtype=x.dtype, device=x.device)
    if bias is None:
        bias = torch.zeros(x.shape[1], dtype=x.dtype, device=x.device)
    return _GroupNormFunction.apply(_flattenable(x), num_groups, weight, bias, eps)


class TritonGroupNorm(torch.nn.GroupNorm):
    """``nn.GroupNorm`` (same parameters and state dict) computed by :func:`group_norm` where it can run:
    CUDA tensors, or any under the Triton interpreter."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda or triton_interpreting():
            return group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        return super().forward(x)


def use_triton_group_norm(*models: torch.nn.Module) -> int:
    """Make every ``nn.GroupNorm`` in ``models`` a :class:`TritonGroupNorm` in place; returns how many."""
    swapped = 0
    for model in models:
        for module in model.modules():
            if type(module) is torch.nn.GroupNorm:
                module.__class__ = TritonGroupNorm
                swapped += 1
    return swapped
