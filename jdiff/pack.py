"""Packed runs: the runs of a sweep that share a base model train in one process, in one batched step.

A pack is a few runs whose settings allow one model and one step for all (:func:`pack_key`). The engine is
loaded once; each run's adapter is a slice of the packed layers (:meth:`jdiff.engines.base.Engine.
add_packed_lora`), each sample goes through its own run's adapter, and each run keeps everything it has
alone: its data order, augmentation and noise streams (its batches are :func:`jdiff.train.make_batch` of its
own config), optimiser state and settings, learning-rate schedule, clipping, loss weights, rank and alpha,
and its own run folder with the same files. Generation then samples the runs' images in shared batches,
each prompt through its run's adapter. A run that fails (a non-finite loss, broken images, a score that is
not a number) gets FAILED in its folder and leaves the pack; the others go on.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Optional

import numpy as np
from filelock import FileLock
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from jdiff import rundir, tensorboard
from jdiff.data import image_file_name
from jdiff.engines.base import EngineError, GenerateRequest, TrainBatch
from jdiff.files import save_png, write_json, write_text
from jdiff.lora_file import check_adapter_file, save_adapters
from jdiff.prior import load_class_images
from jdiff.schedule import learning_rate
from jdiff.train import (TrainingDiverged, batch_source, diverged_message, enlarged_views, loss_row,
                         optimizer_settings, write_loss_log)

log = logging.getLogger(__name__)

# What the runs of a pack must share: one model, engine and step shape. Everything else may differ.
PACK_KEYS = ("model", "engine", "deterministic", "paths", "data.resolution", "train.steps", "train.batch_size",
             "prior.enabled", "lora.unet_targets", "lora.text_encoder_targets")
MAX_SAMPLING_BATCH = 64  # the most prompts a pack samples at once (twice as many rows with guidance)


COSTS = "pack_costs.json"  # in paths.cache: the GPU memory a packed run took, by pack_key (sweep.pack=auto)


def cost_key(cfg: DictConfig) -> str:
    return hashlib.sha1(str(pack_key(cfg)).encode()).hexdigest()[:16]


def measured_cost(cfg: DictConfig) -> Optional[float]:
    """GiB of GPU memory a run of ``cfg``'s kind took in a pack before (its pack's peak over its size), or None."""
    data, _ = rundir.read_json(Path(cfg.paths.cache) / COSTS)
    entry = (data or {}).get(cost_key(cfg))
    return float(entry["gib_per_run"]) if isinstance(entry, dict) and "gib_per_run" in entry else None


def record_cost(cfg: DictConfig, runs: int, peak_gib: float) -> None:
    path = Path(cfg.paths.cache) / COSTS
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        data, _ = rundir.read_json(path)
        data = data or {}
        data[cost_key(cfg)] = {"gib_per_run": round(peak_gib / runs, 3), "runs": runs, "peak_gib": round(peak_gib, 2),
                               "engine": cfg.engine.name, "resolution": cfg.data.resolution}
        write_json(path, data)


def pack_key(cfg: DictConfig) -> Optional[str]:
    """The settings a run shares with the runs it can be packed with, or None: it runs alone (it does not train,
    or it starts from a LoRA file)."""
    if "train" not in cfg.stages or cfg.lora.path is not None or cfg.train.checkpoint_every or cfg.train.sample_every:
        return None  # nothing to train, or what happens between steps is its own (checkpoints, samples)
    if cfg.inject.name != "none":
        return None  # style injection samples with its own loop (jdiff.inject), which packs do not route
    def value(key: str):
        node = OmegaConf.select(cfg, key)
        return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node

    values = {key: value(key) for key in PACK_KEYS}
    values["text_encoder_trains"] = cfg.lora.text_encoder_rank > 0
    values["stages"] = list(cfg.stages)
    return repr(sorted(values.items()))


def plan_packs(cfgs: list[DictConfig], size: int) -> list[list[int]]:
    """The runs (indices into ``cfgs``) in packs of at most ``size``, in the order given: runs with the same
    :func:`pack_key` together; a run that cannot pack is a pack of its own."""
    groups: dict[str, list[int]] = defaultdict(list)
    packs: list[list[int]] = []
    for i, cfg in enumerate(cfgs):
        key = pack_key(cfg)
        if key is None or size <= 1:
            packs.append([i])
            continue
        groups[key].append(i)
        if len(groups[key]) == size:
            packs.append(groups.pop(key))
    packs += list(groups.values())
    return sorted(packs, key=lambda pack: pack[0])


def concat_batches(batches: list[TrainBatch]) -> TrainBatch:
    """The runs' batches as one, run after run."""
    join = lambda name: np.concatenate([getattr(b, name) for b in batches])
    return TrainBatch(pixels=join("pixels"), prompts=[p for b in batches for p in b.prompts], weights=join("weights"),
                      timesteps=join("timesteps"), signal=join("signal"), noise_level=join("noise_level"),
                      noise=join("noise"), posterior_noise=join("posterior_noise"))


def train_pack(engine, runs: list, failed: dict[int, BaseException]) -> None:
    """Train the adapters of ``runs`` (pipeline.Run objects sharing ``engine``) together; each run's loss log and
    adapter go into its folder. A run whose loss stops being a number goes into ``failed`` and leaves the pack."""
    from jdiff.pipeline import LORA_FILE, lora_spec

    cfgs = [run.cfg for run in runs]
    steps, n = cfgs[0].train.steps, cfgs[0].train.batch_size
    shared: dict[tuple, list] = {}  # runs of one class set (prior.share=sweep: every run) read it once

    def class_views(run) -> list:
        key = (tuple(item.path for item in run.class_items), run.cfg.data.resolution, run.cfg.augment.crop_scale)
        if key not in shared:
            shared[key] = enlarged_views(load_class_images(run.class_items), run.cfg)
        return shared[key]

    sources = [batch_source(engine, run.cfg, run.style, class_views(run), [item.prompt for item in run.class_items],
                            run.schedule) for run in runs]
    engine.add_packed_lora([lora_spec(cfg) for cfg in cfgs])
    engine.setup_packed_training([optimizer_settings(cfg) for cfg in cfgs])
    members = list(range(len(runs)))  # the runs still in the pack, in the engine's order
    rows: dict[int, list[dict]] = {i: [] for i in members}
    started, wall_start = time.perf_counter(), time.time()
    bar = tqdm(total=steps, desc=f"train x{len(runs)}", unit="step")

    def lr(i: int, step: int) -> float:
        t = cfgs[i].train
        return learning_rate(step, t.lr, steps, t.lr_schedule, t.lr_warmup_steps)

    def record(step: int, queued: list[int], batches: list[TrainBatch], losses: Callable[[], np.ndarray]) -> None:
        per_sample = losses().reshape(len(queued), -1)
        dropped = []
        for i, batch, values in zip(queued, batches, per_sample):
            if i in failed:
                continue
            rows[i].append(loss_row(step, lr(i, step), n, batch.weights, values, time.perf_counter() - started))
            loss = rows[i][-1]["loss"]
            if not np.isfinite(loss):
                failed[i] = TrainingDiverged(diverged_message(cfgs[i], step + 1, loss, rundir.LOSS))
                log.error("[%s] %s", runs[i].dir.name, failed[i])
                dropped.append(i)
            elif (step + 1) % 50 == 0 or step + 1 == steps:
                write_loss_log(runs[i].dir / rundir.LOSS, rows[i])
        for i in dropped:
            write_loss_log(runs[i].dir / rundir.LOSS, rows[i])
        if dropped:
            keep = [position for position, i in enumerate(members) if i not in failed]
            members[:] = [members[p] for p in keep]
            if members:
                engine.keep_packed(keep)
        bar.update(1)

    try:
        with ThreadPoolExecutor(max_workers=min(4, len(runs)), thread_name_prefix="batches") as pool:
            draw = lambda step: {i: pool.submit(sources[i], step) for i in members}
            upcoming, pending = draw(0), None
            for step in range(steps):
                if not members:
                    break
                queued = list(members)
                batches = [upcoming[i].result() for i in queued]
                if step + 1 < steps:
                    upcoming = draw(step + 1)
                wait = engine.start_packed_train_step(concat_batches(batches), np.array([lr(i, step) for i in queued]))
                if pending:
                    record(*pending)
                pending = (step, queued, batches, wait)
            if pending and members:
                record(*pending)
    finally:
        bar.close()
    seconds = time.perf_counter() - started
    log.info("trained %d runs x %d steps in %.1f s (%.2f run-steps/s)", len(runs), steps, seconds,
             len(runs) * steps / max(seconds, 1e-9))
    for i, run in enumerate(runs):
        if rows[i] and tensorboard.available():
            tensorboard.write_log(run.dir / rundir.TENSORBOARD, rows[i], wall_start)
    for position, i in enumerate(members):
        adapter = runs[i].dir / LORA_FILE
        save_adapters(adapter, engine.packed_adapters(position),
                      {"style": runs[i].style.style_id, "steps": steps})
        try:
            check_adapter_file(adapter)
        except ValueError as err:
            adapter.unlink()
            failed[i] = TrainingDiverged(f"training ended with an unusable adapter ({err}); try a smaller train.lr "
                                         f"(now {cfgs[i].train.lr}).")
    survivors = [p for p, i in enumerate(members) if i not in failed]
    if len(survivors) < len(members) and survivors:
        engine.keep_packed(survivors)
    members[:] = [members[p] for p in survivors]
    return members


def sampling_key(req: GenerateRequest) -> tuple:
    """What the prompts of one sampling batch share."""
    return (req.steps, req.guidance_scale, req.negative_prompt, req.origin_scale, req.strength, req.sampler,
            req.init_image is None)


def merged(requests: list[GenerateRequest], adapters: list[int]) -> GenerateRequest:
    """One request of many one-prompt requests, each prompt through adapter ``adapters[i]``."""
    first = requests[0]
    join = lambda name: None if getattr(first, name) is None else np.concatenate([getattr(r, name) for r in requests])
    return GenerateRequest(
        prompts=[p for r in requests for p in r.prompts], noise=join("noise"), steps=first.steps,
        guidance_scale=first.guidance_scale, negative_prompt=first.negative_prompt,
        origin_prompts=None if first.origin_prompts is None else [p for r in requests for p in r.origin_prompts],
        origin_scale=first.origin_scale,
        init_image=None if first.init_image is None else np.stack([r.init_image for r in requests]),
        init_posterior_noise=join("init_posterior_noise"), strength=first.strength, sampler=first.sampler,
        adapters=np.asarray(adapters, np.int64))


def generate_pack(engine, runs: list, members: list[int], failed: dict[int, BaseException]) -> None:
    """Every image of the runs ``members`` (their engine order is their adapter index), in shared batches."""
    from jdiff.generate import init_image, sampling_request

    items = defaultdict(list)  # sampling key -> [(run, object, request)]
    for position, i in enumerate(members):
        run = runs[i]
        init = init_image(run.cfg, run.style)
        for k, obj in enumerate(run.style.prompt_objects):
            req = sampling_request(engine, run.cfg, run.style, [obj], k, init)
            items[sampling_key(req)].append((i, position, obj, req))
    for group in items.values():
        size = min(MAX_SAMPLING_BATCH, max(runs[i].cfg.infer.batch_size for i, *_ in group) * len(members))
        for start in tqdm(range(0, len(group), size), desc=f"generate x{len(members)}", unit="batch"):
            chunk = [item for item in group[start : start + size] if item[0] not in failed]
            if chunk:
                sample(engine, runs, chunk, failed)


def sample(engine, runs: list, chunk: list, failed: dict[int, BaseException]) -> None:
    """Sample one shared batch; when it fails, each run's part again alone, so that only a broken run fails."""
    try:
        images = engine.generate(merged([req for *_, req in chunk], [position for _, position, _, _ in chunk]))
    except EngineError:
        if len({i for i, *_ in chunk}) == 1:
            raise
        for i in dict.fromkeys(i for i, *_ in chunk):
            try:
                sample(engine, runs, [item for item in chunk if item[0] == i], failed)
            except EngineError as err:
                failed[i] = err
                log.error("[%s] %s", runs[i].dir.name, err)
        return
    for (i, _, obj, _), image in zip(chunk, images):
        save_png(runs[i].dir / rundir.IMAGES / image_file_name(obj), image)


def gpu_memory_watch():
    """This process's GPU memory as nvidia-smi sees it (any engine's allocator), when it runs on a GPU."""
    if not os.environ.get("CUDA_VISIBLE_DEVICES"):
        return None
    from jdiff.bench.memory import GpuMemoryWatch

    return GpuMemoryWatch(os.getpid())


def run_pack(cfgs: list[DictConfig], run_dirs: list[Path]) -> dict[int, BaseException]:
    """Run the stages of ``cfgs`` as one pack, into ``run_dirs`` (checked and prepared by the caller); returns the
    runs that failed, by index, with their errors. The others end with COMPLETE, as alone."""
    from jdiff.pipeline import USER_ERRORS, Run, finish, resolve_paths
    from jdiff.validate import validate_config

    started = time.perf_counter()
    failed: dict[int, BaseException] = {}
    runs = []
    for i, (cfg, run_dir) in enumerate(zip(cfgs, run_dirs)):
        try:
            resolve_paths(cfg)
            validate_config(cfg)
            run_dir.mkdir(parents=True, exist_ok=True)
            write_text(run_dir / rundir.CONFIG, OmegaConf.to_yaml(cfg, resolve=True))
            runs.append(Run(cfg, run_dir))
        except USER_ERRORS as err:
            failed[i] = err
            runs.append(None)
    alive = [i for i, run in enumerate(runs) if run is not None]
    if not alive:
        return failed
    engine = runs[alive[0]].engine
    for i in alive:
        runs[i]._engine = engine
        runs[i].seconds["load_engine"] = runs[alive[0]].seconds.get("load_engine", 0.0)

    def each(stage: str, fn: Callable) -> None:
        for i in alive:
            if i not in failed:
                try:
                    runs[i].timed(stage, lambda: fn(runs[i]))
                except USER_ERRORS as err:
                    failed[i] = err

    if cfgs[alive[0]].prior.enabled and "prior" in cfgs[alive[0]].stages:
        each("prior", lambda run: run.prior())
    members = [i for i in alive if i not in failed]
    if members:
        stage_started = time.perf_counter()
        local: dict[int, BaseException] = {}
        watch = gpu_memory_watch()
        trained = train_pack(engine, [runs[i] for i in members], local)
        peak = watch.stop() if watch else None
        if peak:  # what sweep.pack=auto sizes the next packs of this kind by
            record_cost(cfgs[members[0]], len(members), peak)
        failed.update({members[j]: err for j, err in local.items()})
        members = [members[j] for j in trained]
        for i in alive:
            runs[i].seconds["train"] = round(time.perf_counter() - stage_started, 2)
    if members and "generate" in cfgs[alive[0]].stages:
        stage_started = time.perf_counter()
        local = {}
        generate_pack(engine, [runs[i] for i in members], list(range(len(members))), local)
        failed.update({members[j]: err for j, err in local.items()})
        for i in members:
            runs[i].seconds["generate"] = round(time.perf_counter() - stage_started, 2)
    for i in members:
        if i in failed:
            continue
        try:
            finish(runs[i], started, pack={"size": len(cfgs), "runs": [str(d) for d in run_dirs]})
        except USER_ERRORS as err:
            failed[i] = err
    for i, err in failed.items():
        write_json(run_dirs[i] / rundir.FAILED, {"error": str(err), "type": type(err).__name__})
    return failed
