"""One run: validate, then the stages prior -> train -> generate -> score, each writing into the run dir.

The run directory ends up holding everything needed to understand and reproduce the run:

    config.yaml         the resolved config
    lora.safetensors    the adapter (diffusers' load_lora_weights reads it)
    loss.csv            the per-step training loss
    samples/step_<k>/   train.sample_every's images; tensorboard/ the loss as TensorBoard events (if installed)
    checkpoint/         train.checkpoint_every's training state, until the run completes
    images/<Object>.png one image per prompt
    scores.json         the metrics and the final score
    contact_sheet.png   references and generated images, labelled
    run.log             the log
    COMPLETE            written last: the run finished
    FAILED              instead, in a sweep: {"error": ..., "type": ...} of the run that failed
    class_set.json      with prior preservation: the class set (share, styles, objects, cache folder)
"""

from __future__ import annotations

import copy
import logging
import os
import time
from pathlib import Path
from typing import Optional

import numpy as np
from omegaconf import DictConfig, OmegaConf, open_dict

from jdiff import checkpoint, rundir
from jdiff.contact_sheet import contact_sheet
from jdiff.data import StyleDataError, image_file_name, load_rgb, load_style
from jdiff.demo_data import check_demo_root, write_demo_styles
from jdiff.engines.base import Engine, EngineError, LoraSpec, create_engine
from jdiff.files import inside, save_png, write_json, write_text
from jdiff.generate import generate_images
from jdiff.lora_file import check_adapter_file
from jdiff.models import ModelNotFoundError, check_build_path, resolve_model_dir
from jdiff.prior import ClassImage, ClassSet, class_images, class_set, load_class_images, prior_batch_size
from jdiff.schedule import NoiseSchedule
from jdiff.scoring import final_score
from jdiff.scoring.scorer import Scorer, StyleImages
from jdiff.train import TrainingDiverged, train_lora
from jdiff.validate import ConfigError, validate_config

log = logging.getLogger(__name__)

COMPLETE, FAILED, LORA_FILE = rundir.COMPLETE, rundir.FAILED, rundir.LORA
# Errors in what the user asked for (config, data, weights, engine, run folder): reported by their message alone.
USER_ERRORS = (ConfigError, StyleDataError, ModelNotFoundError, EngineError, rundir.RunDirError, TrainingDiverged)


def resolve_paths(cfg: DictConfig) -> DictConfig:
    """Make paths.root absolute so every derived path is, whatever the working directory later."""
    cfg.paths.root = str(Path(cfg.paths.root).expanduser().resolve())
    return cfg


def lora_spec(cfg: DictConfig) -> LoraSpec:
    lora = cfg.lora
    return LoraSpec(
        unet_rank=lora.unet_rank,
        unet_alpha=float(lora.unet_alpha or lora.unet_rank),
        unet_targets=tuple(lora.unet_targets),
        text_encoder_rank=lora.text_encoder_rank,
        text_encoder_alpha=float(lora.text_encoder_alpha or lora.text_encoder_rank or 1),
        text_encoder_targets=tuple(lora.text_encoder_targets),
        seed=cfg.seed,
    )


def load_engine(cfg: DictConfig, model_dir: Path) -> Engine:
    """The engine ``cfg`` chooses, with the model of ``model_dir`` loaded."""
    e = cfg.engine
    log.info("loading %s with engine=%s", model_dir, e.name)
    # every option of the chosen engine, whichever it is (their keys are that engine's: TorchOptions or
    # JittorOptions in jdiff/engines/options.py)
    options = {k: v for k, v in OmegaConf.to_container(e, resolve=True).items() if k != "name"}
    return create_engine(e.name, model_dir, prediction_type=cfg.model.prediction_type,
                         deterministic=cfg.deterministic, **options)


class Run:
    """The state shared by the stages of one run; the engine is loaded on first use."""

    def __init__(self, cfg: DictConfig, run_dir: Path):
        self.cfg = cfg
        self.dir = Path(run_dir)
        if cfg.data.builder == "demo":
            write_demo_styles(Path(cfg.data.root), Path(cfg.paths.cache))
        self.style = load_style(Path(cfg.data.root), str(cfg.style))
        self.model_dir = resolve_model_dir(cfg.model, Path(cfg.paths.cache))
        self.schedule = NoiseSchedule.from_model(self.model_dir, cfg.model.prediction_type)
        self._engine: Optional[Engine] = None
        self.class_items: list[ClassImage] = []
        self.seconds: dict[str, float] = {}  # wall time of each stage, and of loading the engine

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            started = time.perf_counter()
            self._engine = load_engine(self.cfg, self.model_dir)
            self.seconds["load_engine"] = round(time.perf_counter() - started, 2)
        return self._engine

    def timed(self, stage: str, fn):
        """Run one stage; its wall time, less any engine loading it triggered, goes into ``seconds``."""
        started, loading = time.perf_counter(), self.seconds.get("load_engine", 0.0)
        out = fn()
        spent = time.perf_counter() - started - (self.seconds.get("load_engine", 0.0) - loading)
        self.seconds[stage] = round(spent, 2)
        return out

    # -- stages -------------------------------------------------------------------------------------------

    def class_set(self) -> ClassSet:
        """The class images this run trains with (:func:`jdiff.prior.class_set`)."""
        return class_set(self.cfg, self.style, self.model_dir, self.schedule.prediction_type)

    def prior(self) -> None:
        wanted = self.class_set()
        write_json(self.dir / rundir.CLASS_SET, wanted.record())
        self.class_items = class_images(wanted.cache_dir, list(wanted.objects), wanted.per_object, wanted.settings,
                                        lambda: self.engine, prior_batch_size(self.cfg))

    def train(self) -> None:
        if self.cfg.prior.enabled and not self.class_items:
            self.prior()
        self.engine.add_lora(lora_spec(self.cfg))
        train_lora(self.engine, self.cfg, self.style, load_class_images(self.class_items),
                   [item.prompt for item in self.class_items], self.schedule, self.dir / "loss.csv")
        adapter = self.dir / LORA_FILE
        self.engine.save_lora(adapter, extra_metadata={"style": self.style.style_id, "steps": self.cfg.train.steps})
        try:
            check_adapter_file(adapter)  # the last step may have broken the weights though its loss was a number
        except ValueError as err:
            adapter.unlink()
            raise TrainingDiverged(f"training ended with an unusable adapter ({err}); try a smaller train.lr "
                                   f"(now {self.cfg.train.lr}).") from err

    def generate(self) -> None:
        if "train" not in self.cfg.stages:
            self.engine.load_lora(Path(self.cfg.lora.path))
        generate_images(self.engine, self.cfg, self.style, self.dir / "images")

    def score(self) -> dict:
        generated = self.generated_images()
        style = StyleImages(self.style.style_id, generated, self.style.images())
        scored = Scorer(self.cfg.score, Path(self.cfg.paths.cache)).score([style])
        broken = {m: v for m, v in scored.metrics.items() if not rundir.finite_number(v)}
        if broken:
            raise EngineError(f"scoring gave no number for {', '.join(f'{m} ({v})' for m, v in broken.items())}; "
                              f"look at the images in {self.dir / rundir.IMAGES} (blank or broken images cannot be "
                              f"scored). The run is not complete.")
        final = final_score(scored.metrics)
        result = {"style": self.style.style_id, "images": len(generated), "metrics": scored.metrics,
                  "final": final.to_dict(), "skipped": scored.skipped, "seconds": round(scored.seconds, 3)}
        write_json(self.dir / "scores.json", result)
        log.info("scored %d images in %.1f s", len(generated), scored.seconds)
        return result

    def generated_images(self) -> list[tuple[str, np.ndarray]]:
        return [(o, load_rgb(self.dir / "images" / image_file_name(o))) for o in self.style.prompt_objects]

    def write_contact_sheet(self, scores: Optional[dict] = None) -> None:
        res = min(self.cfg.data.resolution, 256)
        refs = list(zip(self.style.objects, self.style.images_at(res)))
        sheet = contact_sheet(refs, self.generated_images(), title=f"style {self.style.style_id}", scores=scores)
        save_png(self.dir / "contact_sheet.png", sheet)


def resolved(cfg: DictConfig) -> dict:
    """The config as plain data, every interpolation resolved: what ``config.yaml`` records."""
    return OmegaConf.to_container(cfg, resolve=True)


def check_before_run(cfg: DictConfig, run_dir: Optional[Path] = None) -> None:
    """Everything about a run that can be refused before anything is written: the config, and whether the run
    folder may take it (:func:`jdiff.rundir.check`). ``cfg`` may be Hydra's whole config; without ``run_dir``
    the folder is its ``hydra.run.dir``, resolved (and so made) only once the config is known to be good."""
    task = copy.deepcopy(cfg)
    if "hydra" in task:
        with open_dict(task):
            del task["hydra"]
    resolve_paths(task)
    validate_config(task)
    cache = Path(task.paths.cache)
    check_build_path(task.model, cache)
    if task.data.builder == "demo":
        check_demo_root(Path(task.data.root), cache)
    run_dir = Path(os.path.abspath(run_dir if run_dir is not None else str(OmegaConf.select(cfg, "hydra.run.dir"))))
    rundir.check(run_dir, resolved(task), task.overwrite)
    check_places(task, run_dir)
    rundir.hold(run_dir)  # kept to the end of the run: a second run into this folder is refused


def check_places(cfg: DictConfig, run_dir: Path) -> None:
    """What the run reads and keeps must not be inside its own folder: a resumed or overwritten run would find
    it as foreign files, or delete it."""
    places = {"paths.cache": cfg.paths.cache, "data.root": cfg.data.root}
    if cfg.lora.path is not None:
        places["lora.path"] = cfg.lora.path
    for key, place in places.items():
        if inside(Path(place), run_dir):
            raise rundir.RunDirError(f"{key}={place} is inside the run folder {run_dir}; the run folder holds only "
                                     f"the run's own files: choose another hydra.run.dir (or {key}).")


def run(cfg: DictConfig, run_dir: Path, prepared: bool = False) -> Optional[float]:
    """Run the configured stages into ``run_dir``; returns the final score when the score stage ran.

    The folder is checked first (:func:`jdiff.rundir.prepare`: never a finished run unless ``overwrite``, never
    a folder of somebody else's); ``prepared``: the caller (a sweep job) did that already."""
    started = time.perf_counter()
    resolve_paths(cfg)
    validate_config(cfg)
    run_dir = Path(os.path.abspath(run_dir))
    if prepared:
        return _run(cfg, run_dir, started)
    check_places(cfg, run_dir)
    acquired = rundir.hold(run_dir)
    try:
        rundir.prepare(run_dir, resolved(cfg), cfg.overwrite)
        return _run(cfg, run_dir, started)
    finally:
        if acquired:
            rundir.release(run_dir)


def _run(cfg: DictConfig, run_dir: Path, started: float) -> Optional[float]:
    run_dir.mkdir(parents=True, exist_ok=True)
    run = Run(cfg, run_dir)
    write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    stages = list(cfg.stages)
    if "prior" in stages and cfg.prior.enabled:
        run.timed("prior", run.prior)
    if "train" in stages:
        run.timed("train", run.train)
    if "generate" in stages:
        run.timed("generate", run.generate)
    return finish(run, started)


def finish(run: Run, started: float, **extra) -> Optional[float]:
    """The end of a run whose images are made: the contact sheet, the scores, then COMPLETE (with ``extra``)."""
    stages = list(run.cfg.stages)
    if "generate" in stages:
        run.write_contact_sheet()
    scores = run.timed("score", run.score) if "score" in stages else None
    if scores is not None:  # drawn again, now with the final score (the one above stays if scoring fails)
        run.write_contact_sheet(scores)
    checkpoint.remove(run.dir)  # the run is done: nothing to resume (a crash before COMPLETE retrains, as before)
    seconds = round(time.perf_counter() - started, 2)
    final = scores["final"]["value"] if scores else None
    write_json(run.dir / COMPLETE, {"final_score": final, "seconds": seconds, "stages": stages,
                                    "stage_seconds": run.seconds, **extra})
    summary(run.dir, scores, seconds)
    return final


def summary(run_dir: Path, scores: Optional[dict], seconds: float) -> None:
    lines = ["", f"jdiff run finished in {seconds:.1f} s", f"  run dir      {run_dir}"]
    if scores:
        final = scores["final"]
        note = f"  (partial: missing {', '.join(final['missing'])})" if final["missing"] else ""
        lines.append(f"  final score  {final['value'] + 0.0:.4f}{note}")  # + 0.0: no '-0.0000'
        lines += [f"  {k:<12} {v:.4f}" for k, v in scores["metrics"].items()]
    for name in ("images", LORA_FILE, "scores.json", "contact_sheet.png", "loss.csv", rundir.SAMPLES,
                 rundir.TENSORBOARD):
        if (run_dir / name).exists():
            lines.append(f"  {name:<12} {run_dir / name}")
    log.info("\n".join(lines))

