"""LoRA adapters on disk, in the layout diffusers' ``load_lora_weights`` reads, without any framework.

A file holds, for each adapted linear layer ``M`` of the UNet or text encoder,
``unet.M.lora_A.weight`` (rank x in) and ``unet.M.lora_B.weight`` (out x rank) (``text_encoder.M...``
likewise), and the safetensors metadata ``lora_adapter_metadata``: per prefix the rank, alpha and target
modules, as peft's LoraConfig names them. The update a layer applies is ``(alpha / rank) * B @ A @ x``.

Reading checks every value before any model sees it, and a file that cannot work raises
:class:`AdapterFileError` (a ValueError) naming the file, the key and what to do: non-finite tensors, a lora_A
without its lora_B, ranks that disagree, a broken ``lora_adapter_metadata`` (not JSON, not an object, a rank
or alpha of the wrong type or value), other layouts (kohya/webui, old diffusers, DoRA, ...), files that are
no safetensors. ``check_adapter_file(path)`` runs these checks alone, for code that checks a config before
loading a model; the checks that need the model (module names, layer sizes) are ``Engine.load_lora``'s.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from jdiff.files import atomic_write
from jdiff.noise import LORA_INIT, stream, text_key

PREFIXES = ("unet", "text_encoder")
METADATA_KEY = "lora_adapter_metadata"
ADAPTER_FILE = "lora.safetensors"  # the adapter in a jdiff run folder
SHOWN = 3  # how many keys an error message lists
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")  # safetensors' names
PICKLE_PROTOCOLS = (b"\x02", b"\x03", b"\x04", b"\x05")  # a pickle starts with 0x80 and its protocol
FIX = "train the adapter again, or point lora.path at another adapter file"


class AdapterFileError(ValueError):
    """A LoRA file jdiff cannot use; the message names the file, the key, and what to do."""


@dataclass
class Adapter:
    """The adapters of one model (UNet or text encoder): module name -> (A, B)."""

    rank: int
    alpha: float
    layers: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def initial_down_weights(module: str, rank: int, in_features: int, seed: int) -> np.ndarray:
    """A fresh LoRA A matrix, N(0, 1/rank) as in the diffusers DreamBooth-LoRA script, from jdiff's own
    generator so that every engine starts from the same adapter."""
    rng = stream(seed, LORA_INIT, text_key(module))
    return (rng.standard_normal((rank, in_features)) / rank).astype(np.float32)


def module_suffix(module: str) -> str:
    """The short name peft matches a layer by: ``to_q``, ``q_proj``, or ``to_out.0`` for numbered ones."""
    parts = module.split(".")
    return ".".join(parts[-2:]) if parts[-1].isdigit() and len(parts) > 1 else parts[-1]


def save_adapters(path: Path, adapters: dict[str, Adapter], extra_metadata: dict | None = None) -> Path:
    tensors: dict[str, np.ndarray] = {}
    meta: dict[str, object] = {}
    for prefix, adapter in adapters.items():
        if prefix not in PREFIXES:
            raise ValueError(f"unknown adapter prefix {prefix!r}")
        if not adapter.layers:
            continue
        for module, (down, up) in sorted(adapter.layers.items()):
            tensors[f"{prefix}.{module}.lora_A.weight"] = np.ascontiguousarray(down, dtype=np.float32)
            tensors[f"{prefix}.{module}.lora_B.weight"] = np.ascontiguousarray(up, dtype=np.float32)
        meta[f"{prefix}.r"] = adapter.rank
        meta[f"{prefix}.lora_alpha"] = adapter.alpha
        meta[f"{prefix}.target_modules"] = sorted({module_suffix(m) for m in adapter.layers})
    if not tensors:
        raise ValueError("no adapter weights to save")
    metadata = {"format": "pt", METADATA_KEY: json.dumps(meta, sort_keys=True)}
    if extra_metadata:
        metadata["jdiff"] = json.dumps(extra_metadata, sort_keys=True)
    return atomic_write(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def adapter_file(path: Path) -> Path:
    """The LoRA file ``path`` names: the file itself, or a run folder's lora.safetensors."""
    path = Path(path)
    if path.is_dir():
        file = path / ADAPTER_FILE
        if file.is_file():
            return file
        others = sorted(p.name for p in path.glob("*.safetensors"))
        hint = (f"it holds {', '.join(others)}: point lora.path at one of those files" if others else
                "point lora.path at a jdiff run folder whose train stage finished, or at a LoRA .safetensors file")
        raise AdapterFileError(f"LoRA folder {path} has no {ADAPTER_FILE}; {hint}.")
    if not path.is_file():
        raise AdapterFileError(f"LoRA file {path} does not exist; point lora.path at a jdiff run folder or at a "
                               f"LoRA .safetensors file.")
    return path


def check_adapter_file(path: Path) -> Path:
    """Read and check a LoRA file (or run folder) without any framework or model, as :func:`load_adapters`
    does; returns the file. Raises :class:`AdapterFileError` (a ValueError) naming the file, the key and the
    fix. The checks that need the model (module names, layer shapes) are the engine's, in ``load_lora``."""
    file = adapter_file(path)
    load_adapters(file)
    return file


def load_adapters(path: Path) -> dict[str, Adapter]:
    """Read a LoRA file written by jdiff or diffusers (peft key layout, optional alpha metadata), every value
    checked: finite tensors, A and B of each layer present and of one rank, a readable metadata entry. Raises
    :class:`AdapterFileError` (a ValueError) naming the file and the key."""
    path = adapter_file(path)
    tensors, metadata = _read_safetensors(path)
    if not tensors:
        raise AdapterFileError(f"LoRA file {path} holds no tensors; {FIX}.")
    _refuse_foreign_layout(path, sorted(tensors))
    meta = _adapter_metadata(path, metadata)
    adapters: dict[str, Adapter] = {}
    for key in sorted(tensors):
        value = tensors[key]
        prefix, _, rest = key.partition(".")
        if prefix not in PREFIXES or not rest.endswith((".lora_A.weight", ".lora_B.weight")):
            raise AdapterFileError(f"{path}: unexpected key {key!r}; a jdiff/diffusers LoRA file holds "
                                   f"unet.<module>.lora_A.weight, unet.<module>.lora_B.weight (text_encoder."
                                   f"<module>... likewise) and nothing else.")
        _check_tensor(path, key, value)
        module, which = rest[: -len(".lora_A.weight")], rest[-len("A.weight")]
        adapter = adapters.setdefault(prefix, Adapter(rank=0, alpha=0.0))
        down, up = adapter.layers.get(module, (None, None))
        adapter.layers[module] = (value, up) if which == "A" else (down, value)
    _refuse_non_finite(path, tensors)
    for prefix, adapter in adapters.items():
        for module, (down, up) in sorted(adapter.layers.items()):
            name = f"{prefix}.{module}"
            if down is None or up is None:
                have, lack = ("lora_A", "lora_B") if up is None else ("lora_B", "lora_A")
                raise AdapterFileError(f"{path}: {name}.{lack}.weight is missing (the file has {name}.{have}.weight); "
                                       f"every adapted layer needs both, so the file is incomplete: {FIX}.")
            if down.shape[0] != up.shape[1]:
                raise AdapterFileError(
                    f"{path}: {name}.lora_A.weight has rank {down.shape[0]} (shape {tuple(down.shape)}) but "
                    f"{name}.lora_B.weight has rank {up.shape[1]} (shape {tuple(up.shape)}); A is rank x in and B "
                    f"is out x rank, of one rank: {FIX}.")
        ranks = {down.shape[0] for down, _ in adapter.layers.values()}
        if len(ranks) != 1:
            raise AdapterFileError(f"{path}: {prefix} adapters of different ranks {sorted(ranks)} are not supported; "
                                   f"{FIX}.")
        adapter.rank = ranks.pop()
        adapter.alpha = _alpha(path, meta, prefix, adapter.rank)
    return adapters


def _read_safetensors(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The tensors (bfloat16 ones widened to float32: numpy has no bfloat16) and the string metadata."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as err:
        raise AdapterFileError(f"cannot read LoRA file {path}: {err}.") from err
    if not head:
        raise AdapterFileError(f"LoRA file {path} is empty (0 bytes): it was not written completely (an "
                               f"interrupted run or copy?); {FIX}.")
    tensors: dict[str, np.ndarray] = {}
    try:
        with safe_open(str(path), framework="numpy") as f:
            metadata = f.metadata() or {}
            for key in f.keys():
                dtype = f.get_slice(key).get_dtype()
                if dtype not in FLOAT_DTYPES:
                    raise AdapterFileError(f"{path}: {key} holds {dtype} values; LoRA weights are floating point "
                                           f"(F32, F16 or BF16): {FIX}.")
                tensors[key] = _bfloat16_tensor(path, key) if dtype == "BF16" else f.get_tensor(key)
    except (SafetensorError, OSError) as err:
        if head.startswith(b"PK\x03\x04") or (head[:1] == b"\x80" and head[1:2] in PICKLE_PROTOCOLS):
            raise AdapterFileError(
                f"LoRA file {path} is a pickle (PyTorch .bin/.pt/.ckpt) file, not safetensors; jdiff reads adapters "
                f"only from .safetensors files (unpickling can run arbitrary code). If you trust it, convert it "
                f"(safetensors.torch.save_file(torch.load(file), 'lora.safetensors')).") from err
        raise AdapterFileError(f"LoRA file {path} is not a readable safetensors file ({err}); a LoRA file is a "
                               f".safetensors file as jdiff's train stage or diffusers' save_lora_weights write it. "
                               f"Is it truncated (an interrupted copy or download)? {FIX.capitalize()}.") from err
    return tensors, metadata


def _bfloat16_tensor(path: Path, key: str) -> np.ndarray:
    """One bfloat16 tensor as float32, read by the safetensors layout: an 8-byte header size, the JSON header
    (name -> dtype, shape, data_offsets), then the data."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        info = json.loads(f.read(size))[key]
        start, end = info["data_offsets"]
        f.seek(8 + size + start)
        raw = np.frombuffer(f.read(end - start), dtype="<u2")
    return (raw.astype(np.uint32) << 16).view(np.float32).reshape(info["shape"])


# Key spellings of LoRA layouts jdiff does not read, by what they say about the file
FOREIGN_LAYOUTS = (
    (lambda k: k.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) or ".lora_down." in k
     or ".lora_up." in k,
     "is a kohya-ss / AUTOMATIC1111 (webui) LoRA, a format jdiff does not support yet (a conversion is "
     "planned). Convert it to the diffusers/peft layout first (unet.<module>.lora_A.weight; diffusers' "
     "pipe.load_lora_weights reads it, and pipe.save_lora_weights writes that layout), or train the adapter with "
     "jdiff"),
    (lambda k: ".processor." in k or k.endswith(("_lora.down.weight", "_lora.up.weight")),
     "is an old diffusers attention-processor LoRA (keys like ...processor.to_q_lora.down.weight). Re-save it "
     "in the current layout: load it with diffusers' pipe.load_lora_weights, then pipe.save_lora_weights"),
    (lambda k: k.startswith("base_model.model."),
     "is a plain peft state dict (base_model.model.<module>...). Save it with diffusers' save_lora_weights, or "
     "rename the keys to unet.<module>.lora_A.weight / text_encoder.<module>.lora_A.weight"),
    (lambda k: k.startswith(("text_encoder_2.", "transformer.")),
     "is for another architecture (SDXL's second text encoder, or a transformer model such as SD3 or Flux); jdiff "
     "adapts Stable Diffusion 2.1's UNet and text encoder: train an adapter for this model"),
    (lambda k: "lora_magnitude_vector" in k,
     "is a DoRA adapter (lora_magnitude_vector), which jdiff does not support; train a plain LoRA"),
    (lambda k: "lora_embedding_" in k,
     "adapts embedding layers (lora_embedding_A/B), which jdiff does not support; jdiff adapts linear layers"),
    (lambda k: (".lora_A." in k or ".lora_B." in k) and k.endswith(".bias"),
     "has LoRA biases (peft's lora_bias), which jdiff does not support; train an adapter without them"),
)


def _refuse_foreign_layout(path: Path, keys: list[str]) -> None:
    for matches, what in FOREIGN_LAYOUTS:
        found = [k for k in keys if matches(k)]
        if found:
            more = f" and {len(found) - 1} more" if len(found) > 1 else ""
            raise AdapterFileError(f"LoRA file {path} (key {found[0]!r}{more}) {what}.")


def _check_tensor(path: Path, key: str, value: np.ndarray) -> None:
    if not np.issubdtype(value.dtype, np.floating):
        raise AdapterFileError(f"{path}: {key} holds {value.dtype} values; LoRA weights are floating point "
                               f"(float32, float16 or bfloat16): {FIX}.")
    if value.ndim != 2:
        raise AdapterFileError(f"{path}: {key} has shape {tuple(value.shape)}; jdiff adapts linear layers, whose "
                               f"LoRA weights are matrices (a convolution's adapter?): {FIX}.")
    if 0 in value.shape:
        raise AdapterFileError(f"{path}: {key} is empty (shape {tuple(value.shape)}); {FIX}.")


def _refuse_non_finite(path: Path, tensors: dict[str, np.ndarray]) -> None:
    bad = [k for k in sorted(tensors) if not np.isfinite(tensors[k]).all()]
    if bad:
        first = tensors[bad[0]]
        count = int(first.size - np.isfinite(first).sum())
        more = ""
        if len(bad) > 1:
            listed = ", ".join(bad[1:1 + SHOWN]) + (", ..." if len(bad) > SHOWN + 1 else "")
            more = f"; {len(bad) - 1} more tensors have some too ({listed})"
        raise AdapterFileError(
            f"{path}: {bad[0]} has {count} non-finite values (NaN or inf) of {first.size}{more}; the images would "
            f"come out black. The training that wrote it diverged: train again with a smaller train.lr (or "
            f"engine.mixed_precision=no or bf16 instead of fp16), or point lora.path at another adapter file.")


def _adapter_metadata(path: Path, metadata: dict[str, str]) -> dict:
    raw = metadata.get(METADATA_KEY)
    if raw is None:
        return {}
    try:
        meta = json.loads(raw)
    except (json.JSONDecodeError, TypeError) as err:
        raise AdapterFileError(f"{path}: the safetensors metadata {METADATA_KEY!r} is not JSON ({err}); re-save the "
                               f"adapter, or remove that entry (alpha then defaults to the rank).") from err
    if not isinstance(meta, dict):
        raise AdapterFileError(f"{path}: the safetensors metadata {METADATA_KEY!r} is a JSON {type(meta).__name__}; "
                               f"it must be an object such as {{\"unet.r\": 4, \"unet.lora_alpha\": 4}}: re-save the "
                               f"adapter, or remove that entry (alpha then defaults to the rank).")
    return meta


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _alpha(path: Path, meta: dict, prefix: str, rank: int) -> float:
    """The adapter's alpha from the metadata (the rank when it has none), every related entry checked."""
    def refuse(key: str, need: str) -> None:
        raise AdapterFileError(f"{path}: {METADATA_KEY} entry {f'{prefix}.{key}'!r} = {meta[f'{prefix}.{key}']!r} "
                               f"{need}; correct or remove that entry, or {FIX}.")

    r = meta.get(f"{prefix}.r")
    if r is not None:
        if not _number(r) or not math.isfinite(r) or r != int(r) or r < 1:
            refuse("r", "is not a rank (an integer >= 1)")
        if int(r) != rank:
            refuse("r", f"does not match the rank {rank} of the file's {prefix} tensors")
    alpha = meta.get(f"{prefix}.lora_alpha")
    if alpha is None:
        alpha = rank
    elif not _number(alpha) or not math.isfinite(alpha) or alpha <= 0:
        refuse("lora_alpha", "is not an alpha (a finite number > 0)")
    for key in ("rank_pattern", "alpha_pattern"):
        pattern = meta.get(f"{prefix}.{key}")
        if pattern not in (None, {}):
            if not isinstance(pattern, dict):
                refuse(key, "is not an object of module -> value")
            wanted = rank if key == "rank_pattern" else alpha
            if any(v != wanted for v in pattern.values()):
                refuse(key, "gives some modules their own " + ("rank" if key == "rank_pattern" else "alpha")
                       + ", which jdiff does not support (one rank and alpha per model)")
    if meta.get(f"{prefix}.use_dora"):
        refuse("use_dora", "asks for DoRA, which jdiff does not support")
    rslora = meta.get(f"{prefix}.use_rslora")
    if rslora not in (None, False, True):
        refuse("use_rslora", "is not true or false")
    if rslora:  # rsLoRA scales by alpha / sqrt(rank): the same update as plain LoRA with alpha * sqrt(rank)
        return float(alpha) * math.sqrt(rank)
    return float(alpha)
