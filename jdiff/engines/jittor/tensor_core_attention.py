"""The float16 CUDA kernels of the fused attention on tensor cores (flash-attention style, WMMA 16x16x16 tiles).

API (used by :mod:`jdiff.engines.jittor.fused_attention`, which chooses between these and its scalar kernels):
    serves(q) -> whether these kernels take q (float16 on CUDA, head_dim a multiple of 16, at most 128)
    header(head_dim) -> the CUDA header for one head_dim
    FORWARD_SRC, BACKWARD_SRC: the jt.code sources; the same inputs and outputs as the scalar kernels
    key_pass_splits(n_q, n_k, bh) -> how many query ranges the dK/dV pass splits into

Same algorithm and outputs as the scalar kernels (forward with an online softmax, saving the log-sum-exp; a
dQ pass over key tiles; a dK/dV pass over query tiles, split over query ranges whose partial sums are added
in a fixed order: no atomics, deterministic), but the five products of each tile (S = Q K^T, P V, dP =
dO V^T, dS K, and dS^T Q with P^T dO) run as warp-wide matrix multiplications on the tensor cores: float16
operands, float32 accumulators. A block has 4 warps and 64 rows (query rows in the forward and dQ passes,
key rows in the dK/dV pass), 16 per warp; the other side streams in tiles of 32. Probabilities and dS are
rounded to float16 for their products (as flash attention does); softmax statistics, the running output
and every accumulator are float32. Each lane of a warp owns half of one of the warp's 16 rows for the
element-wise steps (scale, exp, rescale), so a row's max and sum need one shuffle.

These kernels run only on a GPU (compute capability 8.0 or later, with enough shared memory per block for the
head_dim: ``serves`` checks both, and anything else takes the scalar kernels). They share no code with the
scalar kernels, so the CPU tests do not run them: ``launch/check_jittor_attention.py`` checks them on a GPU
against a float64 reference (its float16 cases).
"""

from __future__ import annotations

import jittor as jt

MAX_HEAD_DIM = 128
ROWS = 64  # rows per block (4 warps x 16)
TILE = 32  # streamed rows per tile
BLOCKS_WANTED = 512


# The most shared memory one block may opt into, by compute capability (CUDA C programming guide); other
# compute capabilities from 8.0 on have 99 KiB (8.6, 8.9, 12.x), earlier ones have no WMMA path here.
SHARED_MEMORY_LIMIT = {80: 163 * 1024, 87: 163 * 1024, 90: 227 * 1024, 100: 227 * 1024, 103: 227 * 1024}
OTHER_LIMIT = 99 * 1024


def shared_memory(head_dim: int) -> dict:
    """Bytes of dynamic shared memory per block of each kernel: the arrays the kernels lay out, in order."""
    ldh, ldf, lds, ldp = head_dim + 8, head_dim + 4, TILE + 4, TILE + 8
    h_rows, h_tile, s_rows, p_rows, f_rows = ROWS * ldh * 2, TILE * ldh * 2, ROWS * lds * 4, ROWS * ldp * 2, ROWS * ldf * 4
    return {"FORWARD_SMEM": h_rows + 2 * h_tile + s_rows + p_rows + 2 * f_rows + 2 * ROWS * 4,
            "QUERY_SMEM": 2 * h_rows + 2 * h_tile + 2 * s_rows + p_rows + f_rows + 2 * ROWS * 4,
            "KEY_SMEM": 2 * h_rows + 2 * h_tile + 2 * s_rows + 2 * p_rows + f_rows + 2 * TILE * 4}


def shared_memory_limit(archs) -> int:
    """What every GPU Jittor compiles for (compute capabilities as 80, 90, ...) lets a block use; 0 before 8.0."""
    if not archs or min(archs) < 80:
        return 0
    return min(SHARED_MEMORY_LIMIT.get(arch, OTHER_LIMIT) for arch in archs)


def serves(q: jt.Var) -> bool:
    head_dim = q.shape[-1]
    if not (jt.flags.use_cuda and str(q.dtype) == "float16" and head_dim % 16 == 0 and head_dim <= MAX_HEAD_DIM):
        return False
    return max(shared_memory(head_dim).values()) <= shared_memory_limit(list(jt.flags.cuda_archs))


def key_pass_splits(n_q: int, n_k: int, bh: int) -> int:
    key_blocks = -(-n_k // ROWS)
    return max(1, min(-(-n_q // TILE), -(-BLOCKS_WANTED // (key_blocks * bh))))


def header(head_dim: int) -> str:
    source = HEADER.replace("HEAD_DIM", str(head_dim))
    for name, size in shared_memory(head_dim).items():
        source = source.replace(f"{name}_BYTES", str(size))
    return source


# Jittor's code preprocessor reads '@' as its own syntax: none may appear below. The #includes come first.
HEADER = r"""
#include <cmath>
#include <cstddef>
#include <cuda_fp16.h>
#include <mma.h>

namespace tc_attention {
using namespace nvcuda;

constexpr int D = HEAD_DIM;
constexpr int ROWS = 64, TILE = 32, THREADS = 128;
constexpr int LDH = D + 8;      // row stride of float16 tiles of D columns (a multiple of 8, rows 32-byte aligned)
constexpr int LDF = D + 4;      // float32 tiles of D columns
constexpr int LDS = TILE + 4;   // float32 score tiles
constexpr int LDP = TILE + 8;   // float16 probability / dS tiles

typedef wmma::fragment<wmma::matrix_a, 16, 16, 16, half, wmma::row_major> FragA;
typedef wmma::fragment<wmma::matrix_b, 16, 16, 16, half, wmma::col_major> FragBt;  // B read from rows of B^T
typedef wmma::fragment<wmma::matrix_b, 16, 16, 16, half, wmma::row_major> FragB;
typedef wmma::fragment<wmma::accumulator, 16, 16, 16, float> FragC;

// bytes of dynamic shared memory per block (shared_memory() in the Python module: the arrays each kernel lays
// out below, every one a multiple of 128 bytes for D % 16 == 0)
constexpr size_t FORWARD_SMEM = FORWARD_SMEM_BYTES, QUERY_SMEM = QUERY_SMEM_BYTES, KEY_SMEM = KEY_SMEM_BYTES;

// rows [0, n_valid) of src (contiguous rows of D) into dst (row stride LDH), zeros up to n_rows; 8 values a load
__device__ __forceinline__ void load_rows(half* dst, const half* src, int n_valid, int n_rows) {
    constexpr int V = D / 8;
    for (int i = threadIdx.x; i < n_rows * V; i += THREADS) {
        const int r = i / V, c = (i - r * V) * 8;
        uint4 val = make_uint4(0u, 0u, 0u, 0u);
        if (r < n_valid) val = *reinterpret_cast<const uint4*>(src + (size_t)r * D + c);
        *reinterpret_cast<uint4*>(dst + r * LDH + c) = val;
    }
}

// c (16 x 16*NT floats, row stride ldc) = a (16 x 16*KT, row-major, stride lda) b, where b is (16*KT x 16*NT)
// given row-major (stride ldb), or, B_T, as the rows of its transpose (the rows of K for Q K^T)
template <int NT, int KT, bool B_T>
__device__ __forceinline__ void warp_matmul(const half* a, int lda, const half* b, int ldb, float* c, int ldc) {
#pragma unroll
    for (int j = 0; j < NT; j++) {
        FragC acc;
        wmma::fill_fragment(acc, 0.f);
#pragma unroll
        for (int k = 0; k < KT; k++) {
            FragA fa;
            wmma::load_matrix_sync(fa, a + k * 16, lda);
            if (B_T) {
                FragBt fb;
                wmma::load_matrix_sync(fb, b + j * 16 * ldb + k * 16, ldb);
                wmma::mma_sync(acc, fa, fb, acc);
            } else {
                FragB fb;
                wmma::load_matrix_sync(fb, b + k * 16 * ldb + j * 16, ldb);
                wmma::mma_sync(acc, fa, fb, acc);
            }
        }
        wmma::store_matrix_sync(c + j * 16, acc, ldc, wmma::mem_row_major);
    }
}

// acc[j] += a (16 x TILE, row-major, stride LDP) b (TILE x D, row-major, stride LDH), j over D/16 column blocks
__device__ __forceinline__ void warp_accumulate(FragC* acc, const half* a, const half* b) {
#pragma unroll
    for (int k = 0; k < TILE / 16; k++) {
        FragA fa;
        wmma::load_matrix_sync(fa, a + k * 16, LDP);
#pragma unroll
        for (int j = 0; j < D / 16; j++) {
            FragB fb;
            wmma::load_matrix_sync(fb, b + k * 16 * LDH + j * 16, LDH);
            wmma::mma_sync(acc[j], fa, fb, acc[j]);
        }
    }
}

__device__ __forceinline__ void put(float* p, float v) { *p = v; }
__device__ __forceinline__ void put(half* p, float v) { *p = __float2half_rn(v); }

// a warp's 16 x D accumulators through its rows of `stage`, times mul, into dst (float32 or float16): this
// lane's half row (none when dst is null: a row past the end)
template <class T>
__device__ __forceinline__ void store_rows(const FragC* acc, float* stage, T* dst, float mul) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
    for (int j = 0; j < D / 16; j++)
        wmma::store_matrix_sync(stage + warp * 16 * LDF + j * 16, acc[j], LDF, wmma::mem_row_major);
    __syncwarp();
    if (dst != nullptr) {
        const float* src = stage + (warp * 16 + lane / 2) * LDF + (lane % 2) * (D / 2);
        for (int c = 0; c < D / 2; c++) put(dst + c, src[c] * mul);
    }
    __syncwarp();
}

// one block: ROWS query rows of one (batch, head), key/value tiles streamed
__global__ void __launch_bounds__(THREADS) forward_kernel(const half* q, const half* k, const half* v, half* out,
                                                          float* lse, int n_q, int n_k, float scale) {
    extern __shared__ __align__(128) unsigned char smem[];
    half* q_s = reinterpret_cast<half*>(smem);
    half* k_s = q_s + ROWS * LDH;
    half* v_s = k_s + TILE * LDH;
    float* s_s = reinterpret_cast<float*>(v_s + TILE * LDH);
    half* p_s = reinterpret_cast<half*>(s_s + ROWS * LDS);
    float* o_s = reinterpret_cast<float*>(p_s + ROWS * LDP);
    float* pv_s = o_s + ROWS * LDF;
    float* m_s = pv_s + ROWS * LDF;
    float* l_s = m_s + ROWS;

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int row = warp * 16 + lane / 2, side = lane % 2;  // this lane: half `side` of block row `row`
    const size_t bh = blockIdx.y;
    const int q0 = blockIdx.x * ROWS;
    load_rows(q_s, q + (bh * n_q + q0) * D, min(ROWS, n_q - q0), ROWS);
    for (int i = threadIdx.x; i < ROWS * LDF; i += THREADS) o_s[i] = 0.f;
    if (threadIdx.x < ROWS) { m_s[threadIdx.x] = -INFINITY; l_s[threadIdx.x] = 0.f; }

    for (int k0 = 0; k0 < n_k; k0 += TILE) {
        const int nk = min(TILE, n_k - k0);
        __syncthreads();  // the previous tiles are used up (and, the first time, q_s, o_s, m_s, l_s are set)
        load_rows(k_s, k + (bh * n_k + k0) * D, nk, TILE);
        load_rows(v_s, v + (bh * n_k + k0) * D, nk, TILE);
        __syncthreads();
        warp_matmul<TILE / 16, D / 16, true>(q_s + warp * 16 * LDH, LDH, k_s, LDH, s_s + warp * 16 * LDS, LDS);
        __syncwarp();
        float* srow = s_s + row * LDS + side * 16;
        float tile_max = -INFINITY;
#pragma unroll
        for (int c = 0; c < 16; c++) {
            const float s = side * 16 + c < nk ? srow[c] * scale : -INFINITY;  // keys past n_k weigh nothing
            srow[c] = s;
            tile_max = fmaxf(tile_max, s);
        }
        tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
        const float m_old = m_s[row], m_new = fmaxf(m_old, tile_max);
        const float rescale = __expf(m_old - m_new);  // 0 on the first tile (m_old = -inf)
        half* prow = p_s + row * LDP + side * 16;
        float sum = 0.f;
#pragma unroll
        for (int c = 0; c < 16; c++) {
            const float p = __expf(srow[c] - m_new);
            sum += p;
            prow[c] = __float2half_rn(p);
        }
        sum += __shfl_xor_sync(0xffffffffu, sum, 1);
        __syncwarp();  // both lanes of the row have read m_s
        if (side == 0) { m_s[row] = m_new; l_s[row] = l_s[row] * rescale + sum; }
        warp_matmul<D / 16, TILE / 16, false>(p_s + warp * 16 * LDP, LDP, v_s, LDH, pv_s + warp * 16 * LDF, LDF);
        __syncwarp();
        float* orow = o_s + row * LDF + side * (D / 2);
        const float* pvrow = pv_s + row * LDF + side * (D / 2);
#pragma unroll
        for (int c = 0; c < D / 2; c++) orow[c] = orow[c] * rescale + pvrow[c];
        __syncwarp();
    }
    if (q0 + row < n_q) {
        const float inv_l = 1.f / l_s[row];
        const float* orow = o_s + row * LDF + side * (D / 2);
        half* dst = out + (bh * n_q + q0 + row) * D + side * (D / 2);
#pragma unroll
        for (int c = 0; c < D / 2; c++) dst[c] = __float2half_rn(orow[c] * inv_l);
        if (side == 0) lse[bh * n_q + q0 + row] = m_s[row] + logf(l_s[row]);
    }
}

// dQ pass: ROWS query rows, key/value tiles streamed; also writes delta_i = dO_i . O_i for the dK/dV pass
__global__ void __launch_bounds__(THREADS) grad_query_kernel(const half* q, const half* k, const half* v,
                                                             const half* out, const float* lse, const half* dout,
                                                             half* dq, float* delta, int n_q, int n_k, float scale) {
    extern __shared__ __align__(128) unsigned char smem[];
    half* q_s = reinterpret_cast<half*>(smem);
    half* do_s = q_s + ROWS * LDH;
    half* k_s = do_s + ROWS * LDH;
    half* v_s = k_s + TILE * LDH;
    float* s_s = reinterpret_cast<float*>(v_s + TILE * LDH);
    float* dp_s = s_s + ROWS * LDS;
    half* ds_s = reinterpret_cast<half*>(dp_s + ROWS * LDS);
    float* stage = reinterpret_cast<float*>(ds_s + ROWS * LDP);
    float* lse_s = stage + ROWS * LDF;
    float* delta_s = lse_s + ROWS;

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int row = warp * 16 + lane / 2, side = lane % 2;
    const size_t bh = blockIdx.y;
    const int q0 = blockIdx.x * ROWS, nq = min(ROWS, n_q - q0);
    load_rows(q_s, q + (bh * n_q + q0) * D, nq, ROWS);
    load_rows(do_s, dout + (bh * n_q + q0) * D, nq, ROWS);
    __syncthreads();
    {
        float d = 0.f;
        if (row < nq) {
            const half* orow = out + (bh * n_q + q0 + row) * D + side * (D / 2);
            const half* dorow = do_s + row * LDH + side * (D / 2);
            for (int c = 0; c < D / 2; c++) d += __half2float(dorow[c]) * __half2float(orow[c]);
        }
        d += __shfl_xor_sync(0xffffffffu, d, 1);
        if (side == 0) {
            delta_s[row] = d;
            lse_s[row] = row < nq ? lse[bh * n_q + q0 + row] : 0.f;
            if (row < nq) delta[bh * n_q + q0 + row] = d;
        }
    }
    FragC acc[D / 16];
#pragma unroll
    for (int j = 0; j < D / 16; j++) wmma::fill_fragment(acc[j], 0.f);

    for (int k0 = 0; k0 < n_k; k0 += TILE) {
        const int nk = min(TILE, n_k - k0);
        __syncthreads();
        load_rows(k_s, k + (bh * n_k + k0) * D, nk, TILE);
        load_rows(v_s, v + (bh * n_k + k0) * D, nk, TILE);
        __syncthreads();
        warp_matmul<TILE / 16, D / 16, true>(q_s + warp * 16 * LDH, LDH, k_s, LDH, s_s + warp * 16 * LDS, LDS);
        warp_matmul<TILE / 16, D / 16, true>(do_s + warp * 16 * LDH, LDH, v_s, LDH, dp_s + warp * 16 * LDS, LDS);
        __syncwarp();
        const float row_lse = lse_s[row], row_delta = delta_s[row];
#pragma unroll
        for (int c = 0; c < 16; c++) {
            const int j = side * 16 + c;
            const float p = j < nk ? __expf(s_s[row * LDS + j] * scale - row_lse) : 0.f;
            ds_s[row * LDP + j] = __float2half_rn(p * (dp_s[row * LDS + j] - row_delta));
        }
        __syncwarp();
        warp_accumulate(acc, ds_s + warp * 16 * LDP, k_s);
    }
    store_rows(acc, stage, row < nq ? dq + (bh * n_q + q0 + row) * D + side * (D / 2) : nullptr, scale);
}

// dK/dV pass: ROWS key rows, the query tiles of split blockIdx.z streamed; partial sums into the split's slice
__global__ void __launch_bounds__(THREADS) grad_key_kernel(const half* q, const half* k, const half* v,
                                                           const float* lse, const half* dout, const float* delta,
                                                           float* dk_parts, float* dv_parts, int n_q, int n_k,
                                                           int bh_count, float scale) {
    extern __shared__ __align__(128) unsigned char smem[];
    half* k_s = reinterpret_cast<half*>(smem);
    half* v_s = k_s + ROWS * LDH;
    half* q_s = v_s + ROWS * LDH;
    half* do_s = q_s + TILE * LDH;
    float* st_s = reinterpret_cast<float*>(do_s + TILE * LDH);
    float* dpt_s = st_s + ROWS * LDS;
    half* pt_s = reinterpret_cast<half*>(dpt_s + ROWS * LDS);
    half* dst_s = pt_s + ROWS * LDP;
    float* stage = reinterpret_cast<float*>(dst_s + ROWS * LDP);
    float* lse_t = stage + ROWS * LDF;
    float* delta_t = lse_t + TILE;

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int row = warp * 16 + lane / 2, side = lane % 2;
    const size_t bh = blockIdx.y;
    const int key0 = blockIdx.x * ROWS, nk = min(ROWS, n_k - key0);
    load_rows(k_s, k + (bh * n_k + key0) * D, nk, ROWS);
    load_rows(v_s, v + (bh * n_k + key0) * D, nk, ROWS);
    FragC dk[D / 16], dv[D / 16];
#pragma unroll
    for (int j = 0; j < D / 16; j++) { wmma::fill_fragment(dk[j], 0.f); wmma::fill_fragment(dv[j], 0.f); }

    const int tiles = (n_q + TILE - 1) / TILE;
    const int begin = (int)((long long)blockIdx.z * tiles / gridDim.z);
    const int end = (int)((long long)(blockIdx.z + 1) * tiles / gridDim.z);
    for (int t = begin; t < end; t++) {
        const int q0 = t * TILE, nq = min(TILE, n_q - q0);
        __syncthreads();
        load_rows(q_s, q + (bh * n_q + q0) * D, nq, TILE);
        load_rows(do_s, dout + (bh * n_q + q0) * D, nq, TILE);
        if (threadIdx.x < TILE) {  // queries past n_q: p = exp(-inf) = 0
            lse_t[threadIdx.x] = threadIdx.x < nq ? lse[bh * n_q + q0 + threadIdx.x] : INFINITY;
            delta_t[threadIdx.x] = threadIdx.x < nq ? delta[bh * n_q + q0 + threadIdx.x] : 0.f;
        }
        __syncthreads();
        warp_matmul<TILE / 16, D / 16, true>(k_s + warp * 16 * LDH, LDH, q_s, LDH, st_s + warp * 16 * LDS, LDS);
        warp_matmul<TILE / 16, D / 16, true>(v_s + warp * 16 * LDH, LDH, do_s, LDH, dpt_s + warp * 16 * LDS, LDS);
        __syncwarp();
#pragma unroll
        for (int c = 0; c < 16; c++) {
            const int i = side * 16 + c;
            const float p = __expf(st_s[row * LDS + i] * scale - lse_t[i]);
            pt_s[row * LDP + i] = __float2half_rn(p);
            dst_s[row * LDP + i] = __float2half_rn(p * (dpt_s[row * LDS + i] - delta_t[i]));
        }
        __syncwarp();
        warp_accumulate(dv, pt_s + warp * 16 * LDP, do_s);
        warp_accumulate(dk, dst_s + warp * 16 * LDP, q_s);
    }
    const size_t at = (((size_t)blockIdx.z * bh_count + bh) * n_k + key0 + row) * D + side * (D / 2);
    store_rows(dk, stage, row < nk ? dk_parts + at : nullptr, scale);
    store_rows(dv, stage, row < nk ? dv_parts + at : nullptr, 1.f);
}

__global__ void sum_parts_kernel(const float* parts, half* total, size_t n, int splits) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)blockDim.x * gridDim.x) {
        float s = 0.f;
        for (int p = 0; p < splits; p++) s += parts[p * n + i];
        total[i] = __float2half_rn(s);
    }
}

template <class Kernel>
void allow_smem(Kernel kernel, size_t bytes) {
    cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes);
}

}  // namespace tc_attention
"""

# in0 q, in1 k, in2 v (batch*heads, tokens, D); out0 the output, out1 the log-sum-exp (batch*heads, query tokens)
FORWARD_SRC = r"""
const float scale = (float)(1.0 / std::sqrt((double)tc_attention::D));
const int n_q = (int)in0_shape1, n_k = (int)in1_shape1;
tc_attention::allow_smem(tc_attention::forward_kernel, tc_attention::FORWARD_SMEM);
dim3 grid((n_q + tc_attention::ROWS - 1) / tc_attention::ROWS, (unsigned)in0_shape0);
tc_attention::forward_kernel<<<grid, tc_attention::THREADS, tc_attention::FORWARD_SMEM>>>(
    in0_p, in1_p, in2_p, out0_p, out1_p, n_q, n_k, scale);
"""

# in0 q, in1 k, in2 v, in3 out, in4 lse, in5 dO; out0 dq, out1 dk, out2 dv, out3 delta, out4/out5 partial dk/dv
BACKWARD_SRC = r"""
const float scale = (float)(1.0 / std::sqrt((double)tc_attention::D));
const int bh_count = (int)in0_shape0, n_q = (int)in0_shape1, n_k = (int)in1_shape1, splits = (int)out4_shape0;
tc_attention::allow_smem(tc_attention::grad_query_kernel, tc_attention::QUERY_SMEM);
tc_attention::allow_smem(tc_attention::grad_key_kernel, tc_attention::KEY_SMEM);
dim3 query_grid((n_q + tc_attention::ROWS - 1) / tc_attention::ROWS, (unsigned)bh_count);
tc_attention::grad_query_kernel<<<query_grid, tc_attention::THREADS, tc_attention::QUERY_SMEM>>>(
    in0_p, in1_p, in2_p, in3_p, in4_p, in5_p, out0_p, out3_p, n_q, n_k, scale);
dim3 key_grid((n_k + tc_attention::ROWS - 1) / tc_attention::ROWS, (unsigned)bh_count, (unsigned)splits);
tc_attention::grad_key_kernel<<<key_grid, tc_attention::THREADS, tc_attention::KEY_SMEM>>>(
    in0_p, in1_p, in2_p, in4_p, in5_p, out3_p, out4_p, out5_p, n_q, n_k, bh_count, scale);
const size_t n = (size_t)bh_count * n_k * tc_attention::D;
const int sum_blocks = (int)((n + 255) / 256 < 4096 ? (n + 255) / 256 : 4096);
tc_attention::sum_parts_kernel<<<sum_blocks, 256>>>(out4_p, out1_p, n, splits);
tc_attention::sum_parts_kernel<<<sum_blocks, 256>>>(out5_p, out2_p, n, splits);
"""
