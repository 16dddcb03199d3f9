"""Check and time the fused Jittor attention on CUDA at Stable Diffusion 2.1's attention shapes (512 px, batch 2).

    python -m jdiff.bench.jittor_attention --out attention.json [--repeats 10]

For each case (self-attention at 64x64, 32x32, 16x16 and 8x8 latent tokens, and cross-attention from those
to 77 text tokens; head_dim 64) in float32 and float16 (float16 runs the tensor-core kernels):
- check: Jittor's allocator is first filled with NaN buffers of the outputs' sizes (freed, so the kernels get
  them back: anything a kernel fails to write stays NaN), then the fused kernel's output and gradients
  (dq, dk, dv of sum(out * dO)) are compared with a float64 reference: relative error ||x - ref|| / ||ref||
  below 1e-5 (float32) or 5e-3 (float16), everything finite, and the gradients bitwise the same on a
  second run (no atomics: deterministic). The unfused path's errors are printed for comparison.
- time: median of --repeats calls (after two warm-up calls), synchronised with jt.sync_all(True) around
  each, of the fused and the unfused Jittor attention (forward, and forward + backward), and of torch's
  scaled_dot_product_attention (forward + backward) when torch has CUDA here.
Inputs are float16-representable, so one float64 reference serves both dtypes. A failing case is reported
and the run goes on; the table comes last, the JSON has every number and error. Exit status 1 when any
check failed or a case crashed, 2 when Jittor has no CUDA.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from jdiff.engines.base import EngineError
from jdiff.engines.jittor.env import import_jittor

HEAD_DIM = 64
TEXT_TOKENS = 77
# (latent side, batch 2 x heads): SD 2.1's UNet has 5, 10, 20 and 20 heads of 64 channels at its four levels
LEVELS = [(64, 10), (32, 20), (16, 40), (8, 40)]
CASES = [(f"{kind} {side}x{side}", side * side, side * side if kind == "self" else TEXT_TOKENS, bh)
         for kind in ("self", "cross") for side, bh in LEVELS]
LIMITS = {"float32": 1e-5, "float16": 5e-3}  # relative error against the float64 reference
NAMES = ("out", "dq", "dk", "dv")


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m jdiff.bench.jittor_attention",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="check_jittor_attention.json", help="where to write the JSON results")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per measurement (the median is kept)")
    args = parser.parse_args()

    try:
        jt = import_jittor("cuda")
    except EngineError as err:
        print(f"no Jittor on CUDA here: {err}")
        return 2
    from jdiff.engines.jittor import blocks
    from jdiff.engines.jittor.fast import fused_attention

    torch = torch_with_cuda()
    results = {"device": device_name(torch), "jittor": jt.__version__, "python": platform.python_version(),
               "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "head_dim": HEAD_DIM,
               "limits": LIMITS, "repeats": args.repeats, "cases": []}
    print(f"device: {results['device']}, jittor {jt.__version__}, torch SDPA: "
          f"{'yes' if torch else 'no (torch without CUDA)'}", flush=True)

    def attend(mode):
        def run(q, k, v):
            fused_attention.MODE = mode
            return blocks.attention(q, k, v, upcast=True)  # SD 2.1 upcasts attention
        return run

    for name, n_q, n_k, bh in CASES:
        inputs = random_inputs(bh, n_q, n_k, seed=len(results["cases"]))
        try:
            expected = reference(*inputs)
        except Exception as err:  # noqa: BLE001 - a failure is recorded and the next case runs
            expected = None
            print(f"{name}: the float64 reference failed: {err!r}", flush=True)
        for dtype in ("float32", "float16"):
            # problems fail the case; notes (the unfused path or torch failing) do not
            record = {"case": name, "dtype": dtype, "n_q": n_q, "n_k": n_k, "batch_heads": bh, "passed": False,
                      "errors": {}, "ms": {}, "problems": [], "notes": []}
            results["cases"].append(record)
            try:
                if expected is None:
                    raise RuntimeError("no float64 reference")
                check(jt, attend, inputs, expected, dtype, record)
                measure(jt, attend, torch, inputs, dtype, args.repeats, record)
            except Exception as err:  # noqa: BLE001 - a failure is recorded and the next case runs
                record["problems"].append(f"crashed: {err!r}")
                traceback.print_exc()
            finally:
                record["passed"] = not record["problems"]
                fused_attention.MODE = "auto"
                jt.sync_all(True)
                jt.gc()
            print(f"{name} {dtype}: {'ok' if record['passed'] else 'FAILED'} errors {record['errors'].get('fused')} "
                  f"ms {record['ms']} {'; '.join(record['problems'] + record['notes'])}", flush=True)

    Path(args.out).write_text(json.dumps(results, indent=1))
    print_table(results)
    print(f"JSON: {args.out}")
    failed = [f"{r['case']} {r['dtype']}" for r in results["cases"] if not r["passed"]]
    print(f"{len(results['cases']) - len(failed)}/{len(results['cases'])} cases passed"
          + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


def random_inputs(bh: int, n_q: int, n_k: int, seed: int) -> list[np.ndarray]:
    """q, k, v, dO as float64 arrays of (2, bh/2, tokens, HEAD_DIM), exactly representable in float16."""
    rng = np.random.default_rng(seed)
    shapes = [(n_q, HEAD_DIM), (n_k, HEAD_DIM), (n_k, HEAD_DIM), (n_q, HEAD_DIM)]
    return [rng.standard_normal((2, bh // 2, *s)).astype(np.float16).astype(np.float64) for s in shapes]


def reference(q, k, v, dout) -> list[np.ndarray]:
    """out, dq, dk, dv in float64 for the loss sum(out * dO), one (batch, head) at a time to bound memory."""
    scale = q.shape[-1] ** -0.5
    results = [np.empty_like(q), np.empty_like(q), np.empty_like(k), np.empty_like(v)]
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            qh, kh, vh, doh = q[b, h], k[b, h], v[b, h], dout[b, h]
            scores = qh @ kh.T * scale
            probs = np.exp(scores - scores.max(-1, keepdims=True))
            probs /= probs.sum(-1, keepdims=True)
            dprobs = doh @ vh.T
            dscores = probs * (dprobs - (dprobs * probs).sum(-1, keepdims=True)) * scale
            for result, value in zip(results, (probs @ vh, dscores @ kh, dscores.T @ qh, probs.T @ doh)):
                result[b, h] = value
    return results


def forward_and_grads(jt, attention, q, k, v, dout) -> list:
    out = attention(q, k, v)
    grads = jt.grad((out * dout).sum(), [q, k, v])
    jt.sync([out, *grads])
    return [out, *grads]


def poison_allocator(jt, shapes, dtype) -> None:
    """Allocate NaN-filled buffers of the outputs' sizes and free them: Jittor's caching allocator hands the
    same memory to the next allocations of those sizes, so unwritten output elements read NaN."""
    poison = [jt.full(shape, float("nan"), dtype) for shape in shapes]
    poison += [jt.full(shape, float("nan"), "float32") for shape in shapes]  # lse, D_i, partial dk/dv
    jt.sync(poison)
    del poison


def check(jt, attend, inputs, expected, dtype, record) -> None:
    q, k, v, dout = (jt.array(x.astype(dtype)) for x in inputs)
    errors = {}
    for mode in ("fused", "unfused"):
        if mode == "fused":
            poison_allocator(jt, [q.shape, k.shape, v.shape, q.shape], dtype)
        try:
            got = [x.numpy().astype(np.float64) for x in forward_and_grads(jt, attend(mode), q, k, v, dout)]
        except Exception as err:  # noqa: BLE001 - the unfused path failing is reported, not fatal
            if mode == "fused":
                raise
            record["notes"].append(f"unfused check crashed: {err!r}")
            continue
        errors[mode] = {name: relative_error(x, ref) for name, x, ref in zip(NAMES, got, expected)}
        if mode == "fused":
            nonfinite = [name for name, x in zip(NAMES, got) if not np.isfinite(x).all()]
            if nonfinite:
                record["problems"].append(f"non-finite values (unwritten or overflow) in {nonfinite}")
            again = [x.numpy().astype(np.float64) for x in forward_and_grads(jt, attend(mode), q, k, v, dout)]
            if not all(np.array_equal(a, b, equal_nan=True) for a, b in zip(got, again)):
                record["problems"].append("a second run gave different results (not deterministic)")
    record["errors"] = errors
    too_large = {name: e for name, e in errors["fused"].items() if not e < LIMITS[dtype]}
    if too_large:
        record["problems"].append(f"relative error above {LIMITS[dtype]:g}: {too_large}")


def relative_error(x: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


def measure(jt, attend, torch, inputs, dtype, repeats, record) -> None:
    q, k, v, dout = (jt.array(x.astype(dtype)) for x in inputs)
    steps = {}
    for mode in ("fused", "unfused"):
        steps[f"{mode}_fwd"] = lambda mode=mode: attend(mode)(q, k, v).sync()
        steps[f"{mode}_fwd_bwd"] = lambda mode=mode: forward_and_grads(jt, attend(mode), q, k, v, dout)
    for label, step in steps.items():
        try:
            record["ms"][label] = median_ms(step, repeats, lambda: jt.sync_all(True))
        except Exception as err:  # noqa: BLE001 - e.g. the unfused path out of memory: recorded, not fatal
            (record["problems"] if label.startswith("fused") else record["notes"]).append(
                f"{label} timing crashed: {err!r}")
    if torch is not None:
        try:
            record["ms"]["torch_sdpa_fwd_bwd"] = median_ms(torch_sdpa_step(torch, inputs, dtype), repeats,
                                                           torch.cuda.synchronize)
        except Exception as err:  # noqa: BLE001
            record["notes"].append(f"torch SDPA timing crashed: {err!r}")


def median_ms(step, repeats, synchronize) -> float:
    for _ in range(2):  # compiles, allocator warm-up
        step()
    times = []
    for _ in range(repeats):
        synchronize()
        started = time.perf_counter()
        step()
        synchronize()
        times.append(time.perf_counter() - started)
    return 1e3 * statistics.median(times)


def torch_sdpa_step(torch, inputs, dtype):
    q, k, v, dout = (torch.tensor(x, dtype=getattr(torch, dtype), device="cuda") for x in inputs)
    q, k, v = (x.requires_grad_() for x in (q, k, v))

    def step():
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        torch.autograd.grad(out, (q, k, v), dout)
    return step


def torch_with_cuda():
    try:
        import torch
    except Exception:  # noqa: BLE001 - torch is optional here
        return None
    return torch if torch.cuda.is_available() else None


def device_name(torch) -> str:
    if torch is not None:
        return torch.cuda.get_device_name(0)
    import subprocess
    try:
        return subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "unknown GPU"


def print_table(results) -> None:
    columns = ["fused_fwd", "unfused_fwd", "fused_fwd_bwd", "unfused_fwd_bwd", "torch_sdpa_fwd_bwd"]
    print(f"\nfused Jittor attention on {results['device']} (ms per call, median of {results['repeats']}; "
          "rel err = max over out/dq/dk/dv)")
    header = ("| case | dtype | tokens q/k | b*h | check | rel err fused | rel err unfused | "
              + " | ".join(columns) + " | unfused/fused fwd+bwd | torch/fused fwd+bwd |")
    print(header)
    print("|" + " --- |" * (header.count("|") - 1))
    for r in results["cases"]:
        worst = {mode: max(errs.values()) for mode, errs in r["errors"].items()}
        ms = r["ms"]
        cells = [r["case"], r["dtype"], f"{r['n_q']}/{r['n_k']}", str(r["batch_heads"]),
                 "ok" if r["passed"] else "FAILED", fmt(worst.get("fused"), "{:.1e}"),
                 fmt(worst.get("unfused"), "{:.1e}")]
        cells += [fmt(ms.get(c), "{:.3f}") for c in columns]
        cells += [ratio(ms.get("unfused_fwd_bwd"), ms.get("fused_fwd_bwd")),
                  ratio(ms.get("torch_sdpa_fwd_bwd"), ms.get("fused_fwd_bwd"))]
        print("| " + " | ".join(cells) + " |")


def fmt(value, pattern: str) -> str:
    return "-" if value is None else pattern.format(value)


def ratio(numerator, denominator) -> str:
    return "-" if not numerator or not denominator else f"{numerator / denominator:.2f}x"


if __name__ == "__main__":
    sys.exit(main())
