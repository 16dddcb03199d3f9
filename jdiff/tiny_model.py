"""``model=tiny``: a diffusers-format Stable Diffusion 2.1-shaped folder with tiny random weights.

The folder has the same layout, component classes and config keys as the real
``stabilityai/stable-diffusion-2-1`` repository, only shrunk, so every code path
that loads real SD 2.1 weights loads it unchanged::

    <folder>/
      model_index.json                 StableDiffusionPipeline; safety_checker and
                                       feature_extractor null, requires_safety_checker false
      unet/config.json                 UNet2DConditionModel (SD 2.1 block types, 3 levels)
      unet/diffusion_pytorch_model.safetensors
      vae/config.json                  AutoencoderKL (4 levels: downsampling factor 8)
      vae/diffusion_pytorch_model.safetensors
      text_encoder/config.json         CLIPTextModel (hidden 32, 2 layers, gelu)
      text_encoder/model.safetensors
      tokenizer/vocab.json             CLIP-style byte-level BPE, built here from a
      tokenizer/merges.txt             small English word list
      tokenizer/tokenizer_config.json
      tokenizer/special_tokens_map.json
      scheduler/scheduler_config.json  DDIMScheduler exactly as SD 2.1's (prediction_type
                                       taken from the argument)
      jdiff_tiny.json                  written last: build metadata + file sizes/hashes

It is produced without any download, so tests, CI and smoke runs use the real
loading code (``from_pretrained``) on a model that runs in milliseconds on CPU.

Tokenizer choices
-----------------
The vocabulary mirrors CLIP's layout: ids 0..255 are the 256 byte-level symbols in
``bytes_to_unicode`` order (so ``"!"`` is id 0), ids 256..511 are the same symbols with
the ``</w>`` end-of-word suffix, then one token per BPE merge, then ``<|startoftext|>``
and ``<|endoftext|>`` as the last two ids.  Like the real SD 2.1 tokenizer (and unlike
SD 1.x's, which pads with ``<|endoftext|>``), the pad token is ``"!"`` (id 0): padded
prompts therefore look exactly like SD 2.1's (``BOS ... EOS ! ! !``).  The text encoder's
``eos_token_id`` is the real EOS id, so the pooled output is taken at the first EOS.
The merges are learnt deterministically (greedy most-frequent-pair BPE with
lexicographic tie-breaking) from :data:`TINY_WORDS`, so every word of that list is a
single token; ``"an image of sunflower in style_03"`` is 9 tokens plus BOS/EOS
(the CLIP pre-tokenizer splits ``_`` and every digit off on their own).

Weights
-------
Weights are deterministic functions of ``seed``: each component is constructed
under ``torch.manual_seed`` (inside ``torch.random.fork_rng``, so the caller's RNG
state is untouched) and the same seed gives byte-identical safetensors files.
Default initialisations are used, except that **every all-zero weight tensor
(ndim >= 2: linear / conv / embedding weights) of the UNet and the VAE is
re-initialised with normal(0, 0.02) values** drawn from a ``torch.Generator`` seeded
from ``seed``.  Zero-initialised output layers (zero-conv / zero-projection
conventions) would make a tiny *random* model degenerate: outputs constant in the
inputs and LoRA / upstream gradients exactly zero.  Norm-layer biases (zero by
default, as in any fresh model) are kept.  After the fix the UNet output depends
on the latents, the timestep and the text conditioning, and every parameter
receives a gradient.  (With diffusers 0.42 the default constructors leave no
weight tensor at zero, so the guard currently changes nothing; the names it
re-initialised, if any, are recorded in ``jdiff_tiny.json``.)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

__all__ = [
    "TINY_VERSION",
    "TINY_WORDS",
    "build_tiny_model",
    "ensure_tiny_model",
    "is_complete_tiny_model",
    "tiny_model_dirname",
]

#: Bump when the architecture / tokenizer / file layout changes; part of the cache folder name.
TINY_VERSION = 2

PREDICTION_TYPES = ("v_prediction", "epsilon")

MARKER_FILE = "jdiff_tiny.json"

#: Files (relative to the model folder) that a complete build must contain.
REQUIRED_FILES = (
    "model_index.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "tokenizer/vocab.json",
    "tokenizer/merges.txt",
    "tokenizer/tokenizer_config.json",
    "tokenizer/special_tokens_map.json",
    "scheduler/scheduler_config.json",
    MARKER_FILE,
)

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "!"  # like SD 2.1's tokenizer (SD 1.x pads with EOS instead)
UNK_TOKEN = EOS_TOKEN
MODEL_MAX_LENGTH = 77

# --------------------------------------------------------------------------- architecture
TEXT_HIDDEN_SIZE = 32

#: UNet config: SD 2.1's keys and block types, shrunk to 3 levels.
UNET_CONFIG = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    center_input_sample=False,
    flip_sin_to_cos=True,
    freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    only_cross_attention=False,
    # (32, 64, 64) costs ~25% more CPU time per step for no benefit in tests; the
    # step time is dominated by per-op overhead at this size anyway.
    block_out_channels=(16, 32, 32),
    layers_per_block=1,
    downsample_padding=1,
    mid_block_scale_factor=1,
    act_fn="silu",
    norm_num_groups=8,  # divides 16, 32 and the up-path concatenations (48, 64)
    norm_eps=1e-5,
    cross_attention_dim=TEXT_HIDDEN_SIZE,
    # As in SD 2.1 this (mis-named) key is the number of heads per level: head dim 8
    # everywhere (SD 2.1: [5, 10, 20, 20] heads of dim 64).
    attention_head_dim=[2, 4, 4],
    dual_cross_attention=False,
    use_linear_projection=True,
    upcast_attention=True,
    num_class_embeds=None,
)

#: VAE config: SD's AutoencoderKL keys, 4 levels (downsampling factor 8), tiny channels.
VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(8, 16, 16, 16),
    layers_per_block=1,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=4,
    sample_size=64,
    scaling_factor=0.18215,
)

#: SD 2.1's scheduler/scheduler_config.json, minus prediction_type (an argument here).
SCHEDULER_CONFIG = {
    "_class_name": "DDIMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}

#: ``model=sd21_random``: the real SD 2.1 UNet / VAE / text-encoder configs (``stabilityai/stable-diffusion-2-1``)
#: at full size, random weights. For speed and memory benchmarks on a GPU: weights do not change the cost.
SD21_UNET_CONFIG = dict(
    UNET_CONFIG,
    sample_size=96,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    norm_num_groups=32,
    cross_attention_dim=1024,
    attention_head_dim=[5, 10, 20, 20],
)
SD21_VAE_CONFIG = dict(VAE_CONFIG, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                       norm_num_groups=32, sample_size=768)
#: OpenCLIP ViT-H/14's text tower as SD 2.1 ships it (its vocabulary size; the tokenizer stays the tiny one)
SD21_TEXT_CONFIG = dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, projection_dim=512,
                        num_hidden_layers=23, num_attention_heads=16)
TINY_TEXT_CONFIG = dict(hidden_size=TEXT_HIDDEN_SIZE, intermediate_size=64, projection_dim=32,
                        num_hidden_layers=2, num_attention_heads=4)
#: builder name -> (UNet config, VAE config, text-encoder config)
ARCHITECTURES = {
    "tiny": (UNET_CONFIG, VAE_CONFIG, TINY_TEXT_CONFIG),
    "sd21_random": (SD21_UNET_CONFIG, SD21_VAE_CONFIG, SD21_TEXT_CONFIG),
}

# --------------------------------------------------------------------------- tokenizer data
#: Words that become single BPE tokens (lower-case ASCII letters only: the CLIP
#: pre-tokenizer splits digits and punctuation off on their own).
TINY_WORDS = tuple(
    """
    a an the of in on at with and or by for to from is are this that its it as
    image images photo photograph picture painting drawing sketch illustration art
    artwork render style styled styles portrait landscape scene view close up
    high quality detailed beautiful simple colorful dark bright light small large
    big old new red green blue yellow orange purple pink white black brown gray
    gold silver sks zwx token concept
    sunflower flower flowers rose tree trees forest grass leaf mountain river lake
    sea ocean beach sky cloud clouds sun moon star rain snow water fire stone rock
    cat dog bird fish horse cow pig sheep rabbit bear lion tiger elephant monkey
    fox wolf deer duck chicken frog snake turtle butterfly bee owl panda
    house building city street road bridge tower castle church room kitchen
    car bus train bicycle boat ship airplane truck
    man woman person people child boy girl face hand eye
    apple banana fruit bread cake cup bottle chair table bed lamp book clock
    phone computer guitar piano bowl vase hat shoe bag umbrella candle
    watercolor oil ink pencil pixel anime cartoon comic sculpture mosaic
    abstract realistic vintage minimalist
    """.split()
)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP reversible byte -> printable unicode mapping (insertion order = CLIP's)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\u00a1"), ord("\u00ac") + 1))
        + list(range(ord("\u00ae"), ord("\u00ff") + 1))
    )
    mapping = {b: chr(b) for b in printable}
    n = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + n)
            n += 1
    return mapping


def _learn_merges(words) -> list[tuple[str, str]]:
    """Greedy BPE training with CLIP's ``</w>`` convention; deterministic.

    Each word starts as its characters with ``</w>`` fused onto the last one; at each
    step the most frequent adjacent pair is merged (ties broken by the pair's string
    order) until every word is a single symbol.
    """
    byte_map = _bytes_to_unicode()
    seqs = []
    for w in dict.fromkeys(words):  # de-duplicate, keep order
        syms = [byte_map[b] for b in w.encode("utf-8")]
        syms[-1] = syms[-1] + "</w>"
        seqs.append(syms)
    merges: list[tuple[str, str]] = []
    while True:
        counts: dict[tuple[str, str], int] = {}
        for s in seqs:
            for pair in zip(s, s[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            return merges
        best = min(counts, key=lambda p: (-counts[p], p))
        merges.append(best)
        joined = best[0] + best[1]
        for k, s in enumerate(seqs):
            if len(s) < 2:
                continue
            out, i = [], 0
            while i < len(s):
                if i + 1 < len(s) and s[i] == best[0] and s[i + 1] == best[1]:
                    out.append(joined)
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            seqs[k] = out


def build_tokenizer_files(out_dir: Path) -> dict[str, int]:
    """Write CLIP-style ``vocab.json``/``merges.txt``/configs into ``out_dir``; return the vocab."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    base = list(_bytes_to_unicode().values())
    tokens = base + [b + "</w>" for b in base]
    merges = _learn_merges(TINY_WORDS)
    tokens += ["".join(m) for m in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab: dict[str, int] = {}
    for t in tokens:  # a merged string can arise from two different merges: keep the first id
        vocab.setdefault(t, len(vocab))

    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    # The "#version" header line is skipped by both the slow (v4) and fast CLIP tokenizers.
    merges_text = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
    (out_dir / "merges.txt").write_text(merges_text, encoding="utf-8")
    special = {
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "unk_token": UNK_TOKEN,
    }
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "add_prefix_space": False,
        "do_lower_case": True,
        "errors": "replace",
        "model_max_length": MODEL_MAX_LENGTH,
        **special,
    }
    _write_json(out_dir / "tokenizer_config.json", config)
    _write_json(out_dir / "special_tokens_map.json", special)
    return vocab


# --------------------------------------------------------------------------- helpers
def _write_json(path: Path, obj) -> None:
    Path(path).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _component_seed(seed: int, k: int) -> int:
    # distinct, deterministic streams per component; fits torch's 64-bit seed range
    return (int(seed) * 1_000_003 + k) % (2**63)


def _canonical_text_encoder_keys(path: Path) -> None:
    """Name the weights ``text_model.*`` as real SD checkpoints do (transformers 5 saves a freshly built
    CLIPTextModel without that prefix); both transformers 4 and 5 and the Jittor engine read this form."""
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(path))
    if all(k.startswith("text_model.") for k in tensors):
        return
    renamed = {(k if k.startswith("text_model.") else "text_model." + k): v for k, v in tensors.items()}
    save_file(renamed, str(path), metadata={"format": "pt"})


def _fix_zero_init(model, generator, std: float = 0.02) -> list[str]:
    """Re-initialise all-zero weight tensors (ndim >= 2) with N(0, std); return their names."""
    import torch

    fixed = []
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2 and not torch.any(p):
                p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * std)
                fixed.append(name)
    return fixed


def tiny_model_dirname(seed: int = 0, prediction_type: str = "v_prediction", architecture: str = "tiny") -> str:
    return f"{architecture}-v{TINY_VERSION}-seed{int(seed)}-{prediction_type}"


def is_complete_tiny_model(path: Path) -> bool:
    """True when ``path`` holds every required file with the sizes its marker recorded."""
    path = Path(path)
    marker = path / MARKER_FILE
    try:
        meta = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if meta.get("tiny_version") != TINY_VERSION:
        return False
    files = meta.get("files", {})
    for rel in REQUIRED_FILES:
        if rel == MARKER_FILE:
            continue
        f = path / rel
        if rel not in files or not f.is_file() or f.stat().st_size != files[rel]["size"]:
            return False
    return True


# --------------------------------------------------------------------------- build
def build_tiny_model(out_dir: Path, seed: int = 0, prediction_type: str = "v_prediction",
                     architecture: str = "tiny") -> Path:
    """Build the tiny SD 2.1-shaped diffusers folder in ``out_dir`` (created; may exist empty); with
    ``architecture="sd21_random"``, SD 2.1 at full size (about 3.5 GB of random float32 weights).

    Deterministic: the same ``seed`` and ``prediction_type`` give byte-identical files.
    All-zero-initialised UNet/VAE weight tensors are re-initialised with N(0, 0.02)
    (see the module docstring).  Returns ``out_dir``.
    """
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    unet_config, vae_config, text_sizes = ARCHITECTURES[architecture]
    import torch
    import diffusers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seed = int(seed)

    vocab = build_tokenizer_files(out_dir / "tokenizer")
    n_params: dict[str, int] = {}
    reinitialised: dict[str, list[str]] = {}

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_component_seed(seed, 1))
        unet = UNet2DConditionModel(**unet_config)
        reinitialised["unet"] = _fix_zero_init(unet, torch.Generator().manual_seed(_component_seed(seed, 101)))
        n_params["unet"] = sum(p.numel() for p in unet.parameters())
        unet.save_pretrained(out_dir / "unet", safe_serialization=True)
        del unet

        torch.manual_seed(_component_seed(seed, 2))
        vae = AutoencoderKL(**vae_config)
        reinitialised["vae"] = _fix_zero_init(vae, torch.Generator().manual_seed(_component_seed(seed, 102)))
        n_params["vae"] = sum(p.numel() for p in vae.parameters())
        vae.save_pretrained(out_dir / "vae", safe_serialization=True)
        del vae

        text_config = CLIPTextConfig(
            **{"vocab_size": len(vocab), **text_sizes},
            max_position_embeddings=MODEL_MAX_LENGTH,
            hidden_act="gelu",
            layer_norm_eps=1e-5,
            bos_token_id=vocab[BOS_TOKEN],
            eos_token_id=vocab[EOS_TOKEN],
            pad_token_id=vocab[PAD_TOKEN],
        )
        torch.manual_seed(_component_seed(seed, 3))
        text_encoder = CLIPTextModel(text_config)
        n_params["text_encoder"] = sum(p.numel() for p in text_encoder.parameters())
        text_encoder.save_pretrained(out_dir / "text_encoder", safe_serialization=True)
        del text_encoder
        _canonical_text_encoder_keys(out_dir / "text_encoder" / "model.safetensors")

    (out_dir / "scheduler").mkdir(exist_ok=True)
    _write_json(
        out_dir / "scheduler" / "scheduler_config.json",
        {**SCHEDULER_CONFIG, "_diffusers_version": diffusers.__version__, "prediction_type": prediction_type},
    )

    _write_json(
        out_dir / "model_index.json",
        {
            "_class_name": "StableDiffusionPipeline",
            "_diffusers_version": diffusers.__version__,
            "feature_extractor": [None, None],
            "image_encoder": [None, None],
            "requires_safety_checker": False,
            "safety_checker": [None, None],
            "scheduler": ["diffusers", "DDIMScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        },
    )

    files = {}
    for rel in REQUIRED_FILES:
        if rel == MARKER_FILE:
            continue
        f = out_dir / rel
        if not f.is_file():
            raise RuntimeError(f"tiny model build did not produce {rel}")
        files[rel] = {"size": f.stat().st_size, "sha256": _sha256(f)}
    _write_json(
        out_dir / MARKER_FILE,
        {
            "tiny_version": TINY_VERSION,
            "architecture": architecture,
            "seed": seed,
            "prediction_type": prediction_type,
            "num_parameters": n_params,
            "reinitialised_zero_weights": reinitialised,
            "files": files,
        },
    )
    # save_pretrained / mkdtemp create owner-only files; a cache is meant to be shared
    for d, _, names in os.walk(out_dir):
        os.chmod(d, 0o755)
        for n in names:
            os.chmod(os.path.join(d, n), 0o644)
    return out_dir


def ensure_tiny_model(cache_root: Path, seed: int = 0, prediction_type: str = "v_prediction",
                      architecture: str = "tiny") -> Path:
    """Return ``cache_root / {architecture}-v{TINY_VERSION}-seed{seed}-{prediction_type}``, building it if needed.

    A complete existing folder is reused as is.  Otherwise (missing or incomplete) the
    model is built into a temporary sibling folder and ``os.rename``-d into place, under
    a ``filelock.FileLock`` on ``<target>.lock``; if the target appeared meanwhile
    (another process won a race) the fresh build is discarded.
    """
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    cache_root = Path(cache_root)
    target = cache_root / tiny_model_dirname(seed, prediction_type, architecture)
    if is_complete_tiny_model(target):
        return target

    from filelock import FileLock

    cache_root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if is_complete_tiny_model(target):
            return target
        for stale in cache_root.glob(f".{target.name}.tmp-*"):  # builds killed midway; none runs now
            shutil.rmtree(stale, ignore_errors=True)
        if target.exists():  # incomplete leftover: move aside, then delete
            trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=cache_root))
            os.rename(target, trash / "x")
            shutil.rmtree(trash, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=cache_root))
        try:
            build_tiny_model(tmp, seed=seed, prediction_type=prediction_type, architecture=architecture)
            if not target.exists():
                try:
                    os.rename(tmp, target)
                except OSError:
                    if not is_complete_tiny_model(target):
                        raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    if not is_complete_tiny_model(target):
        raise RuntimeError(f"tiny model at {target} is incomplete after building")
    return target
