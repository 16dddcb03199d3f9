"""Check and time the float16 attention forward kernel alone: built with nvcc from the same header the Jittor
engine compiles (``tensor_core_attention.header``), without Jittor, at SD 2.1's attention shapes.

    python -m jdiff.bench.attention_forward [--arch 90] [--compile-only] [--out forward.json]

Each case fills q, k, v with normal float16 values and the outputs with NaN, runs the kernel twice (the two
outputs must be bitwise equal), compares the output and the log-sum-exp of 10 rows (the first and last
(batch, head), rows 0, 1, 63, 64 and the last) with a float64 reference, and times the kernel with CUDA events
(the mean of --repeats launches after a warm-up pass). Needs nvcc and, unless --compile-only, an NVIDIA GPU of
compute capability 8.0 or later. Exit status 1 when a check failed or the build failed. It builds with
``--use_fast_math``, as Jittor builds jt.code kernels (the ninth run's table, docs/benchmarks.md, was measured
without it).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from jdiff.engines.jittor.fast import tensor_core_attention

HEAD_DIM = 64
# (name, batch x heads, query tokens, key tokens): training (batch 2) and sampling (batch 10: 5 images, CFG)
CASES = [("train self 64x64", 10, 4096, 4096), ("train cross 64x64", 10, 4096, 77),
         ("train self 32x32", 20, 1024, 1024), ("sample self 64x64", 50, 4096, 4096),
         ("sample self 16x16", 200, 256, 256), ("ragged 1000 x 130", 3, 1000, 130)]
OUT_LIMIT, LSE_LIMIT = 5e-3, 1e-3  # max |error| / max |reference| of the output; max |error| of the log-sum-exp

HARNESS = r"""
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>
using namespace tc_attention;
#define CK(x) do { cudaError_t e = (x); if (e != cudaSuccess) { \
    printf("{\"error\": \"%s at line %d\"}\n", cudaGetErrorString(e), __LINE__); return 1; } } while (0)

static int run_case(const char* name, int bh, int n_q, int n_k, int repeats) {
    const size_t nq = (size_t)bh * n_q * D, nk = (size_t)bh * n_k * D, nl = (size_t)bh * n_q;
    std::vector<half> hq(nq), hk(nk), hv(nk);
    std::mt19937 gen(1);
    std::normal_distribution<float> normal(0.f, 1.f);
    for (auto& x : hq) x = __float2half(normal(gen));
    for (auto& x : hk) x = __float2half(normal(gen));
    for (auto& x : hv) x = __float2half(normal(gen));
    half *q, *k, *v, *out; float* lse;
    CK(cudaMalloc(&q, nq * 2)); CK(cudaMalloc(&k, nk * 2)); CK(cudaMalloc(&v, nk * 2));
    CK(cudaMalloc(&out, nq * 2)); CK(cudaMalloc(&lse, nl * 4));
    CK(cudaMemcpy(q, hq.data(), nq * 2, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(k, hk.data(), nk * 2, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(v, hv.data(), nk * 2, cudaMemcpyHostToDevice));
    CK(cudaMemset(out, 0xff, nq * 2)); CK(cudaMemset(lse, 0xff, nl * 4));  // NaN: what the kernel skips shows
    const float scale = 1.f / sqrtf((float)D);
    allow_smem(forward_kernel, FORWARD_SMEM);
    const dim3 grid((n_q + ROWS - 1) / ROWS, bh);
    forward_kernel<<<grid, THREADS, FORWARD_SMEM>>>(q, k, v, out, lse, n_q, n_k, scale);
    CK(cudaGetLastError());
    std::vector<half> first(nq), again(nq);
    std::vector<float> first_lse(nl);
    CK(cudaMemcpy(first.data(), out, nq * 2, cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(first_lse.data(), lse, nl * 4, cudaMemcpyDeviceToHost));
    cudaEvent_t start, stop;
    cudaEventCreate(&start); cudaEventCreate(&stop);
    float ms = 0.f;
    for (int pass = 0; pass < 2; pass++) {  // the first pass warms up
        cudaEventRecord(start);
        for (int r = 0; r < repeats; r++) forward_kernel<<<grid, THREADS, FORWARD_SMEM>>>(q, k, v, out, lse, n_q, n_k, scale);
        cudaEventRecord(stop);
        CK(cudaEventSynchronize(stop));
        cudaEventElapsedTime(&ms, start, stop);
    }
    CK(cudaMemcpy(again.data(), out, nq * 2, cudaMemcpyDeviceToHost));
    size_t non_finite = 0;
    for (size_t i = 0; i < nq; i++) non_finite += !std::isfinite(__half2float(first[i]));
    for (size_t i = 0; i < nl; i++) non_finite += !std::isfinite(first_lse[i]);
    const bool same = std::memcmp(first.data(), again.data(), nq * 2) == 0;
    double out_err = 0, out_max = 0, lse_err = 0;
    const int rows[] = {0, 1, 63, 64, n_q - 1};
    for (int h : {0, bh - 1}) {
        for (int r : rows) {
            std::vector<double> p(n_k);
            double m = -1e300, l = 0;
            for (int j = 0; j < n_k; j++) {
                double acc = 0;
                for (int d = 0; d < D; d++)
                    acc += (double)__half2float(hq[((size_t)h * n_q + r) * D + d]) * __half2float(hk[((size_t)h * n_k + j) * D + d]);
                p[j] = acc * scale;
                m = p[j] > m ? p[j] : m;
            }
            for (int j = 0; j < n_k; j++) { p[j] = exp(p[j] - m); l += p[j]; }
            for (int d = 0; d < D; d++) {
                double o = 0;
                for (int j = 0; j < n_k; j++) o += p[j] * __half2float(hv[((size_t)h * n_k + j) * D + d]);
                o /= l;
                out_err = fmax(out_err, fabs(o - __half2float(first[((size_t)h * n_q + r) * D + d])));
                out_max = fmax(out_max, fabs(o));
            }
            lse_err = fmax(lse_err, fabs(m + log(l) - first_lse[(size_t)h * n_q + r]));
        }
    }
    const double ms_call = ms / repeats, tflops = 4.0 * bh * n_q * n_k * D / (ms_call * 1e-3) / 1e12;
    printf("{\"case\": \"%s\", \"bh\": %d, \"n_q\": %d, \"n_k\": %d, \"ms\": %.4f, \"tflops\": %.1f, "
           "\"out_error\": %.3e, \"lse_error\": %.3e, \"non_finite\": %zu, \"deterministic\": %s}\n",
           name, bh, n_q, n_k, ms_call, tflops, out_err / out_max, lse_err, non_finite, same ? "true" : "false");
    cudaFree(q); cudaFree(k); cudaFree(v); cudaFree(out); cudaFree(lse);
    return 0;
}

int main() {
    int failed = 0;
CASES_HERE
    return failed;
}
"""


def nvcc() -> str:
    found = os.environ.get("nvcc_path") or shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    if not Path(found).exists():
        raise SystemExit(f"no nvcc at {found}: install the CUDA toolkit, or set nvcc_path")
    return found


def gpu_arch() -> int:
    try:
        cap = subprocess.run(["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=60).stdout.split()
        return int(float(cap[0]) * 10)
    except (OSError, IndexError, ValueError, subprocess.TimeoutExpired):
        return 90


def source(repeats: int) -> str:
    calls = "\n".join(f'    failed |= run_case("{name}", {bh}, {n_q}, {n_k}, {repeats});' for name, bh, n_q, n_k in CASES)
    return tensor_core_attention.header(HEAD_DIM) + HARNESS.replace("CASES_HERE", calls)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jdiff.bench.attention_forward",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=None, help="compute capability as 80, 90, ... (default: this GPU's)")
    parser.add_argument("--compile-only", action="store_true", help="build the kernel and the harness, run nothing")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default=None, help="JSON results")
    args = parser.parse_args(argv)
    arch = args.arch or gpu_arch()
    if arch < 80:
        print(f"compute capability {arch / 10:.1f}: the tensor-core kernels need 8.0 or later")
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        cu, exe = Path(tmp) / "forward.cu", Path(tmp) / "forward"
        cu.write_text(source(args.repeats))
        built = subprocess.run([nvcc(), "-std=c++17", "-O3", "--use_fast_math", f"-arch=sm_{arch}", "-o", str(exe),
                                str(cu)], capture_output=True, text=True)
        if built.returncode:
            print(built.stderr[-4000:])
            return 1
        print(f"built for sm_{arch}")
        if args.compile_only:
            return 0
        ran = subprocess.run([str(exe)], capture_output=True, text=True)
    rows = [json.loads(line) for line in ran.stdout.splitlines() if line.startswith("{")]
    failed = ran.returncode != 0 or len(rows) != len(CASES)
    print("| case | batch x heads | queries | keys | ms | TFLOPS | output error | lse error | finite | deterministic |")
    print("| --- " * 10 + "|")
    for r in rows:
        if "error" in r:
            print(r["error"])
            continue
        ok = (r["out_error"] <= OUT_LIMIT and r["lse_error"] <= LSE_LIMIT and r["non_finite"] == 0
              and r["deterministic"])
        failed |= not ok
        print(f"| {r['case']} | {r['bh']} | {r['n_q']} | {r['n_k']} | {r['ms']:.3f} | {r['tflops']:.0f} | "
              f"{r['out_error']:.1e} | {r['lse_error']:.1e} | {r['non_finite'] == 0} | {r['deterministic']} |"
              + ("" if ok else " FAILED"))
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
