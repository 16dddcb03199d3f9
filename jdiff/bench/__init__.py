"""Speed and memory of jdiff's engines against the reference DreamBooth-LoRA baseline, on one GPU.

    python -m jdiff.bench                                     # SD 2.1 (random weights), 512 px, all sections
    python -m jdiff.bench --variants baseline,torch-bf16 --sections train
    python -m jdiff.bench --model tiny --device cpu --resolution 64 --steps 2 --images 2   # a smoke run

Sections (each variant x section runs in a fresh process, so memory and compile caches do not carry over):

- ``train``: steps/s of the reference method's step (1 style image + 1 prior image, UNet LoRA rank 32 on
  to_q/k/v/out, VAE encode and text encoder included, AdamW, gradient clipping), after warm-up steps;
  peak GPU memory (the process's, read from nvidia-smi while it runs; torch's allocator peak as well).
- ``generate``: seconds for one style's images (default 25: batches of 5, 40 steps, img2img at strength 0.9,
  guidance 7.5), after one warm-up batch.
  ``--inject styleid``: the same images stylised by StyleID (jdiff/inject.py; its DDIM inversions and injected
  sampling on top of each batch; the style's own inversion falls in the warm-up).
- ``check``: correctness of each speed path: five training steps' losses and one batch of images from the
  same inputs, against the fp32 torch engine, within limits set by the variant's precision (CHECK_LIMITS).
- ``e2e``: one style end to end through ``python -m jdiff.main`` (800 steps + the images + the Hist score),
  with the class-image cache warmed by an earlier run, wall time of the whole command; also its stages'
  seconds, and from its loss log the first training step's seconds and the loop's steps/s after it.

Variants: ``baseline`` is plain diffusers + peft in fp32 the way the reference DreamBooth-LoRA script runs
(text encoder and VAE every step, a loss.item() every step); the others are jdiff engines with settings
(see VARIANTS). The model is ``model=sd21_random``: the SD 2.1 architecture at full size with random weights
(weights do not change the cost). Prints a table, ratios to the baseline last, and writes JSON (--out).

The package's other benchmarks and GPU diagnostics, each ``python -m jdiff.bench.<name> --help``:

    sweep              N tiny-model runs one at a time, then two at a time (or on 1 GPU, then 2); the speed-up
    scoring            the scoring's speed: 15 styles x 25 images, cold and warm caches, each metric alone
    determinism        GPU: the demo run again, deterministic, on another GPU and on the CPU; how far apart
    profile_train      GPU: the torch or Jittor profiler over a few training steps of a variant above
    model_load         GPU: where the torch engine's load time goes
    group_norm         GPU: the torch engine's Triton GroupNorm against PyTorch's at SD 2.1 shapes
    jittor_attention   GPU: the Jittor engine's fused attention against a float64 reference, and its speed
    jittor_kernels     GPU: the Jittor engine's transpose, GroupNorm and convolution kernels against Jittor's ops
    attention_forward  GPU, without Jittor: the float16 attention forward kernel built with nvcc, checked, timed
    diagnose_jittor    GPU: a Jittor step's time split between the host and the device; cuDNN convolutions

The shell scripts that run them on a GPU machine (all of docs/benchmarks.md's measurements; A against B from two
source trees) are in the checkout's bench/ folder.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np

from jdiff import rundir
from jdiff.bench.baseline import RANK, TARGETS, Baseline
from jdiff.bench.memory import GpuMemoryWatch

VARIANTS = {
    "baseline": {},
    "torch": {"engine": "torch"},
    "torch-bf16": {"engine": "torch", "mixed_precision": "bf16"},
    "torch-bf16-compile": {"engine": "torch", "mixed_precision": "bf16", "compile": "default"},
    "torch-bf16-graphs": {"engine": "torch", "mixed_precision": "bf16", "compile": "reduce-overhead"},
    "torch-cudagraphs": {"engine": "torch", "compile": "cuda-graphs"},
    "torch-bf16-cudagraphs": {"engine": "torch", "mixed_precision": "bf16", "compile": "cuda-graphs"},
    "torch-bf16-cudagraphs-cl": {"engine": "torch", "mixed_precision": "bf16", "compile": "cuda-graphs",
                                 "channels_last": True},
    "torch-bf16-cudagraphs-triton": {"engine": "torch", "mixed_precision": "bf16", "compile": "cuda-graphs",
                                     "group_norm": "triton"},
    "torch-bf16-cudagraphs-triton-cl": {"engine": "torch", "mixed_precision": "bf16", "compile": "cuda-graphs",
                                        "group_norm": "triton", "channels_last": True},
    "jittor": {"engine": "jittor"},
    "jittor-fp16": {"engine": "jittor", "mixed_precision": "fp16"},
    "jittor-replay": {"engine": "jittor", "compile": "replay"},
    "jittor-fp16-replay": {"engine": "jittor", "mixed_precision": "fp16", "compile": "replay"},
}
SECTIONS = ("train", "generate", "e2e", "check")
REFERENCE = "torch"  # the fp32 engine every speed path is checked against
# allowed difference from the reference: max relative loss difference, mean absolute pixel difference (levels)
CHECK_LIMITS = {"no": (1e-3, 1.0), "bf16": (3e-2, 8.0), "fp16": (1e-2, 4.0)}
CHECK_STEPS = 5  # training steps compared; with cuda-graphs, the first two run eagerly and the rest replay
STYLE_PROMPT, PRIOR_PROMPT = "an image of wheat field in style_00", "an image of wheat field"
OBJECTS = ["Dolphin", "Lighthouse", "Bicycle", "Owl", "Violin"]
E2E_OBJECTS = 25


# -- one measurement, in its own process --------------------------------------------------------------------


def train_batches(model_dir: Path, resolution: int, latent: tuple, count: int):
    """``count`` batches of the reference step: one style image and one prior image, random pixels and noise."""
    from jdiff.engines.base import TrainBatch
    from jdiff.schedule import NoiseSchedule

    schedule = NoiseSchedule.from_model(model_dir)
    rng = np.random.default_rng(0)
    for _ in range(count):
        timesteps = rng.integers(0, schedule.num_train_timesteps, size=2).astype(np.int64)
        signal, noise_level = schedule.coefficients(timesteps)
        yield TrainBatch(
            pixels=rng.uniform(-1, 1, (2, 3, resolution, resolution)).astype(np.float32),
            prompts=[STYLE_PROMPT, PRIOR_PROMPT], weights=np.ones(2, np.float32), timesteps=timesteps,
            signal=signal, noise_level=noise_level, noise=rng.standard_normal((2, *latent)).astype(np.float32),
            posterior_noise=rng.standard_normal((2, *latent)).astype(np.float32))


def generate_requests(resolution: int, latent: tuple, images: int, batch: int, steps: int):
    from jdiff.engines.base import GenerateRequest

    rng = np.random.default_rng(1)
    init = rng.uniform(-1, 1, (3, resolution, resolution)).astype(np.float32)  # the average style image
    for start in range(0, images, batch):
        n = min(batch, images - start)
        prompts = [f"an image of {OBJECTS[(start + k) % len(OBJECTS)]} in style_00" for k in range(n)]
        yield GenerateRequest(prompts=prompts, noise=rng.standard_normal((n, *latent)).astype(np.float32),
                              steps=steps, guidance_scale=7.5, init_image=init, strength=0.9,
                              init_posterior_noise=rng.standard_normal((n, *latent)).astype(np.float32))


def load(variant: str, model_dir: Path, device: str):
    settings = dict(VARIANTS[variant])
    if not settings:
        return Baseline(model_dir, "cuda" if device == "auto" else device)
    from jdiff.engines.base import LoraSpec, OptimizerSettings, create_engine

    engine = create_engine(settings.pop("engine"), model_dir, device=device, **settings)
    engine.add_lora(LoraSpec(unet_rank=RANK, unet_alpha=RANK, unet_targets=TARGETS))
    engine.setup_training(OptimizerSettings(lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                                            max_grad_norm=1.0, text_encoder_lr_ratio=1.0))
    return engine


def loaded_with_batches(variant: str, model: str, resolution: int, device: str, cache: str = "data/cache/bench"):
    """A variant loaded as ``measure`` loads it, and four batches of the reference training step: for the scripts
    beside this one that look inside one variant's steps (profile_train, diagnose_jittor)."""
    from jdiff.tiny_model import ensure_tiny_model

    model_dir = ensure_tiny_model(Path(cache) / "models", architecture=model)
    engine = load(variant, model_dir, device)
    return engine, list(train_batches(model_dir, resolution, engine.latent_shape(resolution), 4))


def torch_peak_gib() -> Optional[float]:
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return torch.cuda.max_memory_allocated() / 2**30


def measure(variant: str, section: str, args) -> dict:
    """Run one variant's section here; returns its numbers."""
    from jdiff.tiny_model import ensure_tiny_model

    model_dir = ensure_tiny_model(Path(args.cache) / "models", architecture=args.model)
    started = time.perf_counter()
    engine = load(variant, model_dir, args.device)
    result = {"load_s": time.perf_counter() - started}
    latent = engine.latent_shape(args.resolution)
    if section == "check":
        return numbers_to_check(variant, engine, model_dir, latent, args)
    if section == "train":
        batches = list(train_batches(model_dir, args.resolution, latent, 4))
        started = time.perf_counter()
        run_steps(variant, engine, batches, args.warmup)
        result["warmup_s"] = time.perf_counter() - started
        started = time.perf_counter()
        run_steps(variant, engine, batches, args.steps)
        seconds = time.perf_counter() - started
        result.update(steps=args.steps, steps_per_s=args.steps / seconds)
    else:
        requests = list(generate_requests(args.resolution, latent, args.images, args.batch, args.infer_steps))
        make = engine.generate
        if args.inject == "styleid":  # the images stylised by StyleID; the style's inversion is in the warm-up
            if variant == "baseline":
                return {"skipped": "inject=styleid runs on jdiff's engines only"}
            from jdiff.inject import InjectSettings, StyleID

            make = StyleID(engine, InjectSettings(inversion_steps=args.inversion_steps), requests[0].init_image).generate
            result.update(inject="styleid", inversion_steps=args.inversion_steps)
        started = time.perf_counter()
        make(requests[0])
        result["warmup_s"] = time.perf_counter() - started
        started = time.perf_counter()
        images = sum(len(make(r)) for r in requests)
        result.update(images=images, generate_s=time.perf_counter() - started)
    result["torch_peak_gib"] = torch_peak_gib()
    result.update(jittor_memory())
    return result


def jittor_memory() -> dict:
    """On Jittor's GPU path, what this process holds now (nvidia-smi) and after ``jt.gc()`` hands the allocator's
    cached blocks back: their difference is memory kept for reuse, not memory the step needs."""
    jt = sys.modules.get("jittor")
    if jt is None or not jt.flags.use_cuda:
        return {}
    from jdiff.bench.memory import process_gib
    from jdiff.engines.jittor.env import cudnn_workspace_gib

    jt.sync_all(True)
    held = process_gib(os.getpid())
    jt.gc()
    return {"jittor_held_gib": held, "jittor_after_gc_gib": process_gib(os.getpid()),
            "cudnn_workspace_cap_gib": cudnn_workspace_gib()}


def run_steps(variant: str, engine, batches: list, count: int) -> None:
    """``count`` training steps, each one's loss brought to the host, the way each side trains: the baseline
    reads its loss after every step (loss.item()); jdiff's loop reads a step's losses after queuing the next."""
    if variant == "baseline":
        for k in range(count):
            engine.train_step(batches[k % len(batches)])
        return
    from jdiff.train import run_one_ahead

    run_one_ahead(engine, ((batches[k % len(batches)], 1e-4) for k in range(count)), lambda *done: None)


def numbers_to_check(variant: str, engine, model_dir: Path, latent: tuple, args) -> dict:
    """CHECK_STEPS training steps' losses, then one batch of images, on fixed inputs: saved for ``compare``."""
    losses = [engine.train_step(batch, 1e-4) for batch in train_batches(model_dir, args.resolution, latent, CHECK_STEPS)]
    request = next(generate_requests(args.resolution, latent, args.batch, args.batch, args.infer_steps))
    images = np.stack(engine.generate(request))
    path = check_file(variant, args)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, losses=np.stack(losses), images=images)
    return {"saved": str(path)}


def check_file(variant: str, args) -> Path:
    """Where a variant's check numbers go; named by every setting they depend on."""
    name = f"{variant}-{args.model}-{args.device}-{args.resolution}px-{CHECK_STEPS}-{args.batch}x{args.infer_steps}.npz"
    return Path(args.cache) / "check" / name


def compare(variant: str, args) -> dict:
    """How far a variant's numbers are from the fp32 reference's, against the limits for its precision."""
    ours, ref = np.load(check_file(variant, args)), np.load(check_file(REFERENCE, args))
    loss_error = float(np.max(np.abs(ours["losses"] - ref["losses"]) / np.abs(ref["losses"])))
    pixel_error = float(np.mean(np.abs(ours["images"].astype(np.float64) - ref["images"])))
    loss_limit, pixel_limit = CHECK_LIMITS[VARIANTS[variant].get("mixed_precision", "no")]
    return {"loss_rel_error": loss_error, "pixel_mean_abs_error": pixel_error, "limits": [loss_limit, pixel_limit],
            "ok": loss_error <= loss_limit and pixel_error <= pixel_limit}


# -- end to end, through the CLI ----------------------------------------------------------------------------


def write_bench_style(root: Path) -> Path:
    """Style 00 for the end-to-end run: 10 drawn images and 25 objects to generate."""
    from jdiff.demo_data import DEMO_STYLES, draw_image
    from jdiff.scoring.clip import load_clip_r_names

    folder = root / "00"
    if (folder / "prompt.json").exists():
        return root
    (folder / "images").mkdir(parents=True, exist_ok=True)
    palette, motif, _, _ = DEMO_STYLES["00"]
    names = load_clip_r_names()
    for k in range(10):
        draw_image(palette, motif, seed=k).resize((512, 512)).save(folder / "images" / f"{names[50 + k]}.png")
    prompts = {str(i): name.title() for i, name in enumerate(names[:E2E_OBJECTS])}
    (folder / "prompt.json").write_text(json.dumps(prompts, indent=1))
    return root


def end_to_end(variant: str, args) -> dict:
    settings = dict(VARIANTS[variant])
    if not settings:
        return {"skipped": "the baseline has no end-to-end command"}
    root = Path(args.cache) / "e2e"
    styles = write_bench_style(root / "styles")
    overrides = [f"model={args.model}", f"model.path={Path(args.cache).resolve() / 'models'}",
                 f"data.root={styles.resolve()}", "style=00", f"data.resolution={args.resolution}",
                 "score=hist", f"train.steps={args.e2e_steps}", f"infer.steps={args.infer_steps}",
                 "prior.images_per_object=1", f"paths.root={root.resolve()}", f"engine.device={args.device}"]
    overrides += [f"engine={settings.pop('engine')}"] + [f"engine.{k}={v}" for k, v in settings.items()]
    command = [sys.executable, "-m", "jdiff.main", *overrides]
    run_dir = root / "runs" / f"{variant}-{time.strftime('%Y%m%d-%H%M%S')}"
    warm = subprocess.run(command + ["stages=[prior]", f"hydra.run.dir={run_dir}-prior"], capture_output=True,
                          text=True)
    if warm.returncode:
        return {"error": warm.stderr[-2000:]}
    started = time.perf_counter()
    done = subprocess.run(command + [f"hydra.run.dir={run_dir}"], capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode:
        return {"error": done.stderr[-2000:]}
    stage_seconds = (rundir.inspect(run_dir).complete or {}).get("stage_seconds")
    return {"e2e_s": seconds, "train_steps": args.e2e_steps, "run_dir": str(run_dir), "stage_seconds": stage_seconds,
            **loop_speed(run_dir / "loss.csv")}


def loop_speed(loss_log: Path) -> dict:
    """From a run's loss log (seconds since training started, at each step's record): the first step's
    seconds (recording, compiling) apart from the pace of the pipeline's loop after it, to set against the
    train section's steps/s (prepared batches, no pipeline)."""
    with open(loss_log, newline="") as f:
        seconds = [float(row["seconds"]) for row in csv.DictReader(f)]
    span = seconds[-1] - seconds[0] if len(seconds) > 1 else 0.0
    # A step's loss is read once the next step is queued, so the last two records can share one instant:
    # over too few steps the span may be zero, and the pace is then unknown (None), not infinite.
    return {"first_step_s": seconds[0] if seconds else None,
            "loop_steps_per_s": (len(seconds) - 1) / span if span > 0 else None}


# -- the parent: one child process per measurement ----------------------------------------------------------


def run_child(variant: str, section: str, argv: list[str]) -> dict:
    command = [sys.executable, "-m", "jdiff.bench", "--child", variant, section, *argv]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    watch = GpuMemoryWatch(child.pid)
    out, err = child.communicate()
    peak = watch.stop()
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if child.returncode or not lines:
        return {"error": err.strip()[-1500:] or f"exit {child.returncode}"}
    return {**json.loads(lines[-1]), "gpu_peak_gib": peak}


def machine() -> dict:
    info = {"python": platform.python_version(), "host": platform.node(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "jdiff": str(Path(__file__).resolve().parents[1])}
    try:
        info["gpu"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                                     capture_output=True, text=True, timeout=30).stdout.strip()
    except OSError:
        info["gpu"] = None
    for name in ("torch", "diffusers", "peft", "jittor"):
        try:
            info[name] = __import__("importlib.metadata").metadata.version(name)
        except Exception:
            info[name] = None
    return info


def table(results: dict) -> str:
    rows = ["| variant | train steps/s | train peak GiB (process / torch) | generate s | e2e s |",
            "| --- | --- | --- | --- | --- |"]
    fmt = lambda x, spec: "-" if x is None else format(x, spec)
    for variant, sections in results.items():
        train, gen, e2e = (sections.get(s, {}) for s in ("train", "generate", "e2e"))
        rows.append(f"| {variant} | {fmt(train.get('steps_per_s'), '.2f')} | "
                    f"{fmt(train.get('gpu_peak_gib'), '.2f')} / {fmt(train.get('torch_peak_gib'), '.2f')} | "
                    f"{fmt(gen.get('generate_s'), '.1f')} | {fmt(e2e.get('e2e_s'), '.1f')} |")
    base = results.get("baseline", {})
    b_train, b_gen = base.get("train", {}).get("steps_per_s"), base.get("generate", {}).get("generate_s")
    rows.append("")
    for variant, sections in results.items():
        speed = sections.get("train", {}).get("steps_per_s")
        gen = sections.get("generate", {}).get("generate_s")
        ratios = []
        if b_train and speed:
            ratios.append(f"train {speed / b_train:.2f}x")
        if b_gen and gen:
            ratios.append(f"generate {b_gen / gen:.2f}x")
        if ratios and variant != "baseline":
            rows.append(f"{variant} vs baseline: " + ", ".join(ratios))
    for variant, sections in results.items():
        check = sections.get("check", {})
        if "ok" in check:
            rows.append(f"{variant} vs fp32 {REFERENCE}: loss rel error {check['loss_rel_error']:.1e}, images "
                        f"{check['pixel_mean_abs_error']:.2f} levels: {'ok' if check['ok'] else 'FAIL'}")
        elif "error" in check:
            rows.append(f"{variant} check: FAIL ({check['error'][-200:]})")
    return "\n".join(rows)


def parse(argv):
    parser = argparse.ArgumentParser(prog="python -m jdiff.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="baseline,torch,torch-bf16,jittor",
                        help=f"comma-separated, from {', '.join(VARIANTS)}")
    parser.add_argument("--sections", default="check,train,generate,e2e", help=f"comma-separated, from {', '.join(SECTIONS)}")
    parser.add_argument("--model", default="sd21_random", choices=["sd21_random", "tiny"])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--steps", type=int, default=30, help="timed training steps")
    parser.add_argument("--warmup", type=int, default=5, help="training steps before timing")
    parser.add_argument("--images", type=int, default=25)
    parser.add_argument("--batch", type=int, default=5)
    parser.add_argument("--infer-steps", type=int, default=40)
    parser.add_argument("--inject", default="none", choices=["none", "styleid"],
                        help="generate: the images as they are, or stylised by StyleID (inject=styleid's defaults)")
    parser.add_argument("--inversion-steps", type=int, default=20, help="--inject styleid: inject.inversion_steps")
    parser.add_argument("--e2e-steps", type=int, default=800)
    parser.add_argument("--cache", default="data/cache/bench", help="where the model and e2e runs go")
    parser.add_argument("--out", default=None, help="JSON file for the results")
    parser.add_argument("--child", nargs=2, metavar=("VARIANT", "SECTION"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in args.variants.split(","):
        if name not in VARIANTS:
            parser.error(f"--variants: {name!r} is not one of {', '.join(VARIANTS)}")
    for name in args.sections.split(","):
        if name not in SECTIONS:
            parser.error(f"--sections: {name!r} is not one of {', '.join(SECTIONS)}")
    return args


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    if args.child:
        print(json.dumps(measure(*args.child, args)), flush=True)
        return 0
    from jdiff.tiny_model import ensure_tiny_model

    started = time.perf_counter()
    ensure_tiny_model(Path(args.cache) / "models", architecture=args.model)
    print(f"model {args.model} ready in {time.perf_counter() - started:.0f} s", flush=True)
    results: dict = {}
    variants = args.variants.split(",")
    if "check" in args.sections.split(",") and (REFERENCE in variants or not check_file(REFERENCE, args).exists()):
        # the reference first, so that every check has it; an earlier run's numbers serve when it is not asked for
        variants = [REFERENCE] + [v for v in variants if v != REFERENCE]
    for variant in variants:
        for section in args.sections.split(","):
            if section == "check" and variant == "baseline":
                got = {"skipped": "the baseline draws its own noise; it is the speed reference only"}
            elif section == "check":
                got = run_child(variant, section, argv)
                got = got if "error" in got or variant == REFERENCE else {**got, **compare(variant, args)}
            elif section == "e2e":
                got = end_to_end(variant, args)
            else:
                got = run_child(variant, section, argv)
            results.setdefault(variant, {})[section] = got
            print(f"{variant:>20} {section:>8}: {json.dumps(got)}", flush=True)
    report = {"machine": machine(), "args": {k: v for k, v in vars(args).items() if k != "child"},
              "results": results}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"\n{report['machine']}\n{table(results)}")
    failed = [v for v, sections in results.items() if sections.get("check", {}).get("ok") is False
              or "error" in sections.get("check", {})]
    return 1 if failed else 0

