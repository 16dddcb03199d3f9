"""``python -m jdiff.export <run folder or LoRA file> --format webui|comfyui|diffusers [--out FILE] [--overwrite]``:
a jdiff adapter in the format another tool loads.

    webui      AUTOMATIC1111's Stable Diffusion WebUI (and kohya-ss' own tools): kohya-ss key names,
               ``lora_unet_<module with . as _>.lora_down.weight`` (A), ``.lora_up.weight`` (B) and ``.alpha`` (that
               module's true alpha, so the update keeps its scale alpha / rank), ``lora_te_<module>...`` for the
               text encoder (``lora_te_text_model_encoder_layers_0_self_attn_q_proj``), and kohya's ``ss_*``
               metadata (``ss_v2``, ``ss_network_dim``, ``ss_network_alpha``, ``ss_base_model_version``, ...).
    comfyui    ComfyUI's LoraLoader: it maps the same kohya-ss names onto SD 1.x/2.x UNets and CLIP text encoders
               (it does not map diffusers' unet.<module>.lora_A names of an SD UNet), so the file is the same.
    diffusers  jdiff's own layout (diffusers' ``pipe.load_lora_weights``), a checked copy with its metadata.

The metadata comes from the run's config.yaml when the input is a run folder (or its lora.safetensors), from the
file's own metadata otherwise. The file goes to ``--out``, by default beside the input: ``<run>/lora.<format>
.safetensors`` in a run folder (names the run-folder contract knows, see :mod:`jdiff.rundir`; a run that is
redone removes them with its other outputs), ``<name>.<format>.safetensors`` beside another file. An existing
file is replaced only with ``--overwrite``; a file of any other name is never written into a run folder. What is
wrong with the input or the output place ends in one line ``error: ...`` and exit status 2, with nothing written.
jdiff reads the webui/comfyui files back as well (``lora.path=<file>``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

import numpy as np
from safetensors import safe_open

from jdiff import rundir
from jdiff.files import save_safetensors
from jdiff.lora_file import (ADAPTER_FILE, KOHYA_ALPHA, KOHYA_DOWN, KOHYA_UP, Adapter, AdapterFileError,
                             is_kohya_file, kohya_name, load_adapters, save_adapters)

FORMATS = ("webui", "comfyui", "diffusers")
# model.name of jdiff's model configs -> (SD 2.x, v-prediction or None when the config does not say)
KNOWN_MODELS = {"sd15": (False, False), "sd21": (True, True), "sd21_base": (True, False), "sd21_random": (True, None),
                "tiny": (True, None)}
# the width of the text (cross-attention) states: 768 is SD 1.x's CLIP ViT-L, 1024 SD 2.x's OpenCLIP ViT-H
SD1_TEXT_WIDTH = 768
ATTENTION = ("q_proj", "k_proj", "v_proj", "out_proj")
WHERE = {"webui": "copy it into stable-diffusion-webui/models/Lora under any name, NAME.safetensors, and write "
                   "<lora:NAME:1> in the prompt",
         "comfyui": "copy it into ComfyUI/models/loras and pick it in a LoraLoader node",
         "diffusers": "pipe.load_lora_weights(\"{file}\") in diffusers, or lora.path={file} in jdiff"}


class ExportError(ValueError):
    """The input or the output place cannot be used; the message says why and what to do."""


def source_file(path: Path) -> tuple[Path, Optional[Path]]:
    """The LoRA file ``path`` names (a file, or a run folder's lora.safetensors) and the jdiff run folder it
    belongs to (None: a file of its own)."""
    path = Path(path)
    if not path.exists():
        raise ExportError(f"{path} does not exist; give a jdiff run folder or a LoRA .safetensors file.")
    if path.is_dir():
        if not (path / ADAPTER_FILE).is_file():
            kind = "a jdiff run folder" if rundir.is_jdiff_config(path / rundir.CONFIG) else "a folder"
            raise ExportError(f"{path} is {kind} without {ADAPTER_FILE} (its train stage did not finish, or it did "
                              f"not train); give a run folder that trained an adapter, or a LoRA .safetensors file.")
        path = path / ADAPTER_FILE
    run = path.parent if path.name == ADAPTER_FILE and rundir.is_jdiff_config(path.parent / rundir.CONFIG) else None
    return path, run


def default_out(file: Path, run: Optional[Path], fmt: str) -> Path:
    if run is not None:
        return run / rundir.EXPORTS[fmt]
    return file.with_name(f"{file.name.removesuffix('.safetensors')}.{fmt}.safetensors")


def check_out(out: Path, file: Path, fmt: str, overwrite: bool) -> None:
    """Refuse an output place that would lose or spoil something: the input itself, an existing file (unless
    ``overwrite``), a folder, a name a run folder does not hold, a file WebUI and ComfyUI would not list."""
    if out.suffix != ".safetensors":
        raise ExportError(f"--out {out} does not end in .safetensors; WebUI, ComfyUI and diffusers find LoRA files "
                          f"by that suffix: name it <something>.safetensors.")
    if out.exists() and out.resolve() == file.resolve():
        raise ExportError(f"--out {out} is the input file; choose another --out.")
    if out.is_dir():
        raise ExportError(f"--out {out} is a folder; give a file name (<folder>/<name>.safetensors).")
    if out.exists() and not overwrite:
        raise ExportError(f"{out} exists already; pass --overwrite to replace it, or choose another --out.")
    folder = out.parent
    if rundir.is_jdiff_config(folder / rundir.CONFIG) and out.name != rundir.EXPORTS[fmt]:
        raise ExportError(f"{folder} is a jdiff run folder, which holds only files jdiff names (a later run would "
                          f"refuse a folder with others in it): write {folder / rundir.EXPORTS[fmt]} (leave --out "
                          f"out) or a file outside the run folder.")


def text_encoder_name(prefix: str, module: str) -> str:
    """A module's name in the original SD checkpoint's CLIP (``text_model.`` first), as kohya-ss names it."""
    if prefix == "text_encoder" and not module.startswith("text_model."):
        return "text_model." + module
    return module


def kohya_tensors(adapters: dict[str, Adapter]) -> dict[str, np.ndarray]:
    """The kohya-ss state dict of ``adapters``: per module lora_down (A), lora_up (B), and alpha (a scalar)."""
    tensors: dict[str, np.ndarray] = {}
    for prefix, adapter in sorted(adapters.items()):
        for module, (down, up) in sorted(adapter.layers.items()):
            name = kohya_name(prefix, text_encoder_name(prefix, module))
            if f"{name}.{KOHYA_DOWN}" in tensors:
                raise ExportError(f"two {prefix} modules have the kohya-ss name {name} (the names lose their dots); "
                                  f"WebUI and ComfyUI could not tell them apart.")
            tensors[f"{name}.{KOHYA_DOWN}"] = np.ascontiguousarray(down, dtype=np.float32)
            tensors[f"{name}.{KOHYA_UP}"] = np.ascontiguousarray(up, dtype=np.float32)
            tensors[f"{name}.{KOHYA_ALPHA}"] = np.array(adapter.alpha, dtype=np.float32)
    return tensors


def text_width(adapters: dict[str, Adapter]) -> Optional[int]:
    """The width of the text states, read off the adapted layers: a cross-attention key/value projection's input
    or a text-encoder attention projection's."""
    for prefix, adapter in adapters.items():
        for module, (down, _) in adapter.layers.items():
            if (prefix == "unet" and module.endswith(("attn2.to_k", "attn2.to_v"))) or \
                    (prefix == "text_encoder" and module.endswith(("self_attn.q_proj", "self_attn.k_proj"))):
                return int(down.shape[1])
    return None


def model_kind(adapters: dict[str, Adapter], config: Optional[dict]) -> tuple[bool, Optional[bool]]:
    """(SD 2.x?, v-prediction?: None when unknown): from the run's model config when it names one of jdiff's
    models, else from the adapter's shapes; an adapter that says nothing is taken for SD 2.x (jdiff's model)."""
    model = (config or {}).get("model") or {}
    v2, v_pred = KNOWN_MODELS.get(model.get("name"), (None, None))
    if model.get("prediction_type"):
        v_pred = model["prediction_type"] == "v_prediction"
    if v2 is None:
        v2 = text_width(adapters) != SD1_TEXT_WIDTH
    return v2, v_pred


def number(value: float) -> str:
    """A number as kohya-ss writes its float arguments (16.0, 0.5)."""
    return str(float(value))


def kohya_metadata(adapters: dict[str, Adapter], config: Optional[dict], file_meta: dict[str, str],
                   fmt: str) -> dict[str, str]:
    """kohya-ss' ``ss_*`` metadata (all strings) for the exported file: what WebUI shows and sorts LoRAs by."""
    jdiff_meta = _json(file_meta.get("jdiff"))
    main = adapters.get("unet") or adapters["text_encoder"]
    v2, v_pred = model_kind(adapters, config)
    meta = {k: v for k, v in file_meta.items() if k.startswith("ss_")}  # a source that had some keeps them
    meta.update({
        "format": "pt",
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(main.rank),
        "ss_network_alpha": number(main.alpha),
        "ss_v2": str(v2),
        "ss_base_model_version": "sd_v2" if v2 else "sd_v1",
    })  # no ss_output_name: WebUI then names the LoRA by its file name, whatever the file is renamed to
    if v_pred is not None:
        meta["ss_v_parameterization"] = str(v_pred)
    steps = jdiff_meta.get("steps")
    cfg = config or {}
    if "train" in (cfg.get("stages") or []):  # the run trained this adapter: its settings are the adapter's
        train, lora, model = cfg.get("train") or {}, cfg.get("lora") or {}, cfg.get("model") or {}
        steps = train.get("steps", steps)
        resolution = (cfg.get("data") or {}).get("resolution")
        if resolution:
            meta["ss_resolution"] = f"({resolution}, {resolution})"
        if train.get("lr") is not None:
            meta["ss_learning_rate"] = meta["ss_unet_lr"] = number(train["lr"])
            if "text_encoder" in adapters and lora.get("text_encoder_lr_ratio") is not None:
                meta["ss_text_encoder_lr"] = number(train["lr"] * lora["text_encoder_lr_ratio"])
        settings = {"ss_lr_scheduler": train.get("lr_schedule"), "ss_lr_warmup_steps": train.get("lr_warmup_steps"),
                    "ss_batch_size_per_device": train.get("batch_size"), "ss_seed": cfg.get("seed"),
                    "ss_mixed_precision": (cfg.get("engine") or {}).get("mixed_precision"),
                    "ss_sd_model_name": model.get("name") if model.get("builder") else model.get("path")}
        for key, value in settings.items():
            if value is not None:
                meta[key] = str(value)
        meta["ss_training_comment"] = (f"trained by jdiff (style {cfg.get('style')}, engine "
                                       f"{(cfg.get('engine') or {}).get('name')}), exported for {fmt}")
    if isinstance(steps, int) and not isinstance(steps, bool):
        meta["ss_steps"] = meta["ss_max_train_steps"] = str(steps)
    meta["jdiff"] = json.dumps({**jdiff_meta, "exported_as": fmt, **{
        f"{prefix}_rank_alpha": [a.rank, a.alpha] for prefix, a in sorted(adapters.items())}}, sort_keys=True)
    return meta


def _json(text: Optional[str]) -> dict:
    try:
        value = json.loads(text) if text else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def partial_attention(adapters: dict[str, Adapter]) -> list[str]:
    """Text-encoder attention modules with adapters on some but not all of q/k/v/out_proj: WebUI runs SD 2.x's
    CLIP attention as one module and adapts it only when all four are there."""
    adapter = adapters.get("text_encoder")
    held: dict[str, set[str]] = {}
    for module in (adapter.layers if adapter else {}):
        attention, _, proj = text_encoder_name("text_encoder", module).rpartition(".")
        if proj in ATTENTION and attention.endswith("self_attn"):
            held.setdefault(attention, set()).add(proj)
    return sorted(a for a, projs in held.items() if projs != set(ATTENTION))


def export(source: Path, fmt: str, out: Optional[Path] = None, overwrite: bool = False) -> tuple[Path, list[str]]:
    """Write the adapter of ``source`` (a run folder or a LoRA file) in format ``fmt``; returns the file and
    warnings. Raises :class:`ExportError` or :class:`jdiff.lora_file.AdapterFileError` (ValueErrors)."""
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}.")
    file, run = source_file(source)
    if is_kohya_file(file):
        raise ExportError(f"{file} is a kohya-ss (WebUI/ComfyUI) LoRA already: WebUI and ComfyUI load it as it is, "
                          f"and jdiff too (lora.path={file}); jdiff.export converts jdiff/diffusers adapters.")
    adapters = load_adapters(file)
    out = Path(out) if out is not None else default_out(file, run, fmt)
    check_out(out, file, fmt, overwrite)
    config = None
    if run is not None:
        config, problem = rundir.read_config(run)
        if problem:
            raise ExportError(f"{run}: {problem}; export {file} as a file of its own by copying it out of the run "
                              f"folder, or repair the config.")
    with safe_open(str(file), framework="numpy") as f:
        file_meta = dict(f.metadata() or {})
    warnings = []
    if fmt == "diffusers":
        save_adapters(out, {prefix: Adapter(a.rank, a.alpha, {text_encoder_name(prefix, m): w for m, w in
                                                              a.layers.items()}) for prefix, a in adapters.items()},
                      extra_metadata={**_json(file_meta.get("jdiff")), "exported_as": fmt})
        return out, warnings
    tensors = kohya_tensors(adapters)
    metadata = kohya_metadata(adapters, config, file_meta, fmt)
    partial = partial_attention(adapters)
    if fmt == "webui" and partial and metadata["ss_v2"] == "True":
        shown = ", ".join(partial[:3]) + (f" and {len(partial) - 3} more" if len(partial) > 3 else "")
        warnings.append(f"WebUI (AUTOMATIC1111) applies an SD 2.x text-encoder attention adapter only where "
                        f"q_proj, k_proj, v_proj and out_proj all have one (its CLIP runs them as one module), so "
                        f"it skips those of {shown}; ComfyUI and diffusers apply them. Train with lora."
                        f"text_encoder_targets=[q_proj,k_proj,v_proj,out_proj] for WebUI.")
    save_safetensors(out, tensors, metadata)
    return out, warnings


def summary(adapters: dict[str, Adapter]) -> str:
    names = {"unet": "UNet", "text_encoder": "text-encoder"}
    return ", ".join(f"{len(a.layers)} {names[p]} layers of rank {a.rank}, alpha {a.alpha:g}"
                     for p, a in sorted(adapters.items(), key=lambda item: item[0] != "unet"))


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one "error:" line (after the usage), exit status 2
        self.print_usage(sys.stderr)
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def main(argv: Optional[list[str]] = None) -> int:
    parser = Parser(prog="python -m jdiff.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="a jdiff run folder, or a LoRA .safetensors file")
    parser.add_argument("--format", required=True, choices=FORMATS,
                        help="webui (AUTOMATIC1111), comfyui, or diffusers (jdiff's own layout)")
    parser.add_argument("--out", type=Path, help="the file to write (default: beside the input, "
                                                 "<run>/lora.<format>.safetensors in a run folder)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    args = parser.parse_args(argv)
    try:
        out, warnings = export(args.source, args.format, args.out, args.overwrite)
    except (ExportError, AdapterFileError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"error: cannot write the export ({err.strerror or err}{f': {err.filename}' if err.filename else ''}); "
              f"choose a writable --out.", file=sys.stderr)
        return 2
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"wrote {out} ({args.format}: {summary(load_adapters(args.source))})")
    print(f"to use it, {WHERE[args.format].format(file=out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
