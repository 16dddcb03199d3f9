"""Packed runs (jdiff.pack, sweep.pack): K runs trained in one batched step match the same runs trained alone,
on both engines, with mixed ranks, alphas, learning rates, clipping and prior weights; a run that fails in a
pack fails alone; a packed sweep writes every run's folder as an unpacked one does, and a killed pack resumes.

Not bit-identical: a packed layer computes each run's adapter with one batched matrix product where the
unpacked engine runs one linear layer after another, so sums are taken in another order; Adam divides by
sqrt(v), which turns those last-bit differences of tiny gradients into small differences of the weights.
Measured on this machine: whole-adapter relative difference ~1e-6, images ~1e-4 levels of 255."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from conftest import QUICK, compose_config
from jdiff import rundir
from jdiff.data import load_rgb
from jdiff.lora_file import load_adapters
from jdiff.pack import pack_key, plan_packs, run_pack
from jdiff.pipeline import run

REPO = Path(__file__).resolve().parents[1]
STEPS = ["train.steps=5", "train.lr=1e-3"]
# two runs that differ in everything a pack lets differ
VARIANTS = [
    ["style=00", "lora.unet_rank=4"],
    ["style=01", "lora.unet_rank=8", "lora.unet_alpha=4", "prior.weight=0.5", "train.lr=5e-4",
     "train.max_grad_norm=0.01", "seed=7"],
]


def adapter_difference(a: Path, b: Path) -> float:
    """||A - B|| / ||A|| over all of an adapter file's tensors."""
    first, second = load_adapters(a), load_adapters(b)
    assert first.keys() == second.keys()
    diff = norm = 0.0
    for prefix in first:
        assert (first[prefix].rank, first[prefix].alpha) == (second[prefix].rank, second[prefix].alpha)
        assert first[prefix].layers.keys() == second[prefix].layers.keys()
        for name, tensors in first[prefix].layers.items():
            for x, y in zip(tensors, second[prefix].layers[name]):
                diff += float(((x - y) ** 2).sum())
                norm += float((x ** 2).sum())
    return (diff / norm) ** 0.5


def image_levels(a: Path, b: Path) -> float:
    names = sorted(p.name for p in (a / rundir.IMAGES).glob("*.png"))
    assert names and names == sorted(p.name for p in (b / rundir.IMAGES).glob("*.png"))
    return float(np.mean([np.abs(load_rgb(a / rundir.IMAGES / n).astype(float)
                                 - load_rgb(b / rundir.IMAGES / n).astype(float)).mean() for n in names]))


@pytest.mark.parametrize("engine, extra", [("torch", []), ("jittor", []),
                                           ("torch", ["lora=unet_te", "lora.text_encoder_rank=2"]),
                                           ("jittor", ["lora=unet_te", "lora.text_encoder_rank=2"])])
def test_packed_runs_match_the_same_runs_alone(jdiff_root, tiny_model_dir, tmp_path, engine, extra):
    overrides = [QUICK + STEPS + [f"engine={engine}", *extra, *v] for v in VARIANTS]
    alone = [tmp_path / f"alone{i}" for i in range(len(VARIANTS))]
    packed = [tmp_path / f"pack{i}" for i in range(len(VARIANTS))]
    for o, d in zip(overrides, alone):
        run(compose_config(o, jdiff_root), d)
    cfgs = [compose_config(o, jdiff_root) for o in overrides]
    assert len({pack_key(c) for c in cfgs}) == 1
    assert run_pack(cfgs, packed) == {}
    for a, p in zip(alone, packed):
        assert (p / rundir.COMPLETE).is_file()
        assert sorted(x.name for x in p.iterdir()) == sorted(x.name for x in a.iterdir() if x.name != ".lock")
        assert adapter_difference(a / rundir.LORA, p / rundir.LORA) < 1e-4
        assert image_levels(a, p) < 0.5
        assert np.allclose(np.loadtxt(a / rundir.LOSS, delimiter=",", skiprows=1, usecols=(0, 1, 2, 3, 4)),
                           np.loadtxt(p / rundir.LOSS, delimiter=",", skiprows=1, usecols=(0, 1, 2, 3, 4)),
                           rtol=1e-4, atol=1e-6)


def test_a_packs_runs_of_one_class_set_read_it_once_and_match_their_runs_alone(jdiff_root, tiny_model_dir, tmp_path,
                                                                              monkeypatch):
    """prior.share=sweep gives every run one class set: a pack reads and enlarges its images once, not once a run
    (~14 ms an image on a 2-core machine: for set A's 15 runs of 280, most of the 81 s before the first step on
    the H200)."""
    import jdiff.pack

    shared = ["prior.share=sweep", "prior.styles=[00,01]", "engine=torch"]
    overrides = [QUICK + STEPS + shared + [x for x in v if x != "seed=7"] for v in VARIANTS]  # one seed: one set
    cfgs = [compose_config(o, jdiff_root) for o in overrides]
    reads = []
    load = jdiff.pack.load_class_images
    monkeypatch.setattr(jdiff.pack, "load_class_images", lambda items: reads.append(len(items)) or load(items))
    packed = [tmp_path / f"pack{i}" for i in range(len(VARIANTS))]
    assert run_pack(cfgs, packed) == {}
    assert len(reads) == 1 and reads[0] > 0
    for o, p in zip(overrides, packed):
        run(compose_config(o, jdiff_root), tmp_path / "alone")
        assert adapter_difference(tmp_path / "alone" / rundir.LORA, p / rundir.LORA) < 1e-4
        assert image_levels(tmp_path / "alone", p) < 0.5
        rundir.clear_outputs(tmp_path / "alone")


@pytest.mark.parametrize("engine", ["torch", "jittor"])
def test_a_run_that_diverges_fails_alone_and_the_pack_goes_on(jdiff_root, tiny_model_dir, tmp_path, engine):
    good = QUICK + STEPS + [f"engine={engine}", "style=00"]
    bad = QUICK + ["train.steps=5", f"engine={engine}", "style=01", "train.lr=1e30", "train.max_grad_norm=0"]
    dirs = [tmp_path / "good", tmp_path / "bad"]
    failed = run_pack([compose_config(good, jdiff_root), compose_config(bad, jdiff_root)], dirs)
    assert set(failed) == {1}
    failure, _ = rundir.read_json(dirs[1] / rundir.FAILED)
    assert failure["type"] == "TrainingDiverged" and "diverged" in failure["error"]
    assert not (dirs[1] / rundir.COMPLETE).exists() and not (dirs[1] / rundir.LORA).exists()
    assert (dirs[0] / rundir.COMPLETE).is_file()
    run(compose_config(good, jdiff_root), tmp_path / "alone")
    assert adapter_difference(tmp_path / "alone" / rundir.LORA, dirs[0] / rundir.LORA) < 1e-4


def test_runs_pack_only_with_runs_that_share_the_model_and_step_shape(jdiff_root, tiny_model_dir):
    base = QUICK + ["engine=torch"]
    cfgs = [compose_config(base + o, jdiff_root) for o in (
        ["style=00"], ["style=01", "lora.unet_rank=16", "train.lr=3e-4", "prior.weight=0.3"],
        ["style=02", "train.steps=9"], ["style=00", "train.batch_size=2"], ["style=01", "engine=jittor"],
        ["style=02", "stages=[generate,score]", "lora.path=/x.safetensors"], ["style=02", "seed=3"],
        ["style=01", "inject=styleid"])]
    assert plan_packs(cfgs, 8) == [[0, 1, 6], [2], [3], [4], [5], [7]]
    assert plan_packs(cfgs, 2) == [[0, 1], [2], [3], [4], [5], [6], [7]]
    assert plan_packs(cfgs, 1) == [[i] for i in range(len(cfgs))]


def sweep(root: Path, name: str, *overrides: str, wait: bool = True):
    command = [sys.executable, "-m", "jdiff.main", "-m", "experiment=demo", "infer.steps=2",
               "prior.images_per_object=1", "train.steps=3", f"sweep.name={name}", *overrides]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if not wait:
        return subprocess.Popen(command, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True)
    done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.mark.parametrize("engine", ["torch", "jittor"])
def test_a_packed_sweep_gives_each_run_its_folder_and_resumes_a_killed_pack(jdiff_root, tiny_model_dir, engine):
    grid = [f"engine={engine}", "lora.unet_rank=2,4,8", "gpus=[0,1]"]
    sweep(jdiff_root, f"unpacked_{engine}", *grid)
    child = sweep(jdiff_root, f"packed_{engine}", *grid, "sweep.pack=2", wait=False)
    folder = jdiff_root / "multirun" / f"packed_{engine}"
    deadline = time.monotonic() + 600
    while not any(folder.glob("*/loss.csv")) and not any(folder.glob("*/" + rundir.COMPLETE)):
        assert child.poll() is None and time.monotonic() < deadline, child.stdout.read().decode()[-3000:]
        time.sleep(0.2)
    os.killpg(child.pid, signal.SIGKILL)  # the whole sweep, its pack process included
    child.wait()
    done = sweep(jdiff_root, f"packed_{engine}", *grid, "sweep.pack=2")
    assert "3 runs in 2 packs (2, 1)" in done.stdout + done.stderr
    unpacked = {d.name: d for d in (jdiff_root / "multirun" / f"unpacked_{engine}").iterdir()
                if d.is_dir() and d.name[0] != "."}
    packed = {d.name: d for d in folder.iterdir() if d.is_dir() and d.name[0] != "."}
    assert unpacked.keys() == packed.keys() and len(packed) == 3  # sweep.pack does not name the runs
    for name, d in packed.items():
        assert (d / rundir.COMPLETE).is_file()
        assert adapter_difference(unpacked[name] / rundir.LORA, d / rundir.LORA) < 1e-4
        assert image_levels(unpacked[name], d) < 0.5
    report = (folder / "scores.csv").read_text()
    assert report.count(",complete,") == 3


def test_bad_pack_sizes_are_refused_in_one_line(jdiff_root, tiny_model_dir):
    from conftest import assert_one_line_error, jdiff_cli

    for value in ("0", "two", "-3"):
        done = jdiff_cli(["-m", "experiment=demo", f"sweep.pack={value}", "sweep.name=bad_pack"], jdiff_root)
        assert_one_line_error(done, "sweep.pack")


def test_auto_spreads_a_sweep_over_its_gpus_in_packs_of_at_most_16(jdiff_root, tiny_model_dir):
    """sweep.pack=auto, as #23's 4-GPU sweep of set A would plan it: the 15 styles in 4 packs, one a GPU."""
    from jdiff.sweep import pack_size

    cfgs = [compose_config(QUICK + ["engine=torch", f"style={i % 3:02d}", f"seed={i}"], jdiff_root) for i in range(15)]
    assert pack_size("auto", 15, 4) == 4
    assert [len(p) for p in plan_packs(cfgs, pack_size("auto", 15, 4))] == [4, 4, 4, 3]
    assert [len(p) for p in plan_packs(cfgs, pack_size("auto", 15, 1))] == [15]
    assert pack_size("auto", 40, 1) == 16 and pack_size(3, 40, 4) == 3


def test_auto_packs_no_more_runs_than_the_free_memory_holds_at_the_measured_cost(jdiff_root, tiny_model_dir):
    from jdiff.pack import measured_cost, record_cost
    from jdiff.sweep import pack_size

    cfg = compose_config(QUICK + ["engine=torch", "style=00", "data.resolution=64"], jdiff_root)
    assert measured_cost(cfg) is None
    record_cost(cfg, 8, 24.0)  # a pack of 8 peaked at 24 GiB: 3 GiB a run
    assert measured_cost(cfg) == 3.0
    other = compose_config(QUICK + ["engine=jittor", "style=00", "data.resolution=64"], jdiff_root)
    assert measured_cost(other) is None  # another engine: another cost
    assert pack_size("auto", 15, 1, 3.0, 20.0) == 6  # 90% of 20 GiB holds 6 runs of 3 GiB
    assert pack_size("auto", 15, 1, 3.0, 200.0) == 15 and pack_size("auto", 15, 1, 3.0, 1.0) == 1


def test_a_pack_the_gpu_has_no_memory_for_runs_again_in_halves(jdiff_root, tiny_model_dir, tmp_path, monkeypatch):
    """run_members: exit code OUT_OF_MEMORY splits the pack in two, each half run on its own; the attempt's
    outputs go, its log stays, and a half's finished run is not run again."""
    from jdiff import sweep

    cfg = compose_config(QUICK + ["engine=torch", "engine.device=cpu", "style=00"], jdiff_root)
    dirs = [tmp_path / f"run{i}" for i in range(3)]
    for d in dirs:
        d.mkdir()
        (d / rundir.CONFIG).write_text(OmegaConf.to_yaml(cfg, resolve=True))  # as the pack's leader writes it
        (d / rundir.LOG).write_text("the first attempt\n")
    calls = []

    def child(run_dirs, gpu, label):
        calls.append([d.name for d in run_dirs])
        if len(run_dirs) > 1 and len(calls) == 1:
            (run_dirs[0] / rundir.LOSS).write_text("step\n")  # what the failed attempt left
            return sweep.OUT_OF_MEMORY
        for d in run_dirs:
            (d / rundir.COMPLETE).write_text('{"final_score": 1.0}')
        return 0

    monkeypatch.setattr(sweep, "run_child", child)
    sweep.run_members(cfg, dirs, "#0")
    assert calls == [["run0", "run1", "run2"], ["run0"], ["run1", "run2"]]
    assert all((d / rundir.COMPLETE).is_file() for d in dirs)
    assert not (dirs[0] / rundir.LOSS).exists() and (dirs[0] / rundir.LOG).read_text() == "the first attempt\n"
