"""GPU check and speed of the Triton GroupNorm (engine.group_norm=triton) against PyTorch's, at SD 2.1 shapes.

For each shape: the largest relative error of the output and of dx against PyTorch's fp32 GroupNorm, and the
time of forward and of forward + backward for PyTorch (NCHW input; channels-last input, which it converts)
and for the Triton kernels (NCHW; channels-last). Ratios are to PyTorch on NCHW, in the same run.

    python -m jdiff.bench.group_norm [--dtype bf16] [--out gn.json]
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from jdiff.engines.torch.group_norm import group_norm

SHAPES = {  # (N, C, H, W): where the reference method's step and sampling meet them
    "vae encoder 512 px, 2 images": (2, 128, 512, 512),
    "vae encoder 256 px": (2, 256, 256, 256),
    "vae encoder 128 px": (2, 512, 128, 128),
    "unet 64 x 64, batch 2": (2, 320, 64, 64),
    "unet up 64 x 64 (960 channels)": (2, 960, 64, 64),
    "unet 32 x 32": (2, 640, 32, 32),
    "unet 16 x 16": (2, 1280, 16, 16),
    "unet 8 x 8": (2, 1280, 8, 8),
    "sampling unet 64 x 64, batch 10": (10, 320, 64, 64),
    "vae decoder 512 px, 5 images": (5, 256, 512, 512),
}
GROUPS = 32


def timed(fn, repeats: int = 20) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def run(shape, dtype) -> dict:
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(shape, device="cuda", generator=g).mul_(2).add_(0.5).to(dtype)
    weight = torch.randn(shape[1], device="cuda", generator=g).to(dtype)
    bias = torch.randn(shape[1], device="cuda", generator=g).to(dtype)
    dy = torch.randn(shape, device="cuda", generator=g).to(dtype)
    xr = x.float().requires_grad_()
    ref = F.group_norm(xr, GROUPS, weight.float(), bias.float(), 1e-6)
    (ref_dx,) = torch.autograd.grad(ref, xr, dy.float())
    layouts = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}
    out = {"shape": list(shape)}
    for layout, fmt in layouts.items():
        xl, dyl = x.contiguous(memory_format=fmt), dy.contiguous(memory_format=fmt)
        for name, fn in (("torch", F.group_norm), ("triton", group_norm)):
            xi = xl.detach().requires_grad_()
            y = fn(xi, GROUPS, weight, bias, 1e-6)
            (dx,) = torch.autograd.grad(y, xi, dyl)
            y = y.detach()
            key = f"{name}-{layout}"
            out[key] = {
                "y_rel_error": float((y.float() - ref).abs().max() / ref.abs().max()),
                "dx_rel_error": float((dx.float() - ref_dx).abs().max() / ref_dx.abs().max()),
                "keeps_layout": bool(y.is_contiguous(memory_format=fmt)),
                "forward_ms": timed(lambda: fn(xl, GROUPS, weight, bias, 1e-6)),
                "forward_backward_ms": timed(
                    lambda: torch.autograd.grad(fn(xi, GROUPS, weight, bias, 1e-6), xi, dyl)),
            }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m jdiff.bench.group_norm",
                                     description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__} (CUDA {torch.version.cuda}), {args.dtype}")
    results = {}
    print(f"{'shape':34} {'variant':14} {'y err':>8} {'dx err':>8} {'fwd ms':>8} {'x':>6} {'f+b ms':>8} {'x':>6} layout")
    for label, shape in SHAPES.items():
        r = results[label] = run(shape, dtype)
        base = r["torch-nchw"]
        for key in ("torch-nchw", "torch-nhwc", "triton-nchw", "triton-nhwc"):
            v = r[key]
            print(f"{label:34} {key:14} {v['y_rel_error']:8.1e} {v['dx_rel_error']:8.1e} {v['forward_ms']:8.3f} "
                  f"{base['forward_ms'] / v['forward_ms']:6.2f} {v['forward_backward_ms']:8.3f} "
                  f"{base['forward_backward_ms'] / v['forward_backward_ms']:6.2f} {'kept' if v['keeps_layout'] else 'NCHW'}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "dtype": args.dtype, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
