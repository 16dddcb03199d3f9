"""Where a training step's time goes (#6): a profiler over a few steps of one bench variant.

    python -m jdiff.bench.profile_train --variant torch-bf16-cudagraphs-triton-cl
    python -m jdiff.bench.profile_train --variant jittor-fp16 --steps 5 --rows 30
    python -m jdiff.bench.profile_train --variant jittor --model tiny --resolution 64 --device cpu   # a smoke run

Loads the variant the way ``python -m jdiff.bench`` does (SD 2.1 architecture with random weights at 512 px
by default, UNet LoRA rank 32), runs warm-up steps (compiling, for compiled variants and Jittor), then
profiles ``--steps`` steps: torch's profiler for the baseline and torch variants, Jittor's for Jittor ones.
Prints the wall time per step, the time spent in kernels (the rest is launch overhead and host work), and
the kernels that took longest; Jittor's fused kernels are grouped by the ops they fuse.
"""

from __future__ import annotations

import argparse
import re
import time
from collections import Counter

from jdiff import bench


def torch_profile(run_steps, steps: int, rows: int, cuda: bool) -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    with profile(activities=activities) as prof:
        started = time.perf_counter()
        run_steps()
        sync()
        wall = (time.perf_counter() - started) / steps
    events = prof.key_averages()
    if cuda:
        kernels = sum(e.self_device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
        busy = kernels / 1e6 / steps  # the profiler counts microseconds
        print(f"{wall * 1e3:.1f} ms per step (profiled), GPU kernels {busy * 1e3:.1f} ms ({100 * busy / wall:.0f}% busy)")
        print(events.table(sort_by="self_device_time_total", row_limit=rows, max_name_column_width=60))
    else:
        print(f"{wall * 1e3:.1f} ms per step (profiled)")
    print(events.table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=60))


def fused_ops(name: str) -> str:
    """A Jittor kernel's name lists the ops fused into it (``«opkey0:broadcast_to«...«opkey1:binary«...«OP:add``):
    their kinds, with the operator of binary/unary/reduce ops, e.g. ``broadcast_to+binary.multiply+reduce.add``."""
    kinds = []
    for part in re.split(r"«opkey\d+:", name)[1:]:
        kind = part.split("«", 1)[0]
        op = re.search(r"«OP:(\w+)", part)
        kinds.append(f"{kind}.{op.group(1)}" if op and kind in ("binary", "unary", "reduce") else kind)
    return "+".join(kinds) or name[:60]


def jittor_profile(run_steps, steps: int, rows: int) -> None:
    import jittor as jt

    jt.sync_all(True)
    with jt.profile_scope() as report:
        started = time.perf_counter()
        run_steps()
        jt.sync_all(True)
        wall = (time.perf_counter() - started) / steps
    header, table = report[0], report[1:]
    name, count, total = header.index("Name"), header.index("Count"), header.index("TotalTime")
    seconds, calls = Counter(), Counter()
    for row in table:  # TotalTime is in ns
        seconds[fused_ops(row[name])] += float(row[total]) / 1e9 / steps
        calls[fused_ops(row[name])] += int(row[count]) // steps
    busy = sum(seconds.values())
    print(f"{wall * 1e3:.1f} ms per step (profiled), kernels {busy * 1e3:.1f} ms ({100 * busy / wall:.0f}% busy), "
          f"{sum(calls.values())} kernel launches per step, {len(table)} distinct kernels")
    print(f"{'ms/step':>9} {'share':>6} {'calls':>6}  fused ops")
    for kinds, sec in seconds.most_common(rows):
        print(f"{sec * 1e3:9.2f} {100 * sec / busy:5.1f}% {calls[kinds]:6d}  {kinds[:110]}")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m jdiff.bench.profile_train",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="torch-bf16-cudagraphs-triton-cl", choices=list(bench.VARIANTS))
    parser.add_argument("--model", default="sd21_random", choices=["sd21_random", "tiny"])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--cache", default="data/cache/bench", help="as python -m jdiff.bench's")
    args = parser.parse_args()

    engine, batches = bench.loaded_with_batches(args.variant, args.model, args.resolution, args.device, args.cache)
    bench.run_steps(args.variant, engine, batches, args.warmup)
    run_steps = lambda: bench.run_steps(args.variant, engine, batches, args.steps)

    print(f"{args.variant}, {args.model} at {args.resolution} px on {args.device}:")
    if args.variant.startswith("jittor"):
        jittor_profile(run_steps, args.steps, args.rows)
    else:
        torch_profile(run_steps, args.steps, args.rows, cuda=args.device.startswith("cuda"))


if __name__ == "__main__":
    main()
