"""The run-directory contract: the files a run writes, its markers, and reading them whatever state they are in.

A run directory holds (see the README's "Where results go"):

    config.yaml, lora.safetensors, loss.csv, images/, scores.json, contact_sheet.png   the run's outputs
    lora.webui.safetensors, lora.comfyui.safetensors, lora.diffusers.safetensors        the adapter exported
               by ``python -m jdiff.export <run>`` (outputs too: a run that is redone removes them with the rest)
    COMPLETE   written last: {"final_score", "seconds", "stages", "stage_seconds"}; the run finished
    FAILED     instead, when it failed: {"error", "type"}
    job.json   in a sweep: where and when the run's process ran
    run.log, .hydra/, .lock                                                           the run's record

Every reader here returns what it found and, when a file is there but cannot be used, what is wrong with it,
never an exception: one damaged run must not stop a sweep or its report. Whether jdiff may write into a
folder is decided in one place, :func:`prepare`: a finished run is never touched unless the user asked for it
(``overwrite=true``), and a folder holding files jdiff did not write is refused.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

CONFIG = "config.yaml"
LORA = "lora.safetensors"
LOSS = "loss.csv"
IMAGES = "images"
SCORES = "scores.json"
SHEET = "contact_sheet.png"
LOG = "run.log"
COMPLETE = "COMPLETE"
FAILED = "FAILED"
JOB = "job.json"
CLASS_SET = "class_set.json"  # the run's class images: share, styles, objects, cache folder
CHECKPOINT = "checkpoint"  # train.checkpoint_every: jdiff.checkpoint's folder, kept when the run resumes
SAMPLES = "samples"  # train.sample_every: samples/step_<k>/<name>.png, kept when the run resumes
TENSORBOARD = "tensorboard"  # jdiff.tensorboard's event file, when TensorBoard is installed
HYDRA = ".hydra"
LOCK = ".lock"
# The adapter of the run in another format, by jdiff.export's format name
EXPORTS = {fmt: f"lora.{fmt}.safetensors" for fmt in ("webui", "comfyui", "diffusers")}
# What a run writes (and what overwrite=true removes), and everything else that may be in a run directory.
OUTPUTS = (CONFIG, LORA, LOSS, IMAGES, SCORES, SHEET, COMPLETE, FAILED, JOB, CLASS_SET, CHECKPOINT, SAMPLES,
           TENSORBOARD, *EXPORTS.values())
RECORD = (LOG, HYDRA, LOCK)
# What a resumed run keeps of the attempt before (overwrite=true removes them too): the training it continues
KEPT_ON_RESUME = (CHECKPOINT, SAMPLES)
# The files a checkpoint folder holds (jdiff.checkpoint), and the event file's name start (jdiff.tensorboard)
CHECKPOINT_FILES = ("state.json", "adapter.safetensors", "optimizer.safetensors")
EVENTS_PREFIX = "events.out.tfevents."
# Keys that say where and how a run is placed, not what it computes: a run may resume with other values.
PLACEMENT_KEYS = ("gpus", "n_jobs", "sweep", "overwrite")
# Keys that change how the work is packed (the class images' batches: docs/sweeps.md) or what a run shows on
# the way, not its results: a run may resume with other values too.
NEUTRAL_KEYS = ("prior.batch_size", "train.checkpoint_every", "train.sample_every", "train.sample_prompts")
SAMPLE_STEP = re.compile(r"^step_\d+$")
# jdiff.files.atomic_write's temporary files: ".<name>.<random>.tmp<suffix>"; and ".tmp<6 random>", which
# safetensors' own file writer left beside a file when jdiff (before 2026-12-03) wrote with it and was killed.
TEMPORARY = re.compile(r"^(\..+\.tmp(\.[A-Za-z0-9]+)?|\.tmp[A-Za-z0-9]{6})$")


class RunDirError(RuntimeError):
    """jdiff may not write into this folder; the message says why and what to do."""


def read_json(path: Path) -> tuple[Optional[dict], Optional[str]]:
    """(the JSON object in ``path``, None), (None, None) when there is no file, or (None, what is wrong)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None, None
    except (OSError, UnicodeDecodeError) as err:
        return None, f"{path.name} cannot be read ({err})"
    if not text.strip():
        return None, f"{path.name} is empty"
    try:
        data = json.loads(text)
    except ValueError as err:
        return None, f"{path.name} is not valid JSON ({err})"
    if not isinstance(data, dict):
        return None, f"{path.name} holds a {type(data).__name__}, not a JSON object"
    return data, None


def finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class RunState:
    """What a folder holds, as a run directory.

    status: ``new`` (missing, empty, or only Hydra's record of a run that has not written anything yet),
    ``complete``, ``failed``, ``unfinished`` (outputs but no marker: running, killed or interrupted), or
    ``broken`` (a marker, or the folder, that cannot be read). ``foreign``: names in it that jdiff does not
    write (a folder of somebody else's, or notes a user put in a run folder): jdiff writes into neither.
    """

    path: Path
    status: str
    complete: Optional[dict] = None
    failure: Optional[dict] = None
    problem: str = ""
    foreign: list[str] = field(default_factory=list)

    @property
    def final_score(self) -> Optional[float]:
        value = (self.complete or {}).get("final_score")
        return value if finite_number(value) else None

    @property
    def foreign_problem(self) -> str:
        shown = ", ".join(self.foreign[:5]) + (f" and {len(self.foreign) - 5} more" if len(self.foreign) > 5 else "")
        return f"{self.path} holds files jdiff did not write: {shown}"


def is_temporary(name: str) -> bool:
    return bool(TEMPORARY.match(name))


def inspect(run_dir: Path) -> RunState:
    run_dir = Path(run_dir)
    try:
        if not run_dir.exists():
            return RunState(run_dir, "new")
        if not run_dir.is_dir():
            return RunState(run_dir, "broken", problem=f"{run_dir} is a file, not a folder", foreign=[run_dir.name])
        names = sorted(p.name for p in run_dir.iterdir())
    except OSError as err:
        fix = f": give read permission (chmod -R u+rX {run_dir})" if isinstance(err, PermissionError) else ""
        return RunState(run_dir, "broken", problem=f"the run folder cannot be read ({err.strerror or err}){fix}")
    foreign = [n for n in names if n not in OUTPUTS + RECORD and not is_temporary(n)]
    if (run_dir / IMAGES).is_dir():  # a run writes only PNGs there
        foreign += [f"{IMAGES}/{p.name}" for p in sorted((run_dir / IMAGES).iterdir())
                    if not (p.is_file() and p.suffix == ".png") and not is_temporary(p.name)]
    foreign += _foreign_inside(run_dir / CHECKPOINT, lambda p: p.is_file() and p.name in CHECKPOINT_FILES)
    foreign += _foreign_inside(run_dir / TENSORBOARD, lambda p: p.is_file() and p.name.startswith(EVENTS_PREFIX))
    foreign += _foreign_inside(run_dir / SAMPLES, lambda p: p.is_dir() and bool(SAMPLE_STEP.match(p.name)))
    if (run_dir / SAMPLES).is_dir():
        for step in sorted((run_dir / SAMPLES).iterdir()):
            if step.is_dir() and SAMPLE_STEP.match(step.name):
                foreign += [f"{SAMPLES}/{n}" for n in _foreign_inside(step, lambda p: p.is_file() and p.suffix == ".png")]
    if any(n in OUTPUTS for n in names) and not is_jdiff_config(run_dir / CONFIG):
        # files named like a run's, without the config a run writes before any of them: not jdiff's
        foreign += [n for n in names if n in OUTPUTS and n not in foreign]
    if COMPLETE in names:
        complete, problem = read_json(run_dir / COMPLETE)
        if complete is None:
            return RunState(run_dir, "broken", problem=problem or "COMPLETE cannot be read", foreign=foreign)
        return RunState(run_dir, "complete", complete=complete, foreign=foreign)
    if FAILED in names:
        if (run_dir / FAILED).is_dir():
            return RunState(run_dir, "broken", problem="FAILED is a folder, not jdiff's marker file", foreign=foreign)
        failure, problem = read_json(run_dir / FAILED)
        if failure is None:  # a plain-text marker still says the run failed
            try:
                text = (run_dir / FAILED).read_text(encoding="utf-8", errors="replace").strip()
            except OSError as err:
                text = f"FAILED cannot be read ({err.strerror or err})"
            failure = {"error": text or (problem or "FAILED is empty"), "type": "unknown"}
        return RunState(run_dir, "failed", failure=failure, foreign=foreign)
    if any(n in OUTPUTS for n in names):
        return RunState(run_dir, "unfinished", foreign=foreign)
    return RunState(run_dir, "new", foreign=foreign)


def _foreign_inside(folder: Path, ours) -> list[str]:
    """``folder/<name>`` for each entry of one of a run's folders that ``ours`` does not accept (temporary files
    aside); nothing when ``folder`` is not a folder."""
    if not folder.is_dir():
        return []
    return [f"{folder.name}/{p.name}" for p in sorted(folder.iterdir()) if not ours(p) and not is_temporary(p.name)]


def is_jdiff_config(path: Path) -> bool:
    """Whether ``path`` is the resolved config a jdiff run writes (a mapping with jdiff's top-level keys)."""
    data, _ = read_config(path.parent) if path.name == CONFIG else (None, None)
    return isinstance(data, dict) and {"style", "stages", "engine", "lora"} <= data.keys()


def may_record(run_dir: Path, overwrite: bool) -> bool:
    """Whether Hydra may write its record (``.hydra/``, ``run.log``) into ``run_dir`` for a new run: not into a
    finished run unless it is to be overwritten, and never into a folder of somebody else's."""
    state = inspect(run_dir)
    return not state.foreign and (state.status != "complete" or bool(overwrite))


def read_config(run_dir: Path) -> tuple[Optional[dict], Optional[str]]:
    """(the run's resolved config as a plain dict, None), (None, None) when absent, or (None, what is wrong)."""
    path = Path(run_dir) / CONFIG
    try:
        from omegaconf import OmegaConf

        if not path.is_file():
            return None, None
        data = OmegaConf.to_container(OmegaConf.load(path))
    except Exception as err:  # YAML errors, OmegaConf's own, a bad interpolation: all mean "unusable"
        return None, f"{CONFIG} cannot be read ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
    if not isinstance(data, dict):
        return None, f"{CONFIG} holds a {type(data).__name__}, not a config"
    return data, None


def read_overrides(run_dir: Path) -> tuple[dict[str, str], Optional[str]]:
    """The overrides Hydra recorded for the run (``.hydra/overrides.yaml``) as key -> value, and any problem."""
    path = Path(run_dir) / HYDRA / "overrides.yaml"
    try:
        from omegaconf import OmegaConf

        if not path.is_file():
            return {}, None
        items = OmegaConf.to_container(OmegaConf.load(path))
    except Exception as err:
        return {}, f".hydra/overrides.yaml cannot be read ({type(err).__name__})"
    if items is None:
        return {}, None
    if not isinstance(items, list):
        return {}, ".hydra/overrides.yaml is not a list of overrides"
    result = {}
    for item in items:
        key, _, value = str(item).partition("=")
        result[key.lstrip("+~")] = value
    return result, None


def flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def changed_keys(old: dict, new: dict) -> list[str]:
    """Keys of two resolved configs whose values differ, leaving out where and how the run is placed and how its
    work is packed. A key the old config lacks (it is newer than the run) counts only when it is not at its
    default: a new key's default keeps what runs did before it."""
    a, b = flatten(old), flatten(new)
    defaults = schema_defaults()
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k) and k.split(".")[0] not in PLACEMENT_KEYS
                  and k not in NEUTRAL_KEYS and not (k not in a and k in defaults and b.get(k) == defaults[k]))


def schema_defaults() -> dict:
    """The defaults of jdiff's schema (jdiff.config.JdiffConfig), flattened; the engine's options are not in it."""
    from omegaconf import OmegaConf

    from jdiff.config import JdiffConfig

    tree = OmegaConf.to_container(OmegaConf.structured(JdiffConfig), resolve=False, throw_on_missing=False)
    return {k: v for k, v in flatten(tree).items() if v != "???"}


def remove_temporary(run_dir: Path) -> None:
    """Delete atomic_write's leftovers (a process killed while writing) in the run folder and its folders, and
    a checkpoint folder that was being written (``.checkpoint.<random>.tmp``)."""
    run_dir = Path(run_dir)
    folders = [run_dir, run_dir / IMAGES, run_dir / CHECKPOINT, run_dir / TENSORBOARD]
    if (run_dir / SAMPLES).is_dir():
        folders += [p for p in (run_dir / SAMPLES).iterdir() if p.is_dir() and SAMPLE_STEP.match(p.name)]
    for folder in folders:
        if folder.is_dir():
            for p in folder.iterdir():
                if p.is_file() and is_temporary(p.name):
                    p.unlink(missing_ok=True)
                elif folder == run_dir and p.is_dir() and is_temporary(p.name) and p.name.startswith(f".{CHECKPOINT}."):
                    shutil.rmtree(p, ignore_errors=True)


def clear_outputs(run_dir: Path, keep: tuple[str, ...] = ()) -> None:
    """Remove what an earlier attempt at this run wrote here (its log and Hydra's record stay, and ``keep``)."""
    run_dir = Path(run_dir)
    for name in OUTPUTS:
        if name in keep:
            continue
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    remove_temporary(run_dir)


WHERE = "choose another folder (hydra.run.dir=... for a single run, sweep.name=... for a sweep)"


def check(run_dir: Path, config: Optional[dict], overwrite: bool) -> RunState:
    """What ``run_dir`` holds, when a run of ``config`` (resolved, plain; None: not compared) may go there;
    otherwise :class:`RunDirError`. A new folder may; a finished run only with ``overwrite``; an unfinished,
    failed or broken run when it recorded the same config (it is resumed: the stages write everything again),
    otherwise only with ``overwrite``; a folder holding files jdiff did not write, never."""
    state = inspect(run_dir)
    if state.foreign:
        raise RunDirError(f"{state.foreign_problem}; jdiff writes runs only into new folders or its own run folders: "
                          f"{WHERE}.")
    if state.status == "broken" and not (Path(run_dir) / COMPLETE).exists():  # the folder itself cannot be read
        raise RunDirError(f"{run_dir}: {state.problem}; {WHERE}.")
    writable(Path(run_dir))
    if state.status == "new" or overwrite:
        return state
    if state.status == "complete":
        score = state.final_score
        raise RunDirError(f"{run_dir} holds a finished run{f' (final score {round(score, 4) + 0.0:.4f})' if score is not None else ''}; "
                          f"jdiff never overwrites one. Pass overwrite=true to replace it, or {WHERE}.")
    old, _ = read_config(run_dir)
    changed = changed_keys(old, config) if old is not None and config is not None else []
    if changed:
        shown = ", ".join(changed[:6]) + (f" and {len(changed) - 6} more" if len(changed) > 6 else "")
        raise RunDirError(f"{run_dir} holds an unfinished run with other settings ({shown}); resume it with its own "
                          f"settings, pass overwrite=true to replace it, or {WHERE}.")
    return state


def writable(run_dir: Path) -> None:
    """Make ``run_dir`` if needed and write a scrap file there, so a read-only or missing place fails now, with
    a message, rather than halfway through the run."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=run_dir):
            pass
    except OSError as err:
        raise RunDirError(f"cannot write into {run_dir} ({err.strerror or err}); {WHERE}.") from err


_held: dict[str, object] = {}


def hold(run_dir: Path) -> bool:
    """Take ``run_dir``'s lock until :func:`release` or the end of this process, or raise :class:`RunDirError`
    when another process holds it: two runs never write into one folder at once. False: held already."""
    from filelock import FileLock, Timeout

    key = os.path.abspath(run_dir)
    if key in _held:
        return False
    lock = FileLock(os.path.join(key, LOCK))
    try:
        Path(key).mkdir(parents=True, exist_ok=True)
        lock.acquire(timeout=0)
    except Timeout:
        raise RunDirError(f"{key} is being run by another process right now; wait for it to end, or {WHERE}.") from None
    except OSError as err:
        raise RunDirError(f"cannot lock {os.path.join(key, LOCK)} ({err.strerror or err}); {WHERE}.") from err
    _held[key] = lock
    return True


def release(run_dir: Path) -> None:
    lock = _held.pop(os.path.abspath(run_dir), None)
    if lock is not None:
        lock.release()


def prepare(run_dir: Path, config: Optional[dict], overwrite: bool) -> RunState:
    """:func:`check`, then clear what an earlier attempt left (with ``overwrite``, its log too)."""
    state = check(run_dir, config, overwrite)
    if state.status != "new":
        clear_outputs(run_dir, keep=() if overwrite else KEPT_ON_RESUME)
        log = Path(run_dir) / LOG
        if overwrite and log.is_file():
            # truncated, not deleted: this run's own log handler may have it open for appending already
            with open(log, "r+", encoding="utf-8") as f:
                f.truncate(0)
    return state


# -- where Hydra puts a run and its record (resolvers of conf/config.yaml) ------------------------------------

_claimed: dict[tuple[str, str], str] = {}


def new_run_dir(base: str, style) -> str:
    """A single run's folder, ``<base>/<date>/<time>_style<NN>``, made now so that no other run can take it: a
    run started in the same second gets ``_2``, ``_3``... The same answer for the rest of this process."""
    from datetime import datetime

    key = (str(base), str(style))
    if key not in _claimed:
        stem = Path(base) / datetime.now().strftime("%Y-%m-%d") / f"{datetime.now():%H-%M-%S}_style{style}"
        stem.parent.mkdir(parents=True, exist_ok=True)
        for n in range(1, 10_000):
            path = stem if n == 1 else stem.with_name(f"{stem.name}_{n}")
            try:
                path.mkdir()
            except FileExistsError:
                continue
            _claimed[key] = str(path)
            break
        else:
            raise RunDirError(f"{stem}: no free run folder name; set hydra.run.dir=<a new folder>.")
    return _claimed[key]


def record_dir(output_dir: str, overwrite) -> Optional[str]:
    """``hydra.output_subdir``: ``.hydra``, or None (Hydra writes no record) where it would rewrite a finished
    run's or write into a folder that is not jdiff's."""
    return HYDRA if may_record(Path(output_dir), bool(overwrite)) else None


def log_file(output_dir: str, overwrite) -> str:
    """The run's log file, or the null device where :func:`record_dir` says Hydra may not write (or where the
    log's place is taken by something that is not a file)."""
    path = Path(output_dir) / LOG
    usable = path.is_file() or not path.exists()
    return str(path) if usable and may_record(Path(output_dir), bool(overwrite)) else os.devnull
