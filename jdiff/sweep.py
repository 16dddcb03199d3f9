"""One run of a ``-m`` sweep: resumable, on a GPU of its own, in a fresh process, failing alone.

Hydra's launcher (joblib on one machine, submitit on a cluster) calls :func:`run_sweep_job` for each run
of a sweep. The job

- skips the run when its directory already holds COMPLETE, so a named sweep launched again resumes;
- takes a free GPU by holding a file lock (``<cache>/locks/<host>.gpu<N>.lock``), waiting while all are
  busy, so that two jobs never share a GPU, also across sweeps that share the cache;
- runs the stages in a child process (``python -m jdiff.job RUN_DIR``, see :mod:`jdiff.job`) that sees
  only that GPU: CUDA state, memory and random state never leak from one run into the next, and a crash
  frees the GPU;
- when the run fails, leaves FAILED (``{"error": ..., "type": ...}``) in the run directory and returns
  None, so the sweep goes on (Optuna records a failed trial).

Run directories are named by the job's overrides (``lora.unet_rank=4,style=00``) rather than by job
number, so a grid that grew or shrank between launches still finds its finished runs.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator, Optional

from filelock import FileLock, Timeout
from omegaconf import DictConfig, OmegaConf

import jdiff
from jdiff import rundir
from jdiff.devices import parse_device
from jdiff.files import write_json, write_text
from jdiff.pipeline import resolve_paths, resolved
from jdiff.rundir import FAILED
from jdiff.validate import ConfigError

log = logging.getLogger(__name__)

CONFIG_FILE = rundir.CONFIG
JOB_FILE = rundir.JOB
INTERRUPTED = 130  # the child's exit code after Ctrl-C or SIGTERM: the run is unfinished, not failed
POLL_SECONDS = 1.0  # how often a job waiting for a GPU looks again
STOP_SECONDS = 10.0  # how long a stopped job's child gets to clean up before it is killed


def register_resolvers() -> None:
    """The resolvers conf/config.yaml uses for the launcher's job count and the run directory names."""
    OmegaConf.register_new_resolver("jdiff.n_jobs", parallel_jobs, replace=True)
    OmegaConf.register_new_resolver("jdiff.run_dir_name", run_dir_name, replace=True)
    OmegaConf.register_new_resolver("jdiff.new_run_dir", rundir.new_run_dir, replace=True)
    OmegaConf.register_new_resolver("jdiff.record_dir", rundir.record_dir, replace=True)
    OmegaConf.register_new_resolver("jdiff.log_file", rundir.log_file, replace=True)


def detect_gpus() -> list[str]:
    """The GPUs this process may use: CUDA_VISIBLE_DEVICES when set, else nvidia-smi's list, else none."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        gpus = []
        for gpu in (g.strip() for g in visible.split(",")):
            if not gpu or gpu.startswith("-"):  # CUDA ignores every id from an invalid one on
                break
            gpus.append(gpu)
        return gpus
    try:
        listing = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in listing.splitlines() if line.strip()]


def sweep_gpus(gpus) -> list[str]:
    """The config's ``gpus`` as a list of ids: null detects them, ``[]`` means none."""
    return detect_gpus() if gpus is None else [str(g) for g in gpus]


def parallel_jobs(n_jobs, gpus) -> int:
    """How many jobs the launcher runs at once: ``n_jobs`` when set, else one per GPU (1 without GPUs)."""
    return int(n_jobs) if n_jobs is not None else max(1, len(sweep_gpus(gpus)))


def run_dir_name(override_dirname: str) -> str:
    """One path component naming a run by its overrides: readable, and the same for the same overrides.

    Characters a file name should not hold become ``_``; a name so changed, or cut to length, gets a
    hash of the exact overrides so that two runs never share a directory.
    """
    if not override_dirname:
        return "defaults"
    name = re.sub(r"[^A-Za-z0-9_.,=+\-\[\]]", "_", override_dirname)
    if name != override_dirname or len(name) > 150:
        name = f"{name[:150]}-{hashlib.sha1(override_dirname.encode()).hexdigest()[:8]}"
    return name


def gpu_lock_file(lock_dir: Path, gpu: str) -> Path:
    # One lock per GPU of this host (a shared cache serves many hosts) and per SLURM allocation (SLURM
    # numbers each allocation's GPUs from 0).
    scope = socket.gethostname()
    if "SLURM_JOB_ID" in os.environ:
        scope += f".slurm{os.environ['SLURM_JOB_ID']}"
    return Path(lock_dir) / f"{scope}.gpu{re.sub(r'[^A-Za-z0-9_.-]', '_', gpu)}.lock"


@contextlib.contextmanager
def hold_gpu(lock_dir: Path, gpus: list[str]) -> Iterator[Optional[str]]:
    """Hold the lock of a free GPU among ``gpus`` for the block (None when there are none to hold)."""
    if not gpus:
        yield None
        return
    Path(lock_dir).mkdir(parents=True, exist_ok=True)
    waiting = False
    while True:
        for gpu in gpus:
            lock = FileLock(str(gpu_lock_file(lock_dir, gpu)))
            try:
                lock.acquire(timeout=0)
            except Timeout:
                continue
            try:
                yield gpu
            finally:
                lock.release()
            return
        if not waiting:
            log.info("every GPU (%s) is busy; waiting for one", ", ".join(gpus))
            waiting = True
        time.sleep(POLL_SECONDS)


def run_sweep_job(cfg: DictConfig, run_dir: Path, label: str, sweep_dir: Optional[Path] = None) -> Optional[float]:
    """Run one sweep run in ``run_dir``; returns its final score, or None when it failed or did not run.

    A finished run is skipped (``overwrite=true`` runs it again); an unfinished, failed or broken one (a COMPLETE
    that cannot be read) runs again from the start; a folder holding files jdiff did not write is left alone.
    ``sweep_dir``: where the launcher's class-image plan recorded the styles of a ``prior.share=sweep`` class set."""
    from jdiff.prior_plan import sweep_styles

    run_dir = Path(run_dir)
    resolve_paths(cfg)
    sweep_styles(cfg, Path(sweep_dir) if sweep_dir is not None else run_dir.parent)
    pack = find_pack(run_dir) if str(cfg.sweep.pack) != "1" else None
    if pack is not None:
        return run_pack_job(cfg, run_dir, label, pack)
    state = rundir.inspect(run_dir)
    if state.foreign:  # not even a lock file goes there
        log.error("[%s] not run: %s; jdiff writes only into its own run folders", label, state.foreign_problem)
        return None
    try:
        rundir.hold(run_dir)  # another process running it, or the lock's place taken: the run is left as it is
    except rundir.RunDirError as err:
        log.warning("[%s] skipped here: %s", label, err)
        return None
    try:
        state = rundir.inspect(run_dir)
        if state.status == "complete" and not cfg.overwrite:
            old, _ = rundir.read_config(run_dir)
            changed = rundir.changed_keys(old, resolved(cfg)) if old is not None else []
            if changed:
                log.warning("[%s] %s finished with other values of %s; kept as it is (overwrite=true runs it "
                            "again, or use a new sweep.name)", label, run_dir, ", ".join(changed))
            log.info("[%s] skipped, finished earlier: %s", label, run_dir)
            return state.final_score
        if state.status == "broken":
            log.warning("[%s] %s: %s; running it again", label, run_dir, state.problem)
        try:
            rundir.prepare(run_dir, None, cfg.overwrite)
            return run_in_child(cfg, run_dir, label)
        except Exception as err:  # whatever goes wrong stays in this run: the sweep and its report go on
            record_failure(run_dir, label, type(err).__name__, str(err))
            return None
    finally:
        rundir.release(run_dir)


def run_in_child(cfg: DictConfig, run_dir: Path, label: str) -> Optional[float]:
    device = parse_device(cfg.engine.device, "engine.device")
    if device.index not in (None, 0):
        raise ConfigError(f"engine.device={device} cannot work in a sweep: each job sees only its own GPU, as "
                          "cuda:0. Choose the GPUs with gpus=[...] and leave engine.device=auto.")
    gpus = [] if device.kind == "cpu" else sweep_gpus(cfg.gpus)
    write_text(run_dir / CONFIG_FILE, OmegaConf.to_yaml(cfg, resolve=True))
    with hold_gpu(Path(cfg.paths.cache) / "locks", gpus) as gpu:
        code = run_child([run_dir], gpu, label)
    if code == 0:
        return rundir.inspect(run_dir).final_score
    if code == INTERRUPTED:
        log.warning("[%s] interrupted; %s is unfinished and runs again when the sweep is launched again",
                    label, run_dir)
        return None
    failure, _ = rundir.read_json(run_dir / FAILED)
    if failure is None:  # the child died before it could say why (killed, out of memory, segfault)
        record_failure(run_dir, label, "ProcessExit", f"the run's process exited with code {code}")
        return None
    log.error("[%s] FAILED (%s: %s); see %s", label, failure.get("type"), failure.get("error"), run_dir / rundir.LOG)
    return None


def job_environment(gpu: Optional[str]) -> dict:
    """The environment of a child process that sees only ``gpu`` (none: the CPU) and imports this very jdiff."""
    env = dict(os.environ)
    env["CUDA_VISIBLE_DEVICES"] = gpu if gpu is not None else ""
    env.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")  # number the GPUs the way nvidia-smi does
    source_root = str(Path(jdiff.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (source_root, env.get("PYTHONPATH")) if p)
    return env


def run_child(run_dirs: list[Path], gpu: Optional[str], label: str) -> int:
    """Run the stages in ``python -m jdiff.job RUN_DIR...`` (several: one pack), seeing only ``gpu``; returns its
    exit code."""
    env = job_environment(gpu)
    host = socket.gethostname()
    started = time.time()
    child = subprocess.Popen([sys.executable, "-m", "jdiff.job", *map(str, run_dirs), "--label", label, "--prepared"],
                             env=env)
    job = {"host": host, "gpu": gpu, "pid": child.pid, "started": started}
    if len(run_dirs) > 1:
        job["pack"] = [str(d) for d in run_dirs]
    for run_dir in run_dirs:
        write_json(Path(run_dir) / JOB_FILE, job)
    where = ", ".join(map(str, run_dirs))
    log.info("[%s] started on %s, %s (pid %d): %s", label, host, f"GPU {gpu}" if gpu else "CPU", child.pid, where)
    try:
        code = child.wait()
    finally:
        stop(child)
    finished = time.time()
    for run_dir in run_dirs:
        write_json(Path(run_dir) / JOB_FILE, {**job, "finished": finished, "seconds": round(finished - started, 3),
                                              "exit_code": code})
    if code == 0:
        log.info("[%s] finished in %.1f s: %s", label, finished - started, where)
    return code


def stop(child: subprocess.Popen) -> None:
    """End a child that is still running (the job was interrupted): SIGTERM, then SIGKILL if it lingers."""
    if child.poll() is not None:
        return
    child.terminate()
    try:
        child.wait(STOP_SECONDS)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()


def record_failure(run_dir: Path, label: str, kind: str, error: str) -> None:
    log.error("[%s] FAILED (%s: %s): %s", label, kind, error, run_dir)
    try:
        write_json(run_dir / FAILED, {"error": error, "type": kind})
    except OSError as err:  # a full or read-only disk: the run stays unfinished and reruns at the next launch
        log.error("[%s] could not write %s: %s", label, run_dir / FAILED, err)


# -- packs (sweep.pack): runs that share a base model, trained in one process (jdiff.pack) ------------------

PACKS = ".packs"  # in the sweep folder: the launch plans, the packs' locks and what each pack ran
AUTO_PACK = 16  # sweep.pack=auto: at most this many runs a pack (fewer when the GPUs can share the runs)
OUT_OF_MEMORY = 75  # a pack's exit code when the GPU ran out of memory: the pack is split in two and run again


def pack_size(pack, runs: int, gpus: int, gib_per_run: Optional[float] = None,
              free_gib: Optional[float] = None) -> int:
    """The most runs a pack holds: sweep.pack as a number, or for ``auto`` the runs spread evenly over the GPUs, at
    most AUTO_PACK, and no more than 90% of the GPUs' free memory holds at the cost a packed run of this kind was
    measured at (``gib_per_run``). A pack that does not fit after all is halved when it runs."""
    if str(pack) != "auto":
        return int(pack)
    size = min(AUTO_PACK, -(-runs // max(1, gpus)))
    if gib_per_run and free_gib:
        size = min(size, int(0.9 * free_gib // gib_per_run))
    return max(1, size)


def free_memory_gib(gpus: list[str]) -> Optional[float]:
    """The least free memory among ``gpus``, from nvidia-smi (None without it)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index,memory.free", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    free = {i.strip(): float(m) / 1024 for i, m in (line.split(",") for line in out.splitlines() if "," in line)}
    known = [free[g] for g in gpus if g in free]
    return min(known) if known else None


def plan_launch(config: DictConfig, composed: list, job_overrides, initial_job_idx: int) -> list[int]:
    """Before the jobs of one launch start: with sweep.pack != 1, group them into packs
    (:func:`jdiff.pack.plan_packs`) and write the plan into the sweep folder, where each job finds its pack.
    ``composed``: each job's (config, run folder), or None for one that cannot run (it runs alone, and fails
    alone), as :func:`jdiff.prior_plan.compose_jobs` gives them. Returns the order to start the jobs in: each
    pack's first run first, so the packs start at once."""
    from jdiff.pack import measured_cost, plan_packs
    from jdiff.prior_plan import sweep_styles

    order = list(range(len(job_overrides)))
    pack = OmegaConf.select(config, "sweep.pack", default=1)
    valid = [i for i, job in enumerate(composed) if job is not None]
    if str(pack) == "1" or len(valid) < 2:
        return order
    sweep_dir = Path(os.path.abspath(str(config.hydra.sweep.dir)))
    cfgs = [sweep_styles(composed[i][0], sweep_dir) for i in valid]
    dirs = [composed[i][1] for i in valid]
    gpus = sweep_gpus(config.gpus)
    cost = measured_cost(cfgs[0]) if str(pack) == "auto" else None
    packs = plan_packs(cfgs, pack_size(pack, len(cfgs), len(gpus), cost, free_memory_gib(gpus) if cost else None))
    token = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{initial_job_idx}"  # one a launch (Optuna: many)
    folder = sweep_dir / PACKS
    plan = {"launch": token, "packs": [{"id": f"{token}-{j}", "runs": [
        {"dir": str(dirs[i]), "config": resolved(cfgs[i]), "overrides": list(job_overrides[valid[i]])}
        for i in members]} for j, members in enumerate(packs)]}
    write_json(folder / f"{token}.json", plan)
    index, _ = rundir.read_json(folder / "index.json")
    index = index or {}
    for j, members in enumerate(packs):
        for i in members:
            index[dirs[i].name] = {"plan": f"{token}.json", "pack": j}
    write_json(folder / "index.json", index)
    sizes = [len(p) for p in packs]
    log.info("sweep.pack=%s: %d runs in %d packs (%s)", pack, len(cfgs), len(packs), ", ".join(map(str, sizes)))
    leaders = [valid[members[0]] for members in packs]
    first = set(leaders)
    return leaders + [i for i in order if i not in first]


def find_pack(run_dir: Path) -> Optional[dict]:
    """The pack of ``run_dir`` in its sweep's newest plan, or None when it runs alone."""
    folder = run_dir.parent / PACKS
    index, _ = rundir.read_json(folder / "index.json")
    entry = (index or {}).get(run_dir.name)
    if not entry:
        return None
    plan, _ = rundir.read_json(folder / entry["plan"])
    if not plan or entry["pack"] >= len(plan.get("packs", [])):
        return None
    pack = plan["packs"][entry["pack"]]
    return pack if len(pack["runs"]) > 1 else None


def run_pack_job(cfg: DictConfig, run_dir: Path, label: str, pack: dict) -> Optional[float]:
    """A sweep job whose run is in a pack: the first job of the pack to come runs every run of it that needs to
    run, in one process on one GPU; the others wait for it and report their run's result."""
    folder = run_dir.parent / PACKS
    with FileLock(str(folder / f"{pack['id']}.lock")):
        ran, _ = rundir.read_json(folder / f"{pack['id']}.ran.json")
        if not ran or run_dir.name not in ran.get("runs", []):
            lead_pack(cfg, pack, label, folder)
    state = rundir.inspect(run_dir)
    return state.final_score if state.status == "complete" else None


def lead_pack(cfg: DictConfig, pack: dict, label: str, folder: Path) -> None:
    """Check, hold and prepare each run of ``pack`` as a lone job would (:func:`run_sweep_job`), then run those
    that need it together; what ran is written down, so the pack's other jobs do not run it again."""
    members, held = [], []
    try:
        for entry in pack["runs"]:
            run_dir, config = Path(entry["dir"]), entry["config"]
            name = f"{label}:{run_dir.name}"
            state = rundir.inspect(run_dir)
            if state.foreign:
                log.error("[%s] not run: %s; jdiff writes only into its own run folders", name, state.foreign_problem)
                continue
            try:
                rundir.hold(run_dir)
            except rundir.RunDirError as err:
                log.warning("[%s] skipped here: %s", name, err)
                continue
            held.append(run_dir)
            state = rundir.inspect(run_dir)
            if state.status == "complete" and not config.get("overwrite"):
                log.info("[%s] skipped, finished earlier: %s", name, run_dir)
                continue
            rundir.prepare(run_dir, None, bool(config.get("overwrite")))
            write_text(run_dir / CONFIG_FILE, OmegaConf.to_yaml(OmegaConf.create(config)))
            record = run_dir / rundir.HYDRA / "overrides.yaml"
            if not record.exists():  # the member's own job may come after the run finished, when Hydra records nothing
                record.parent.mkdir(exist_ok=True)
                write_text(record, OmegaConf.to_yaml(OmegaConf.create(entry["overrides"])))
            members.append(run_dir)
        if members:
            run_members(cfg, members, label)
    finally:
        for run_dir in held:
            rundir.release(run_dir)
        write_json(folder / f"{pack['id']}.ran.json", {"runs": [Path(e["dir"]).name for e in pack["runs"]]})


def run_members(cfg: DictConfig, members: list[Path], label: str) -> None:
    """Run ``members`` as one pack in a child process on a GPU of their own; a pack the GPU has no memory for is
    split in two halves, run one after the other."""
    device = parse_device(cfg.engine.device, "engine.device")
    gpus = [] if device.kind == "cpu" else sweep_gpus(cfg.gpus)
    try:
        with hold_gpu(Path(cfg.paths.cache) / "locks", gpus) as gpu:
            code = run_child(members, gpu, label)
    except Exception as err:
        for run_dir in members:
            record_failure(run_dir, label, type(err).__name__, str(err))
        return
    if code == OUT_OF_MEMORY and len(members) > 1:
        half = len(members) // 2
        log.warning("[%s] a pack of %d runs did not fit in the GPU's memory; running it as %d + %d", label,
                    len(members), half, len(members) - half)
        for part in (members[:half], members[half:]):
            part = [d for d in part if rundir.inspect(d).status != "complete"]  # a finished run stays as it is
            for run_dir in part:  # the attempt's files go; its log stays (it says why)
                rundir.prepare(run_dir, None, False)
            if part:
                run_members(cfg, part, label)
        return
    for run_dir in members:
        state = rundir.inspect(run_dir)
        if state.status in ("complete", "failed"):
            continue
        if code == INTERRUPTED:
            log.warning("[%s] interrupted; %s is unfinished and runs again when the sweep is launched again",
                        label, run_dir)
        else:
            record_failure(run_dir, label, "ProcessExit", f"the pack's process exited with code {code}")
