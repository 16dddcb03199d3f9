"""Benchmark (not a test): the same sweep of N short tiny-model runs, one job at a time and two at a time.

    python -m jdiff.bench.sweep                   # CPU: n_jobs=1, then n_jobs=2 (no GPU)
    python -m jdiff.bench.sweep --gpus 0,1        # a 2-GPU machine: gpus=[0], then gpus=[0,1]
    python -m jdiff.bench.sweep --runs 8 --train-steps 20 --threads 1 engine=torch   # threads: a torch option
    python -m jdiff.bench.sweep --gpus 0,1 engine=torch   # extra arguments: overrides for every run

Each sweep is the real command (``python -m jdiff.main -m ...``, joblib launcher, a process per run) in a
scratch root. A one-run warm-up first builds the tiny model, the demo styles and the class images, so the
timed sweeps do the same work. Prints each sweep's wall time and the speed-up of the parallel one.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jdiff
from jdiff import rundir

SOURCE = str(Path(jdiff.__file__).resolve().parents[1])  # each run imports the same jdiff as this process


def sweep(root: Path, name: str, ranks: list[int], overrides: list[str]) -> float:
    command = [sys.executable, "-m", "jdiff.main", "-m", f"sweep.name={name}",
               "lora.unet_rank=" + ",".join(map(str, ranks)), *overrides]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (SOURCE, os.environ.get("PYTHONPATH")) if p)}
    started = time.perf_counter()
    done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"sweep {name} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    states = [rundir.inspect(p) for p in (root / "multirun" / name).iterdir() if p.is_dir()]
    failed = [s for s in states if s.status != "complete"]
    if failed:
        sys.exit(f"sweep {name}: {len(failed)} runs did not finish, e.g. {failed[0].path}: "
                 f"{failed[0].failure or failed[0].problem or failed[0].status}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m jdiff.bench.sweep",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=6, help="runs per sweep (LoRA ranks 1..N)")
    parser.add_argument("--train-steps", type=int, default=10)
    parser.add_argument("--infer-steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None,
                        help="engine.threads per run, a torch engine option: add engine=torch (default: all cores)")
    parser.add_argument("--gpus", default=None, help="two GPU ids, e.g. 0,1: compare one GPU with both")
    parser.add_argument("--root", type=Path, default=None, help="scratch root (default: a temporary folder)")
    parser.add_argument("overrides", nargs="*", help="config overrides for every run, e.g. engine=torch")
    args = parser.parse_args()

    root = args.root or Path(tempfile.mkdtemp(prefix="jdiff-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    common = ["experiment=demo", f"train.steps={args.train_steps}", f"infer.steps={args.infer_steps}",
              "prior.images_per_object=1", *args.overrides]
    if args.threads:
        common.append(f"engine.threads={args.threads}")
    if args.gpus:
        gpus = args.gpus.split(",")
        settings = {"1 GPU": [f"gpus=[{gpus[0]}]"], f"{len(gpus)} GPUs": [f"gpus=[{args.gpus}]"]}
    else:
        settings = {"n_jobs=1": ["gpus=[]", "n_jobs=1"], "n_jobs=2": ["gpus=[]", "n_jobs=2"]}
    stamp = time.strftime("%H%M%S")

    print(f"machine: {platform.node()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    print(f"{args.runs} runs per sweep: {' '.join(common)}; root {root}")
    sweep(root, f"bench-warmup-{stamp}", [1], common + next(iter(settings.values())))
    times = {}
    for label, overrides in settings.items():
        times[label] = sweep(root, f"bench-{label.replace(' ', '').replace('=', '')}-{stamp}",
                             list(range(1, args.runs + 1)), common + overrides)
        print(f"  {label:<10} {times[label]:8.1f} s   {times[label] / args.runs:6.1f} s/run")
    serial, parallel = times.values()
    print(f"speed-up of the parallel sweep: {serial / parallel:.2f}x")


if __name__ == "__main__":
    main()
