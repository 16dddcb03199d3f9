"""``engine.compile=replay``: run a Jittor computation from an execution plan recorded once, not re-planned.

Each time Jittor runs a lazy graph, its executor walks every node, decides which operations to fuse into one
kernel, orders the kernels, looks each one up, and only then launches. For the SD 2.1 training step that is
about 6,400 kernels, and on an H100 the host work (Python building the graph, then the executor's pass) takes
several times as long as the GPU's (docs/benchmarks.md, sixth run). ``Replay`` records that work once per input
shape: it builds the graph a single time, has the executor plan it, and keeps the plan (the fused operators in
launch order, with their compiled entry points). Each later call binds the new inputs' memory to the recorded
inputs and launches the kernels straight from the plan: no Python and no executor pass. It is the Jittor
counterpart of the torch engine's CUDA graphs, one level up: the host still launches every kernel.

The recording and replaying are Jittor's own (``jittor/vcompiler`` in Jittor 1.3.x, a C++ extension compiled at
first use). What a replayed function may do follows from how it works:

- its inputs are the only values that change between calls. Anything else it reads (the frozen base weights)
  is fixed at recording; so are Python numbers, which Jittor bakes into the graph as constants: a learning rate
  or a loss scale must come in as an input, not as a float;
- it must not run the graph while it is being recorded: no ``.numpy()``, ``.item()`` or ``sync``;
- the graph must depend on the inputs' shapes only, never on their values;
- a new input shape (or dtype) records a new plan.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import jittor as jt

from jdiff.engines.base import EngineError

CPU_HEADERS = Path(__file__).with_name("cpu_headers")
RECORDER = Path(jt.__file__).parent / "vcompiler"


@functools.cache
def extension(source_dir: Path = RECORDER):
    """Jittor's graph recorder (``build_sgraph``, ``exec_sgraph``), compiled with Jittor's own flags; on a machine
    without CUDA, the two CUDA headers it includes come from ``cpu_headers``."""
    import jittor.compiler as compiler
    import jittor_utils
    from jittor_utils import lock

    if not (source_dir / "vcompiler.cc").is_file():
        raise EngineError(f"engine.compile=replay uses Jittor 1.3.x's graph recorder ({source_dir}/vcompiler.cc), "
                          f"which this Jittor ({jt.__version__}) does not have; use engine.compile=no, or "
                          "install jittor==1.3.11.0.")
    flags = compiler.cc_flags
    if "-DHAS_CUDA" not in flags:
        flags += f' -I"{CPU_HEADERS}"'
    with lock.lock_scope():
        return jittor_utils.compile_module((source_dir / "vcompiler.h").read_text(),
                                           f'{flags} -I"{source_dir}" "{source_dir / "vcompiler.cc"}"')


def device_arrays(arrays) -> list:
    """numpy arrays as Jittor variables in the memory the recorded kernels read. ``jt.array`` keeps its data in
    host memory until a CUDA kernel first reads it, and the executor moves it then; a replay binds its inputs'
    memory as it finds it, so on a GPU each array is first copied to the device."""
    held = [jt.array(a) for a in arrays]
    return [v.copy() for v in held] if jt.flags.use_cuda else held


@dataclass
class Plan:
    graph: object  # the extension's SGraphPtr
    # the graph's nodes live as long as their variables: the recorded inputs and outputs are kept with the plan
    inputs: list
    outputs: list


class Replay:
    """``fn`` (a list of Jittor variables in, a list out) recorded at its first call with each input signature
    (shapes and dtypes), and replayed from then on. The outputs are fresh variables each call."""

    def __init__(self, fn: Callable[[list], list], name: str):
        self.fn = fn
        self.name = name
        self.plans: dict[tuple, Plan] = {}

    def __call__(self, inputs: list) -> list:
        key = tuple((tuple(v.shape), str(v.dtype)) for v in inputs)
        plan = self.plans.get(key)
        if plan is None:
            plan = self.plans[key] = self.record(inputs)
        jt.sync(inputs)  # the recorded inputs take over the memory of these, so it must exist
        return extension().exec_sgraph(plan.graph, inputs)

    def record(self, inputs: list) -> Plan:
        stand_ins = [v.clone() for v in inputs]  # the graph's own inputs; each call lends them new memory
        jt.sync_all()
        ran = jt.flags.exec_called
        outputs = self.fn(stand_ins)
        if jt.flags.exec_called != ran:
            raise EngineError(f"engine.compile=replay: recording the {self.name} ran part of it (a .numpy(), "
                              ".item() or sync inside), so it cannot be replayed; use engine.compile=no.")
        for v in outputs + stand_ins:  # held by the plan, not by the process's list of live variables
            v.release_from_holders()
        return Plan(extension().build_sgraph(outputs, stand_ins), stand_ins, outputs)

    def clear(self) -> None:
        self.plans.clear()

