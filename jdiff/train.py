"""The training of the reference method: the loss (:func:`diffusion_loss`) and the loop (:func:`train_lora`).

Each step draws its own random numbers from (seed, step), so a step's batch and noise never depend on
what came before it, and both engines train on exactly the same data.
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, Optional

import numpy as np
from omegaconf import DictConfig
from tqdm import tqdm

from jdiff import checkpoint, rundir, tensorboard
from jdiff.augment import augment, enlarged, to_model_range
from jdiff.data import StyleSet
from jdiff.engines.base import Engine, OptimizerSettings, TrainBatch
from jdiff.files import save_png, write_text
from jdiff.noise import TRAIN, gaussian, stream
from jdiff.schedule import NoiseSchedule, learning_rate

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """The loss stopped being a number: the run stops there, and the message says what to try."""


LOSS_COLUMNS = ("step", "lr", "loss", "style_loss", "prior_loss", "seconds")


def optimizer_settings(cfg: DictConfig) -> OptimizerSettings:
    t = cfg.train
    return OptimizerSettings(lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_epsilon,
                             weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm,
                             text_encoder_lr_ratio=cfg.lora.text_encoder_lr_ratio)


def make_batch(step: int, cfg: DictConfig, style_views: list, style_prompts: list[str], class_views: list,
               class_prompts: list[str], schedule: NoiseSchedule, latent_shape: tuple[int, int, int]) -> TrainBatch:
    """Step ``step``'s batch: style images (and as many class images with prior preservation). The views are
    uint8 arrays, or the same ``enlarged`` beforehand (the same batch, made faster)."""
    rng = stream(cfg.seed, TRAIN, step)
    n = cfg.train.batch_size
    res, aug = cfg.data.resolution, cfg.augment
    view = lambda image: augment(image, res, rng, crop_scale=aug.crop_scale, random_crop=aug.random_crop,
                                 hflip=aug.hflip, rotate_degrees=aug.rotate_degrees)
    picks = rng.integers(0, len(style_views), size=n)
    pixels = [view(style_views[i]) for i in picks]
    prompts = [style_prompts[i] for i in picks]
    weights = [1.0 / n] * n
    if class_views:
        class_picks = rng.integers(0, len(class_views), size=n)
        pixels += [view(class_views[i]) for i in class_picks]
        prompts += [class_prompts[i] for i in class_picks]
        weights += [cfg.prior.weight / n] * n
    b = len(pixels)
    timesteps = rng.integers(0, schedule.num_train_timesteps, size=b).astype(np.int64)
    signal, noise_level = schedule.coefficients(timesteps)
    weights = np.asarray(weights, dtype=np.float64)
    if cfg.train.snr_gamma > 0:
        weights = weights * min_snr_weights(schedule, timesteps, cfg.train.snr_gamma)
    noise = gaussian(rng, (b, *latent_shape))
    posterior_noise = gaussian(rng, (b, *latent_shape))
    if cfg.train.noise_offset > 0:  # drawn last, and only when on: runs without it keep their random numbers
        noise = noise + np.float32(cfg.train.noise_offset) * gaussian(rng, (b, latent_shape[0], 1, 1))
    return TrainBatch(
        pixels=to_model_range(np.stack(pixels)),
        prompts=prompts,
        weights=weights.astype(np.float32),
        timesteps=timesteps,
        signal=signal,
        noise_level=noise_level,
        noise=noise,
        posterior_noise=posterior_noise,
    )


def min_snr_weights(schedule: NoiseSchedule, timesteps: np.ndarray, gamma: float) -> np.ndarray:
    """Min-SNR-gamma loss weights (Hang et al. 2023) per timestep, SNR = alpha_bar / (1 - alpha_bar): min(SNR,
    gamma) / SNR for an epsilon target, min(SNR, gamma) / (SNR + 1) for a v target (float64)."""
    acp = schedule.alphas_cumprod[timesteps].astype(np.float64)
    snr = acp / (1.0 - acp)
    clipped = np.minimum(snr, gamma)
    return clipped / (snr + 1.0) if schedule.prediction_type == "v_prediction" else clipped / snr


def diffusion_loss(engine: Engine, pixels, posterior_noise, states, noise, signal, noise_level, timesteps):
    """The per-sample loss of a training batch, in ``engine``'s tensors (every engine's step computes it with this
    function, its recorded steps included): the images' latents (a VAE posterior sample, no gradients) noised to
    each sample's timestep, x_t = sqrt(alpha_bar) * x_0 + sqrt(1 - alpha_bar) * noise, and the mean squared
    error of the UNet's prediction against its target, the noise (epsilon) or v = sqrt(alpha_bar) * noise -
    sqrt(1 - alpha_bar) * x_0 (v_prediction, SD 2.1). ``signal`` and ``noise_level`` are sqrt(alpha_bar) and
    sqrt(1 - alpha_bar) per sample; the step's loss is :func:`weighted_loss` of the result."""
    latents = engine.encode_images(pixels, posterior_noise)
    signal, noise_level = signal.reshape(-1, 1, 1, 1), noise_level.reshape(-1, 1, 1, 1)
    prediction = engine.predict(signal * latents + noise_level * noise, timesteps, states)
    target = noise if engine.prediction_type == "epsilon" else signal * noise - noise_level * latents
    return ((prediction - target) ** 2).reshape(prediction.shape[0], -1).mean(1)


def weighted_loss(per_sample, weights):
    """The step's loss: the per-sample losses weighted (:func:`make_batch`: 1/n for each style image, prior.weight/n
    for each class image) and summed."""
    return (per_sample * weights).sum()


def enlarged_views(images: list[np.ndarray], cfg: DictConfig) -> list:
    """``images`` as the run's augmentation cuts its views from (:func:`jdiff.augment.enlarged` at its resolution
    and crop scale): made once, not at every step."""
    return [enlarged(v, cfg.data.resolution, cfg.augment.crop_scale) for v in images]


def batch_source(engine: Engine, cfg: DictConfig, style: StyleSet, class_views: list,
                 class_prompts: list[str], schedule: NoiseSchedule) -> Callable[[int], TrainBatch]:
    """A run's batches: step -> :func:`make_batch` of that step; ``class_views`` are :func:`enlarged_views`."""
    style_views = enlarged_views(style.images(), cfg)
    style_prompts = [cfg.data.train_template.format(object=o, style=style.style_id) for o in style.objects]
    latent_shape = engine.latent_shape(cfg.data.resolution)
    return lambda step: make_batch(step, cfg, style_views, style_prompts, class_views, class_prompts, schedule,
                                   latent_shape)


def loss_row(step: int, lr: float, batch_size: int, weights: np.ndarray, per_sample: np.ndarray,
             seconds: float) -> dict:
    """A line of loss.csv: step ``step``'s weighted loss, and the mean losses of its style and class images."""
    n = batch_size
    return {"step": step + 1, "lr": lr, "loss": float((per_sample * weights).sum()),
            "style_loss": float(per_sample[:n].mean()),
            "prior_loss": float(per_sample[n:].mean()) if len(per_sample) > n else 0.0,
            "seconds": round(seconds, 3)}


def train_lora(engine: Engine, cfg: DictConfig, style: StyleSet, class_images: list[np.ndarray],
               class_prompts: list[str], schedule: NoiseSchedule, loss_log: Path) -> list[dict]:
    """Train the attached adapters for ``train.steps`` steps; writes the per-step loss log as it goes, and into
    the loss log's folder (the run's) what train.checkpoint_every, train.sample_every and TensorBoard ask for.
    A checkpoint there (:mod:`jdiff.checkpoint`) is continued from."""
    t = cfg.train
    run_dir = Path(loss_log).parent
    draw = batch_source(engine, cfg, style, enlarged_views(class_images, cfg), class_prompts, schedule)
    engine.setup_training(optimizer_settings(cfg))
    n = cfg.train.batch_size
    rows: list[dict] = []
    resumed = checkpoint.read(run_dir, t.steps)
    if resumed is not None:
        checkpoint.restore(run_dir, engine)
        rows = [dict(row) for row in resumed["rows"]]
        log.info("resuming training at step %d of %d from %s", len(rows), t.steps, run_dir / rundir.CHECKPOINT)
    else:
        shutil.rmtree(run_dir / rundir.SAMPLES, ignore_errors=True)  # an earlier attempt's, from its step 0 on
    first = len(rows)
    board = run_dir / rundir.TENSORBOARD if tensorboard.available() else None
    waited = 0.0  # seconds the loop waited for the worker's next batch
    started = time.perf_counter() - (rows[-1]["seconds"] if rows else 0.0)
    wall_start = time.time() - (rows[-1]["seconds"] if rows else 0.0)
    bar = tqdm(total=t.steps, initial=first, desc="train", unit="step")

    def write_logs() -> None:
        write_loss_log(loss_log, rows)
        if board is not None:
            tensorboard.write_log(board, rows, wall_start)

    def record(step: int, lr: float, batch: TrainBatch, per_sample: np.ndarray) -> None:
        rows.append(loss_row(step, lr, n, batch.weights, per_sample, time.perf_counter() - started))
        if not np.isfinite(rows[-1]["loss"]):
            raise TrainingDiverged(diverged_message(cfg, step + 1, rows[-1]["loss"], loss_log.name))
        bar.update(1)
        bar.set_postfix(loss=f"{rows[-1]['loss']:.4f}")
        if (step + 1) % 50 == 0 or step + 1 == cfg.train.steps:
            write_logs()

    def pause(done: int):
        """What to do once ``done`` steps are taken and recorded, before the next is queued (None: nothing)."""
        if done == first:
            return None
        sample = t.sample_every and done % t.sample_every == 0
        keep = t.checkpoint_every and (done % t.checkpoint_every == 0 or done == t.steps)
        if not (sample or keep):
            return None

        def work() -> None:
            if sample:  # before the checkpoint: a checkpoint at step k means step k's samples are there
                write_samples(engine, cfg, style, run_dir / rundir.SAMPLES / f"step_{done}")
            if keep:
                write_logs()
                checkpoint.save(run_dir, engine, done, rows)
        return work

    def steps(worker: ThreadPoolExecutor):
        """(batch, lr) of each step; the next batch is drawn on the worker thread (augmentation is CPU work)
        while the engine runs this one. Batches depend on (seed, step) only."""
        nonlocal waited
        upcoming = worker.submit(draw, first) if first < t.steps else None
        for step in range(first, t.steps):
            asked = time.perf_counter()
            batch = upcoming.result()
            waited += time.perf_counter() - asked
            if step + 1 < t.steps:
                upcoming = worker.submit(draw, step + 1)
            yield batch, learning_rate(step, t.lr, t.steps, t.lr_schedule, t.lr_warmup_steps)

    try:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="batches") as worker:
            run_one_ahead(engine, steps(worker), record, start=first, pause=pause)
    except BaseException:  # a step failed (or the run was stopped): keep the losses of the steps that finished
        if rows:
            write_logs()
        raise
    finally:
        bar.close()
    if first == t.steps:
        write_logs()
    log.info("trained %d steps in %.1f s (%.2f steps/s; %.1f s of it waiting for the next batch)", len(rows) - first,
             rows[-1]["seconds"], (len(rows) - first) / max(time.perf_counter() - started, 1e-9), waited)
    return rows


def write_samples(engine: Engine, cfg: DictConfig, style: StyleSet, out_dir: Path) -> list[Path]:
    """train.sample_prompts (or the style's first 2 prompt objects) sampled with the adapters as they are now,
    with the generation settings and the same noise at every step, as ``out_dir/<name>.png``."""
    from dataclasses import replace

    from jdiff.data import image_file_name
    from jdiff.generate import init_image, sampling_request

    init = init_image(cfg, style)
    prompts = cfg.train.sample_prompts
    objects = list(style.prompt_objects)[:2] if prompts is None else [str(p) for p in prompts]
    names = ([image_file_name(o) for o in objects] if prompts is None
             else [f"prompt_{i:02d}.png" for i in range(len(objects))])
    saved = []
    size = cfg.infer.batch_size
    for begin in range(0, len(objects), size):
        chunk = objects[begin:begin + size]
        request = sampling_request(engine, cfg, style, chunk, begin, init)
        if prompts is not None:  # verbatim: no template, no origin-prompt blend
            request = replace(request, prompts=chunk, origin_prompts=None)
        for name, image in zip(names[begin:begin + size], engine.generate(request)):
            saved.append(save_png(out_dir / name, image))
    return saved


def run_one_ahead(engine: Engine, steps: Iterable[tuple[TrainBatch, float]],
                  record: Callable[[int, float, TrainBatch, np.ndarray], None], start: int = 0,
                  pause: Optional[Callable[[int], Optional[Callable[[], None]]]] = None) -> None:
    """Train on ``steps`` ((batch, lr) pairs, the first being step ``start``), reading step k's per-sample losses
    (for ``record(k, lr, batch, losses)``) only after step k+1 is queued, so the host prepares the next step while
    the device runs this one. When a step fails, the step queued before it is still recorded, if its losses can
    be read. ``pause(k)``: work to do when k steps are taken, with every one recorded and none queued (a
    checkpoint, samples), or None; asked before each step after the first, and after the last."""
    pending, recording = None, False
    done = start
    try:
        for step, (batch, lr) in enumerate(steps, start):
            work = pause(step) if pause else None
            if work is not None:
                if pending:
                    recording = True
                    _record(pending, record)
                    recording, pending = False, None
                work()
            queued = (step, lr, batch, engine.start_train_step(batch, lr))
            if pending:
                recording = True
                _record(pending, record)
                recording = False
            pending = queued
            done = step + 1
        if pending:
            recording = True
            _record(pending, record)
            pending = None
        work = pause(done) if pause else None
        if work is not None:
            work()
    except BaseException:
        if pending and not recording:  # not when recording it was what failed (a non-finite loss)
            with contextlib.suppress(Exception):
                _record(pending, record)
        raise


def _record(queued: tuple, record: Callable) -> None:
    step, lr, batch, losses = queued
    record(step, lr, batch, losses())


def diverged_message(cfg: DictConfig, step: int, loss: float, loss_log: str) -> str:
    t, precision = cfg.train, cfg.engine.mixed_precision
    tries = ["a smaller train.lr (the reference method uses 1e-4)"]
    if not 0 < t.max_grad_norm <= 1.0:
        tries.append("gradient clipping (train.max_grad_norm=1.0)")
    if precision != "no":
        tries.append("full precision (engine.mixed_precision=no)")
    return (f"training diverged at step {step} of {t.steps}: the loss is {loss} with train.lr={t.lr}, "
            f"train.max_grad_norm={t.max_grad_norm}, engine.mixed_precision={precision}. Try {' or '.join(tries)}; "
            f"the losses so far are in {loss_log}.")


def write_loss_log(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=LOSS_COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, buf.getvalue())
