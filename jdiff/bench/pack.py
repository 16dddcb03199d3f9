"""``python -m jdiff.bench.pack --variant torch-bf16-cudagraphs-triton-cl --packs 1,4,8,16``: packed training
throughput, in run-steps per second, against the same engine training one run at a time (sweep.pack=1).

Each K runs in a fresh process (memory and recorded graphs do not carry over): K runs' adapters (rank 32 on
the attention projections, the reference step of one style and one class image per run) trained together on
``model=sd21_random`` at 512 px. Prints one JSON line per K and a table; the ratio is against K=1 unpacked in
the same call.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from jdiff.bench import VARIANTS, load, torch_peak_gib, train_batches
from jdiff.bench.baseline import RANK, TARGETS
from jdiff.bench.memory import GpuMemoryWatch


def measure(variant: str, runs: int, args) -> dict:
    from jdiff.engines.base import LoraSpec, OptimizerSettings, create_engine
    from jdiff.pack import concat_batches
    from jdiff.tiny_model import ensure_tiny_model

    model_dir = ensure_tiny_model(Path(args.cache) / "models", architecture=args.model)
    if runs == 0:  # the unpacked engine: today's one run per process
        engine = load(variant, model_dir, args.device)
        batches = list(train_batches(model_dir, args.resolution, engine.latent_shape(args.resolution), 4))
        step = lambda i: engine.start_train_step(batches[i % 4], 1e-4)
        per_step = 1
    else:
        settings = dict(VARIANTS[variant])
        engine = create_engine(settings.pop("engine"), model_dir, device=args.device, **settings)
        engine.add_packed_lora([LoraSpec(unet_rank=RANK, unet_alpha=RANK, unet_targets=TARGETS, seed=k)
                                for k in range(runs)])
        engine.setup_packed_training([OptimizerSettings(lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                                                        max_grad_norm=1.0, text_encoder_lr_ratio=1.0)] * runs)
        single = list(train_batches(model_dir, args.resolution, engine.latent_shape(args.resolution), 4))
        batches = [concat_batches([single[(i + k) % 4] for k in range(runs)]) for i in range(4)]
        step = lambda i: engine.start_packed_train_step(batches[i % 4], np.full(runs, 1e-4))
        per_step = runs
    pending = None
    for i in range(args.warmup):
        pending = step(i)
    pending()
    started = time.perf_counter()
    for i in range(args.steps):
        done = step(i)
        if pending:
            pending()
        pending = done
    pending()
    seconds = time.perf_counter() - started
    return {"variant": variant, "runs": runs or 1, "packed": runs > 0, "steps_per_s": round(args.steps / seconds, 2),
            "run_steps_per_s": round(per_step * args.steps / seconds, 2), "torch_peak_gib": torch_peak_gib()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m jdiff.bench.pack", description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="torch-bf16-cudagraphs-triton-cl", choices=sorted(VARIANTS))
    parser.add_argument("--packs", default="1,4,8,16", help="the pack sizes K to measure")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--model", default="sd21_random")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--cache", default="data/cache/bench")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        print("RESULT " + json.dumps(measure(args.variant, args.child, args)), flush=True)
        return
    results = []
    for runs in [0, *map(int, args.packs.split(","))]:
        command = [sys.executable, "-m", "jdiff.bench.pack", "--child", str(runs),
                   *[a for a in (argv if argv is not None else sys.argv[1:])]]
        child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        watch = GpuMemoryWatch(child.pid)
        out, _ = child.communicate()
        peak = watch.stop()
        lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
        result = json.loads(lines[-1][7:]) if lines else {"variant": args.variant, "runs": runs or 1,
                                                           "packed": runs > 0, "error": out[-800:]}
        result["process_peak_gib"] = round(peak, 2) if peak else None
        results.append(result)
        print(json.dumps(result), flush=True)
    base = results[0].get("run_steps_per_s")
    print(f"\n{args.variant}, {args.model} {args.resolution}px, rank {RANK}, one style + one class image per run")
    print("| K | packed | run-steps/s | x sweep.pack=1 | peak GiB (process) |")
    print("| --- | --- | --- | --- | --- |")
    for r in results:
        rate = r.get("run_steps_per_s")
        ratio = f"{rate / base:.2f}" if rate and base else "-"
        print(f"| {r['runs']} | {'yes' if r['packed'] else 'no'} | {rate or r.get('error', '')[:60]} | {ratio} | "
              f"{r.get('process_peak_gib')} |")
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
