"""Check and time jdiff's transpose and GroupNorm kernels, and its size-keeping convolution's input gradient
(``blocks.Conv2d``), for Jittor on CUDA at SD 2.1's shapes (512 px, batch 2).

    python -m jdiff.bench.jittor_kernels [--repeats 10] [--out kernels.json]

Each case runs with ``kernels.MODE = "fused"`` (the CUDA kernels) and ``"unfused"`` (Jittor's own ops), in
float32 and float16 (the convolutions in float16 only; weights in float16 too, as the fp16 engine has them), on
the same inputs: output and input gradient of sum(y * upstream) must agree within the dtype's tolerance (max abs difference relative to the largest value), and the times are the median of
--repeats forward + backward calls, synchronised. Exit status 1 when a check failed, 2 without CUDA.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from jdiff.engines.base import EngineError
from jdiff.engines.jittor.env import import_jittor

LIMITS = {"float32": 1e-5, "float16": 4e-3}
# (name, input shape, what): None for the transpose, GroupNorm's group count, or ("conv", output channels,
# kernel). The UNet's maps at 64, 32, 16, 8 latents; a VAE encoder map (256 channels at 256 x 256, for 512 px
# images); then odd sizes
CASES = [("channels_last 320x64x64", (2, 320, 64, 64), None), ("channels_last 1280x16x16", (2, 1280, 16, 16), None),
         ("group_norm 320x64x64", (2, 320, 64, 64), 32), ("group_norm 640x32x32", (2, 640, 32, 32), 32),
         ("group_norm 1280x8x8", (2, 1280, 8, 8), 32), ("group_norm 256x256x256", (2, 256, 256, 256), 32),
         # sizes that are not multiples of 32: partial tiles of the transpose, 3 channels a group
         ("channels_last 77x33x31", (2, 77, 33, 31), None), ("group_norm 96x33x31", (2, 96, 33, 31), 32),
         # the UNet's 3x3 convolutions whose input gradient the float16 training step takes by the flipped weights
         # (float16 only: the engine keeps Jittor's own gradient for float32, and for 1x1 kernels)
         ("conv 320x64x64 3x3", (2, 320, 64, 64), ("conv", 320, 3)), ("conv 960x64x64 3x3 -> 320", (2, 960, 64, 64),
         ("conv", 320, 3)), ("conv 1280x16x16 3x3", (2, 1280, 16, 16), ("conv", 1280, 3)),
         ("conv 96x33x31 3x3", (2, 96, 33, 31), ("conv", 64, 3))]


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m jdiff.bench.jittor_kernels",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", default=None, help="JSON results")
    parser.add_argument("--device", default="cuda", help="cpu: a smoke run of the CPU loops (slow at these sizes; there Jittor's "
                        "own float32 sums over a million values, the reference, lose digits: the 256x256x256 float32 "
                        "case misses the 1e-5 limit)")
    parser.add_argument("--only", default="", help="the cases whose name contains this only (e.g. conv)")
    args = parser.parse_args()
    try:
        jt = import_jittor(args.device)
    except EngineError as err:
        print(f"no Jittor on CUDA here: {err}")
        return 2
    from jdiff.engines.jittor import blocks
    from jdiff.engines.jittor.fast import kernels

    def run(what, x, upstream, layer):
        y = blocks.channels_last(x) if what is None else layer(x)
        (dx,) = jt.grad((y.float32() * upstream.reshape(y.shape)).sum(), [x])
        return y, dx

    def make_layer(what, channels, dtype, rng):
        if what is None:
            return None
        if isinstance(what, tuple):  # a convolution, weights at the scale of their fan-in
            _, out_channels, k = what
            layer = blocks.Conv2d(channels, out_channels, k, padding=k // 2)
            layer.weight.assign(jt.array((rng.standard_normal(layer.weight.shape) / np.sqrt(channels * k * k))
                                         .astype(np.float32)))
        else:
            layer = blocks.GroupNorm(what, channels, eps=1e-6)
            layer.weight.assign(jt.array(rng.standard_normal(channels).astype(np.float32)))
        layer.bias.assign(jt.array(rng.standard_normal(layer.bias.shape).astype(np.float32)))
        if dtype == "float16":
            layer.float16()  # as engine.mixed_precision=fp16 has them
        return layer

    rng = np.random.default_rng(0)
    failed, rows = 0, []
    for name, shape, what in [case for case in CASES if args.only in case[0]]:
        x_np = (3 + rng.standard_normal(shape)).astype(np.float32)
        out_shape = (shape[0], what[1], *shape[2:]) if isinstance(what, tuple) else shape
        upstream = jt.array(rng.standard_normal(out_shape).astype(np.float32))
        for dtype in ("float16",) if isinstance(what, tuple) else ("float32", "float16"):
            x = jt.array(x_np.astype(dtype))
            layer = make_layer(what, shape[1], dtype, np.random.default_rng(1))
            jt.sync_all(True)
            got, ms = {}, {}
            for mode in ("fused", "unfused"):
                kernels.MODE = mode
                y, dx = run(what, x, upstream, layer)
                got[mode] = [y.float32().numpy(), dx.float32().numpy()]
                times = []
                for _ in range(args.repeats + 2):  # inputs on the GPU already: the op and its gradient only
                    jt.sync_all(True)
                    started = time.perf_counter()
                    jt.sync([*run(what, x, upstream, layer)])
                    jt.sync_all(True)
                    times.append(time.perf_counter() - started)
                ms[mode] = 1e3 * statistics.median(times[2:])
            errors = [float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30)) for a, b in zip(*got.values())]
            finite = all(np.isfinite(a).all() for a in got["fused"])
            ok = finite and max(errors) <= LIMITS[dtype]
            failed += not ok
            rows.append({"case": name, "dtype": dtype, "fused_ms": ms["fused"], "unfused_ms": ms["unfused"],
                         "speedup": ms["unfused"] / ms["fused"], "y_error": errors[0], "dx_error": errors[1], "ok": ok})
            print(json.dumps(rows[-1]), flush=True)
    print("\n| case | dtype | fused ms | Jittor ops ms | speed-up | y error | dx error | ok |\n" + "| --- " * 8 + "|")
    for r in rows:
        print(f"| {r['case']} | {r['dtype']} | {r['fused_ms']:.3f} | {r['unfused_ms']:.3f} | {r['speedup']:.1f}x | "
              f"{r['y_error']:.1e} | {r['dx_error']:.1e} | {'ok' if r['ok'] else 'FAILED'} |")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
