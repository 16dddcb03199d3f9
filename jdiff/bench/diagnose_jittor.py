"""Where a Jittor training step's wall time goes on the GPU (#6): the host or the device.

    python -m jdiff.bench.diagnose_jittor [--parts step,conv] [--variant jittor-fp16] [--steps 6] [--out diag.json]
    python -m jdiff.bench.diagnose_jittor --parts step --model tiny --resolution 64 --device cpu   # a smoke run
    python -m jdiff.bench.diagnose_jittor --parts replay,kernels --variant jittor-fp16-replay --steps 20
    perf record -g python -m jdiff.bench.diagnose_jittor --parts host --device cpu --steps 40   # any machine

``step``: the forward and backward pass of one training step (the reference method's, as ``python -m
jdiff.bench`` builds it: SD 2.1 architecture, random weights, 512 px, UNet LoRA rank 32) in three phases,
median over ``--steps`` steps after warm-up:
  build   Python building Jittor's lazy graph;
  launch  ``jt.sync(..., device_sync=False)`` returning: the executor's pass over the graph and its kernel
          launches, while the device runs what was launched;
  drain   waiting for the device after that.
A ``drain`` far below ``launch`` means the executor, not the device, sets the pace: the device keeps up with
the launches. ``whole_step`` is the engine's own ``train_step`` (with the optimizer), for scale.

``replay`` (``--variant jittor-fp16-replay`` or ``jittor-replay``): the engine's ``train_step`` through the recorded
plan (``engine.compile=replay``) in three phases, median over ``--steps`` steps after warm-up:
  prepare  the host's work before the replay: the per-step numbers, the batch copied to the device;
  launch   the replay returning: the recorded kernels launched from the plan, while the device runs them;
  wait     the rest: waiting for the device to finish, reading the losses, taking the new adapters.
A ``wait`` far above ``launch`` means the device's kernels, not the host, set the pace.

``kernels`` (CUDA only; needs torch installed beside Jittor): the GPU's own time for ``--steps`` training steps of
``--variant``, read through CUPTI by ``torch.profiler``, which records every kernel the process launches, Jittor's
included: kernels a step, the GPU busy time a step (the sum of kernel times), and the kernels taking the most time.

``conv`` (CUDA only): one cuDNN convolution at SD 2.1 shapes through ``jt.cudnn.ops.cudnn_conv``, NCHW
(``abcd``) against NHWC (``acdb``) activations with the OIHW filter, float16: milliseconds per call, each call
one executor run and its sync, and the NHWC result against the NCHW one. (Jittor's OHWI filter format does not
run: cuDNN finds no algorithm, so that layout is not offered.)

``host`` (any device; meant for the CPU under a host profiler): SD 2.1's UNet structure (every block, attention
and LoRA adapter of the real one) at tiny widths (32-64 channels, 8 x 8 latents), a training step with Jittor's
AdamW, so that the kernels do next to nothing and a step's time is Jittor's own work: building the graph,
the executor's pass over it, allocating and freeing nodes. Prints ms per step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from jdiff import bench

PARTS = ("step", "replay", "kernels", "conv", "host")
CONV_SHAPES = [(2, 320, 64, 64, 320, 3), (2, 640, 32, 32, 640, 3), (2, 1280, 16, 16, 1280, 3),
               (2, 960, 64, 64, 320, 3), (2, 128, 512, 512, 128, 3), (2, 640, 64, 64, 320, 1),
               (10, 320, 64, 64, 320, 3), (10, 1280, 16, 16, 1280, 3)]  # (batch, in, h, w, out, kernel)


def warmed_up(variant: str, model: str, resolution: int, device: str):
    """The variant loaded with four batches, after three training steps (Jittor compiles the step's kernels, and
    with replay records its plan); then Jittor."""
    engine, batches = bench.loaded_with_batches(variant, model, resolution, device)
    import jittor as jt

    bench.run_steps(variant, engine, batches, 3)
    jt.sync_all(True)
    return engine, batches, jt


def step_phases(variant: str, steps: int, model: str, resolution: int, device: str) -> dict:
    engine, batches, jt = warmed_up(variant, model, resolution, device)
    phases = {"build": [], "launch": [], "drain": [], "whole_step": []}
    for k in range(steps):
        batch = batches[k % 4]
        started = time.perf_counter()
        per_sample = engine.loss_terms(batch)
        grads = jt.grad((per_sample * jt.array(batch.weights)).sum(), engine.trainable, retain_graph=False)
        built = time.perf_counter()
        jt.sync(grads + [per_sample], False)
        launched = time.perf_counter()
        jt.sync_all(True)
        done = time.perf_counter()
        phases["build"].append(built - started)
        phases["launch"].append(launched - built)
        phases["drain"].append(done - launched)
        del grads, per_sample
        started = time.perf_counter()
        engine.train_step(batch, 1e-4)
        jt.sync_all(True)
        phases["whole_step"].append(time.perf_counter() - started)
    return {name: 1e3 * statistics.median(values) for name, values in phases.items()}


def replay_phases(variant: str, steps: int, model: str, resolution: int, device: str) -> dict:
    engine, batches, _ = warmed_up(variant, model, resolution, device)
    recorded, marks = engine._step_call, []

    def timed(inputs):
        marks.append(time.perf_counter())
        outputs = recorded(inputs)
        marks.append(time.perf_counter())
        return outputs

    engine._step_call = timed
    phases = {"prepare": [], "launch": [], "wait": [], "whole_step": []}
    for k in range(steps):
        marks.clear()
        started = time.perf_counter()
        engine.train_step(batches[k % 4], 1e-4)
        done = time.perf_counter()
        phases["prepare"].append(marks[0] - started)
        phases["launch"].append(marks[1] - marks[0])
        phases["wait"].append(done - marks[1])
        phases["whole_step"].append(done - started)
    return {name: 1e3 * statistics.median(values) for name, values in phases.items()}


def kernel_times(variant: str, steps: int, model: str, resolution: int, device: str, top: int = 25) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    engine, batches, jt = warmed_up(variant, model, resolution, device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for k in range(steps):
            engine.train_step(batches[k % 4], 1e-4)
        jt.sync_all(True)
    totals: dict[str, list] = {}  # kernel name -> [microseconds, calls]
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            total = totals.setdefault(event.name, [0.0, 0])
            total[0] += event.device_time
            total[1] += 1
    busy = sum(us for us, _ in totals.values())
    if not busy:
        raise SystemExit("--parts kernels: torch.profiler saw no CUDA kernels (does this torch have CUDA and CUPTI?)")
    ranked = sorted(totals.items(), key=lambda kv: -kv[1][0])[:top]
    return {"kernels_per_step": sum(calls for _, calls in totals.values()) / steps,
            "gpu_busy_ms_per_step": busy / steps / 1e3,
            "top": [{"kernel": name[:120], "ms_per_step": us / steps / 1e3, "share": us / busy, "calls_per_step": calls / steps}
                    for name, (us, calls) in ranked]}


def host_step(steps: int) -> float:
    import jittor as jt

    from jdiff.engines.jittor.lora import attach_lora, lora_parameters
    from jdiff.engines.jittor.unet import UNet2DConditionModel
    from jdiff.tiny_model import SD21_UNET_CONFIG

    unet = UNet2DConditionModel(dict(SD21_UNET_CONFIG, block_out_channels=(32, 32, 64, 64), norm_num_groups=8,
                                     attention_head_dim=[2, 2, 4, 4], cross_attention_dim=32))
    attach_lora(unet, ["to_q", "to_k", "to_v", "to_out.0"], 4, 4)
    params = lora_parameters(unet)
    for p in params:
        p.start_grad()
    optimizer = jt.optim.AdamW(params, lr=1e-4)
    rng = np.random.default_rng(0)
    latents = jt.array(rng.standard_normal((2, 4, 8, 8)).astype(np.float32))
    states = jt.array(rng.standard_normal((2, 77, 32)).astype(np.float32))
    timesteps = jt.array(np.array([10, 500], dtype=np.int32))

    def step():
        optimizer.step(((unet(latents, timesteps, states) - latents) ** 2).mean())
        jt.sync_all(True)

    for _ in range(3):
        step()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    return 1e3 * (time.perf_counter() - started) / steps


def conv_layouts(dtype: str = "float16", calls: int = 10) -> list[dict]:
    import jittor as jt

    rows = []
    rng = np.random.default_rng(0)
    for n, c, h, w, o, k in CONV_SHAPES:
        x = jt.array(rng.standard_normal((n, c, h, w), dtype=np.float32)).cast(dtype)
        weight = jt.array(rng.standard_normal((o, c, k, k), dtype=np.float32) / np.sqrt(c * k * k)).cast(dtype)
        layouts = {"nchw": (x, "abcd"), "nhwc": (x.transpose(0, 2, 3, 1).clone(), "acdb")}
        jt.sync_all(True)
        row, reference = {"shape": [n, c, h, w, o, k]}, None
        for name, (xi, layout) in layouts.items():
            def conv():
                return jt.cudnn.ops.cudnn_conv(xi, weight, 1, 1, k // 2, k // 2, 1, 1, 1, layout, "oihw", layout)

            out = conv().float32().numpy()
            out = out if layout == "abcd" else out.transpose(0, 3, 1, 2)
            reference = out if reference is None else reference
            row[f"{name}_max_rel_err"] = float(np.abs(out - reference).max() / np.abs(reference).max())
            jt.sync_all(True)
            started = time.perf_counter()
            for _ in range(calls):
                conv().sync()
            jt.sync_all(True)
            row[f"{name}_ms_per_call"] = (time.perf_counter() - started) * 1e3 / calls
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m jdiff.bench.diagnose_jittor",
                                     description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="step,conv", help=f"comma-separated, from {', '.join(PARTS)}")
    parser.add_argument("--variant", default="jittor-fp16", help="a Jittor variant of python -m jdiff.bench",
                        choices=[v for v in bench.VARIANTS if v.startswith("jittor")])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--model", default="sd21_random", choices=["sd21_random", "tiny"])
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    parts = args.parts.split(",")
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"--parts {args.parts}: unknown {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    for part, needs in (("conv", "times cuDNN"), ("kernels", "reads CUDA kernel times")):
        if part in parts and args.device == "cpu":  # before the other parts run, not after
            parser.error(f"--parts {part} {needs}: it needs --device cuda")
    if "kernels" in parts:  # CUPTI through torch; torch is imported before Jittor, as on the device machine
        try:
            import torch  # noqa: F401
        except ImportError:
            parser.error("--parts kernels reads the kernel times through torch.profiler: install torch beside Jittor")
    if "replay" in parts and bench.VARIANTS[args.variant].get("compile") != "replay":
        parser.error(f"--parts replay times the recorded step: use --variant jittor-fp16-replay or jittor-replay, "
                     f"not {args.variant}")
    from jdiff.engines.jittor.env import import_jittor, use_device

    use_device(import_jittor(), args.device)
    result = {}
    if "step" in parts:
        result["step_ms"] = step_phases(args.variant, args.steps, args.model, args.resolution, args.device)
        print("step phases, ms:", json.dumps(result["step_ms"]), flush=True)
    if "replay" in parts:
        result["replay_ms"] = replay_phases(args.variant, args.steps, args.model, args.resolution, args.device)
        print("replayed step phases, ms:", json.dumps(result["replay_ms"]), flush=True)
    if "kernels" in parts:
        result["kernels"] = kernel_times(args.variant, args.steps, args.model, args.resolution, args.device)
        k = result["kernels"]
        print(f"kernels: {k['kernels_per_step']:.0f} a step, GPU busy {k['gpu_busy_ms_per_step']:.1f} ms a step", flush=True)
        for row in k["top"]:
            print(f"  {row['ms_per_step']:8.2f} ms {100 * row['share']:5.1f}% {row['calls_per_step']:6.1f} calls  {row['kernel']}")
    if "host" in parts:
        result["host_ms_per_step"] = host_step(args.steps)
        print(f"host: {result['host_ms_per_step']:.1f} ms per step (SD 2.1's UNet structure, tiny widths)", flush=True)
    if "conv" in parts:
        result["conv_float16"] = conv_layouts()
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
