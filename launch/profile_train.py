"""Where a training step's time goes (#6): the torch profiler over a few steps of one bench variant, on a GPU.

    python launch/profile_train.py --variant torch-bf16-graphs
    python launch/profile_train.py --variant baseline --steps 5 --rows 30

Loads the variant the way ``python -m jdiff.bench`` does (SD 2.1 architecture, random weights, 512 px, UNet
LoRA rank 32), runs warm-up steps (compiling, for compiled variants), then profiles ``--steps`` steps. Prints
the wall time per step, the time the GPU was busy in kernels (what remains is launch overhead and host work),
and the kernels and host ops that took longest.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from jdiff import bench


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="torch-bf16-graphs", choices=[v for v in bench.VARIANTS if "jittor" not in v])
    parser.add_argument("--model", default="sd21_random", choices=["sd21_random", "tiny"])
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--cache", default="data/cache/bench", help="as python -m jdiff.bench's")
    args = parser.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile

    from jdiff.tiny_model import ensure_tiny_model

    model_dir = ensure_tiny_model(Path(args.cache) / "models", architecture=args.model)
    engine = bench.load(args.variant, model_dir, "cuda")
    batches = list(bench.train_batches(model_dir, args.resolution, engine.latent_shape(args.resolution), 4))
    step = (lambda b: engine.train_step(b)) if args.variant == "baseline" else (lambda b: engine.train_step(b, 1e-4))
    for k in range(args.warmup):
        step(batches[k % len(batches)])
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        started = time.perf_counter()
        for k in range(args.steps):
            step(batches[k % len(batches)])
        torch.cuda.synchronize()
        wall = (time.perf_counter() - started) / args.steps
    events = prof.key_averages()
    kernels = sum(e.self_device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    busy = kernels / 1e6 / args.steps  # profiler times are in microseconds
    print(f"{args.variant}: {wall * 1e3:.1f} ms per step (profiled), GPU kernels {busy * 1e3:.1f} ms "
          f"({100 * busy / wall:.0f}% busy)")
    print(events.table(sort_by="self_device_time_total", row_limit=args.rows, max_name_column_width=60))
    print(events.table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=60))


if __name__ == "__main__":
    main()
