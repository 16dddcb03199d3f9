"""Framework-independent random numbers: every stream is a numpy generator keyed by integers.

Both engines take their noise from here, so the same config and seed give the same images whichever engine
runs, however the work is batched, and in whichever order jobs run: image k's noise depends only on
(seed, purpose, k), never on what was drawn before it.
"""

from __future__ import annotations

import zlib

import numpy as np

# Purposes keep the streams apart.
TRAIN = 1
SAMPLE = 2
PRIOR = 3
LORA_INIT = 4


def text_key(text: str) -> int:
    """A stable integer for a string (Python's hash() changes between processes)."""
    return zlib.crc32(text.encode("utf-8"))


def stream(seed: int, purpose: int, *keys: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), int(purpose), *map(int, keys)])))


def gaussian(rng: np.random.Generator, shape) -> np.ndarray:
    return rng.standard_normal(shape, dtype=np.float64).astype(np.float32)
