"""Importing Jittor with its environment set by the project, so users never have to.

API:
    import_jittor(device="auto") -> the ``jittor`` module, on the asked device ("auto", "cpu", "cuda")
    use_device(jt, device)  -> move an imported Jittor to another device
    jittor_device(jt) -> "cuda" or "cpu": where Jittor runs now (``jt.flags.use_cuda``)
    limit_cudnn_workspace(jt) -> the cap set on cuDNN's algorithm-search workspace, in GiB
    cudnn_workspace_gib() -> the cap asked for ($JDIFF_CUDNN_WORKSPACE_GIB, default 2), in GiB
    gpu_driver_present() -> the CPU/GPU rule below

Jittor 1.3.11 reads its settings from environment variables once, at its first import, and out of the box
it tries to download MKL, NCCL, cuTT, CUTLASS and a CUDA toolkit. Before the first import we set, only where
the user has not set them already:

- ``use_mkl=0 use_nccl=0 use_cutt=0 use_cutlass=0 use_mpi=0``: no optional libraries, so no downloads;
- ``FIX_TORCH_ERROR=0``: Jittor must not try to repair a torch install it finds;
- ``nvcc_path=""`` (CPU-only mode) when no GPU can run the code: ``device="cpu"`` was asked, or
  ``gpu_driver_present()`` is false. The rule: a GPU is usable when ``CUDA_VISIBLE_DEVICES`` is not set to
  "" or "-1", and the NVIDIA driver is loaded (``/proc/driver/nvidia/gpus`` lists a GPU) or ``nvidia-smi -L``
  lists one. Without this, a machine that has nvcc but no driver (CI runners, containers) compiles Jittor's
  CUDA parts and then fails at run time.

Jittor's start-up lines (``[i ...]``: lock file, compiler, cache folder, the tools it found) are shown only
when jdiff logs at DEBUG, i.e. ``hydra.verbose=true`` or ``hydra.verbose=jdiff`` (:func:`verbose_logging`):
otherwise ``log_silent=1`` is set for the import, and taken back afterwards (in Jittor's Python and C++ logs
and in the environment, so child processes decide for themselves), so Jittor's warnings and errors while the
run goes on still show. A user's own ``log_silent`` (or ``log_v``) is left as it is. Silent, Jittor does not
show its first compile's progress, so jdiff says in one line that it compiles (minutes); a failed compile still
prints the compiler's output, and the error says how to see Jittor's start-up lines.

Failures become ``EngineError`` with what to do: Jittor missing, numpy 2 (Jittor 1.3.11 segfaults with it),
or a failed compile (naming the cache folder; the compiler's messages are what Jittor printed above).
The first import compiles Jittor's core (minutes); later imports reuse the cache.

On the GPU, cuDNN's algorithm search for each new convolution shape tries every algorithm with a workspace as
large as the largest one needs, up to Jittor's default of a quarter of the card, and Jittor's allocator keeps that
block: a ``jittor_fast`` training process held 43.7 GiB of an H200's 139 GiB, of which 3.8 GiB remained after
``jt.gc()``. jdiff caps the search at 2 GiB (``JDIFF_CUDNN_WORKSPACE_GIB``, default 2; a larger value, e.g. 1000,
gives Jittor's quarter back): on that H200 the same process then peaked at 8.3 GiB training and 11.1 GiB
generating, trained at 7.95 steps/s against 7.14, and made 25 images in 13.0 s against 12.3 (docs/benchmarks.md).

Jittor's import also changes the process in two ways we undo (``import_quietly``): it installs C signal
handlers for SIGINT (exit at once, skipping Python's clean-up: no KeyboardInterrupt, temporary files left
behind) and SIGCHLD (exit at once, silently, when any child process dies of a signal, e.g. a sweep job
killed on purpose), and it forks a pool of compile workers at every import that lives until exit, whose
shutdown can hang. After the import the process's own handlers are back and the pool is closed.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

from jdiff.devices import Device, DeviceError, parse_device
from jdiff.engines.base import EngineError

# GiB: cuDNN's algorithm search tries no algorithm needing a larger workspace (see above)
DEFAULT_CUDNN_WORKSPACE_GIB = 2

NO_DOWNLOAD_SETTINGS = {
    "use_mkl": "0",
    "use_nccl": "0",
    "use_cutt": "0",
    "use_cutlass": "0",
    "use_mpi": "0",
    "FIX_TORCH_ERROR": "0",
}
DRIVER_GPUS = Path("/proc/driver/nvidia/gpus")  # one folder per GPU while the NVIDIA driver is loaded
QUIET_START = {"log_silent": "1"}  # Jittor's start-up lines off, unless jdiff logs at DEBUG
log = logging.getLogger(__name__)
_quieted: set[str] = set()  # the QUIET_START keys prepare_environment set, to take back after the import


def verbose_logging() -> bool:
    """Whether jdiff logs at DEBUG here: ``hydra.verbose=true``, or a logger name covering jdiff's Jittor engine."""
    return log.isEnabledFor(logging.DEBUG)


def gpu_driver_present() -> bool:
    """Whether a CUDA GPU can run code here (see the module docstring for the rule)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    if DRIVER_GPUS.is_dir() and any(DRIVER_GPUS.iterdir()):
        return True
    if shutil.which("nvidia-smi") is None:
        return False
    try:
        listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return listed.returncode == 0 and "GPU" in listed.stdout


def jittor_cache_dir() -> str:
    """Where Jittor keeps its compiled code: ``<home>/.cache/jittor/...``, where home is ``$JITTOR_HOME``, else
    the last ``JITTOR_HOME`` any import saw (Jittor remembers it in ``~/.cache/jittor/config.json``), else
    the user's home folder."""
    utils = sys.modules.get("jittor_utils")
    if utils is not None and getattr(utils, "cache_path", None):  # set once Jittor got that far
        return str(utils.cache_path)
    remembered = Path.home() / ".cache" / "jittor" / "config.json"
    try:
        home = json.loads(remembered.read_text()).get("JITTOR_HOME", str(Path.home()))
    except (OSError, ValueError):
        home = str(Path.home())
    return str(Path(os.environ.get("JITTOR_HOME", home)) / ".cache" / "jittor")


def prepare_environment(device: str = "auto", verbose: bool | None = None) -> None:
    """Set Jittor's environment variables (only those the user left unset). Has effect before the first import.
    ``verbose`` (default: :func:`verbose_logging`) shows Jittor's start-up lines."""
    for key, value in NO_DOWNLOAD_SETTINGS.items():
        os.environ.setdefault(key, value)
    if verbose is None:
        verbose = verbose_logging()
    if not verbose and "log_v" not in os.environ:  # log_v set: the user wants Jittor's lines
        for key, value in QUIET_START.items():
            if key not in os.environ:
                os.environ[key] = value
                _quieted.add(key)
    if device == "cpu" or not gpu_driver_present():
        os.environ.setdefault("nvcc_path", "")


def import_jittor(device: str = "auto"):
    """Import Jittor with the project's environment and put it on ``device`` ("auto", "cpu", "cuda")."""
    check_device(device)  # before a first import that may compile for minutes
    if "jittor" not in sys.modules:
        check_numpy()
        prepare_environment(device)
        check_cuda_toolkit()
    try:
        jittor = import_quietly()
    except ImportError as err:
        raise EngineError(
            f"Jittor is not installed or cannot be imported ({err}). Install it with `pip install jittor==1.3.11.0` "
            "(numpy < 2), or use engine=torch."
        ) from err
    except Exception as err:  # Jittor compiles itself at import; a broken compiler or toolkit fails here
        hidden = " (Jittor's start-up lines were hidden: hydra.verbose=true shows them)" if _quieted else ""
        raise EngineError(
            f"Jittor failed to compile at import ({type(err).__name__}: {err}). The compiler's messages are "
            f"printed above{hidden}; the compiled code lives in {jittor_cache_dir()} (delete it to retry from "
            "scratch). Jittor needs g++; for GPU use also a CUDA toolkit (nvcc) and driver; set nvcc_path=\"\" to "
            "force CPU-only mode, or use engine=torch."
        ) from err
    try:
        use_device(jittor, device)
    finally:
        end_quiet_start(jittor)
    return jittor


def end_quiet_start(jt) -> None:
    """Take back the start-up silence: Jittor's later warnings and errors show, and child processes decide anew."""
    if not _quieted:
        return
    jt.flags.log_silent = 0  # Jittor's C++ log (its warnings; it never silences errors)
    utils = sys.modules.get("jittor_utils")
    if utils is not None and hasattr(utils, "LOG"):
        utils.LOG.log_silent = 0  # Jittor's Python log, which would silence its errors too
    for key in _quieted:
        os.environ.pop(key, None)
    _quieted.clear()


def first_compile_ahead() -> bool:
    """Whether Jittor's core is not compiled yet in its cache folder (call after ``import jittor_utils``)."""
    utils = sys.modules.get("jittor_utils")
    folder = getattr(utils, "cache_path", None)
    return bool(folder) and not any(Path(folder).glob("jittor_core*.so"))


HANDLED_BY_JITTOR = (signal.SIGINT, signal.SIGCHLD)


def import_quietly():
    """``import jittor``, then put back this process's SIGINT/SIGCHLD handlers and close Jittor's compile pool.

    During the import SIGTERM is the default action, so the pool's forked workers die when the pool ends
    them (they would inherit a handler that turns SIGTERM into an exception they may swallow)."""
    if "jittor" in sys.modules:
        return sys.modules["jittor"]
    in_main_thread = threading.current_thread() is threading.main_thread()  # signal.signal works only there
    saved = {sig: signal.getsignal(sig) for sig in (*HANDLED_BY_JITTOR, signal.SIGTERM)} if in_main_thread else {}
    if in_main_thread:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if os.environ.get("nvcc_path") != "":  # CUDA mode: the cuDNN that `cuda13 apply` linked in, if it did
        from jdiff.engines.jittor.fast.cuda13 import preload_cudnn

        preload_cudnn()
    try:
        import jittor_utils  # noqa: F401 (imported for its side effects) Jittor's helpers find the compiler and the cache folder (jittor compiles)

        if _quieted and first_compile_ahead():
            log.info("Jittor compiles itself on its first import here: a few minutes (once per install; "
                     "hydra.verbose=true shows its progress)")
        import jittor
    finally:
        close_compile_pool()
        for sig, handler in saved.items():
            if handler is not None:  # None: set outside Python, nothing to put back
                signal.signal(sig, handler)
    return jittor


def close_compile_pool() -> None:
    """End the worker pool Jittor forks to compile at import (``jittor_utils.run_cmds``); a later compile
    makes a new one."""
    utils = sys.modules.get("jittor_utils")
    if utils is None or getattr(utils, "p", None) is None:
        return
    atexit.unregister(utils.pool_cleanup)
    utils.pool_cleanup()
    utils.pool_size = 0


def check_numpy() -> None:
    import numpy

    if int(numpy.__version__.split(".")[0]) >= 2:
        raise EngineError(
            f"numpy {numpy.__version__} is installed, but Jittor 1.3.11 crashes with numpy 2. "
            "Install numpy < 2 (`pip install 'numpy<2'`), or use engine=torch."
        )


def check_cuda_toolkit() -> None:
    """Jittor 1.3.11 cannot build against CUDA 13 unpatched: say so before it compiles for minutes and fails."""
    if os.environ.get("nvcc_path") == "":  # CPU-only mode: no CUDA code is built
        return
    from jdiff.engines.jittor.fast import cuda13

    if cuda13.needs_patch():
        version = ".".join(map(str, cuda13.cuda_version(cuda13.cuda_home())))
        raise EngineError(
            f"this GPU machine has CUDA {version}, which Jittor 1.3.11 cannot build against as installed. Run "
            "`python -m jdiff.engines.jittor.fast.cuda13 apply` once (it patches Jittor's sources, reversibly, and "
            "checks the result), or use engine=torch, or engine.device=cpu."
        )


def check_device(device: str) -> Device:
    try:
        parsed = parse_device(device, "engine.device")
    except DeviceError as err:
        raise EngineError(str(err)) from err
    if parsed.index not in (None, 0):
        raise EngineError(f"engine.device={device!r}: the Jittor engine runs on auto, cpu or cuda (Jittor uses the "
                          f"first visible GPU: choose it with CUDA_VISIBLE_DEVICES).")
    return parsed


def use_device(jt, device: str) -> None:
    if check_device(device).kind == "cuda":
        if not jt.has_cuda:
            raise EngineError(
                f"engine.device={device} but Jittor has no CUDA here (nvcc_path={os.environ.get('nvcc_path')!r}, "
                f"GPU driver present: {gpu_driver_present()}); use engine.device=cpu or auto."
            )
        jt.flags.use_cuda = 1
    elif device == "cpu":
        jt.flags.use_cuda = 0
    else:
        jt.flags.use_cuda = 1 if jt.has_cuda else 0
    if jt.flags.use_cuda:
        limit_cudnn_workspace(jt)


def limit_cudnn_workspace(jt) -> float | None:
    """Cap cuDNN's algorithm-search workspace at ``$JDIFF_CUDNN_WORKSPACE_GIB`` (default
    ``DEFAULT_CUDNN_WORKSPACE_GIB``), given to Jittor as its fraction of the card and never above Jittor's own
    quarter. Returns the cap in GiB, or None where there is no cuDNN."""
    gib = cudnn_workspace_gib()
    total = jt.get_mem_info().total_cuda_ram
    if getattr(jt, "cudnn", None) is None or total <= 0:
        return None
    jt.cudnn.set_max_workspace_ratio(min(0.25, gib * 2**30 / total))
    return min(gib, 0.25 * total / 2**30)


def cudnn_workspace_gib() -> float:
    """The cap asked for on cuDNN's algorithm-search workspace, in GiB: ``$JDIFF_CUDNN_WORKSPACE_GIB``, else
    ``DEFAULT_CUDNN_WORKSPACE_GIB``; a value that is not a number above 0 is refused by name."""
    raw = os.environ.get("JDIFF_CUDNN_WORKSPACE_GIB", str(DEFAULT_CUDNN_WORKSPACE_GIB))
    try:
        gib = float(raw)
    except ValueError:
        gib = -1.0
    if not gib > 0:
        raise EngineError(f"JDIFF_CUDNN_WORKSPACE_GIB={raw!r}: give cuDNN's workspace cap in GiB, a number above 0 "
                          f"(default {DEFAULT_CUDNN_WORKSPACE_GIB}; 1000 for Jittor's own, a quarter of the card).")
    return gib


def jittor_device(jt) -> str:
    return "cuda" if jt.flags.use_cuda else "cpu"
