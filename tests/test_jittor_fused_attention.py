"""The fused attention kernel (jdiff/engines/jittor/fast/fused_attention.py) through its CPU build: the same tiling,
online softmax and two-pass backward as the CUDA kernels, checked against the unfused ``blocks.attention``
and a float64 numpy reference, forward and the three gradients."""

from __future__ import annotations

import numpy as np
import pytest

from jdiff.engines.jittor.env import import_jittor

jt = import_jittor("cpu")

from jdiff.engines.jittor import blocks  # noqa: E402
from jdiff.engines.jittor.fast import fused_attention, tensor_core_attention  # noqa: E402

TOLERANCE = 1e-4  # max abs difference, float32


def reference(q, k, v, dout):
    """Attention and its gradients in float64: (out, dq, dk, dv) for the loss sum(out * dout)."""
    scale = q.shape[-1] ** -0.5
    scores = q @ k.swapaxes(-1, -2) * scale
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = probs @ v
    dprobs = dout @ v.swapaxes(-1, -2)
    dscores = probs * (dprobs - (dprobs * probs).sum(-1, keepdims=True)) * scale
    return out, dscores @ k, dscores.swapaxes(-1, -2) @ q, probs.swapaxes(-1, -2) @ dout


def random_inputs(n_q, n_k, head_dim, seed=0):
    """(batch 2, heads 2) tensors. The queries are scaled up so the softmax is peaked and its running max
    changes from key tile to key tile, which exercises the online rescaling."""
    rng = np.random.default_rng(seed)
    q = 3 * rng.standard_normal((2, 2, n_q, head_dim))
    k, v = rng.standard_normal((2, 2, n_k, head_dim)), rng.standard_normal((2, 2, n_k, head_dim))
    return q, k, v, rng.standard_normal((2, 2, n_q, head_dim))


def forward_and_grads(attend, q, k, v, dout, dtype="float32"):
    q, k, v, dout = (jt.array(x.astype(dtype)) for x in (q, k, v, dout))
    out = attend(q, k, v)
    grads = jt.grad((out * dout).sum(), [q, k, v])
    return [out.numpy()] + [g.numpy() for g in grads]


# (query tokens, key tokens, head_dim): tiles of 64 queries and 32 keys, so 100 and 77 leave partial tiles;
# n_k = 77 is the text encoder's length (cross-attention). 64/77 and 128/77 split the dK/dV pass over queries.
CASES = [(64, 64, 64), (100, 100, 64), (128, 77, 64), (77, 77, 40), (64, 77, 40)]


@pytest.mark.parametrize("n_q,n_k,head_dim", CASES)
def test_fused_matches_float64_and_unfused(n_q, n_k, head_dim):
    inputs = random_inputs(n_q, n_k, head_dim)
    fused = forward_and_grads(fused_attention.attention, *inputs)
    unfused = forward_and_grads(blocks.attention, *inputs)  # on the CPU, blocks.attention is unfused
    for name, got, expected, other in zip(("out", "dq", "dk", "dv"), fused, reference(*inputs), unfused):
        assert got.shape == expected.shape, name
        assert np.abs(got - expected).max() <= TOLERANCE, (name, np.abs(got - expected).max())
        assert np.abs(got - other).max() <= TOLERANCE, (name, np.abs(got - other).max())


def test_fused_float16_keeps_dtype_and_accuracy():
    inputs = random_inputs(100, 77, 64, seed=1)
    fused = forward_and_grads(fused_attention.attention, *inputs, dtype="float16")
    # the reference sees the same float16-rounded inputs
    expected = reference(*(x.astype(np.float16).astype(np.float64) for x in inputs))
    for name, got, want in zip(("out", "dq", "dk", "dv"), fused, expected):
        assert got.dtype == np.float16, name
        relative = np.linalg.norm(got - want) / np.linalg.norm(want)
        assert relative < 2e-3, (name, relative)


def test_blocks_attention_takes_fused_path_only_where_chosen(monkeypatch):
    calls = []
    kernel = fused_attention.attention
    monkeypatch.setattr(fused_attention, "attention", lambda *qkv: calls.append(1) or kernel(*qkv))
    q, k, v, _ = (jt.array(x.astype("float32")) for x in random_inputs(64, 77, 64))
    unfused = blocks.attention(q, k, v, upcast=True).numpy()
    assert calls == []  # "auto" on the CPU: the unfused path
    monkeypatch.setattr(fused_attention, "MODE", "fused")
    fused = blocks.attention(q, k, v, upcast=True).numpy()
    assert calls == [1]
    np.testing.assert_allclose(fused, unfused, atol=TOLERANCE)
    causal = jt.array(np.triu(np.full((64, 77), -np.inf, dtype=np.float32), 1))
    blocks.attention(q, k, v, bias=causal).sync()
    assert calls == [1]  # a bias (mask) always takes the unfused path


def test_head_dim_over_128_is_refused():
    q = jt.array(np.ones((1, 1, 4, 160), dtype=np.float32))
    with pytest.raises(ValueError, match="head_dim <= 128, got 160"):
        fused_attention.attention(q, q, q)


def test_tensor_core_kernels_only_where_their_shared_memory_fits():
    """The float16 tensor-core kernels need compute capability 8.0+ and up to 115 KiB of shared memory per
    block (head_dim 128): a T4 (7.5) gets none, a 99 KiB card (8.6, 8.9) head_dim 64 only, an H100 all."""
    limit = tensor_core_attention.shared_memory_limit
    need = {d: max(tensor_core_attention.shared_memory(d).values()) for d in (16, 64, 128)}
    assert need[16] < need[64] < need[128]
    assert limit([75]) == 0 and limit([]) == 0
    assert need[64] <= limit([86]) < need[128]
    assert need[128] <= limit([80]) and need[128] <= limit([90])
    assert limit([86, 90]) == limit([86])  # every GPU Jittor compiles for must fit


def test_tensor_core_kernels_compile_for_ampere_and_hopper():
    """The CPU tests cannot run the tensor-core kernels; nvcc can still build them (the header the engine hands
    to jt.code, with python -m jdiff.bench.attention_forward's harness) for sm_80 and sm_90."""
    import shutil
    from pathlib import Path

    from conftest import REPO, jdiff_cli

    if not (shutil.which("nvcc") or Path("/usr/local/cuda/bin/nvcc").exists()):
        pytest.skip("no CUDA toolkit (nvcc) on this machine")
    for arch in ("80", "90"):
        built = jdiff_cli(["--compile-only", "--arch", arch], REPO, module="jdiff.bench.attention_forward")
        assert built.returncode == 0 and f"built for sm_{arch}" in built.stdout, built.stdout[-3000:]
