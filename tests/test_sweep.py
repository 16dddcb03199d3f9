"""Sweeps as users launch them (``python -m jdiff.main -m ...`` in a subprocess): one GPU per job, a fresh
process per run, failures that stay in their run, resume, Ctrl-C, identical results whatever the
parallelism, the submitit and Optuna presets, and the class-image cache shared by concurrent jobs.

The GPUs are fake ids (``gpus=[0,1]``): each job's process records the CUDA_VISIBLE_DEVICES it saw and
runs on the CPU, which is all this machine has."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from itertools import combinations
from pathlib import Path

import pytest
from filelock import FileLock
from omegaconf import OmegaConf
from safetensors import safe_open

from conftest import compose_config
from jdiff.pipeline import COMPLETE, FAILED, LORA_FILE, Run
from jdiff.sweep import JOB_FILE, detect_gpus, gpu_lock_file, hold_gpu, parallel_jobs, run_dir_name, run_sweep_job
from jdiff.validate import ConfigError, validate_config

REPO = Path(__file__).resolve().parents[1]
FAST = ["experiment=demo", "infer.steps=2", "prior.images_per_object=1"]


def sweep_command(name: str, *overrides: str) -> list[str]:
    steps = [] if any(o.startswith("train.steps=") for o in overrides) else ["train.steps=2"]
    return [sys.executable, "-m", "jdiff.main", "-m", *FAST, *steps, f"sweep.name={name}", *overrides]


def sweep_env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO)}


def launch(root: Path, name: str, *overrides: str, failed: int = 0) -> subprocess.CompletedProcess:
    """Run a sweep to its end in ``root`` (paths.root=. is root, so its cache and multirun/ are used). With
    ``failed`` runs it ends with exit code 1 and one line that counts them."""
    done = subprocess.run(sweep_command(name, *overrides), cwd=root, env=sweep_env(), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == (1 if failed else 0), done.stdout[-3000:] + done.stderr[-3000:]
    if failed:
        assert f"runs did not complete ({failed} failed)" in done.stderr.splitlines()[-1], done.stderr[-3000:]
    return done


def runs_by(sweep_dir: Path, key: str) -> dict[str, Path]:
    """The run directories of a sweep by the value of one swept key, read from their names."""
    found = {}
    for run_dir in sweep_dir.iterdir():
        match = re.search(rf"(?:^|,){re.escape(key)}=([^,]+)", run_dir.name)
        if run_dir.is_dir() and match:
            found[match.group(1)] = run_dir
    return found


def read(path: Path) -> dict:
    return json.loads(path.read_text())


def outputs(run_dir: Path) -> dict:
    """What a run computed: the adapter's tensors and metadata, the image files, the metrics."""
    # Not the adapter file's bytes: safetensors writes its metadata in a per-process hash order.
    with safe_open(str(run_dir / LORA_FILE), framework="numpy") as f:
        files = {k: f.get_tensor(k).tobytes() for k in f.keys()}
        files["metadata"] = f.metadata()
    files.update({f"images/{p.name}": p.read_bytes() for p in sorted((run_dir / "images").glob("*.png"))})
    files["metrics"] = json.dumps({k: v for k, v in read(run_dir / "scores.json").items() if k != "seconds"})
    return files


def is_gone(pid: int) -> bool:
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z"  # a zombie has exited
    except FileNotFoundError:
        return True


def wait_for(condition, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.2)


# -- a sweep on two (fake) GPUs, two jobs at a time, with one run that fails ------------------------------


@pytest.fixture(scope="module")
def gpu_sweep(jdiff_root, tiny_model_dir) -> Path:
    launch(jdiff_root, "two_gpus", "lora.unet_rank=2,4,-1", "gpus=[0,1]", failed=1)
    return jdiff_root / "multirun" / "two_gpus"


def test_jobs_running_at_once_hold_different_gpus(gpu_sweep):
    runs = runs_by(gpu_sweep, "lora.unet_rank")
    jobs = {rank: read(run_dir / JOB_FILE) for rank, run_dir in runs.items()}
    assert set(jobs) == {"2", "4", "-1"}
    together = [(a, b) for a, b in combinations(jobs.values(), 2)
                if a["started"] < b["finished"] and b["started"] < a["finished"]]
    assert together, "n_jobs defaults to one per GPU: two jobs must have run at once"
    assert all(a["gpu"] != b["gpu"] for a, b in together)
    assert {job["gpu"] for job in jobs.values()} == {"0", "1"}
    for rank, run_dir in runs.items():  # the run's own process saw only its GPU
        assert f"CUDA_VISIBLE_DEVICES='{jobs[rank]['gpu']}'" in (run_dir / "run.log").read_text()


def test_a_failed_run_is_recorded_and_the_sweep_goes_on(gpu_sweep):
    runs = runs_by(gpu_sweep, "lora.unet_rank")
    failure = read(runs["-1"] / FAILED)
    assert failure["type"] == "ConfigError" and "lora.unet_rank" in failure["error"]
    assert not (runs["-1"] / COMPLETE).exists()
    assert "lora.unet_rank=-1 is invalid" in (runs["-1"] / "run.log").read_text()
    for rank in ("2", "4"):
        assert (runs[rank] / COMPLETE).exists() and not (runs[rank] / FAILED).exists()


def test_relaunch_skips_finished_runs_reruns_the_rest_and_reproduces_them(gpu_sweep, jdiff_root):
    sweep_dir = jdiff_root / "multirun" / "resumed"
    shutil.copytree(gpu_sweep, sweep_dir)
    runs = runs_by(sweep_dir, "lora.unet_rank")
    # Nothing of a finished run is touched, Hydra's record and the log included.
    finished = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in runs["2"].rglob("*") if p.is_file()}
    before = {rank: read(run_dir / JOB_FILE) for rank, run_dir in runs.items()}
    expected = outputs(runs["4"])
    (runs["4"] / COMPLETE).unlink()  # as if the run had been killed before it finished

    # Another grid order (other job numbers), one job at a time, no GPU: it must find its runs by overrides.
    done = launch(jdiff_root, "resumed", "lora.unet_rank=4,-1,2", "n_jobs=1", "gpus=[]", failed=1)

    assert runs_by(sweep_dir, "lora.unet_rank") == runs
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in finished} == finished
    assert read(runs["2"] / JOB_FILE) == before["2"]
    assert "skipped, finished earlier" in done.stdout + done.stderr
    for rank in ("4", "-1"):  # the unfinished and the failed run ran again
        assert read(runs[rank] / JOB_FILE)["started"] > before[rank]["finished"]
    assert (runs["4"] / COMPLETE).exists() and read(runs["-1"] / FAILED)["type"] == "ConfigError"
    assert read(runs["4"] / JOB_FILE)["gpu"] is None
    # Bit-identical to the first time, which ran two at a time on "GPU" 0 or 1.
    assert outputs(runs["4"]) == expected


# -- crashes and Ctrl-C ------------------------------------------------------------------------------------


def test_a_crash_frees_the_gpu_and_ctrl_c_stops_cleanly(jdiff_root, tiny_model_dir):
    """Two long runs on one GPU, two jobs at a time: the second waits for the GPU. Killing the first run's
    process fails that run only and hands the GPU to the second; Ctrl-C then stops everything."""
    sweep_dir = jdiff_root / "multirun" / "interrupted"
    sweep = subprocess.Popen(sweep_command("interrupted", "train.steps=500,501", "gpus=[0]", "n_jobs=2"),
                             cwd=jdiff_root, env=sweep_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    try:
        def training(steps: str) -> bool:
            run_dir = runs_by(sweep_dir, "train.steps").get(steps) if sweep_dir.exists() else None
            return bool(run_dir and (run_dir / JOB_FILE).exists()
                        and "with engine=" in (run_dir / "run.log").read_text())

        wait_for(lambda: training("500") or training("501"), "a run to start training")
        first, second = ("500", "501") if training("500") else ("501", "500")
        runs = runs_by(sweep_dir, "train.steps")
        crashed = read(runs[first] / JOB_FILE)
        os.kill(crashed["pid"], signal.SIGKILL)
        wait_for(lambda: training(second), "the waiting run to get the GPU")
        survivor = read(runs[second] / JOB_FILE)
        os.killpg(sweep.pid, signal.SIGINT)
        sweep.wait(timeout=60)
    finally:
        if sweep.poll() is None:
            os.killpg(sweep.pid, signal.SIGKILL)

    failure = read(runs[first] / FAILED)
    assert failure["type"] == "ProcessExit" and "-9" in failure["error"]
    assert crashed["gpu"] == survivor["gpu"] == "0"
    wait_for(lambda: is_gone(survivor["pid"]), "the interrupted run's process to end", timeout=15)
    # Interrupted is neither finished nor failed: nothing that looks like a result was written.
    left = {p.name for p in runs[second].iterdir() if not p.name.startswith(".")}
    # the loss log so far (rewritten whole) and the class set it trains with
    assert left <= {"config.yaml", JOB_FILE, "run.log", "loss.csv", "class_set.json"}
    lock = FileLock(str(gpu_lock_file(jdiff_root / "data" / "cache" / "locks", "0")))
    lock.acquire(timeout=0)  # the GPU is free again
    lock.release()


# -- beyond the joblib launcher: submitit and Optuna --------------------------------------------------------


def test_optuna_search_through_submitit_records_a_failed_trial_and_goes_on(jdiff_root, tiny_model_dir):
    # Two trials of the preset's TPE sampler, its keys narrowed to one value each but the rank; with seed 0,
    # Optuna 2.10 draws rank 2, then -1 (a failure after a success, the order the sweeper plugin handles worst).
    launch(jdiff_root, "optuna", "search=optuna", "hydra.sweeper.sampler.seed=0", "hydra.sweeper.n_trials=2",
           "hydra/launcher=slurm_local", "hydra.launcher.gpus_per_node=0", "n_jobs=2", "lora.unet_rank=choice(-1,2)",
           "prior.weight=choice(1.0)", "init.strength=choice(0.9)", "train.steps=choice(2)", failed=1)
    sweep_dir = jdiff_root / "multirun" / "optuna"
    runs = runs_by(sweep_dir, "lora.unet_rank")
    assert set(runs) == {"-1", "2"} and read(runs["-1"] / FAILED)["type"] == "ConfigError"
    best = OmegaConf.load(sweep_dir / "optimization_results.yaml")
    assert best.best_params["lora.unet_rank"] == 2
    assert best.best_value == read(runs["2"] / COMPLETE)["final_score"]  # the trial's value is the final score
    assert "LocalLauncher" in (runs["2"] / ".hydra" / "hydra.yaml").read_text()
    assert any((sweep_dir / ".submitit").iterdir())


# -- the class-image cache under concurrency ----------------------------------------------------------------

CLASS_IMAGES = """
import sys, time
from pathlib import Path
from jdiff.engines.base import create_engine
from jdiff.prior import ClassImageSettings, class_images

model_dir, cache, go, report = map(Path, sys.argv[1:])
settings = ClassImageSettings(template="an image of {object}", resolution=64, steps=2, guidance_scale=7.5,
                              negative_prompt="", sampler="model", seed=5, prediction_type="v_prediction")
loads = []
def engine():
    loads.append(1)
    time.sleep(1)  # hold the cache lock a while: the other process must be waiting by now
    return create_engine("torch", model_dir)
while not go.exists():
    time.sleep(0.05)
items = class_images(cache, ["Apple", "Boat"], 2, settings, engine, batch_size=4)
report.write_text(f"{len(loads)} " + " ".join(str(i.path) for i in items))
"""


def test_concurrent_jobs_generate_class_images_once(tiny_model_dir, tmp_path):
    script, go, cache = tmp_path / "class_images.py", tmp_path / "go", tmp_path / "prior"
    script.write_text(CLASS_IMAGES)
    reports = [tmp_path / f"report{i}" for i in range(2)]
    procs = [subprocess.Popen([sys.executable, str(script), str(tiny_model_dir), str(cache), str(go), str(r)],
                              env=sweep_env()) for r in reports]
    time.sleep(0.5)
    go.touch()  # both ask at the same moment, after their imports
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    loads, paths = zip(*(r.read_text().split(" ", 1) for r in reports))
    assert sorted(loads) == ["0", "1"]  # one process generated, the other waited and reused
    assert paths[0] == paths[1] and len(paths[0].split()) == 4
    assert all(Path(p).stat().st_size > 0 for p in paths[0].split())


# -- pieces --------------------------------------------------------------------------------------------------


def test_run_dir_names_are_readable_single_components_and_distinct():
    assert run_dir_name("lora.unet_rank=4,style=00") == "lora.unet_rank=4,style=00"
    assert run_dir_name("") == "defaults"
    with_slash, with_underscore = run_dir_name("model.path=/m/sd21"), run_dir_name("model.path=_m_sd21")
    assert "/" not in with_slash and with_slash.startswith("model.path=_m_sd21-") and with_slash != with_underscore
    assert len(run_dir_name("x=" + "a" * 400)) < 200


def test_gpus_come_from_cuda_visible_devices_then_nvidia_smi(monkeypatch, tmp_path):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert detect_gpus() == ["2", "3"] and parallel_jobs(None, None) == 2
    assert parallel_jobs(None, ["5"]) == 1 and parallel_jobs(3, ["5"]) == 3
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,-1,2")  # CUDA stops at an invalid id
    assert detect_gpus() == ["1"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert detect_gpus() == [] and parallel_jobs(None, None) == 1
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho 0\necho 1\necho 2\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert detect_gpus() == ["0", "1", "2"]
    fake.unlink()
    assert detect_gpus() == []


def test_a_job_takes_a_gpu_nobody_holds(tmp_path):
    with hold_gpu(tmp_path, ["0", "1"]) as first:
        with hold_gpu(tmp_path, ["0", "1"]) as second:
            assert {first, second} == {"0", "1"}
    with hold_gpu(tmp_path, []) as none:
        assert none is None


def test_a_device_no_sweep_job_can_have_fails_that_run_alone(jdiff_root, tmp_path):
    cfg = compose_config(["experiment=demo", "engine.device=cuda:1"], jdiff_root)
    assert run_sweep_job(cfg, tmp_path, label="#0") is None
    failure = read(tmp_path / FAILED)
    assert failure["type"] == "ConfigError" and "engine.device=cuda:1" in failure["error"]


@pytest.mark.parametrize("override, key", [("n_jobs=0", "n_jobs"), ("gpus=[0,0]", "gpus"),
                                           ("engine=torch engine.threads=0", "engine.threads")])
def test_bad_sweep_settings_fail_validation(jdiff_root, override, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        validate_config(compose_config(["experiment=demo", *override.split()], jdiff_root))


def test_deterministic_sets_the_torch_flags(jdiff_root, tiny_model_dir, monkeypatch):
    import torch

    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", "unset")
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG")  # and restored to its state before the test
    cfg = compose_config(["experiment=demo", "engine=torch", "deterministic=true", "engine.threads=1"], jdiff_root)
    try:
        Run(cfg, jdiff_root / "unused").engine
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8" and torch.get_num_threads() == 1
    finally:
        Run(compose_config(["experiment=demo", "engine=torch"], jdiff_root), jdiff_root / "unused").engine
    assert not torch.are_deterministic_algorithms_enabled() and torch.get_num_threads() >= 1
