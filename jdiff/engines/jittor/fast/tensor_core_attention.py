"""The float16 CUDA kernels of the fused attention on tensor cores (flash-attention style).

API (used by :mod:`.fused_attention` beside it, which chooses between these and its scalar kernels):
    serves(q) -> whether these kernels take q (float16 on CUDA, head_dim a multiple of 16, at most 128)
    header(head_dim) -> the CUDA header for one head_dim
    FORWARD_SRC, BACKWARD_SRC: the jt.code sources; the same inputs and outputs as the scalar kernels
    key_pass_splits(n_q, n_k, bh) -> how many query ranges the dK/dV pass splits into

Same algorithm and outputs as the scalar kernels (forward with an online softmax, saving the log-sum-exp; a
dQ pass over key tiles; a dK/dV pass over query tiles, split over query ranges whose partial sums are added
in a fixed order: no atomics, deterministic), but the products of each tile run on the tensor cores:
float16 operands, float32 accumulators. Probabilities and dS are rounded to float16 for their products (as
flash attention does); softmax statistics, the running output and every accumulator are float32.

- The forward pass uses ``mma.sync`` on register fragments, flash-attention-2 style: a block has 4 warps and
  64 query rows, 16 a warp, and each warp keeps its queries, its scores and its output accumulator in
  registers (the scores' accumulator layout is the A operand of P V). Only the key and value tiles, 64 rows
  each, go through shared memory. On an H100 it runs at 148-165 TFLOPS at SD 2.1's 4,096-token
  self-attention, 4.2-4.7x the WMMA version it replaced (docs/benchmarks.md, ninth run).
- The backward passes use WMMA 16x16x16 tiles through shared memory: 4 warps and 64 rows (query rows in the
  dQ pass, key rows in the dK/dV pass), 16 a warp; the other side streams in tiles of 32. Each lane owns
  half of one of its warp's 16 rows for the element-wise steps, so a row's max and sum need one shuffle.

These kernels run only on a GPU (compute capability 8.0 or later, with enough shared memory per block for the
head_dim: ``serves`` checks both, and anything else takes the scalar kernels). They share no code with the
scalar kernels, so the CPU tests do not run them: ``python -m jdiff.bench.jittor_attention`` checks them on a GPU
against a float64 reference (its float16 cases); ``python -m jdiff.bench.attention_forward`` builds the forward
kernel alone with nvcc (no Jittor) and checks and times it.
"""

from __future__ import annotations

MAX_HEAD_DIM = 128
ROWS = 64  # rows per block (4 warps x 16)
TILE = 32  # streamed rows per tile in the backward passes
KV_TILE = 64  # key and value rows per tile in the forward pass
BLOCKS_WANTED = 512


# The most shared memory one block may opt into, by compute capability (CUDA C programming guide); other
# compute capabilities from 8.0 on have 99 KiB (8.6, 8.9, 12.x), earlier ones have no tensor-core path here.
SHARED_MEMORY_LIMIT = {80: 163 * 1024, 87: 163 * 1024, 90: 227 * 1024, 100: 227 * 1024, 103: 227 * 1024}
OTHER_LIMIT = 99 * 1024


def shared_memory(head_dim: int) -> dict:
    """Bytes of dynamic shared memory per block of each kernel: the arrays the kernels lay out, in order."""
    ldh, ldf, lds, ldp = head_dim + 8, head_dim + 4, TILE + 4, TILE + 8
    h_rows, h_tile, s_rows, p_rows, f_rows = ROWS * ldh * 2, TILE * ldh * 2, ROWS * lds * 4, ROWS * ldp * 2, ROWS * ldf * 4
    return {"FORWARD_SMEM": h_rows + 2 * KV_TILE * ldh * 2,
            "QUERY_SMEM": 2 * h_rows + 2 * h_tile + 2 * s_rows + p_rows + f_rows + 2 * ROWS * 4,
            "KEY_SMEM": 2 * h_rows + 2 * h_tile + 2 * s_rows + 2 * p_rows + f_rows + 2 * TILE * 4}


def shared_memory_limit(archs) -> int:
    """What every GPU Jittor compiles for (compute capabilities as 80, 90, ...) lets a block use; 0 before 8.0."""
    if not archs or min(archs) < 80:
        return 0
    return min(SHARED_MEMORY_LIMIT.get(arch, OTHER_LIMIT) for arch in archs)


def serves(q) -> bool:
    import jittor as jt  # here: header() needs no Jittor (jdiff.bench.attention_forward builds with nvcc)

    head_dim = q.shape[-1]
    if not (jt.flags.use_cuda and str(q.dtype) == "float16" and head_dim % 16 == 0 and head_dim <= MAX_HEAD_DIM):
        return False
    return max(shared_memory(head_dim).values()) <= shared_memory_limit(list(jt.flags.cuda_archs))


def key_pass_splits(n_q: int, n_k: int, bh: int) -> int:
    key_blocks = -(-n_k // ROWS)
    return max(1, min(-(-n_q // TILE), -(-BLOCKS_WANTED // (key_blocks * bh))))


def header(head_dim: int) -> str:
    source = HEADER.replace("HEAD_DIM", str(head_dim)).replace("KV_TILE_ROWS", str(KV_TILE))
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

// c (16 x 16*NT floats, row stride ldc) = a (16 x 16*KT, row-major, stride lda) b, where b (16*KT x 16*NT) is
// given as the rows of its transpose (stride ldb; the rows of K for Q K^T)
template <int NT, int KT>
__device__ __forceinline__ void warp_matmul(const half* a, int lda, const half* b, int ldb, float* c, int ldc) {
#pragma unroll
    for (int j = 0; j < NT; j++) {
        FragC acc;
        wmma::fill_fragment(acc, 0.f);
#pragma unroll
        for (int k = 0; k < KT; k++) {
            FragA fa;
            wmma::load_matrix_sync(fa, a + k * 16, lda);
            FragBt fb;
            wmma::load_matrix_sync(fb, b + j * 16 * ldb + k * 16, ldb);
            wmma::mma_sync(acc, fa, fb, acc);
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

// -- the forward pass on mma.sync (m16n8k16), flash-attention-2 style -------------------------------------
// A block has 4 warps and ROWS = 64 query rows, 16 a warp; key/value tiles of KV_TILE = 64 rows stream
// through shared memory. A warp keeps its Q fragments, its scores (16 x 64) and its output accumulator
// (16 x D) in registers: the scores' accumulator layout is the A-operand layout of P V, so the probabilities
// never leave the registers. Fragment layouts (PTX ISA, mma.m16n8k16 with .f16 inputs and .f32 accumulators),
// for lane l, g = l / 4, c = 2 * (l % 4):
//   A (16 x 16, row-major): a0 = (g, c..c+1), a1 = (g+8, c..c+1), a2 = (g, c+8..c+9), a3 = (g+8, c+8..c+9)
//   B (16 x 8, "col"):      b0 = (k = c..c+1, n = g), b1 = (k = c+8..c+9, n = g)
//   C (16 x 8):             c0, c1 = (g, c..c+1), c2, c3 = (g+8, c..c+1)
constexpr int KV_TILE = KV_TILE_ROWS;  // key/value rows a tile in the forward pass

__device__ __forceinline__ void mma_16816(float* c, const unsigned* a, unsigned b0, unsigned b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
                 "{%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ unsigned half2_bits(const half* p) { return *reinterpret_cast<const unsigned*>(p); }

__device__ __forceinline__ unsigned pack_half2(float lo, float hi) {
    const __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const unsigned*>(&h);
}

__device__ __forceinline__ unsigned pack_halves(half lo, half hi) {
    const __half2 h = __halves2half2(lo, hi);
    return *reinterpret_cast<const unsigned*>(&h);
}

__global__ void __launch_bounds__(THREADS) forward_kernel(const half* q, const half* k, const half* v, half* out,
                                                          float* lse, int n_q, int n_k, float scale) {
    extern __shared__ __align__(128) unsigned char smem[];
    half* q_s = reinterpret_cast<half*>(smem);
    half* k_s = q_s + ROWS * LDH;
    half* v_s = k_s + KV_TILE * LDH;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, c = 2 * (lane % 4);
    const size_t bh = blockIdx.y;
    const int q0 = blockIdx.x * ROWS;
    load_rows(q_s, q + (bh * n_q + q0) * D, min(ROWS, n_q - q0), ROWS);
    __syncthreads();
    unsigned qa[D / 16][4];  // this warp's 16 query rows as A fragments, one per 16 columns of D
    const half* qw = q_s + warp * 16 * LDH;
#pragma unroll
    for (int kk = 0; kk < D / 16; kk++) {
        qa[kk][0] = half2_bits(qw + g * LDH + kk * 16 + c);
        qa[kk][1] = half2_bits(qw + (g + 8) * LDH + kk * 16 + c);
        qa[kk][2] = half2_bits(qw + g * LDH + kk * 16 + c + 8);
        qa[kk][3] = half2_bits(qw + (g + 8) * LDH + kk * 16 + c + 8);
    }
    float o[D / 8][4];
#pragma unroll
    for (int t = 0; t < D / 8; t++) o[t][0] = o[t][1] = o[t][2] = o[t][3] = 0.f;
    float m_lo = -INFINITY, m_hi = -INFINITY, l_lo = 0.f, l_hi = 0.f;  // rows g and g + 8; l: this lane's part

    for (int k0 = 0; k0 < n_k; k0 += KV_TILE) {
        const int nk = min(KV_TILE, n_k - k0);
        __syncthreads();  // every warp is done with the previous tiles
        load_rows(k_s, k + (bh * n_k + k0) * D, nk, KV_TILE);
        load_rows(v_s, v + (bh * n_k + k0) * D, nk, KV_TILE);
        __syncthreads();
        float s[KV_TILE / 8][4];  // S = Q K^T for this warp's rows, one C fragment per 8 keys
#pragma unroll
        for (int j = 0; j < KV_TILE / 8; j++) {
            s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
            const half* kr = k_s + (j * 8 + g) * LDH;
#pragma unroll
            for (int kk = 0; kk < D / 16; kk++)
                mma_16816(s[j], qa[kk], half2_bits(kr + kk * 16 + c), half2_bits(kr + kk * 16 + c + 8));
        }
        float tile_lo = -INFINITY, tile_hi = -INFINITY;
#pragma unroll
        for (int j = 0; j < KV_TILE / 8; j++) {
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const bool valid = j * 8 + c + (e & 1) < nk;  // keys past n_k weigh nothing
                s[j][e] = valid ? s[j][e] * scale : -INFINITY;
            }
            tile_lo = fmaxf(tile_lo, fmaxf(s[j][0], s[j][1]));
            tile_hi = fmaxf(tile_hi, fmaxf(s[j][2], s[j][3]));
        }
        // the four lanes of a quad hold the same two rows
#pragma unroll
        for (int x = 1; x <= 2; x <<= 1) {
            tile_lo = fmaxf(tile_lo, __shfl_xor_sync(0xffffffffu, tile_lo, x));
            tile_hi = fmaxf(tile_hi, __shfl_xor_sync(0xffffffffu, tile_hi, x));
        }
        const float new_lo = fmaxf(m_lo, tile_lo), new_hi = fmaxf(m_hi, tile_hi);
        const float rescale_lo = __expf(m_lo - new_lo), rescale_hi = __expf(m_hi - new_hi);  // 0 the first time
        m_lo = new_lo;
        m_hi = new_hi;
        l_lo *= rescale_lo;
        l_hi *= rescale_hi;
#pragma unroll
        for (int t = 0; t < D / 8; t++) {
            o[t][0] *= rescale_lo;
            o[t][1] *= rescale_lo;
            o[t][2] *= rescale_hi;
            o[t][3] *= rescale_hi;
        }
#pragma unroll
        for (int j = 0; j < KV_TILE / 8; j++) {
            s[j][0] = __expf(s[j][0] - m_lo);
            s[j][1] = __expf(s[j][1] - m_lo);
            s[j][2] = __expf(s[j][2] - m_hi);
            s[j][3] = __expf(s[j][3] - m_hi);
            l_lo += s[j][0] + s[j][1];
            l_hi += s[j][2] + s[j][3];
        }
        // O += P V, 16 keys at a time: P's A fragment is the C fragments of two neighbouring 8-key blocks
#pragma unroll
        for (int kk = 0; kk < KV_TILE / 16; kk++) {
            const unsigned pa[4] = {pack_half2(s[2 * kk][0], s[2 * kk][1]), pack_half2(s[2 * kk][2], s[2 * kk][3]),
                                    pack_half2(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                                    pack_half2(s[2 * kk + 1][2], s[2 * kk + 1][3])};
            const half* vr = v_s + (kk * 16 + c) * LDH + g;  // B (keys x dims): rows c, c+1 (+8) of V, column g
#pragma unroll
            for (int t = 0; t < D / 8; t++) {
                const half* vt = vr + t * 8;
                mma_16816(o[t], pa, pack_halves(vt[0], vt[LDH]), pack_halves(vt[8 * LDH], vt[9 * LDH]));
            }
        }
    }
#pragma unroll
    for (int x = 1; x <= 2; x <<= 1) {
        l_lo += __shfl_xor_sync(0xffffffffu, l_lo, x);
        l_hi += __shfl_xor_sync(0xffffffffu, l_hi, x);
    }
    const int row_lo = q0 + warp * 16 + g, row_hi = row_lo + 8;
    const float inv_lo = 1.f / l_lo, inv_hi = 1.f / l_hi;
#pragma unroll
    for (int t = 0; t < D / 8; t++) {
        if (row_lo < n_q)
            *reinterpret_cast<__half2*>(out + (bh * n_q + row_lo) * D + t * 8 + c) =
                __floats2half2_rn(o[t][0] * inv_lo, o[t][1] * inv_lo);
        if (row_hi < n_q)
            *reinterpret_cast<__half2*>(out + (bh * n_q + row_hi) * D + t * 8 + c) =
                __floats2half2_rn(o[t][2] * inv_hi, o[t][3] * inv_hi);
    }
    if (lane % 4 == 0) {
        if (row_lo < n_q) lse[bh * n_q + row_lo] = m_lo + logf(l_lo);
        if (row_hi < n_q) lse[bh * n_q + row_hi] = m_hi + logf(l_hi);
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
        warp_matmul<TILE / 16, D / 16>(q_s + warp * 16 * LDH, LDH, k_s, LDH, s_s + warp * 16 * LDS, LDS);
        warp_matmul<TILE / 16, D / 16>(do_s + warp * 16 * LDH, LDH, v_s, LDH, dp_s + warp * 16 * LDS, LDS);
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
        warp_matmul<TILE / 16, D / 16>(k_s + warp * 16 * LDH, LDH, q_s, LDH, st_s + warp * 16 * LDS, LDS);
        warp_matmul<TILE / 16, D / 16>(v_s + warp * 16 * LDH, LDH, do_s, LDH, dpt_s + warp * 16 * LDS, LDS);
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
