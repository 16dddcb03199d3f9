"""Make an installed Jittor 1.3.x build and run on CUDA 13 / cuDNN 9 machines.

    python -m jdiff.engines.jittor.fast.cuda13 apply     # patch, then verify on the GPU
    python -m jdiff.engines.jittor.fast.cuda13 status    # what is applied, nothing changed
    python -m jdiff.engines.jittor.fast.cuda13 verify    # a conv, a softmax, a where on the GPU; cuDNN loaded
    python -m jdiff.engines.jittor.fast.cuda13 revert    # put every file back as it was

Jittor 1.3.11 was written for CUDA <= 12 and cuDNN 8. On CUDA 13 (CCCL 3) and cuDNN 9 its JIT compiler fails
in five places, all fixed here by small edits of Jittor's installed sources:

- ``extern/cuda/inc/helper_cuda.h`` reads ``cudaDeviceProp.computeMode`` and ``.clockRate``, removed in
  CUDA 13 (in helpers Jittor never calls): constants instead;
- ``compiler.py`` compiles with ``-std=c++14``; CCCL 3 needs C++17;
- ``other/code_softmax.py`` uses ``cub::Max`` (removed): ``cuda::maximum<>``;
- ``depthwise_conv.py`` uses ``cub::LaneId`` (removed): the lane from ``threadIdx.x``;
- ``extern/cuda/cub/ops/cub_where_op.cc`` uses cub's counting/transform iterators (removed): thrust's;
- cuDNN: Jittor looks for ``cudnn.h`` in the CUDA include folder and for cuDNN 8's library names; symbolic
  links to the cuDNN 9 files of the ``nvidia-cudnn`` pip package (what PyTorch uses) satisfy it. Jittor's
  cuDNN RNN ops use APIs cuDNN 9 removed, and one compile error there disables cuDNN for convolutions too,
  so their four source files are moved aside (jdiff uses no RNN).

One numerical fix rides along, in the same way: Jittor's 2-D convolutions give cuDNN the tensors' own type as
the compute type, so float16 convolutions accumulate in float16 (cuDNN's "true half"); the edit asks for
float32 accumulation, as PyTorch's float16 convolutions have it (float32 ones are unchanged). Measured on an
H100 at SD 2.1's shapes, float16 accumulation left input gradients up to 1.3% (of the largest value) apart
between two cuDNN algorithms (docs/benchmarks.md, ninth run).

Every changed file is backed up first under ``<jittor>/.jdiff-cuda13/`` with a manifest; ``revert`` restores
the bytes and removes the links it made. Applying twice changes nothing. Jittor recompiles what changed on
its next import (its cache notices the edited sources).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

MARK = "jdiff-cuda13"
STATE_DIR = ".jdiff-cuda13"
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class Edit:
    path: str  # relative to the jittor package
    old: str  # a regular expression
    new: str
    why: str


EDITS = (
    Edit("extern/cuda/inc/helper_cuda.h", r"deviceProp\.computeMode", "cudaComputeModeDefault",
         "cudaDeviceProp.computeMode was removed in CUDA 13"),
    Edit("extern/cuda/inc/helper_cuda.h", r"deviceProp\.clockRate", "1",
         "cudaDeviceProp.clockRate was removed in CUDA 13"),
    Edit("compiler.py", r'cc_flags \+= " -Wall -Wno-unknown-pragmas -std=c\+\+14 -fPIC "',
         'cc_flags += " -Wall -Wno-unknown-pragmas -std=c++17 -fPIC "', "CCCL 3 (CUDA 13) needs C++17"),
    Edit("compiler.py", r'nvcc_flags = nvcc_flags\.replace\("-std=c\+\+17", "-std=c\+\+14 -Xcompiler -std:c\+\+14"\)',
         'nvcc_flags = nvcc_flags  # C++17 kept for nvcc too (jdiff-cuda13)',
         "nvcc >= 11.4 turned C++17 back into C++14 plus an MSVC-only flag"),
    Edit("other/code_softmax.py", r"cub::Max\(\)", "cuda::maximum<>()", "cub::Max was removed in CCCL 3"),
    Edit("depthwise_conv.py", r"cub::LaneId\(\)", "(threadIdx.x % 32)", "cub::LaneId was removed in CCCL 3"),
    Edit("extern/cuda/cub/ops/cub_where_op.cc", r"cub::CountingInputIterator<To> counting_itr\(0\);",
         "thrust::counting_iterator<To> counting_itr(0);", "cub::CountingInputIterator was removed in CCCL 3"),
    Edit("extern/cuda/cub/ops/cub_where_op.cc",
         r"cub::TransformInputIterator<bool, NonZeroOp<Ti>, Ti\*> itr\(cond->ptr<Ti>\(\), NonZeroOp<Ti>\(\)\);",
         "auto itr = thrust::make_transform_iterator(cond->ptr<Ti>(), NonZeroOp<Ti>());",
         "cub::TransformInputIterator was removed in CCCL 3"),
    Edit("extern/cuda/cub/ops/cub_where_op.cc", r"#include <thrust/transform.h>\n(?!#include <thrust/iterator)",
         "#include <thrust/transform.h>\n#include <thrust/iterator/counting_iterator.h>\n"
         "#include <thrust/iterator/transform_iterator.h>\n", "thrust's iterators replace cub's"),
    *(Edit(f"extern/cuda/cudnn/ops/{name}.cc", r"CUDNN_CROSS_CORRELATION, getDataType<Ty>\(\)",
           "CUDNN_CROSS_CORRELATION, CUDNN_DATA_FLOAT /* jdiff-cuda13: float32 accumulation */",
           "float16 convolutions accumulated in float16 (cuDNN's true-half mode): float32, as torch's do")
      for name in ("cudnn_conv_op", "cudnn_conv_backward_x_op", "cudnn_conv_backward_w_op")),
)
RNN_SOURCES = (
    "extern/cuda/cudnn/ops/cudnn_rnn_op.cc", "extern/cuda/cudnn/ops/cudnn_rnn_op.h",
    "extern/cuda/cudnn/ops/cudnn_rnn_backward_x_op.cc", "extern/cuda/cudnn/ops/cudnn_rnn_backward_x_op.h",
    "extern/cuda/cudnn/src/cudnn_rnn_descriptor.cc", "extern/cuda/cudnn/inc/cudnn_rnn_descriptor.h",
)
# cuDNN 8 library names Jittor links or loads -> the cuDNN 9 library that holds those functions now
CUDNN_LIBRARIES = {
    "libcudnn.so": "libcudnn.so.9",
    "libcudnn_ops_infer.so": "libcudnn_ops.so.9",
    "libcudnn_ops_train.so": "libcudnn_ops.so.9",
    "libcudnn_cnn_infer.so": "libcudnn_cnn.so.9",
    "libcudnn_cnn_train.so": "libcudnn_cnn.so.9",
}


class PatchError(RuntimeError):
    pass


def jittor_package() -> Path:
    """The installed Jittor's folder, found without importing it (an import would compile)."""
    import importlib.util

    spec = importlib.util.find_spec("jittor")
    if spec is None or not spec.submodule_search_locations:
        raise PatchError("Jittor is not installed here: `pip install jittor==1.3.11.0`, then run this again.")
    return Path(list(spec.submodule_search_locations)[0])


def cuda_home() -> Path:
    """The CUDA toolkit Jittor will use: the folder above its nvcc (``nvcc_path``, else PATH, else /usr/local/cuda)."""
    nvcc = os.environ.get("nvcc_path") or shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    return Path(nvcc).resolve().parent.parent


def cuda_version(home: Path) -> tuple[int, int] | None:
    nvcc = home / "bin" / "nvcc"
    try:
        out = subprocess.run([str(nvcc), "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    found = re.search(r"release (\d+)\.(\d+)", out)
    return (int(found.group(1)), int(found.group(2))) if found else None


def cudnn_folder() -> Path | None:
    """The folder of the pip-installed cuDNN 9 (``nvidia-cudnn-cu12``/``-cu13``): ``include/`` and ``lib/``."""
    for entry in sys.path:
        for header in glob.glob(os.path.join(entry, "nvidia", "**", "include", "cudnn.h"), recursive=True):
            folder = Path(header).parent.parent
            if list((folder / "lib").glob("libcudnn.so.9*")):
                return folder
    return None


def unpatched(package: Path) -> list[str]:
    """The edits whose old code is still in ``package`` (none in a patched or a CUDA-13-ready Jittor)."""
    found = []
    for edit in EDITS:
        path = package / edit.path
        if path.exists() and re.search(edit.old, path.read_text()):
            found.append(f"{edit.path}: {edit.why}")
    return found


def needs_patch(package: Path | None = None) -> bool:
    """True where Jittor would fail to build: a CUDA >= 13 toolkit, and Jittor's sources still hold code it
    cannot compile."""
    version = cuda_version(cuda_home())
    if version is None or version[0] < 13:
        return False
    try:
        return bool(unpatched(package or jittor_package()))
    except PatchError:  # no Jittor: import_jittor says so itself
        return False


def read_manifest(package: Path) -> dict:
    path = package / STATE_DIR / MANIFEST
    return json.loads(path.read_text()) if path.exists() else {"edited": [], "moved": [], "links": []}


def write_manifest(package: Path, manifest: dict) -> None:
    path = package / STATE_DIR / MANIFEST
    path.parent.mkdir(exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    tmp.replace(path)


def apply(package: Path, cuda: Path, cudnn: Path | None, say=print) -> list[str]:
    """Patch ``package`` (Jittor's folder) for the toolkit in ``cuda`` and the cuDNN in ``cudnn``.

    Returns what changed (empty when everything was applied already)."""
    manifest = read_manifest(package)
    backups = package / STATE_DIR / "originals"
    changed = []
    for edit in EDITS:
        path = package / edit.path
        if not path.exists():
            raise PatchError(f"{path} is missing: is this Jittor 1.3.x? Nothing else was changed for it.")
        text = path.read_text()
        new_text, count = re.subn(edit.old, edit.new, text)
        if not count:
            continue  # applied already, or this Jittor differs there; verify tells
        if edit.path not in manifest["edited"]:
            backup = backups / edit.path
            backup.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, backup)
            manifest["edited"].append(edit.path)
            write_manifest(package, manifest)
        path.write_text(new_text)
        changed.append(f"{edit.path}: {count} place(s): {edit.why}")
    for relative in RNN_SOURCES:
        path = package / relative
        if path.exists():
            target = backups / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            manifest["moved"].append(relative)
            write_manifest(package, manifest)
            shutil.move(path, target)
            changed.append(f"{relative}: moved aside (cuDNN RNN API removed in cuDNN 9)")
    if cudnn is not None:
        manifest["cudnn"] = str(cudnn)
        links = {cuda / "include" / header.name: header for header in sorted((cudnn / "include").glob("cudnn*.h"))}
        library_dir = cuda / "lib64"
        for name, real in CUDNN_LIBRARIES.items():
            links[library_dir / name] = cudnn / "lib" / real
        for link, target in links.items():
            if link.is_symlink() and os.readlink(link) == str(target):
                continue
            if link.exists() or link.is_symlink():
                say(f"kept {link}: it exists already and is not ours")
                continue
            if not target.exists():
                raise PatchError(f"{target} is missing: the cuDNN at {cudnn} is not cuDNN 9 as expected.")
            manifest["links"].append(str(link))
            write_manifest(package, manifest)
            link.symlink_to(target)
            changed.append(f"{link} -> {target}")
    write_manifest(package, manifest)
    return changed


# cuDNN 9's libraries in load order: each needs only those before it. The engines are opened by name at run time.
CUDNN_LOAD_ORDER = ("libcudnn_graph.so.9", "libcudnn_engines_precompiled.so.9", "libcudnn_engines_runtime_compiled.so.9",
                    "libcudnn_heuristic.so.9", "libcudnn_ops.so.9", "libcudnn_cnn.so.9", "libcudnn_adv.so.9",
                    "libcudnn.so.9")


def preload_cudnn(package: Path | None = None) -> None:
    """Load the patched-in cuDNN's libraries into this process before Jittor opens them through our links.

    Without this the dynamic loader resolves their dependencies (``libcudnn_graph.so.9``, ...) by name, and may
    find another cuDNN 9 on the system (a different minor version: missing symbols)."""
    import ctypes

    try:
        folder = read_manifest(package or jittor_package()).get("cudnn")
    except PatchError:
        return
    if not folder:
        return
    for name in CUDNN_LOAD_ORDER:
        library = Path(folder) / "lib" / name
        if library.exists():
            ctypes.CDLL(str(library), mode=ctypes.RTLD_GLOBAL)


def revert(package: Path) -> list[str]:
    """Undo ``apply``: the original files back, the moved files back, our links removed."""
    manifest = read_manifest(package)
    backups = package / STATE_DIR / "originals"
    changed = []
    for relative in manifest["edited"] + manifest["moved"]:
        source = backups / relative
        if source.exists():
            (package / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, package / relative)
            changed.append(f"{relative}: restored")
    for link in map(Path, manifest["links"]):
        if link.is_symlink():
            link.unlink()
            changed.append(f"{link}: removed")
    shutil.rmtree(package / STATE_DIR, ignore_errors=True)
    return changed


VERIFY = r"""
import numpy as np
from jdiff.engines.jittor.env import import_jittor
jt = import_jittor("cuda")
import jittor.compile_extern as extern
rng = np.random.default_rng(0)
x = rng.standard_normal((2, 8, 16, 16)).astype(np.float32)
w = rng.standard_normal((4, 8, 3, 3)).astype(np.float32)
got = jt.nn.conv2d(jt.array(x), jt.array(w), padding=1).numpy()
windows = np.lib.stride_tricks.sliding_window_view(np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1))), (3, 3), (2, 3))
want = np.einsum("bchwij,ocij->bohw", windows, w)
print("conv     max abs diff %.2e" % np.abs(got - want).max())
assert np.abs(got - want).max() < 1e-3
s = rng.standard_normal((4, 1000)).astype(np.float32)
got = jt.nn.softmax(jt.array(s), dim=1).numpy()
want = np.exp(s - s.max(1, keepdims=True)); want /= want.sum(1, keepdims=True)
print("softmax  max abs diff %.2e" % np.abs(got - want).max())
assert np.abs(got - want).max() < 1e-5
c = rng.standard_normal((64, 64)) > 0
got = jt.where(jt.array(c))
assert all((g.numpy() == w_).all() for g, w_ in zip(got, np.nonzero(c))), "where"
print("where    ok")
assert extern.cudnn is not None, "cuDNN did not load (see Jittor's messages above)"
print("cuDNN    loaded")
"""


def verify() -> bool:
    """Run the checks in a fresh process (Jittor reads its setup once per process)."""
    root = Path(__file__).resolve().parents[4]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", VERIFY], env=env)
    return done.returncode == 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jdiff.engines.jittor.fast.cuda13",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["apply", "status", "verify", "revert"])
    args = parser.parse_args(argv)
    try:
        package = jittor_package()
        cuda = cuda_home()
        if args.action == "status":
            manifest = read_manifest(package)
            print(f"Jittor at {package}; CUDA {cuda_version(cuda)} at {cuda}; cuDNN 9 at {cudnn_folder()}")
            print("applied" if manifest["edited"] or manifest["moved"] else "not applied",
                  json.dumps(manifest, indent=1))
            return 0
        if args.action == "revert":
            for line in revert(package) or ["nothing to revert"]:
                print(line)
            return 0
        if args.action == "apply":
            cudnn = cudnn_folder()
            if cudnn is None:
                print("no pip cuDNN 9 found (nvidia-cudnn-cu12/cu13): cuDNN left as it is; convolutions may be slow")
            for line in apply(package, cuda, cudnn) or ["nothing to change: applied already"]:
                print(line)
        ok = verify()
        print("verified: Jittor runs on this GPU" if ok else "verification FAILED: see the messages above")
        return 0 if ok else 1
    except PatchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
