"""LoRA adapters on disk, in the layout diffusers' ``load_lora_weights`` reads, without any framework.

A file holds, for each adapted linear layer ``M`` of the UNet or text encoder,
``unet.M.lora_A.weight`` (rank x in) and ``unet.M.lora_B.weight`` (out x rank) (``text_encoder.M...``
likewise), and the safetensors metadata ``lora_adapter_metadata``: per prefix the rank, alpha and target
modules, as peft's LoraConfig names them. The update a layer applies is ``(alpha / rank) * B @ A @ x``.

Reading also takes the kohya-ss layout that AUTOMATIC1111's WebUI and ComfyUI load (what ``jdiff.export``
writes): ``lora_unet_<M with . as _>.lora_down.weight`` (= A), ``.lora_up.weight`` (= B) and ``.alpha`` (a
scalar, that module's alpha; none: alpha = rank), ``lora_te_`` for the text encoder. Its names lost their dots
(``to_out_0``: ``to_out.0`` or ``to_out_0``?), so they are matched against the model's own linear layers
(``module_names``, which ``Engine.load_lora`` gives); a kohya file whose modules have other alphas or ranks
becomes one rank and alpha per model, the difference folded into B (zero rows and columns pad the lower
ranks), which changes no output.

Reading checks every value before any model sees it, and a file that cannot work raises
:class:`AdapterFileError` (a ValueError) naming the file, the key and what to do: non-finite tensors, a lora_A
without its lora_B, ranks that disagree, a broken ``lora_adapter_metadata`` (not JSON, not an object, a rank
or alpha of the wrong type or value), other layouts (SDXL, LyCORIS, old diffusers, DoRA, ...), files that are
no safetensors. ``check_adapter_file(path)`` runs these checks alone, for code that checks a config before
loading a model; the checks that need the model (module names, layer sizes) are ``Engine.load_lora``'s.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional

import numpy as np
from safetensors import SafetensorError, safe_open

from jdiff.files import save_safetensors
from jdiff.noise import LORA_INIT, stream, text_key

PREFIXES = ("unet", "text_encoder")
METADATA_KEY = "lora_adapter_metadata"
ADAPTER_FILE = "lora.safetensors"  # the adapter in a jdiff run folder
SHOWN = 3  # how many keys an error message lists
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")  # safetensors' names
PICKLE_PROTOCOLS = (b"\x02", b"\x03", b"\x04", b"\x05")  # a pickle starts with 0x80 and its protocol
FIX = "train the adapter again, or point lora.path at another adapter file"
# The kohya-ss (WebUI, ComfyUI) layout: the prefix of each model's module names, and the parts of one module
KOHYA_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
KOHYA_DOWN, KOHYA_UP, KOHYA_ALPHA = "lora_down.weight", "lora_up.weight", "alpha"
ModuleNames = Callable[[str], Iterable[str]]  # prefix -> the dotted names of the model's linear layers


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


def kohya_name(prefix: str, module: str) -> str:
    """The kohya-ss name of a module: ``lora_unet_`` / ``lora_te_`` and the dotted name with ``.`` as ``_``."""
    return KOHYA_PREFIXES[prefix] + module.replace(".", "_")


def linear_layer_names(model, prefix: str) -> list[str]:
    """The names, as a LoRA file spells them, of the linear layers of ``model`` (a torch or Jittor module: a
    layer with integer ``in_features`` and ``out_features``). Text-encoder names carry ``text_model.`` as in
    real SD checkpoints, also where the model has no such submodule (transformers 5's CLIPTextModel)."""
    extra = "text_model." if prefix == "text_encoder" and not hasattr(model, "text_model") else ""
    return [extra + name for name, module in model.named_modules()
            if name and isinstance(getattr(module, "in_features", None), int)
            and isinstance(getattr(module, "out_features", None), int)]


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
    return save_safetensors(Path(path), tensors, metadata)


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
    _load(file, None)
    return file


def is_kohya_file(path: Path) -> bool:
    """Whether the LoRA file (or run folder) ``path`` is in the kohya-ss (WebUI, ComfyUI) layout; unreadable
    files raise :class:`AdapterFileError`."""
    path = adapter_file(path)
    try:
        with safe_open(str(path), framework="numpy") as f:
            keys = list(f.keys())
    except (SafetensorError, OSError):
        keys = list(_read_safetensors(path)[0])  # raises with the message for what the file is instead
    return _kohya_layout(sorted(keys))


def load_adapters(path: Path, module_names: Optional[ModuleNames] = None) -> dict[str, Adapter]:
    """Read a LoRA file written by jdiff or diffusers (peft key layout, optional alpha metadata), or by kohya-ss
    tools (``jdiff.export``'s webui/comfyui formats), every value checked: finite tensors, A and B of each layer
    present and of one rank, a readable metadata entry. A kohya file's module names are matched against
    ``module_names(prefix)``, the dotted names of the model's linear layers (:func:`linear_layer_names`), so it
    needs them. Raises :class:`AdapterFileError` (a ValueError) naming the file and the key."""
    path = adapter_file(path)
    if module_names is None and is_kohya_file(path):
        raise AdapterFileError(f"{path} is a kohya-ss (WebUI/ComfyUI) LoRA; its module names are matched against "
                               f"the model's layers, so jdiff reads it into a model (lora.path={path}).")
    return _load(path, module_names)


def _load(path: Path, module_names: Optional[ModuleNames]) -> dict[str, Adapter]:
    """:func:`load_adapters`; a kohya file without ``module_names`` keeps its kohya names (checks only)."""
    tensors, metadata = _read_safetensors(path)
    if not tensors:
        raise AdapterFileError(f"LoRA file {path} holds no tensors; {FIX}.")
    if _kohya_layout(sorted(tensors)):
        return _kohya_adapters(path, tensors, module_names)
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
# The same for kohya-ss files: what a module's part (the key after the module name) or name says
KOHYA_FOREIGN_PARTS = (
    (lambda part: part == "dora_scale",
     "is a DoRA adapter (dora_scale), which jdiff does not support; use a plain LoRA"),
    (lambda part: part.startswith(("hada_", "lokr_", "lora_mid")) or part in ("a1.weight", "a2.weight", "b1.weight",
                                                                              "b2.weight", "oft_blocks", "on_input"),
     "is a LyCORIS network (LoHa, LoKr, LoCon/Tucker, GLoRA, OFT or IA3), which jdiff does not support; use a "
     "plain LoRA (lora_down/lora_up)"),
    (lambda part: part in ("diff", "diff_b", "w_norm", "b_norm", "set_weight", "bias"),
     "changes whole weights or biases (a full, norm or bias difference), which jdiff does not support; use a "
     "plain LoRA (lora_down/lora_up)"),
)
KOHYA_OTHER_MODELS = "is a kohya-ss LoRA for another architecture ({what}); jdiff adapts Stable Diffusion's UNet and " \
                     "text encoder (lora_unet_..., lora_te_...): use an adapter for this model"


def _kohya_layout(keys: list[str]) -> bool:
    return any(k.startswith("lora_") or ".lora_down." in k or ".lora_up." in k for k in keys)


def _kohya_adapters(path: Path, tensors: dict[str, np.ndarray], module_names: Optional[ModuleNames]) \
        -> dict[str, Adapter]:
    """The adapters of a kohya-ss file, checked as a jdiff file is; see the module's docstring."""
    parts: dict[str, dict[str, np.ndarray]] = {}  # "lora_unet_<module>" -> part -> tensor
    for key in sorted(tensors):
        stem, _, part = key.partition(".")
        for matches, what in KOHYA_FOREIGN_PARTS:
            if matches(part):
                raise AdapterFileError(f"LoRA file {path} (key {key!r}) {what}.")
        if stem.startswith(("lora_te1_", "lora_te2_")):
            raise AdapterFileError(f"LoRA file {path} (key {key!r}) "
                                   f"{KOHYA_OTHER_MODELS.format(what='SDXL: two text encoders, lora_te1_/lora_te2_')}.")
        if not stem.startswith(tuple(KOHYA_PREFIXES.values())) or part not in (KOHYA_DOWN, KOHYA_UP, KOHYA_ALPHA):
            if stem.startswith("lora_") and part in (KOHYA_DOWN, KOHYA_UP, KOHYA_ALPHA):
                raise AdapterFileError(f"LoRA file {path} (key {key!r}) "
                                       f"{KOHYA_OTHER_MODELS.format(what=stem.split('_')[1] + ' keys')}.")
            raise AdapterFileError(f"{path}: unexpected key {key!r}; a kohya-ss (WebUI/ComfyUI) LoRA file holds "
                                   f"lora_unet_<module>.lora_down.weight, .lora_up.weight and .alpha (lora_te_<module>"
                                   f"... likewise) and nothing else.")
        value = tensors[key]
        if part == KOHYA_ALPHA:
            if not np.issubdtype(value.dtype, np.floating) or value.size != 1:
                raise AdapterFileError(f"{path}: {key} has shape {tuple(value.shape)} ({value.dtype}); a module's "
                                       f"alpha is one number: {FIX}.")
        else:
            _check_tensor(path, key, value)
        parts.setdefault(stem, {})[part] = value
    _refuse_non_finite(path, tensors)
    found: dict[str, dict[str, tuple[np.ndarray, np.ndarray, float]]] = {}
    for stem, held in sorted(parts.items()):
        if KOHYA_DOWN not in held or KOHYA_UP not in held:
            have = " and ".join(f"{stem}.{p}" for p in sorted(held))
            lack = KOHYA_DOWN if KOHYA_DOWN not in held else KOHYA_UP
            raise AdapterFileError(f"{path}: {stem}.{lack} is missing (the file has {have}); every adapted layer "
                                   f"needs lora_down and lora_up, so the file is incomplete: {FIX}.")
        down, up = held[KOHYA_DOWN], held[KOHYA_UP]
        if down.shape[0] != up.shape[1]:
            raise AdapterFileError(
                f"{path}: {stem}.{KOHYA_DOWN} has rank {down.shape[0]} (shape {tuple(down.shape)}) but {stem}."
                f"{KOHYA_UP} has rank {up.shape[1]} (shape {tuple(up.shape)}); lora_down is rank x in and lora_up "
                f"is out x rank, of one rank: {FIX}.")
        rank = down.shape[0]
        alpha = float(held[KOHYA_ALPHA].reshape(-1)[0]) if KOHYA_ALPHA in held else float(rank)
        if not alpha > 0:
            raise AdapterFileError(f"{path}: {stem}.{KOHYA_ALPHA} = {alpha:g}; an alpha is a number > 0 (the layer's "
                                   f"update is scaled by alpha / rank): {FIX}.")
        prefix = next(p for p, start in KOHYA_PREFIXES.items() if stem.startswith(start))
        found.setdefault(prefix, {})[stem] = (down.astype(np.float32), up.astype(np.float32), alpha)
    adapters = {}
    for prefix, modules in found.items():
        names = _kohya_module_names(path, prefix, sorted(modules), module_names)
        adapters[prefix] = _one_rank_and_alpha({names[stem]: value for stem, value in modules.items()})
    return adapters


def _kohya_module_names(path: Path, prefix: str, stems: list[str], module_names: Optional[ModuleNames]) \
        -> dict[str, str]:
    """The model's dotted module name of each kohya name: the model's linear layer whose kohya name it is."""
    start = KOHYA_PREFIXES[prefix]
    if module_names is None:  # checks only: the names stay kohya's
        return {stem: stem[len(start):] for stem in stems}
    table: dict[str, Optional[str]] = {}
    for name in module_names(prefix):
        kohya = kohya_name(prefix, name)
        table[kohya] = name if table.get(kohya, name) == name else None  # None: two layers, one kohya name
    unknown = [s for s in stems if s not in table]
    if unknown:
        listed = ", ".join(unknown[:SHOWN]) + (", ..." if len(unknown) > SHOWN else "")
        raise AdapterFileError(
            f"{path}: the {prefix} of the model has no linear layer whose kohya-ss name is {unknown[0]} "
            f"({len(unknown)} of the file's {len(stems)} {start}... modules match none: {listed}). Was the adapter "
            f"trained on another model (SD 1.x, SDXL, another UNet)? Use an adapter trained on this model.")
    ambiguous = [s for s in stems if table[s] is None]
    if ambiguous:
        raise AdapterFileError(f"{path}: {ambiguous[0]} names more than one linear layer of the model's {prefix} "
                               f"(the kohya-ss names lose the dots); jdiff cannot tell which it adapts.")
    return {stem: table[stem] for stem in stems}


def _one_rank_and_alpha(modules: dict[str, tuple[np.ndarray, np.ndarray, float]]) -> Adapter:
    """One Adapter (one rank, one alpha) for modules of their own ranks and alphas, with the same updates: the
    rank is the largest, the scale (alpha / rank) the most common; a module of another scale gets its B times
    its scale / that scale, and a lower rank zero rows in A and zero columns in B."""
    rank = max(down.shape[0] for down, _, _ in modules.values())
    scales = Counter(alpha / down.shape[0] for down, _, alpha in modules.values())
    scale = max(scales, key=lambda s: (scales[s], s))
    alphas = [alpha for down, _, alpha in modules.values() if down.shape[0] == rank and alpha / rank == scale]
    adapter = Adapter(rank=rank, alpha=alphas[0] if alphas else scale * rank)
    for name, (down, up, alpha) in sorted(modules.items()):
        own = alpha / down.shape[0]
        if own != scale:
            up = (up.astype(np.float64) * (own / scale)).astype(np.float32)
        if down.shape[0] < rank:
            down = np.concatenate([down, np.zeros((rank - down.shape[0], down.shape[1]), np.float32)])
            up = np.concatenate([up, np.zeros((up.shape[0], rank - up.shape[1]), np.float32)], axis=1)
        adapter.layers[name] = (down, up)
    return adapter


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
