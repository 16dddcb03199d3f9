"""A sweep's class images, planned as one set before its runs start.

The gpu_pool launcher (``hydra_plugins/jdiff_gpu_pool``) calls :func:`plan_sweep` with every job of a multirun
(Optuna: of each batch of trials). It composes each job's config as the launcher does, and collects, per cache
folder (model + sampling settings), the distinct (object, k) that the runs with prior preservation need. The
missing ones are sampled in fixed slices of ``prior.batch_size`` images of one deterministic list (the folder's
images in :func:`jdiff.prior.plan_order`), the slices split into contiguous shares, one child process per GPU
(``python -m jdiff.prior_plan WORK``), each holding its GPU's lock like a job does. The runs then find every image
cached and only load them. A job that cannot be composed, validated or located is left out: it fails on its own.

The sweep folder gets ``class_images.json``: the styles of each ``prior.share=sweep`` class set (by data.root),
and what each share generated where. Sweep jobs read the styles from it (:func:`sweep_styles`).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from omegaconf import DictConfig, OmegaConf, open_dict

from jdiff import rundir
from jdiff.files import write_json
from jdiff.prior import ClassImageSettings, Item, batches, class_set, generate_batch, missing, plan_order, \
    prior_batch_size

log = logging.getLogger(__name__)

PLAN_FILE = "class_images.json"  # in the sweep folder


@dataclass
class Group:
    """One cache folder's share of the plan."""

    cache_dir: Path
    settings: ClassImageSettings
    model_dir: Path
    config: dict  # the resolved config of the first job that uses the folder: the engine that generates
    batch_size: int
    items: set = field(default_factory=set)  # every (object, k) the sweep's jobs use, for fixed slices
    needed: set = field(default_factory=set)  # those of the jobs still to run


def needs_prior(cfg: DictConfig) -> bool:
    return bool(cfg.prior.enabled) and ("prior" in cfg.stages or "train" in cfg.stages)


def compose_jobs(base: DictConfig, loader,
                 job_overrides: Sequence[Sequence[str]]) -> list[Optional[tuple[DictConfig, Path]]]:
    """Each job's task config (validated, paths resolved) and run folder, in the order of ``job_overrides``; None
    for a job that fails either (it reports that itself when it runs). The launcher composes them once, for the
    class-image plan and the packs (:func:`jdiff.sweep.plan_launch`)."""
    from jdiff.pipeline import resolve_paths
    from jdiff.validate import validate_config

    jobs = []
    for overrides in job_overrides:
        try:
            sweep_cfg = loader.load_sweep_config(base, list(overrides))
            run_dir = Path(os.path.abspath(Path(str(sweep_cfg.hydra.sweep.dir)) / str(sweep_cfg.hydra.sweep.subdir)))
            cfg = copy.deepcopy(sweep_cfg)
            with open_dict(cfg):
                del cfg["hydra"]
            resolve_paths(cfg)
            validate_config(cfg)
        except Exception as err:  # the job reports it itself when it runs
            log.info("sweep plan: leaving out job %s (%s)", " ".join(overrides), str(err).splitlines()[0] if str(err) else type(err).__name__)
            jobs.append(None)
            continue
        jobs.append((cfg, run_dir))
    return jobs


def shared_styles(jobs: list[tuple[DictConfig, Path]]) -> dict[str, list[str]]:
    """The styles of each share=sweep class set, by data.root: the sweep's own, sorted."""
    found: dict[str, set] = {}
    for cfg, _ in jobs:
        if needs_prior(cfg) and cfg.prior.share == "sweep" and cfg.prior.styles is None:
            found.setdefault(str(cfg.data.root), set()).add(str(cfg.style))
    return {root: sorted(styles) for root, styles in found.items()}


def sweep_styles(cfg: DictConfig, sweep_dir: Path) -> DictConfig:
    """A sweep job's config with ``prior.styles`` set to its sweep's styles (share=sweep, styles not given, and the
    launcher planned them); otherwise as it is."""
    if not (cfg.prior.share == "sweep" and cfg.prior.styles is None):
        return cfg
    plan, _ = rundir.read_json(Path(sweep_dir) / PLAN_FILE)
    styles = ((plan or {}).get("styles") or {}).get(str(cfg.data.root))
    if styles:
        cfg.prior.styles = list(styles)
    return cfg


def plan_groups(jobs: list[tuple[DictConfig, Path]], styles: dict[str, list[str]]) -> list[Group]:
    from jdiff.data import load_style
    from jdiff.demo_data import write_demo_styles
    from jdiff.models import resolve_model_dir
    from jdiff.pipeline import resolved
    from jdiff.schedule import NoiseSchedule

    loaded, models, groups = {}, {}, {}

    def style(root: str, name: str):
        if (root, name) not in loaded:
            loaded[root, name] = load_style(Path(root), name)
        return loaded[root, name]

    for cfg, run_dir in jobs:
        if not needs_prior(cfg):
            continue
        try:
            if cfg.prior.share == "sweep" and cfg.prior.styles is None and str(cfg.data.root) in styles:
                cfg.prior.styles = styles[str(cfg.data.root)]
            if cfg.data.builder == "demo":
                write_demo_styles(Path(cfg.data.root), Path(cfg.paths.cache))
            model_key = json.dumps([OmegaConf.to_container(cfg.model, resolve=True), cfg.paths.cache])
            if model_key not in models:
                model_dir = resolve_model_dir(cfg.model, Path(cfg.paths.cache))
                models[model_key] = (model_dir, NoiseSchedule.from_model(model_dir, cfg.model.prediction_type))
            model_dir, schedule = models[model_key]
            root = str(cfg.data.root)
            wanted = class_set(cfg, style(root, str(cfg.style)), model_dir, schedule.prediction_type,
                               load=lambda name: style(root, name))
        except Exception as err:  # the run meets it again and says so
            log.info("class-image plan: leaving out %s (%s)", run_dir.name, str(err).splitlines()[0] if str(err) else type(err).__name__)
            continue
        group = groups.get(wanted.cache_dir)
        if group is None:
            group = groups[wanted.cache_dir] = Group(wanted.cache_dir, wanted.settings, model_dir, resolved(cfg),
                                                     prior_batch_size(cfg))
        group.items.update(wanted.items)
        state = rundir.inspect(run_dir)
        if not (state.status == "complete" and not cfg.overwrite):
            group.needed.update(wanted.items)
    return list(groups.values())


def shares(groups: list[Group], n: int) -> list[list[tuple[int, list[Item]]]]:
    """The batches to sample (those holding a missing image a run needs), as ``n`` contiguous shares."""
    work = []
    for g, group in enumerate(groups):
        todo = set(missing(group.cache_dir, group.needed))
        work += [(g, batch) for batch in batches(plan_order(group.items), group.batch_size) if todo.intersection(batch)]
    n = max(1, min(n, len(work)))
    cut = [round(i * len(work) / n) for i in range(n + 1)]
    return [work[cut[i] : cut[i + 1]] for i in range(n) if cut[i] < cut[i + 1]]


def workers(base: DictConfig, groups: list[Group]) -> tuple[list[str], int]:
    """The GPUs to generate on and how many processes: one per GPU (n_jobs at most), or n_jobs (1) on the CPU."""
    from jdiff.devices import parse_device
    from jdiff.sweep import parallel_jobs, sweep_gpus

    on_cpu = all(parse_device(g.config["engine"]["device"], "engine.device").kind == "cpu" for g in groups)
    gpus = [] if on_cpu else sweep_gpus(base.gpus)
    n = parallel_jobs(base.n_jobs, gpus)
    return gpus, (min(n, len(gpus)) if gpus else n)


def plan_sweep(base: DictConfig, composed: Sequence[Optional[tuple[DictConfig, Path]]]) -> dict:
    """Generate what the jobs' runs need before they start (``composed``: :func:`compose_jobs`); returns what went
    into ``class_images.json``."""
    from jdiff.sweep import hold_gpu, job_environment, stop

    started = time.time()
    sweep_dir = Path(os.path.abspath(str(base.hydra.sweep.dir)))
    jobs = [job for job in composed if job is not None]
    styles = shared_styles(jobs)
    record = {"styles": styles, "started": started, "shares": []}
    sweep_dir.mkdir(parents=True, exist_ok=True)
    write_json(sweep_dir / PLAN_FILE, record)
    groups = plan_groups(jobs, styles)
    if not groups:
        return record
    gpus, n = workers(base, groups)
    work = shares(groups, n)
    record["images"] = sum(len(g.items) for g in groups)
    record["missing"] = sum(len(missing(g.cache_dir, g.needed)) for g in groups)
    record["batch_size"] = {str(g.cache_dir): g.batch_size for g in groups}
    if not work:
        log.info("class images: all %d that the sweep's runs need are cached", len(set().union(*(g.needed for g in groups))))
        write_json(sweep_dir / PLAN_FILE, record)
        return record
    log.info("class images: %d missing of %d in %d cache folder(s); %d batches over %d process(es)%s",
             record["missing"], record["images"], len(groups), sum(map(len, work)), len(work),
             f" on GPUs {', '.join(gpus)}" if gpus else "")
    lock_dir = Path(groups[0].config["paths"]["cache"]) / "locks"
    temp = Path(tempfile.mkdtemp(prefix="jdiff-prior-plan-"))
    children: list[subprocess.Popen] = []

    def run_share(index: int, share: list[tuple[int, list[Item]]]) -> dict:
        used = sorted({g for g, _ in share})
        order = {"groups": [{"cache_dir": str(groups[g].cache_dir), "model_dir": str(groups[g].model_dir),
                             "settings": asdict(groups[g].settings), "config": groups[g].config} for g in used],
                 "batches": [[used.index(g), [list(item) for item in batch]] for g, batch in share]}
        work_file, result_file = temp / f"share{index}.json", temp / f"share{index}.result.json"
        write_json(work_file, order)
        with hold_gpu(lock_dir, gpus) as gpu:
            begun = time.time()
            child = subprocess.Popen([sys.executable, "-m", "jdiff.prior_plan", str(work_file), str(result_file),
                                      "--label", f"prior {index}"], env=job_environment(gpu))
            children.append(child)
            try:
                code = child.wait()
            finally:
                stop(child)
        result, _ = rundir.read_json(result_file)
        return {"share": index, "gpu": gpu, "pid": child.pid, "batches": len(share), "exit_code": code,
                "seconds": round(time.time() - begun, 3), "generated": (result or {}).get("generated", [])}

    pool = ThreadPoolExecutor(max_workers=len(work), thread_name_prefix="prior-share")
    try:
        futures = [pool.submit(run_share, i, s) for i, s in enumerate(work)]
        record["shares"] = [f.result() for f in futures]
    except KeyboardInterrupt:  # Ctrl-C: the images made so far stay; the next launch makes the rest
        log.warning("interrupted while making the class images; launch the sweep again to go on")
        for future in futures:
            future.cancel()
        for child in children:
            stop(child)
        raise
    finally:
        pool.shutdown(wait=True)
        for f in temp.iterdir():
            f.unlink()
        temp.rmdir()
    record["seconds"] = round(time.time() - started, 3)
    record["generated"] = sum(len(s["generated"]) for s in record["shares"])
    write_json(sweep_dir / PLAN_FILE, record)
    failed = [s for s in record["shares"] if s["exit_code"] != 0]
    if failed:
        log.warning("class images: %d of %d share(s) did not finish (exit codes %s); the runs make what is missing "
                    "themselves", len(failed), len(work), ", ".join(str(s["exit_code"]) for s in failed))
    else:
        log.info("class images: %d generated in %.1f s (%.2f images/s over %d GPU share(s))", record["generated"],
                 record["seconds"], record["generated"] / max(record["seconds"], 1e-9), len(record["shares"]))
    return record


# -- the child process: one share ---------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    from jdiff.job import stop_when_orphaned, typed_config
    from jdiff.pipeline import load_engine
    from jdiff.sweep import INTERRUPTED

    parser = argparse.ArgumentParser(prog="python -m jdiff.prior_plan", description="one share of a sweep's class images")
    parser.add_argument("work", type=Path, help="the share: the cache folders and the batches to sample")
    parser.add_argument("result", type=Path, help="where to write what was generated")
    parser.add_argument("--label", default="prior")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=f"[%(asctime)s][{args.label}][%(levelname)s] - %(message)s",
                        force=True)
    stop_when_orphaned()
    signal.signal(signal.SIGTERM, _interrupt)
    order = json.loads(args.work.read_text(encoding="utf-8"))
    engines: dict[int, object] = {}
    generated: list = []
    log.info("%d batches, CUDA_VISIBLE_DEVICES=%r", len(order["batches"]), os.environ.get("CUDA_VISIBLE_DEVICES"))
    try:
        for number, (g, batch) in enumerate(order["batches"], 1):
            group = order["groups"][g]
            if g not in engines:
                for other in list(engines):  # one model in memory at a time
                    del engines[other]

            def engine(g=g, group=group):
                if g not in engines:
                    engines[g] = load_engine(typed_config(group["config"]), Path(group["model_dir"]))
                return engines[g]

            cache_dir = Path(group["cache_dir"])
            made = generate_batch(cache_dir, [(o, int(k)) for o, k in batch], ClassImageSettings(**group["settings"]),
                                  engine)
            generated += [[cache_dir.name, o, k] for o, k in made]
            log.info("batch %d/%d: %d images made, %d found made", number, len(order["batches"]), len(made),
                     len(batch) - len(made))
    except KeyboardInterrupt:
        log.warning("interrupted; the images made so far are kept")
        write_json(args.result, {"generated": generated})
        return INTERRUPTED
    except Exception as err:
        log.error("class images failed: %s: %s", type(err).__name__, err)
        write_json(args.result, {"generated": generated, "error": str(err)})
        return 1
    write_json(args.result, {"generated": generated})
    return 0


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
