"""Fused, memory-efficient scaled dot-product attention for Jittor (flash-attention style), forward and backward.

API:
    attention(q, k, v) -> softmax(q k^T / sqrt(d)) v on (batch, heads, tokens, head_dim), never building the
                          (query tokens x key tokens) matrix; output in q's dtype (float32 or float16)
    applies(q, bias) -> whether ``blocks.attention`` should take this path (see MODE)
    MODE: "auto" (fused when Jittor runs on CUDA), "fused" or "unfused" (forced; for tests and benchmarks)
    MAX_HEAD_DIM: the largest head_dim served (128)

Algorithm (one row of queries at a time, keys and values streamed in tiles):
- forward: scores of the row against a key tile, the tile's max updates the row's running max, the running
  sum and the output accumulator are rescaled by exp(old max - new max), then the tile's probabilities add
  into both ("online softmax"). The row's log-sum-exp (lse) is saved for the backward pass.
- backward: probabilities are recomputed tile by tile from lse, p = exp(s - lse), with
  D_i = rowsum(dO_i * O_i), dS = p * (dO_i . v_j - D_i). Two passes, so no thread ever adds into memory
  another one writes (no atomics, deterministic results): dQ, one query row per thread streaming key tiles;
  dK and dV, one key row per thread streaming query tiles. When there are few key tiles (cross-attention to
  77 text tokens), the query range is split over several blocks ("splits") whose partial dK/dV are summed
  in a fixed order afterwards, so the GPU still gets enough blocks.
All arithmetic is float32, whatever the inputs' dtype. On CUDA, float16 inputs with a head_dim that is a multiple
of 16 take the tensor-core kernels of :mod:`jdiff.engines.jittor.fast.tensor_core_attention` instead: the same
passes, with the tile products on tensor cores (float16 operands, float32 accumulators).

The numeric core (the per-row steps and the tile loads) is C++ written once, ``__host__ __device__`` under
nvcc and plain inline functions under g++. The CUDA kernels (one thread block per tile of rows, key/value or
query tiles in shared memory, each thread's row state in registers) and the CPU loops (the same tiles, the
block's threads run one after another) both call it, so the CPU tests exercise the GPU's algorithm.
Tile sizes and head_dim are compile-time constants: Jittor compiles one kernel per head_dim, once (cached).
"""

from __future__ import annotations

from typing import Optional

import jittor as jt

from jdiff.engines.jittor.fast import tensor_core_attention

MODE = "auto"
MODES = ("auto", "fused", "unfused")
MAX_HEAD_DIM = 128  # each thread keeps up to 3 rows of head_dim floats in registers; more would spill
DTYPES = ("float32", "float16")

FORWARD_QUERIES = 64  # query rows per block in the forward and dQ passes (one thread each)
FORWARD_KEYS = 32  # key rows per shared-memory tile in those passes
BLOCKS_WANTED = 512  # enough blocks to keep a large GPU busy (an H100 has 132 SMs, several blocks each)


def key_pass_tiles(head_dim: int) -> tuple[int, int]:
    """(key rows per block, query rows per shared tile) of the dK/dV pass: smaller past head_dim 64 so the
    shared memory (query, dO and value tiles) stays under the 48 KiB a block gets without opting in."""
    return (64, 32) if head_dim <= 64 else (32, 16)


def applies(q: jt.Var, bias: Optional[jt.Var]) -> bool:
    """Whether ``blocks.attention`` takes the fused path: no bias (it has no masks), and MODE "fused", or MODE
    "auto" on CUDA with a head_dim and dtype it serves."""
    if MODE not in MODES:
        raise ValueError(f"fused_attention.MODE={MODE!r}: use one of {MODES}")
    if bias is not None or MODE == "unfused":
        return False
    if MODE == "fused":
        return True
    return bool(jt.flags.use_cuda) and q.shape[-1] <= MAX_HEAD_DIM and str(q.dtype) in DTYPES


def attention(q: jt.Var, k: jt.Var, v: jt.Var) -> jt.Var:
    """softmax(q k^T / sqrt(head_dim)) v on (batch, heads, tokens, head_dim) tensors; k and v share their token
    count, which may differ from q's (cross-attention). k and v are cast to q's dtype."""
    check_inputs(q, k, v)
    batch, heads, n_q, head_dim = q.shape
    flat = [x.cast(q.dtype).reshape(batch * heads, x.shape[2], head_dim) for x in (q, k, v)]
    return FusedAttention()(*flat).reshape(batch, heads, n_q, head_dim)


def check_inputs(q: jt.Var, k: jt.Var, v: jt.Var) -> None:
    if not (q.ndim == k.ndim == v.ndim == 4):
        raise ValueError(f"fused attention takes (batch, heads, tokens, head_dim) tensors; got q {q.shape}, "
                         f"k {k.shape}, v {v.shape}")
    head_dim = q.shape[-1]
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"fused attention serves head_dim <= {MAX_HEAD_DIM}, got {head_dim}: set "
                         "jdiff.engines.jittor.fast.fused_attention.MODE = 'auto' (or 'unfused') "
                         "to use the unfused path")
    if k.shape != v.shape or k.shape[:2] != q.shape[:2] or k.shape[3] != head_dim or min(q.shape[2], k.shape[2]) < 1:
        raise ValueError(f"fused attention: q {q.shape}, k {k.shape}, v {v.shape} do not match (same batch, "
                         "heads and head_dim; k and v the same token count; at least one token)")
    if str(q.dtype) not in DTYPES:
        raise ValueError(f"fused attention computes on float32 or float16 inputs, got {q.dtype}")


class FusedAttention(jt.Function):
    """On (batch*heads, tokens, head_dim) tensors. Saves q, k, v, the output and the log-sum-exp per query."""

    def execute(self, q: jt.Var, k: jt.Var, v: jt.Var) -> jt.Var:
        bh, n_q, head_dim = q.shape
        if tensor_core_attention.serves(q):
            out, lse = jt.code([q.shape, (bh, n_q)], [q.dtype, "float32"], [q, k, v],
                               cuda_header=tensor_core_attention.header(head_dim),
                               cuda_src=tensor_core_attention.FORWARD_SRC)
        else:
            out, lse = jt.code(
                [q.shape, (bh, n_q)], [q.dtype, "float32"], [q, k, v],
                cpu_header=kernel_header(head_dim, "cpu"), cpu_src=FORWARD_CPU_SRC,
                cuda_header=kernel_header(head_dim, "cuda"), cuda_src=FORWARD_CUDA_SRC,
            )
        self.saved = (q, k, v, out, lse)
        return out

    def grad(self, dout: Optional[jt.Var]):
        if dout is None:
            return None, None, None
        q, k, v, out, lse = self.saved
        bh, n_q, head_dim = q.shape
        n_k = k.shape[1]
        if tensor_core_attention.serves(q):
            splits = tensor_core_attention.key_pass_splits(n_q, n_k, bh)
            sources = dict(cuda_header=tensor_core_attention.header(head_dim),
                           cuda_src=tensor_core_attention.BACKWARD_SRC)
        else:
            keys_per_block, queries_per_tile = key_pass_tiles(head_dim)
            key_blocks = -(-n_k // keys_per_block)
            splits = max(1, min(-(-n_q // queries_per_tile), -(-BLOCKS_WANTED // (key_blocks * bh))))
            sources = dict(cpu_header=kernel_header(head_dim, "cpu"), cpu_src=BACKWARD_CPU_SRC,
                           cuda_header=kernel_header(head_dim, "cuda"), cuda_src=BACKWARD_CUDA_SRC)
        dq, dk, dv, _delta, _dk_parts, _dv_parts = jt.code(
            [q.shape, k.shape, v.shape, (bh, n_q), (splits, bh, n_k, head_dim), (splits, bh, n_k, head_dim)],
            [q.dtype, q.dtype, q.dtype, "float32", "float32", "float32"],
            [q, k, v, out, lse, dout.cast(q.dtype)], **sources)
        return dq, dk, dv


def kernel_header(head_dim: int, device: str) -> str:
    """The C++ for one head_dim: the constants, the shared numeric core, then the CUDA kernels or CPU loops."""
    keys_per_block, queries_per_tile = key_pass_tiles(head_dim)
    constants = (f"namespace fused_attention {{\n"
                 f"constexpr int D = {head_dim};\n"
                 f"constexpr int FWD_QUERIES = {FORWARD_QUERIES};\n"
                 f"constexpr int FWD_KEYS = {FORWARD_KEYS};\n"
                 f"constexpr int DKV_KEYS = {keys_per_block};\n"
                 f"constexpr int DKV_QUERIES = {queries_per_tile};\n"
                 f"}}\n")
    return INCLUDES[device] + NUMERIC_CORE + constants + CORE_FUNCTIONS + (CUDA_KERNELS if device == "cuda" else CPU_LOOPS)


# Jittor's code preprocessor reads '@' as its own syntax: none may appear in the C++ below.
# Jittor inserts its own #defines after the header's leading #include lines: those stay unconditional, first.
INCLUDES = {
    "cpu": "#include <cmath>\n#include <cstddef>\n#include <vector>\n",
    "cuda": "#include <cmath>\n#include <cstddef>\n#include <cuda_fp16.h>\n",
}

NUMERIC_CORE = r"""
#ifdef __CUDACC__
#define FA_HD __host__ __device__ __forceinline__
#define FA_UNROLL _Pragma("unroll")
#else
#define FA_HD inline
#define FA_UNROLL
#endif

namespace fused_attention {

FA_HD float fa_exp(float x) {
#ifdef __CUDA_ARCH__
    return expf(x);
#else
    return std::exp(x);
#endif
}

FA_HD float fa_log(float x) {
#ifdef __CUDA_ARCH__
    return logf(x);
#else
    return std::log(x);
#endif
}

FA_HD int fa_min(int a, int b) { return a < b ? a : b; }

// float32 <-> the tensors' dtype (float32, or Jittor's float16: __half on CUDA, a struct on the CPU)
template <class T> FA_HD float to_f32(T x) { return float(x); }
template <class T> FA_HD void store_as(T* p, float x) { *p = T(x); }
#ifdef __CUDACC__
FA_HD float to_f32(__half x) { return __half2float(x); }
FA_HD void store_as(__half* p, float x) { *p = __float2half_rn(x); }
#endif

}  // namespace fused_attention
"""

CORE_FUNCTIONS = r"""
namespace fused_attention {

// a . b over D, with four partial sums: independent chains the GPU can overlap
FA_HD float dot(const float* a, const float* b) {
    float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
    FA_UNROLL for (int d = 0; d + 3 < D; d += 4) {
        s0 += a[d] * b[d]; s1 += a[d + 1] * b[d + 1]; s2 += a[d + 2] * b[d + 2]; s3 += a[d + 3] * b[d + 3];
    }
    FA_UNROLL for (int d = D - D % 4; d < D; d++) s0 += a[d] * b[d];
    return (s0 + s1) + (s2 + s3);
}

// Rows [0, n_valid) of src (row-major, D values a row) into dst (row stride dst_stride) as float32 times mul;
// rows [n_valid, n_rows) become 0. Thread tid of n_threads copies every n_threads-th value: coalesced reads.
template <class T>
FA_HD void load_tile(float* dst, int dst_stride, const T* src, int n_valid, int n_rows, float mul, int tid,
                     int n_threads) {
    for (int i = tid; i < n_rows * D; i += n_threads) {
        const int r = i / D, c = i - r * D;
        dst[r * dst_stride + c] = r < n_valid ? to_f32(src[(size_t)r * D + c]) * mul : 0.f;
    }
}

FA_HD void load_values(float* dst, const float* src, int n_valid, int tid, int n_threads) {
    for (int i = tid; i < n_valid; i += n_threads) dst[i] = src[i];
}

// -- forward: one query row against key/value tiles, online softmax --
struct ForwardRow {
    float q[D];    // the query row times 1/sqrt(D)
    float acc[D];  // sum over keys so far of exp(s - m) v
    float m;       // running max of the scores
    float l;       // running sum of exp(s - m)
};

template <class T>
FA_HD void forward_row_start(ForwardRow& r, const T* q, float scale) {
    FA_UNROLL for (int d = 0; d < D; d++) { r.q[d] = to_f32(q[d]) * scale; r.acc[d] = 0.f; }
    r.m = -INFINITY;
    r.l = 0.f;
}

// k, v: FWD_KEYS rows of D (rows past n are zeros)
FA_HD void forward_row_tile(ForwardRow& r, const float* k, const float* v, int n) {
    float s[FWD_KEYS];
    float tile_max = -INFINITY;
    FA_UNROLL for (int j = 0; j < FWD_KEYS; j++) {
        s[j] = j < n ? dot(r.q, k + j * D) : -INFINITY;  // exp(-inf) = 0: keys past n add nothing
        tile_max = fmaxf(tile_max, s[j]);
    }
    const float m_new = fmaxf(r.m, tile_max);
    const float rescale = fa_exp(r.m - m_new);  // 0 on the first tile (m = -inf)
    r.l *= rescale;
    FA_UNROLL for (int d = 0; d < D; d++) r.acc[d] *= rescale;
    FA_UNROLL for (int j = 0; j < FWD_KEYS; j++) {
        const float p = fa_exp(s[j] - m_new);
        r.l += p;
        FA_UNROLL for (int d = 0; d < D; d++) r.acc[d] += p * v[j * D + d];
    }
    r.m = m_new;
}

template <class T>
FA_HD void forward_row_finish(const ForwardRow& r, T* out, float* lse) {
    const float inv_l = 1.f / r.l;
    FA_UNROLL for (int d = 0; d < D; d++) store_as(out + d, r.acc[d] * inv_l);
    *lse = r.m + fa_log(r.l);
}

// -- backward, dQ pass: one query row against key/value tiles --
struct GradQueryRow {
    float q[D];     // the query row times 1/sqrt(D)
    float dout[D];  // dO of the row
    float dq[D];    // sum over keys of dS k (times 1/sqrt(D) at the end)
    float lse;
    float delta;    // D_i = dO_i . O_i
};

template <class T>
FA_HD void grad_query_row_start(GradQueryRow& r, const T* q, const T* out, const T* dout, float lse, float scale) {
    float delta = 0.f;
    FA_UNROLL for (int d = 0; d < D; d++) {
        r.q[d] = to_f32(q[d]) * scale;
        r.dout[d] = to_f32(dout[d]);
        r.dq[d] = 0.f;
        delta += r.dout[d] * to_f32(out[d]);
    }
    r.lse = lse;
    r.delta = delta;
}

// k, v: n rows of D
FA_HD void grad_query_row_tile(GradQueryRow& r, const float* k, const float* v, int n) {
    for (int j = 0; j < n; j++) {
        const float p = fa_exp(dot(r.q, k + j * D) - r.lse);
        const float ds = p * (dot(r.dout, v + j * D) - r.delta);
        FA_UNROLL for (int d = 0; d < D; d++) r.dq[d] += ds * k[j * D + d];
    }
}

template <class T>
FA_HD void grad_query_row_finish(const GradQueryRow& r, T* dq, float* delta, float scale) {
    FA_UNROLL for (int d = 0; d < D; d++) store_as(dq + d, r.dq[d] * scale);
    *delta = r.delta;
}

// -- backward, dK/dV pass: one key row against query tiles --
struct GradKeyRow {
    float k[D];
    float dk[D];  // sum over queries of dS q/sqrt(D)
    float dv[D];  // sum over queries of p dO
};

template <class T>
FA_HD void grad_key_row_start(GradKeyRow& r, const T* k) {
    FA_UNROLL for (int d = 0; d < D; d++) { r.k[d] = to_f32(k[d]); r.dk[d] = 0.f; r.dv[d] = 0.f; }
}

// v: this key's value row; q (scaled by 1/sqrt(D)), dout: n rows of D; lse, delta: n values
FA_HD void grad_key_row_tile(GradKeyRow& r, const float* v, const float* q, const float* dout, const float* lse,
                             const float* delta, int n) {
    for (int i = 0; i < n; i++) {
        const float p = fa_exp(dot(q + i * D, r.k) - lse[i]);
        const float ds = p * (dot(dout + i * D, v) - delta[i]);
        FA_UNROLL for (int d = 0; d < D; d++) {
            r.dv[d] += p * dout[i * D + d];
            r.dk[d] += ds * q[i * D + d];
        }
    }
}

FA_HD void grad_key_row_finish(const GradKeyRow& r, float* dk, float* dv) {
    FA_UNROLL for (int d = 0; d < D; d++) { dk[d] = r.dk[d]; dv[d] = r.dv[d]; }
}

// Which query tiles split number `split` of `splits` covers in the dK/dV pass: [*begin, *end)
FA_HD void split_range(int n_q, int split, int splits, int* begin, int* end) {
    const int tiles = (n_q + DKV_QUERIES - 1) / DKV_QUERIES;
    *begin = (int)((long long)split * tiles / splits);
    *end = (int)((long long)(split + 1) * tiles / splits);
}

// Element i of the sum over splits of the partial dK or dV, always in the same order
template <class T>
FA_HD void sum_splits(const float* parts, T* total, size_t n, int splits, size_t i) {
    float s = 0.f;
    for (int p = 0; p < splits; p++) s += parts[p * n + i];
    store_as(total + i, s);
}

}  // namespace fused_attention
"""

CUDA_KERNELS = r"""
namespace fused_attention {

// Grid (query tiles, batch*heads); thread t holds query row tile*FWD_QUERIES + t.
template <class T>
__global__ void __launch_bounds__(FWD_QUERIES) forward_kernel(const T* q, const T* k, const T* v, T* out, float* lse,
                                                             int n_q, int n_k, float scale) {
    __shared__ __align__(16) float k_tile[FWD_KEYS * D];
    __shared__ __align__(16) float v_tile[FWD_KEYS * D];
    const size_t bh = blockIdx.y;
    const int row = blockIdx.x * FWD_QUERIES + threadIdx.x;
    ForwardRow r;
    forward_row_start(r, q + (bh * n_q + fa_min(row, n_q - 1)) * D, scale);  // rows past n_q: computed, not stored
    for (int k0 = 0; k0 < n_k; k0 += FWD_KEYS) {
        const int n = fa_min(FWD_KEYS, n_k - k0);
        __syncthreads();  // every thread is done with the previous tile
        load_tile(k_tile, D, k + (bh * n_k + k0) * D, n, FWD_KEYS, 1.f, threadIdx.x, blockDim.x);
        load_tile(v_tile, D, v + (bh * n_k + k0) * D, n, FWD_KEYS, 1.f, threadIdx.x, blockDim.x);
        __syncthreads();
        forward_row_tile(r, k_tile, v_tile, n);
    }
    if (row < n_q) forward_row_finish(r, out + (bh * n_q + row) * D, lse + bh * n_q + row);
}

// Grid (query tiles, batch*heads); thread t holds query row tile*FWD_QUERIES + t.
template <class T>
__global__ void __launch_bounds__(FWD_QUERIES) grad_query_kernel(const T* q, const T* k, const T* v, const T* out,
                                                                const float* lse, const T* dout, T* dq, float* delta,
                                                                int n_q, int n_k, float scale) {
    __shared__ __align__(16) float k_tile[FWD_KEYS * D];
    __shared__ __align__(16) float v_tile[FWD_KEYS * D];
    const size_t bh = blockIdx.y;
    const int row = blockIdx.x * FWD_QUERIES + threadIdx.x;
    const size_t row_read = bh * n_q + fa_min(row, n_q - 1);
    GradQueryRow r;
    grad_query_row_start(r, q + row_read * D, out + row_read * D, dout + row_read * D, lse[row_read], scale);
    for (int k0 = 0; k0 < n_k; k0 += FWD_KEYS) {
        const int n = fa_min(FWD_KEYS, n_k - k0);
        __syncthreads();
        load_tile(k_tile, D, k + (bh * n_k + k0) * D, n, FWD_KEYS, 1.f, threadIdx.x, blockDim.x);
        load_tile(v_tile, D, v + (bh * n_k + k0) * D, n, FWD_KEYS, 1.f, threadIdx.x, blockDim.x);
        __syncthreads();
        grad_query_row_tile(r, k_tile, v_tile, n);
    }
    if (row < n_q) grad_query_row_finish(r, dq + (bh * n_q + row) * D, delta + bh * n_q + row, scale);
}

// Grid (key tiles, batch*heads, splits); thread t holds key row tile*DKV_KEYS + t, for the query tiles of its
// split. Value rows are padded to D + 1 floats: each thread reads its own row, and the padding puts the
// threads of a warp on different shared-memory banks.
template <class T>
__global__ void __launch_bounds__(DKV_KEYS) grad_key_kernel(const T* q, const T* k, const T* v, const float* lse,
                                                           const T* dout, const float* delta, float* dk_parts,
                                                           float* dv_parts, int n_q, int n_k, int bh_count,
                                                           float scale) {
    constexpr int V_STRIDE = D + 1;
    __shared__ __align__(16) float q_tile[DKV_QUERIES * D];
    __shared__ __align__(16) float dout_tile[DKV_QUERIES * D];
    __shared__ float lse_tile[DKV_QUERIES];
    __shared__ float delta_tile[DKV_QUERIES];
    __shared__ float v_rows[DKV_KEYS * V_STRIDE];
    const size_t bh = blockIdx.y;
    const int key0 = blockIdx.x * DKV_KEYS;
    const int row = key0 + threadIdx.x;
    GradKeyRow r;
    grad_key_row_start(r, k + (bh * n_k + fa_min(row, n_k - 1)) * D);
    load_tile(v_rows, V_STRIDE, v + (bh * n_k + key0) * D, fa_min(DKV_KEYS, n_k - key0), DKV_KEYS, 1.f, threadIdx.x,
              blockDim.x);
    int begin, end;
    split_range(n_q, blockIdx.z, gridDim.z, &begin, &end);
    for (int tile = begin; tile < end; tile++) {
        const int q0 = tile * DKV_QUERIES, n = fa_min(DKV_QUERIES, n_q - q0);
        __syncthreads();  // the previous tile is used up (and, the first time, v_rows is written)
        load_tile(q_tile, D, q + (bh * n_q + q0) * D, n, DKV_QUERIES, scale, threadIdx.x, blockDim.x);
        load_tile(dout_tile, D, dout + (bh * n_q + q0) * D, n, DKV_QUERIES, 1.f, threadIdx.x, blockDim.x);
        load_values(lse_tile, lse + bh * n_q + q0, n, threadIdx.x, blockDim.x);
        load_values(delta_tile, delta + bh * n_q + q0, n, threadIdx.x, blockDim.x);
        __syncthreads();
        grad_key_row_tile(r, v_rows + threadIdx.x * V_STRIDE, q_tile, dout_tile, lse_tile, delta_tile, n);
    }
    if (row < n_k) {
        const size_t at = (((size_t)blockIdx.z * bh_count + bh) * n_k + row) * D;
        grad_key_row_finish(r, dk_parts + at, dv_parts + at);
    }
}

template <class T>
__global__ void sum_splits_kernel(const float* parts, T* total, size_t n, int splits) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)blockDim.x * gridDim.x)
        sum_splits(parts, total, n, splits, i);
}

}  // namespace fused_attention
"""

# The CPU loops: the kernels' blocks one after another, and within a block the threads' rows one after another
# between the points where the kernels synchronise.
CPU_LOOPS = r"""
namespace fused_attention {

template <class T>
void forward_cpu(const T* q, const T* k, const T* v, T* out, float* lse, int bh_count, int n_q, int n_k,
                 float scale) {
    std::vector<float> k_tile(FWD_KEYS * D), v_tile(FWD_KEYS * D);
    std::vector<ForwardRow> rows(FWD_QUERIES);
    for (size_t bh = 0; bh < (size_t)bh_count; bh++)
        for (int q0 = 0; q0 < n_q; q0 += FWD_QUERIES) {
            const int n_rows = fa_min(FWD_QUERIES, n_q - q0);
            for (int t = 0; t < n_rows; t++) forward_row_start(rows[t], q + (bh * n_q + q0 + t) * D, scale);
            for (int k0 = 0; k0 < n_k; k0 += FWD_KEYS) {
                const int n = fa_min(FWD_KEYS, n_k - k0);
                load_tile(k_tile.data(), D, k + (bh * n_k + k0) * D, n, FWD_KEYS, 1.f, 0, 1);
                load_tile(v_tile.data(), D, v + (bh * n_k + k0) * D, n, FWD_KEYS, 1.f, 0, 1);
                for (int t = 0; t < n_rows; t++) forward_row_tile(rows[t], k_tile.data(), v_tile.data(), n);
            }
            for (int t = 0; t < n_rows; t++)
                forward_row_finish(rows[t], out + (bh * n_q + q0 + t) * D, lse + bh * n_q + q0 + t);
        }
}

template <class T>
void backward_cpu(const T* q, const T* k, const T* v, const T* out, const float* lse, const T* dout, T* dq, T* dk,
                  T* dv, float* delta, float* dk_parts, float* dv_parts, int bh_count, int n_q, int n_k, int splits,
                  float scale) {
    {  // dQ pass (and D_i)
        std::vector<float> k_tile(FWD_KEYS * D), v_tile(FWD_KEYS * D);
        std::vector<GradQueryRow> rows(FWD_QUERIES);
        for (size_t bh = 0; bh < (size_t)bh_count; bh++)
            for (int q0 = 0; q0 < n_q; q0 += FWD_QUERIES) {
                const int n_rows = fa_min(FWD_QUERIES, n_q - q0);
                for (int t = 0; t < n_rows; t++) {
                    const size_t at = bh * n_q + q0 + t;
                    grad_query_row_start(rows[t], q + at * D, out + at * D, dout + at * D, lse[at], scale);
                }
                for (int k0 = 0; k0 < n_k; k0 += FWD_KEYS) {
                    const int n = fa_min(FWD_KEYS, n_k - k0);
                    load_tile(k_tile.data(), D, k + (bh * n_k + k0) * D, n, FWD_KEYS, 1.f, 0, 1);
                    load_tile(v_tile.data(), D, v + (bh * n_k + k0) * D, n, FWD_KEYS, 1.f, 0, 1);
                    for (int t = 0; t < n_rows; t++) grad_query_row_tile(rows[t], k_tile.data(), v_tile.data(), n);
                }
                for (int t = 0; t < n_rows; t++) {
                    const size_t at = bh * n_q + q0 + t;
                    grad_query_row_finish(rows[t], dq + at * D, delta + at, scale);
                }
            }
    }
    {  // dK/dV pass, split over the query tiles, then the splits summed
        std::vector<float> q_tile(DKV_QUERIES * D), dout_tile(DKV_QUERIES * D), lse_tile(DKV_QUERIES),
            delta_tile(DKV_QUERIES), v_rows(DKV_KEYS * D);
        std::vector<GradKeyRow> rows(DKV_KEYS);
        for (int split = 0; split < splits; split++)
            for (size_t bh = 0; bh < (size_t)bh_count; bh++)
                for (int key0 = 0; key0 < n_k; key0 += DKV_KEYS) {
                    const int n_rows = fa_min(DKV_KEYS, n_k - key0);
                    for (int t = 0; t < n_rows; t++) grad_key_row_start(rows[t], k + (bh * n_k + key0 + t) * D);
                    load_tile(v_rows.data(), D, v + (bh * n_k + key0) * D, n_rows, DKV_KEYS, 1.f, 0, 1);
                    int begin, end;
                    split_range(n_q, split, splits, &begin, &end);
                    for (int tile = begin; tile < end; tile++) {
                        const int q0 = tile * DKV_QUERIES, n = fa_min(DKV_QUERIES, n_q - q0);
                        load_tile(q_tile.data(), D, q + (bh * n_q + q0) * D, n, DKV_QUERIES, scale, 0, 1);
                        load_tile(dout_tile.data(), D, dout + (bh * n_q + q0) * D, n, DKV_QUERIES, 1.f, 0, 1);
                        load_values(lse_tile.data(), lse + bh * n_q + q0, n, 0, 1);
                        load_values(delta_tile.data(), delta + bh * n_q + q0, n, 0, 1);
                        for (int t = 0; t < n_rows; t++)
                            grad_key_row_tile(rows[t], v_rows.data() + t * D, q_tile.data(), dout_tile.data(),
                                              lse_tile.data(), delta_tile.data(), n);
                    }
                    for (int t = 0; t < n_rows; t++) {
                        const size_t at = (((size_t)split * bh_count + bh) * n_k + key0 + t) * D;
                        grad_key_row_finish(rows[t], dk_parts + at, dv_parts + at);
                    }
                }
        const size_t n = (size_t)bh_count * n_k * D;
        for (size_t i = 0; i < n; i++) {
            sum_splits(dk_parts, dk, n, splits, i);
            sum_splits(dv_parts, dv, n, splits, i);
        }
    }
}

}  // namespace fused_attention
"""

# in0 q, in1 k, in2 v (batch*heads, tokens, D); out0 the output, out1 the log-sum-exp (batch*heads, query tokens)
FORWARD_CPU_SRC = r"""
const float scale = (float)(1.0 / std::sqrt((double)fused_attention::D));
fused_attention::forward_cpu(in0_p, in1_p, in2_p, out0_p, out1_p, (int)in0_shape0, (int)in0_shape1, (int)in1_shape1,
                             scale);
"""

FORWARD_CUDA_SRC = r"""
const float scale = (float)(1.0 / std::sqrt((double)fused_attention::D));
const int n_q = (int)in0_shape1, n_k = (int)in1_shape1;
dim3 grid((n_q + fused_attention::FWD_QUERIES - 1) / fused_attention::FWD_QUERIES, (unsigned)in0_shape0);
fused_attention::forward_kernel<<<grid, fused_attention::FWD_QUERIES>>>(in0_p, in1_p, in2_p, out0_p, out1_p, n_q,
                                                                        n_k, scale);
"""

# in0 q, in1 k, in2 v, in3 out, in4 lse, in5 dO; out0 dq, out1 dk, out2 dv, out3 D_i, out4/out5 partial dk/dv
# (splits, batch*heads, key tokens, D)
BACKWARD_CPU_SRC = r"""
const float scale = (float)(1.0 / std::sqrt((double)fused_attention::D));
fused_attention::backward_cpu(in0_p, in1_p, in2_p, in3_p, in4_p, in5_p, out0_p, out1_p, out2_p, out3_p, out4_p,
                              out5_p, (int)in0_shape0, (int)in0_shape1, (int)in1_shape1, (int)out4_shape0, scale);
"""

BACKWARD_CUDA_SRC = r"""
const float scale = (float)(1.0 / std::sqrt((double)fused_attention::D));
const int bh_count = (int)in0_shape0, n_q = (int)in0_shape1, n_k = (int)in1_shape1, splits = (int)out4_shape0;
dim3 query_grid((n_q + fused_attention::FWD_QUERIES - 1) / fused_attention::FWD_QUERIES, (unsigned)bh_count);
fused_attention::grad_query_kernel<<<query_grid, fused_attention::FWD_QUERIES>>>(
    in0_p, in1_p, in2_p, in3_p, in4_p, in5_p, out0_p, out3_p, n_q, n_k, scale);
dim3 key_grid((n_k + fused_attention::DKV_KEYS - 1) / fused_attention::DKV_KEYS, (unsigned)bh_count, (unsigned)splits);
fused_attention::grad_key_kernel<<<key_grid, fused_attention::DKV_KEYS>>>(
    in0_p, in1_p, in2_p, in4_p, in5_p, out3_p, out4_p, out5_p, n_q, n_k, bh_count, scale);
const size_t n = (size_t)bh_count * n_k * fused_attention::D;
const int sum_blocks = (int)((n + 255) / 256 < 4096 ? (n + 255) / 256 : 4096);
fused_attention::sum_splits_kernel<<<sum_blocks, 256>>>(out4_p, out1_p, n, splits);
fused_attention::sum_splits_kernel<<<sum_blocks, 256>>>(out5_p, out2_p, n, splits);
"""
