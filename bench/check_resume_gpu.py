"""GPU check of issue #21's trainer features with the torch engine on CUDA (engine=torch_fast: bf16 and the whole
training step as a CUDA graph; engine=torch: fp32, fused AdamW): a run killed after a checkpoint and resumed vs.
an uninterrupted one (the adapter's largest difference, and whether it is bit-identical), samples during
training (the adapter unchanged; the last samples against the final images), and the TensorBoard log read by
TensorBoard's EventAccumulator. From the checkout's root: ``python bench/check_resume_gpu.py``; it prints JSON
(and writes $OUT/results.json)."""

import csv
import json
import os
import traceback
from pathlib import Path

import numpy as np
from PIL import Image
from safetensors.numpy import load_file
from hydra import compose, initialize_config_dir
from jdiff.config import register_configs
QUICK = ["experiment=demo", "train.steps=4", "infer.steps=3", "prior.images_per_object=1"]

def compose_config(overrides, root):
    register_configs()
    with initialize_config_dir(config_dir=str(Path("conf").resolve()), version_base="1.3"):
        cfg = compose("config", overrides=list(overrides))
    cfg.paths.root = str(root)
    return cfg
from jdiff import checkpoint, tensorboard
from jdiff.pipeline import run

root = Path("/tmp/gpuroot"); root.mkdir(exist_ok=True)
out = Path(os.environ.get("OUT", "/tmp/out"))
results = {}
save = checkpoint.save
state = {"kill": None}

class Killed(KeyboardInterrupt):
    pass

def saving(run_dir, engine, step, rows):
    r = save(run_dir, engine, step, rows)
    if step == state["kill"]:
        state["kill"] = None
        raise Killed()
    return r
checkpoint.save = saving

def go(name, engine, *extra):
    d = root / name
    cfg = compose_config(QUICK + ["stages=[train,generate]", "prior=off", "train.steps=8", "lora.unet_rank=4",
                                  "infer.batch_size=1", "deterministic=true", f"engine={engine}", *extra], root)
    run(cfg, d)
    return d

def diff(a, b):
    A, B = load_file(str(a / "lora.safetensors")), load_file(str(b / "lora.safetensors"))
    assert sorted(A) == sorted(B)
    return max(float(np.abs(A[k] - B[k]).max()) for k in A), all(np.array_equal(A[k], B[k]) for k in A)

for engine in ("torch_fast", "torch"):
    r = results[engine] = {}
    try:
        a = go(f"{engine}_plain", engine)
        state["kill"] = 6
        try:
            go(f"{engine}_resumed", engine, "train.checkpoint_every=3")
        except Killed:
            r["killed_at_6"] = sorted(p.name for p in (root / f"{engine}_resumed" / "checkpoint").iterdir())
        b = go(f"{engine}_resumed", engine, "train.checkpoint_every=3")
        r["resume_maxdiff,equal"] = diff(a, b)
        c = go(f"{engine}_sampled", engine, "train.sample_every=4")
        r["sampled_maxdiff,equal"] = diff(a, c)
        ims = {}
        for p in sorted((c / "samples" / "step_8").iterdir()):
            x = np.asarray(Image.open(p)).astype(int); y = np.asarray(Image.open(c / "images" / p.name)).astype(int)
            ims[p.name] = int(np.abs(x - y).max())
        r["last_samples_vs_images_maxdiff"] = ims
        r["sample_steps"] = sorted(p.name for p in (c / "samples").iterdir())
        r["tensorboard_available"] = tensorboard.available()
        ev = b / "tensorboard" / tensorboard.EVENTS
        if ev.exists():
            from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
            acc = EventAccumulator(str(b / "tensorboard")); acc.Reload()
            r["tb_tags"] = sorted(acc.Tags()["scalars"])
            r["tb_loss_steps"] = [s.step for s in acc.Scalars("loss")]
            rows = list(csv.DictReader(open(b / "loss.csv")))
            r["tb_loss_matches_csv"] = bool(np.allclose([s.value for s in acc.Scalars("loss")], [float(x["loss"]) for x in rows], rtol=1e-6))
        r["losses_plain"] = [l.split(",")[2] for l in (a / "loss.csv").read_text().splitlines()[1:]]
        r["losses_resumed"] = [l.split(",")[2] for l in (b / "loss.csv").read_text().splitlines()[1:]]
    except BaseException:
        r["error"] = traceback.format_exc()[-3000:]
print(json.dumps(results, indent=1))
out.mkdir(exist_ok=True); (out / "results.json").write_text(json.dumps(results, indent=1))
