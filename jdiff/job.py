"""``python -m jdiff.job RUN_DIR``: the stages of one sweep run, in a process of their own.

A sweep job (:mod:`jdiff.sweep`) writes the run's resolved config to ``RUN_DIR/config.yaml`` and starts
this module with only its GPU visible. It logs into ``RUN_DIR/run.log`` (after the sweep job's own lines)
and to the console, and ends with exit code 0 (COMPLETE written), 1 (FAILED written: the error and its
type) or 130 (interrupted by Ctrl-C or SIGTERM: neither marker, the run is simply unfinished). It also
stops by itself when the sweep job that started it dies, so that it never holds a GPU nobody has locked.
Run it by hand to redo one run of a sweep in place.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from jdiff.config import JdiffConfig
from jdiff.engines.options import ENGINES
from jdiff.files import write_json
from jdiff.pipeline import USER_ERRORS, run
from jdiff import rundir
from jdiff.rundir import FAILED
from jdiff.sweep import CONFIG_FILE, INTERRUPTED

log = logging.getLogger("jdiff")
ORPHANED = 3  # exit code when the parent sweep job went away


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jdiff.job", description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", type=Path, nargs="+", metavar="run_dir",
                        help="a sweep run directory holding config.yaml (several: the runs of one pack, together)")
    parser.add_argument("--label", default="job", help="a short name for the console, e.g. the job number")
    parser.add_argument("--prepared", action="store_true",
                        help="the sweep job checked and prepared the folder (by hand: leave it out)")
    parser.add_argument("--overwrite", action="store_true", help="by hand: run a finished run again, replacing it")
    args = parser.parse_args(argv)
    if len(args.run_dirs) > 1:
        return run_packed(args)
    run_dir = args.run_dirs[0]
    if not (run_dir / CONFIG_FILE).is_file():
        print(f"error: {run_dir} holds no {CONFIG_FILE}; give a sweep run folder (multirun/<sweep>/<run>).",
              file=sys.stderr)
        return 2
    try:
        cfg = load_config(run_dir)
        if not args.prepared:  # by hand: nothing is written (not even the log) into a folder the run may not use
            cfg.overwrite = args.overwrite  # what was asked now, not what the run's config recorded
            rundir.check(run_dir, None, cfg.overwrite)
    except rundir.RunDirError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # YAML or schema errors: the file was edited or damaged
        print(f"error: {run_dir / CONFIG_FILE} cannot be used as the run's config ({type(err).__name__}: "
              f"{str(err).splitlines()[0] if str(err) else ''}); restore it, or run the sweep again.", file=sys.stderr)
        return 2
    configure_logging(run_dir / "run.log", args.label)
    stop_when_orphaned()
    signal.signal(signal.SIGTERM, _interrupt)
    log.info("run process %d on %s, CUDA_VISIBLE_DEVICES=%r", os.getpid(), socket.gethostname(),
             os.environ.get("CUDA_VISIBLE_DEVICES"))
    try:
        run(cfg, run_dir, prepared=args.prepared)
    except KeyboardInterrupt:
        log.warning("interrupted: %s is unfinished", run_dir)
        return INTERRUPTED
    except Exception as err:  # the run's failure is recorded and ends this process only, not the sweep
        if isinstance(err, rundir.RunDirError):  # the folder is not this run's to write: no marker either
            log.error("%s", err)
            return 2
        if isinstance(err, USER_ERRORS):
            log.error("%s", err)
        else:
            log.exception("the run failed")
        try:
            write_json(run_dir / FAILED, {"error": str(err), "type": type(err).__name__})
        except OSError as write_error:  # a full or read-only disk: the sweep job records the exit code instead
            log.error("could not write %s: %s", run_dir / FAILED, write_error)
        return 1
    return 0


def run_packed(args) -> int:
    """The runs of one pack (:mod:`jdiff.pack`), prepared by the sweep job that started this process. Exit code 0
    when it ran (each run's COMPLETE or FAILED says how it went), OUT_OF_MEMORY when the pack did not fit."""
    from jdiff.engines.base import OutOfMemory
    from jdiff.pack import run_pack
    from jdiff.sweep import OUT_OF_MEMORY

    if not args.prepared:
        print("error: several run folders are one pack, which a sweep job prepares; run one folder by hand.",
              file=sys.stderr)
        return 2
    try:
        cfgs = [load_config(run_dir) for run_dir in args.run_dirs]
    except Exception as err:
        print(f"error: a pack's config.yaml cannot be used ({type(err).__name__}: {err})", file=sys.stderr)
        return 2
    configure_logging([run_dir / "run.log" for run_dir in args.run_dirs], args.label)
    stop_when_orphaned()
    signal.signal(signal.SIGTERM, _interrupt)
    log.info("pack process %d on %s, CUDA_VISIBLE_DEVICES=%r: %d runs", os.getpid(), socket.gethostname(),
             os.environ.get("CUDA_VISIBLE_DEVICES"), len(cfgs))
    try:
        run_pack(cfgs, list(args.run_dirs))
    except KeyboardInterrupt:
        log.warning("interrupted: the pack's unfinished runs stay unfinished")
        return INTERRUPTED
    except OutOfMemory as err:
        log.error("%s", err)
        return OUT_OF_MEMORY
    except Exception as err:  # the pack as a whole failed: each run that did not end says so
        log.exception("the pack failed")
        for run_dir in args.run_dirs:
            if not (run_dir / rundir.COMPLETE).exists() and not (run_dir / FAILED).exists():
                write_json(run_dir / FAILED, {"error": str(err), "type": type(err).__name__})
        return 1
    return 0


def load_config(run_dir: Path) -> DictConfig:
    """The run's resolved config, typed by the schema again (YAML alone would lose the types), its engine's
    options by that engine's options class."""
    return typed_config(OmegaConf.load(run_dir / CONFIG_FILE))


def typed_config(stored) -> DictConfig:
    """A resolved config (a DictConfig or plain dict) typed by the schema, its engine's options by that engine's."""
    stored = OmegaConf.create(stored) if isinstance(stored, dict) else stored
    cfg = OmegaConf.merge(OmegaConf.structured(JdiffConfig), stored)
    engine = ENGINES.get(OmegaConf.select(stored, "engine.name", default=None))
    if engine is not None:
        cfg.engine = OmegaConf.merge(OmegaConf.structured(engine.options), stored.engine)
    return cfg


def configure_logging(log_files, label: str) -> None:
    """The log into each run's run.log (appended to the sweep job's lines; a pack's log goes to all its runs') and
    to the console."""
    handlers = []
    for log_file in [log_files] if isinstance(log_files, Path) else log_files:
        handlers.append(logging.FileHandler(log_file, mode="a"))
        handlers[-1].setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter(f"[%(asctime)s][{label}][%(levelname)s] - %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[*handlers, console], force=True)


def stop_when_orphaned(poll_seconds: float = 1.0) -> None:
    """Exit when the parent goes away: its GPU lock went with it, so another job may take the GPU."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_seconds)
        log.error("the sweep job that started this run is gone; stopping")
        logging.shutdown()
        os._exit(ORPHANED)

    threading.Thread(target=watch, name="orphan-watch", daemon=True).start()


def _interrupt(signum, frame) -> None:
    # SIGTERM unwinds like Ctrl-C, so that temporary files are removed on the way out.
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
