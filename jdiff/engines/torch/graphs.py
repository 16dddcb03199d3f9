"""Whole-call CUDA graphs without a compiler: record a function's kernels once, replay them with new inputs.

``engine.compile=cuda-graphs`` uses this for the whole training step (VAE encode, UNet forward and backward,
loss, clipping, AdamW) and for the UNet calls of sampling. Unlike ``torch.compile(mode="reduce-overhead")``
it compiles nothing: the first calls run eagerly, the next one is recorded, which takes seconds instead of
minutes. The kernels are the eager ones, so results match the eager engine's up to the float order of the
kernels cuDNN picks.
"""

from __future__ import annotations

import warnings
from typing import Callable, Optional, Sequence

import torch


class CaptureError(RuntimeError):
    """Recording a CUDA graph failed: the function does something a graph cannot hold."""


def first_cause(err: BaseException) -> str:
    """The first line of the earliest error in ``err``'s chain. When an op fails while a graph records, ending
    the recording fails too, and that second error ("operation failed due to a previous error during
    capture") is the one raised; the op's own error is its context."""
    while isinstance(err.__context__, RuntimeError):
        err = err.__context__
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


class CapturedCall:
    """``fn(*static_inputs)`` replayed from a CUDA graph; every call copies its inputs into the static buffers.

    The first ``warmup`` calls run ``fn`` eagerly on the buffers (on a side stream on CUDA, as graph capture
    needs: lazy state such as optimizer moments and cuBLAS workspaces is made there). They are real calls
    and their results are returned. The next call records the graph, then replays it. Outputs are the
    graph's own tensors: the next call overwrites them, so read or copy them before calling again.
    With ``capture=False`` (CPU; tests) every call runs ``fn`` eagerly on the same static buffers.
    """

    def __init__(self, fn: Callable[..., Sequence[torch.Tensor]], *, warmup: int = 1, capture: bool = True):
        self.fn, self.warmup, self.capture = fn, warmup, capture
        self.calls = 0
        self.inputs: Optional[list[torch.Tensor]] = None
        self.outputs: Optional[Sequence[torch.Tensor]] = None
        self.graph: Optional[torch.cuda.CUDAGraph] = None

    def __call__(self, *inputs: torch.Tensor) -> Sequence[torch.Tensor]:
        if self.inputs is None:
            self.inputs = [x.detach().clone() for x in inputs]
        else:
            for static, x in zip(self.inputs, inputs, strict=True):
                if static.shape != x.shape or static.dtype != x.dtype:
                    raise ValueError(f"a captured call got a {tuple(x.shape)} {x.dtype} input where it was "
                                     f"recorded with {tuple(static.shape)} {static.dtype}")
                static.copy_(x, non_blocking=True)
        self.calls += 1
        if not self.capture:
            return self.fn(*self.inputs)
        if self.calls <= self.warmup:
            return self._eager_on_side_stream()
        if self.graph is None:
            graph = torch.cuda.CUDAGraph()
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    with torch.cuda.graph(graph):
                        self.outputs = self.fn(*self.inputs)
            except torch.cuda.OutOfMemoryError:
                raise
            except RuntimeError as err:  # an op that waits for the GPU or reads a value back cannot be recorded
                raise CaptureError(first_cause(err)) from err
            self.graph = graph
        self.graph.replay()
        return self.outputs

    def _eager_on_side_stream(self) -> Sequence[torch.Tensor]:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), warnings.catch_warnings():
            # a capturable optimizer warns when it steps outside a graph; these steps are the warm-up
            warnings.filterwarnings("ignore", message=".*capturable.*")
            out = self.fn(*self.inputs)
        main = torch.cuda.current_stream()
        main.wait_stream(side)
        for tensor in out:  # made on the side stream, used on this one: not to be reused before this one is done
            tensor.record_stream(main)
        return out


class CapturedCalls:
    """One :class:`CapturedCall` per input signature (shapes and dtypes), each with its own memory pool."""

    def __init__(self, fn: Callable[..., Sequence[torch.Tensor]], *, warmup: int = 1, capture: bool = True):
        self.fn, self.warmup, self.capture = fn, warmup, capture
        self.calls: dict[tuple, CapturedCall] = {}

    def __call__(self, *inputs: torch.Tensor) -> Sequence[torch.Tensor]:
        key = tuple((tuple(x.shape), x.dtype) for x in inputs)
        if key not in self.calls:
            self.calls[key] = CapturedCall(self.fn, warmup=self.warmup, capture=self.capture)
        return self.calls[key](*inputs)
