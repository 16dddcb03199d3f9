"""Two hand-written kernels where Jittor's generic ones are slow at Stable Diffusion's shapes (profile of #6).

API:
    swap_last_two(x) -> x.transpose(0, 2, 1) of a (batch, rows, cols) tensor, as one tiled kernel
    group_norm(x, num_groups, weight, bias, eps) -> torch.nn.GroupNorm's result on (batch, channels, ...), float32
                    statistics, output in x's dtype, with its own backward kernel
    applies() -> whether the callers take these paths (see MODE)
    MODE: "auto" (on CUDA), "fused" (always, the CPU loops on the CPU; for tests) or "unfused"

Why (measured on an H100, one SD 2.1 training step at 512 px, batch 2):
- Jittor's transpose reads or writes with a stride when the last axis moves. The (b, c, h, w) <-> (b, h*w, c)
  changes around each transformer block took about 3.8 ms each, 260 ms of an 850 ms step. A transpose
  through a 32 x 32 shared-memory tile reads and writes whole rows.
- Jittor reduces each output element with one thread: a GroupNorm over (batch 2, 32 groups) has 64 long
  rows (40,960 values at 64 x 64 latents), so its statistics ran on 64 threads of the GPU: the norms and
  their gradients took over 100 ms of the step. One thread block a group was the first fix; but 64 blocks
  still leave most of an H100 idle (the VAE's groups hold a million values each), and that forward kernel
  took 17.7 ms of a 116 ms replayed step. The forward now spreads each group over many blocks: sums of
  chunks, shifted by the group's first value (so the sum of squares keeps its digits when the mean dwarfs
  the spread), combined per group in a fixed order (runs stay bit-identical), then an elementwise pass
  (about 4 ms a step, docs/benchmarks.md ninth run). The backward keeps one block a group.

GroupNorm's gradient: with xhat = (x - mean) * rstd and g = dy * weight (per channel), n values a group,
    dx = rstd * (g - sum(g) / n - xhat * sum(g * xhat) / n)
(one kernel: the two sums per group, then dx); the weight and bias gradients are Jittor ops that Jittor
computes only when something asks for them (they are frozen in LoRA training).

Each kernel has CPU loops with the same per-element arithmetic (the GroupNorm forward's statistics in one
double-precision loop a group, not in chunks), so the CPU tests run the formulas and the gradient wiring; the
CUDA kernels are checked on the GPU by ``python -m jdiff.bench.jittor_kernels``.
"""

from __future__ import annotations

from typing import Optional

import jittor as jt

MODE = "auto"
MODES = ("auto", "fused", "unfused")
DTYPES = ("float32", "float16")
THREADS = 512  # GroupNorm: threads per group's block
GN_MAX_ROWS = 65535  # GroupNorm's CUDA forward: (sample, group) rows go in its grid's y dimension


def applies(x: Optional[jt.Var] = None) -> bool:
    if MODE not in MODES:
        raise ValueError(f"kernels.MODE={MODE!r}: use one of {MODES}")
    if MODE == "unfused" or (x is not None and str(x.dtype) not in DTYPES):
        return False
    return MODE == "fused" or bool(jt.flags.use_cuda)


# -- (batch, rows, cols) -> (batch, cols, rows) -------------------------------------------------------------


def swap_last_two(x: jt.Var) -> jt.Var:
    """The last two axes of a 3-d tensor swapped."""
    if x.ndim != 3:
        raise ValueError(f"swap_last_two takes a (batch, rows, cols) tensor, got shape {x.shape}")
    if not applies(x) or x.shape[0] > 65535:  # the batch is the kernel's grid z dimension
        return x.transpose(0, 2, 1)
    return SwapLastTwo()(x)


class SwapLastTwo(jt.Function):
    def execute(self, x: jt.Var) -> jt.Var:
        return _swap(x)

    def grad(self, dout: Optional[jt.Var]):
        return None if dout is None else _swap(dout)


def _swap(x: jt.Var) -> jt.Var:
    batch, rows, cols = x.shape
    return jt.code((batch, cols, rows), x.dtype, [x], cpu_src=SWAP_CPU_SRC, cuda_header=SWAP_CUDA_HEADER,
                   cuda_src=SWAP_CUDA_SRC)


SWAP_CPU_SRC = r"""
const size_t batch = in0_shape0, rows = in0_shape1, cols = in0_shape2;
for (size_t b = 0; b < batch; b++)
    for (size_t r = 0; r < rows; r++)
        for (size_t c = 0; c < cols; c++) out0_p[(b * cols + c) * rows + r] = in0_p[(b * rows + r) * cols + c];
"""

SWAP_CUDA_HEADER = r"""
#include <cstddef>
namespace jdiff_kernels {
// 32 x 32 tiles, blocks of 32 x 8 threads: read rows of the input, write rows of the output. The grid's y
// dimension (at most 65535) strides over the row tiles, so any row count works.
template <class T>
__global__ void swap_kernel(const T* __restrict__ x, T* __restrict__ y, int rows, int cols) {
    __shared__ T tile[32][33];  // 33: a column of the tile falls in 32 different banks
    const size_t base = (size_t)blockIdx.z * rows * cols;
    const int c0 = blockIdx.x * 32;
    for (int r0 = blockIdx.y * 32; r0 < rows; r0 += gridDim.y * 32) {
        __syncthreads();  // the previous tile is written out
        for (int k = threadIdx.y; k < 32; k += 8) {
            const int r = r0 + k, c = c0 + threadIdx.x;
            if (r < rows && c < cols) tile[k][threadIdx.x] = x[base + (size_t)r * cols + c];
        }
        __syncthreads();
        for (int k = threadIdx.y; k < 32; k += 8) {
            const int c = c0 + k, r = r0 + threadIdx.x;
            if (r < rows && c < cols) y[base + (size_t)c * rows + r] = tile[threadIdx.x][k];
        }
    }
}
}  // namespace jdiff_kernels
"""

SWAP_CUDA_SRC = r"""
const int rows = (int)in0_shape1, cols = (int)in0_shape2;
const int row_tiles = (rows + 31) / 32;
dim3 grid((cols + 31) / 32, row_tiles < 65535 ? row_tiles : 65535, (unsigned)in0_shape0);
jdiff_kernels::swap_kernel<<<grid, dim3(32, 8)>>>(in0_p, out0_p, rows, cols);
"""


# -- GroupNorm ----------------------------------------------------------------------------------------------


def group_norm(x: jt.Var, num_groups: int, weight: jt.Var, bias: jt.Var, eps: float) -> jt.Var:
    """(x - mean) / sqrt(var + eps) * weight + bias over each group of channels (and all positions) of a
    (batch, channels, ...) tensor; statistics in float32, output in x's dtype."""
    batch, channels = x.shape[0], x.shape[1]
    if channels % num_groups:
        raise ValueError(f"group_norm: {channels} channels do not split into {num_groups} groups")
    flat = x.reshape(batch, channels, -1)
    return GroupNormFunction(num_groups, eps)(flat, weight, bias).reshape(x.shape)


class GroupNormFunction(jt.Function):
    """On (batch, channels, positions). Saves x, weight, the per-group mean and 1/std."""

    def __init__(self, num_groups: int, eps: float):
        self.num_groups, self.eps = num_groups, eps

    def execute(self, x: jt.Var, weight: jt.Var, bias: jt.Var) -> jt.Var:
        batch = x.shape[0]
        y, mean, rstd = jt.code(
            [x.shape, (batch, self.num_groups), (batch, self.num_groups)], [x.dtype, "float32", "float32"],
            [x, weight, bias], cpu_header=GN_CPU_HEADER, cpu_src=gn_source(GN_FORWARD_CPU, self),
            cuda_header=GN_CUDA_HEADER, cuda_src=gn_source(GN_FORWARD_CUDA, self))
        self.saved = (x, weight, mean, rstd)
        # y depends on the statistics in the graph (adding zero): an operator whose other outputs are only saved
        # for a backward pass that a gradient never asks for breaks Jittor's plan recorder (engine.compile=replay):
        # its second replay finds a freed node (docs/benchmarks.md, seventh run)
        return y + ((mean.sum() + rstd.sum()) * 0).cast(y.dtype)

    def grad(self, dy: Optional[jt.Var]):
        if dy is None:
            return None, None, None
        x, weight, mean, rstd = self.saved
        dy = dy.cast(x.dtype)
        dx = jt.code(x.shape, x.dtype, [x, weight, mean, rstd, dy], cpu_header=GN_CPU_HEADER,
                     cpu_src=gn_source(GN_BACKWARD_CPU, self), cuda_header=GN_CUDA_HEADER,
                     cuda_src=gn_source(GN_BACKWARD_CUDA, self))
        batch, channels, positions = x.shape
        per_group = [batch, self.num_groups, 1]
        xhat = ((x.float32().reshape(batch, self.num_groups, -1) - mean.reshape(per_group)) * rstd.reshape(per_group))
        dy32 = dy.float32()
        dweight = (dy32 * xhat.reshape(x.shape)).sum(dims=(0, 2)).cast(weight.dtype)
        dbias = dy32.sum(dims=(0, 2)).cast(weight.dtype)
        return dx, dweight, dbias


def gn_source(template: str, fn: GroupNormFunction) -> str:
    return (template.replace("GROUPS", str(fn.num_groups)).replace("EPS", repr(float(fn.eps)))
            .replace("THREADS", str(THREADS)))


# The shared per-element arithmetic (host and device)
GN_CORE = r"""
#ifdef __CUDACC__
#define GN_HD __host__ __device__ __forceinline__
#else
#define GN_HD inline
#endif
namespace jdiff_kernels {
template <class T> GN_HD float f32(T v) { return float(v); }
template <class T> GN_HD void store(T* p, float v) { *p = T(v); }
#ifdef __CUDACC__
GN_HD float f32(__half v) { return __half2float(v); }
GN_HD void store(__half* p, float v) { *p = __float2half_rn(v); }
#endif
// y for one value: normalised, then the channel's scale and shift
GN_HD float gn_out(float x, float mean, float rstd, float w, float b) { return (x - mean) * rstd * w + b; }
// dx for one value from the group's sums sum_g = sum(dy * w), sum_gx = sum(dy * w * xhat)
GN_HD float gn_dx(float x, float dy, float w, float mean, float rstd, float sum_g, float sum_gx, float n) {
    const float xhat = (x - mean) * rstd;
    return rstd * (dy * w - sum_g / n - xhat * sum_gx / n);
}
}  // namespace jdiff_kernels
"""

GN_CPU_HEADER = "#include <cmath>\n#include <cstddef>\n" + GN_CORE

GN_CUDA_HEADER = "#include <cmath>\n#include <cstddef>\n#include <cuda_fp16.h>\n" + GN_CORE + r"""
namespace jdiff_kernels {
// the sum of v over the block (blockDim.x a multiple of 32, at most 1024); every thread gets it
__device__ float block_sum(float v, float* scratch) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
    __syncthreads();  // scratch free (an earlier call may still read it)
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < warps ? scratch[lane] : 0.f;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// The forward pass in three kernels, so that every group's statistics spread over many blocks (one block a
// group leaves most of the GPU idle at batch 2: 64 blocks, each reading a VAE group's million values 3 times).
// 1. gn_chunk_stats: block (chunk, row) sums its chunk of one row (a row: one sample's group, contiguous),
//    shifted by the row's first value (all chunks of a row share the shift, and it sits among the data, so the
//    sum of squares keeps its digits); writes (sum, sum of squares) to the partials.
// 2. gn_row_stats: one warp a row adds its chunks' partials in a fixed order (deterministic) into mean, 1/std.
// 3. gn_apply: every value normalised, scaled and shifted, over as many blocks as the tensor needs.
// The partials live in a static device buffer: Jittor runs its kernels on one stream, one after another.
// Rows (batch x groups) go in the grid's y dimension: at most 65,535 (GN_MAX_ROWS; blocks.GroupNorm takes
// Jittor's ops beyond that), which also keeps one chunk a row within the partials.
constexpr int GN_MAX_PARTIALS = 1 << 16;
__device__ float2 gn_partials[GN_MAX_PARTIALS];

// the number of chunks a row splits into: enough blocks in all to fill the GPU several times over, chunks of at
// least 2,048 values, and the partials within their buffer
inline int gn_chunks(int rows, int n) {
    int chunks = (1024 + rows - 1) / rows;
    if (chunks > n / 2048) chunks = n / 2048;
    if (chunks > GN_MAX_PARTIALS / rows) chunks = GN_MAX_PARTIALS / rows;
    return chunks < 1 ? 1 : chunks;
}

template <class T>
__global__ void gn_chunk_stats(const T* __restrict__ x, int n, int chunk) {
    __shared__ float scratch[32];
    const size_t base = (size_t)blockIdx.y * n;
    const int begin = blockIdx.x * chunk, end = min(n, begin + chunk);
    const float shift = f32(x[base]);
    float s = 0.f, q = 0.f;
    for (int i = begin + threadIdx.x; i < end; i += blockDim.x) {
        const float d = f32(x[base + i]) - shift;
        s += d;
        q += d * d;
    }
    s = block_sum(s, scratch);
    q = block_sum(q, scratch);
    if (threadIdx.x == 0) gn_partials[blockIdx.y * gridDim.x + blockIdx.x] = make_float2(s, q);
}

template <class T>
__global__ void gn_row_stats(const T* __restrict__ x, float* mean_out, float* rstd_out, int rows, int n, int chunks,
                             float eps) {
    const int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row >= rows) return;
    float s = 0.f, q = 0.f;
    for (int c = lane; c < chunks; c += 32) {
        const float2 p = gn_partials[row * chunks + c];
        s += p.x;
        q += p.y;
    }
    for (int o = 16; o > 0; o >>= 1) {
        s += __shfl_xor_sync(0xffffffffu, s, o);
        q += __shfl_xor_sync(0xffffffffu, q, o);
    }
    if (lane == 0) {
        const float shifted_mean = s / n;
        const float var = fmaxf(q / n - shifted_mean * shifted_mean, 0.f);
        mean_out[row] = f32(x[(size_t)row * n]) + shifted_mean;
        rstd_out[row] = 1.f / sqrtf(var + eps);
    }
}

// block (j, row): a stretch of one row; 32-bit index arithmetic within the row
template <class T, class W>
__global__ void gn_apply(const T* __restrict__ x, const W* __restrict__ weight, const W* __restrict__ bias,
                         const float* __restrict__ mean, const float* __restrict__ rstd, T* __restrict__ y, int groups,
                         int cpg, int positions) {
    const int n = cpg * positions, row = blockIdx.y, c0 = (row % groups) * cpg;
    const size_t base = (size_t)row * n;
    const float m = mean[row], r = rstd[row];
    for (int j = blockIdx.x * blockDim.x + threadIdx.x; j < n; j += gridDim.x * blockDim.x) {
        const int c = c0 + j / positions;
        store(y + base + j, gn_out(f32(x[base + j]), m, r, f32(weight[c]), f32(bias[c])));
    }
}

template <class T, class W>
__global__ void gn_backward(const T* __restrict__ x, const W* __restrict__ weight, const float* mean_in,
                            const float* rstd_in, const T* __restrict__ dy, T* __restrict__ dx, int groups, int cpg,
                            int positions) {
    __shared__ float scratch[32];
    const int n = cpg * positions, c0 = (blockIdx.x % groups) * cpg;
    const size_t base = (size_t)blockIdx.x * n;
    const float mean = mean_in[blockIdx.x], rstd = rstd_in[blockIdx.x];
    float sg = 0.f, sgx = 0.f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        const float g = f32(dy[base + i]) * f32(weight[c0 + i / positions]);
        sg += g;
        sgx += g * (f32(x[base + i]) - mean) * rstd;
    }
    sg = block_sum(sg, scratch);
    sgx = block_sum(sgx, scratch);
    for (int i = threadIdx.x; i < n; i += blockDim.x)
        store(dx + base + i, gn_dx(f32(x[base + i]), f32(dy[base + i]), f32(weight[c0 + i / positions]), mean, rstd,
                                  sg, sgx, (float)n));
}
}  // namespace jdiff_kernels
"""

# in0 x (batch, channels, positions), in1 weight, in2 bias; out0 y, out1 mean, out2 1/std (batch, groups).
# GROUPS, EPS and THREADS are filled in by gn_source.
GN_FORWARD_CUDA = r"""
const int batch = (int)in0_shape0, cpg = (int)in0_shape1 / GROUPS, positions = (int)in0_shape2;
const int rows = batch * GROUPS, n = cpg * positions, chunks = jdiff_kernels::gn_chunks(rows, n);
jdiff_kernels::gn_chunk_stats<<<dim3(chunks, rows), THREADS>>>(in0_p, n, (n + chunks - 1) / chunks);
jdiff_kernels::gn_row_stats<<<(rows + 7) / 8, 256>>>(in0_p, out1_p, out2_p, rows, n, chunks, (float)EPS);
const int stretches = (n + 255) / 256;
jdiff_kernels::gn_apply<<<dim3(stretches < 4096 ? stretches : 4096, rows), 256>>>(in0_p, in1_p, in2_p, out1_p, out2_p,
                                                                                 out0_p, GROUPS, cpg, positions);
"""

# in0 x, in1 weight, in2 mean, in3 1/std, in4 dy; out0 dx
GN_BACKWARD_CUDA = r"""
const int batch = (int)in0_shape0, cpg = (int)in0_shape1 / GROUPS, positions = (int)in0_shape2;
jdiff_kernels::gn_backward<<<batch * GROUPS, THREADS>>>(in0_p, in1_p, in2_p, in3_p, in4_p, out0_p, GROUPS, cpg,
                                                       positions);
"""

# The same arithmetic, one group after another; the sums in double so the CPU result is the exact reference
GN_FORWARD_CPU = r"""
const int batch = (int)in0_shape0, groups = GROUPS, cpg = (int)in0_shape1 / GROUPS, positions = (int)in0_shape2;
const int n = cpg * positions;
for (int bg = 0; bg < batch * groups; bg++) {
    const size_t base = (size_t)bg * n;
    const int c0 = (bg % groups) * cpg;
    double s = 0;
    for (int i = 0; i < n; i++) s += jdiff_kernels::f32(in0_p[base + i]);
    const float mean = (float)(s / n);
    double q = 0;
    for (int i = 0; i < n; i++) { const double d = jdiff_kernels::f32(in0_p[base + i]) - mean; q += d * d; }
    const float rstd = (float)(1.0 / std::sqrt(q / n + EPS));
    for (int i = 0; i < n; i++) {
        const int c = c0 + i / positions;
        jdiff_kernels::store(out0_p + base + i, jdiff_kernels::gn_out(
            jdiff_kernels::f32(in0_p[base + i]), mean, rstd, jdiff_kernels::f32(in1_p[c]), jdiff_kernels::f32(in2_p[c])));
    }
    out1_p[bg] = mean;
    out2_p[bg] = rstd;
}
"""

GN_BACKWARD_CPU = r"""
const int batch = (int)in0_shape0, groups = GROUPS, cpg = (int)in0_shape1 / GROUPS, positions = (int)in0_shape2;
const int n = cpg * positions;
for (int bg = 0; bg < batch * groups; bg++) {
    const size_t base = (size_t)bg * n;
    const int c0 = (bg % groups) * cpg;
    const float mean = in2_p[bg], rstd = in3_p[bg];
    double sg = 0, sgx = 0;
    for (int i = 0; i < n; i++) {
        const double g = (double)jdiff_kernels::f32(in4_p[base + i]) * jdiff_kernels::f32(in1_p[c0 + i / positions]);
        sg += g;
        sgx += g * (jdiff_kernels::f32(in0_p[base + i]) - mean) * rstd;
    }
    for (int i = 0; i < n; i++)
        jdiff_kernels::store(out0_p + base + i, jdiff_kernels::gn_dx(
            jdiff_kernels::f32(in0_p[base + i]), jdiff_kernels::f32(in4_p[base + i]),
            jdiff_kernels::f32(in1_p[c0 + i / positions]), mean, rstd, (float)sg, (float)sgx, (float)n));
}
"""
