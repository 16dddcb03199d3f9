"""``python -m jdiff.export``: a jdiff adapter as the kohya-ss files AUTOMATIC1111's WebUI and ComfyUI load, and
those files read back by jdiff (``lora.path``), by diffusers, and by both engines, with the same outputs.

The key names expected here are derived from the tiny model's own modules the way the loaders derive them, not
through jdiff.export's code: WebUI names a module ``lora_unet_`` / ``lora_te_`` + its module name with ``.`` as
``_``; ComfyUI builds its key map from the UNet's diffusers weight names and, for CLIP, from
``text_model.encoder.layers.{b}.{module}.weight`` for the six modules of its LORA_CLIP_MAP."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from conftest import QUICK, assert_one_line_error, compose_config, jdiff_cli, snapshot
from jdiff import rundir
from jdiff.demo_data import write_demo_styles
from jdiff.engines.base import EngineError, LoraSpec, create_engine
from jdiff.export import export
from jdiff.lora_file import AdapterFileError, check_adapter_file, linear_layer_names, load_adapters

# alpha != rank on both models, and every kind of linear layer the UNet and CLIP have, so that every naming rule
# (to_out.0, ff.net.0.proj, time_embedding.linear_1, resnets' time_emb_proj, CLIP's mlp.fc1) is exercised
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out",
                "time_emb_proj", "linear_1", "linear_2")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
SPEC = LoraSpec(unet_rank=4, unet_alpha=10.0, unet_targets=UNET_TARGETS, text_encoder_rank=2,
                text_encoder_alpha=3.0, text_encoder_targets=TEXT_TARGETS, seed=3)
PROMPTS = ["an image of cat in style_00", "an image of boat in style_00"]
TIMESTEPS = [50.0, 700.0]
# ComfyUI's comfy/lora.py: the CLIP modules its LoRA key map covers, and their kohya spelling
LORA_CLIP_MAP = {"mlp.fc1": "mlp_fc1", "mlp.fc2": "mlp_fc2", "self_attn.k_proj": "self_attn_k_proj",
                 "self_attn.q_proj": "self_attn_q_proj", "self_attn.v_proj": "self_attn_v_proj",
                 "self_attn.out_proj": "self_attn_out_proj"}
PARTS = (".lora_down.weight", ".lora_up.weight", ".alpha")
EXPORT = "jdiff.export"


def torch_engine(model_dir: Path):
    return create_engine("torch", model_dir, device="cpu", threads=2)


@pytest.fixture(scope="module")
def live(tiny_model_dir, tmp_path_factory) -> Path:
    """Adapters with B != 0 (fresh ones leave the model unchanged and would hide mistakes), saved by jdiff."""
    engine = torch_engine(tiny_model_dir)
    engine.add_lora(SPEC)
    rng = np.random.default_rng(5)
    with torch.no_grad():
        for prefix in ("unet", "text_encoder"):
            for layer in engine._lora_layers(prefix).values():
                up = layer.lora_B["default"].weight
                up.copy_(torch.from_numpy(0.05 * rng.standard_normal(tuple(up.shape)).astype(np.float32)))
    path = tmp_path_factory.mktemp("live") / "live.safetensors"
    engine.save_lora(path, extra_metadata={"style": "00", "steps": 12})
    return path


@pytest.fixture(scope="module")
def exported(live, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("exported")
    return {fmt: export(live, fmt, folder / f"live.{fmt}.safetensors")[0] for fmt in ("webui", "comfyui", "diffusers")}


def numpy(value) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().float().cpu().numpy()
    return value.numpy()  # a Jittor Var


def engine_outputs(engine) -> tuple[np.ndarray, np.ndarray]:
    """The text encoder's states of PROMPTS and the UNet's prediction from them: what the adapters change."""
    rng = np.random.default_rng(0)
    latents = engine.latents(rng.standard_normal((len(PROMPTS), *engine.latent_shape(64))).astype(np.float32))
    states = engine.encode_prompts(PROMPTS)
    return numpy(states), numpy(engine.predict(latents, engine.latents(np.array(TIMESTEPS, np.float32)), states))


def adapted(model_dir: Path, lora: Path, name: str = "torch"):
    engine = create_engine(name, model_dir, device="cpu", **({"threads": 2} if name == "torch" else {}))
    engine.load_lora(lora)
    return engine


def diffusers_outputs(model_dir: Path, lora) -> tuple[np.ndarray, np.ndarray]:
    """engine_outputs of a diffusers StableDiffusionPipeline of the model, ``lora`` loaded by load_lora_weights."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None, requires_safety_checker=False)
    if lora is not None:
        pipe.load_lora_weights(str(lora))
    tokens = pipe.tokenizer(PROMPTS, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                            truncation=True, return_tensors="pt").input_ids
    rng = np.random.default_rng(0)
    latents = torch.from_numpy(rng.standard_normal((len(PROMPTS), 4, 8, 8)).astype(np.float32))
    with torch.no_grad():
        states = pipe.text_encoder(tokens)[0]
        pred = pipe.unet(latents, torch.tensor(TIMESTEPS), encoder_hidden_states=states).sample
    return states.numpy(), pred.numpy()


def assert_close(got, want, tol: float = 1e-5) -> None:
    for g, w in zip(got, want):
        assert g.shape == w.shape
        assert np.abs(g - w).max() <= tol * max(1.0, np.abs(w).max()), np.abs(g - w).max()


@pytest.fixture(scope="module")
def reference(tiny_model_dir, live):
    """Outputs with the original jdiff file, and of the model without adapters (they must differ)."""
    want = engine_outputs(adapted(tiny_model_dir, live))
    plain = engine_outputs(torch_engine(tiny_model_dir))
    for w, p in zip(want, plain):
        assert np.abs(w - p).max() > 1e-2  # the adapters change both the text states and the prediction
    return want


# -- the round trip ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["webui", "comfyui", "diffusers"])
def test_exports_load_in_jdiff_and_diffusers_with_the_original_outputs(tiny_model_dir, live, exported, reference,
                                                                     fmt):
    engine = adapted(tiny_model_dir, exported[fmt])
    assert engine.lora_settings == {"unet": (4, 10.0), "text_encoder": (2, 3.0)}
    assert_close(engine_outputs(engine), reference)
    # diffusers converts kohya files itself; alpha != rank, so a loader that took alpha = rank would differ
    assert_close(diffusers_outputs(tiny_model_dir, exported[fmt]), reference)


def test_diffusers_gives_the_original_outputs_from_the_original_file(tiny_model_dir, live, reference):
    """The reference itself is diffusers' reading of the jdiff file, so the exports are compared to both."""
    assert_close(diffusers_outputs(tiny_model_dir, live), reference)
    assert np.abs(diffusers_outputs(tiny_model_dir, None)[1] - reference[1]).max() > 1e-2


def test_the_jittor_engine_reads_the_exports_with_the_original_outputs(tiny_model_dir, live, exported, reference):
    from jdiff.engines.jittor.env import import_jittor

    import_jittor("cpu")
    original = engine_outputs(adapted(tiny_model_dir, live, "jittor"))
    for fmt in ("webui", "comfyui"):
        engine = adapted(tiny_model_dir, exported[fmt], "jittor")
        assert engine.lora_settings == {"unet": (4, 10.0), "text_encoder": (2, 3.0)}
        assert_close(engine_outputs(engine), original, tol=1e-6)
    assert_close(original, reference, tol=1e-3)  # Jittor against torch


# -- the key names ----------------------------------------------------------------------------------------------

def targeted(name: str, targets) -> bool:
    """peft's rule for which layers a target names: the module name, or its end after a dot."""
    return any(name == t or name.endswith("." + t) for t in targets)


def webui_names(model_dir: Path) -> set[str]:
    """WebUI's names of the adapted modules: lora_unet_ / lora_te_ + the module name with . as _ (the text
    encoder's as in the original SD checkpoint, text_model. first)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel.from_pretrained(model_dir / "unet")
    clip = CLIPTextModel.from_pretrained(model_dir / "text_encoder")
    names = {"lora_unet_" + n.replace(".", "_") for n, m in unet.named_modules()
             if isinstance(m, torch.nn.Linear) and targeted(n, UNET_TARGETS)}
    for n, m in clip.named_modules():
        if isinstance(m, torch.nn.Linear) and targeted(n, TEXT_TARGETS):
            names.add("lora_te_" + ("" if n.startswith("text_model.") else "text_model.").replace(".", "_")
                      + n.replace(".", "_"))
    return names


def comfyui_names(model_dir: Path) -> set[str]:
    """ComfyUI's key map for the adapted modules: the UNet's diffusers weight keys (its unet_to_diffusers map)
    as lora_unet_<key without .weight, . as _>, and lora_te_text_model_encoder_layers_{b}_{LORA_CLIP_MAP[c]} for
    each text_model.encoder.layers.{b}.{c}.weight of the CLIP model."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel.from_pretrained(model_dir / "unet").state_dict()
    clip = CLIPTextModel.from_pretrained(model_dir / "text_encoder").state_dict()
    clip = {k if k.startswith("text_model.") else "text_model." + k for k in clip}
    names = {"lora_unet_" + k[: -len(".weight")].replace(".", "_") for k in unet
             if k.endswith(".weight") and unet[k].ndim == 2 and targeted(k[: -len(".weight")], UNET_TARGETS)}
    for b in range(32):
        for c, kohya in LORA_CLIP_MAP.items():
            if f"text_model.encoder.layers.{b}.{c}.weight" in clip and targeted(c, TEXT_TARGETS):
                names.add(f"lora_te_text_model_encoder_layers_{b}_{kohya}")
    return names


@pytest.mark.parametrize("fmt,derive", [("webui", webui_names), ("comfyui", comfyui_names)])
def test_the_exported_keys_are_the_names_the_loaders_derive(tiny_model_dir, live, exported, fmt, derive):
    names = derive(tiny_model_dir)
    assert len([n for n in names if n.startswith("lora_te_")]) == 2 * 6  # two CLIP layers, six modules each
    tensors = load_file(str(exported[fmt]))
    assert set(tensors) == {n + part for n in names for part in PARTS}
    original = load_file(str(live))
    for name in names:
        alpha, down, up = (tensors[name + p] for p in (".alpha", ".lora_down.weight", ".lora_up.weight"))
        assert alpha.shape == () and alpha.dtype == np.float32  # kohya's 0-d alpha, the TRUE alpha
        assert float(alpha) == (10.0 if name.startswith("lora_unet_") else 3.0)
        assert down.shape[0] == up.shape[1] == (4 if name.startswith("lora_unet_") else 2)
    # lora_down is peft's lora_A and lora_up its lora_B, unchanged
    key = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0"
    kohya = "lora_unet_" + key.replace(".", "_")
    np.testing.assert_array_equal(tensors[kohya + ".lora_down.weight"], original[f"unet.{key}.lora_A.weight"])
    np.testing.assert_array_equal(tensors[kohya + ".lora_up.weight"], original[f"unet.{key}.lora_B.weight"])


def test_webui_maps_the_text_encoder_names_onto_sd2s_openclip(exported):
    """WebUI runs SD 2.x's text encoder as OpenCLIP (model.transformer.resblocks.N: attn, a MultiheadAttention
    with out_proj, and mlp.c_fc / mlp.c_proj): its SD 2 rule renames lora_te_text_model_encoder_layers_N_<m>
    (self_attn -> attn, mlp_fc1 -> mlp_c_fc, mlp_fc2 -> mlp_c_proj), then takes [qkv]_proj as parts of attn."""
    openclip = {f"model_transformer_resblocks_{n}_{m}" for n in range(2) for m in ("attn", "attn_out_proj",
                                                                                  "mlp_c_fc", "mlp_c_proj")}
    te = {k.split(".")[0] for k in load_file(str(exported["webui"])) if k.startswith("lora_te_")}
    assert te
    for name in te:
        layer, module = re.match(r"lora_te_text_model_encoder_layers_(\d+)_(.+)", name).groups()
        module = {"mlp_fc1": "mlp_c_fc", "mlp_fc2": "mlp_c_proj"}.get(module, module.replace("self_attn", "attn"))
        target = f"model_transformer_resblocks_{layer}_{module}"
        proj = re.match(r"(.*)_([qkv]_proj)$", target)
        assert (proj.group(1) if proj and target not in openclip else target) in openclip, name


def test_webui_export_warns_when_sd2_attention_has_only_some_adapters(tiny_model_dir, tmp_path):
    engine = torch_engine(tiny_model_dir)
    engine.add_lora(LoraSpec(unet_rank=2, unet_alpha=2.0, unet_targets=("to_q",), text_encoder_rank=2,
                             text_encoder_alpha=2.0, text_encoder_targets=("q_proj", "v_proj"), seed=1))
    engine.save_lora(tmp_path / "qv.safetensors")
    _, warnings = export(tmp_path / "qv.safetensors", "webui")
    assert len(warnings) == 1 and "q_proj, k_proj, v_proj and out_proj" in warnings[0]
    assert "text_model.encoder.layers.0.self_attn" in warnings[0]
    assert export(tmp_path / "qv.safetensors", "comfyui")[1] == []  # ComfyUI adapts each projection


# -- kohya files from elsewhere ---------------------------------------------------------------------------------

def kohya_variant(source: Path, out: Path, change) -> Path:
    tensors = load_file(str(source))
    change(tensors)
    save_file(tensors, str(out))
    return out


def test_kohya_files_with_their_own_alphas_and_ranks_per_module_load_with_the_same_updates(
        tiny_model_dir, exported, tmp_path):
    """kohya's block-wise alphas and resized (dynamic-rank) LoRAs: jdiff folds them into one rank and alpha per
    model; every layer still adds (its alpha / its rank) * up @ down @ x. A module without alpha has alpha = rank.
    (diffusers 0.42 is no reference here: it leaves the per-module alphas of such files unmatched and ignores
    them.)"""
    q = "mid_block.attentions.0.transformer_blocks.0.attn1.to_q"
    v = "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v"
    fc = "text_model.encoder.layers.1.mlp.fc1"
    kq, kv, kfc = "lora_unet_" + q.replace(".", "_"), "lora_unet_" + v.replace(".", "_"), "lora_te_" + fc.replace(
        ".", "_")

    def change(t):
        t[kq + ".alpha"] = np.array(2.5, np.float32)
        t[kv + ".lora_down.weight"] = t[kv + ".lora_down.weight"][:2].copy()  # rank 2 of 4
        t[kv + ".lora_up.weight"] = t[kv + ".lora_up.weight"][:, :2].copy()
        t[kv + ".alpha"] = np.array(7.0, np.float32)
        del t[kfc + ".alpha"]

    mixed = kohya_variant(exported["webui"], tmp_path / "mixed.safetensors", change)
    tensors = load_file(str(mixed))
    engine = adapted(tiny_model_dir, mixed)
    assert engine.lora_settings == {"unet": (4, 10.0), "text_encoder": (2, 3.0)}  # the most common scales
    rng = np.random.default_rng(2)
    for prefix, module, kohya, scale in (("unet", q, kq, 2.5 / 4), ("unet", v, kv, 7.0 / 2),
                                         ("text_encoder", fc, kfc, 2 / 2),
                                         ("unet", "mid_block.attentions.0.proj_in",
                                          "lora_unet_mid_block_attentions_0_proj_in", 10.0 / 4)):
        layer = engine._lora_layers(prefix)[module]
        x = torch.from_numpy(rng.standard_normal((3, layer.in_features)).astype(np.float32))
        down, up = (torch.from_numpy(tensors[kohya + p]) for p in (".lora_down.weight", ".lora_up.weight"))
        with torch.no_grad():
            want = layer.base_layer(x) + scale * (x @ down.T @ up.T)
            torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-6)
    stored = load_adapters(mixed, lambda prefix: linear_layer_names(engine._models()[prefix], prefix))
    down, up = stored["unet"].layers[v]
    assert down.shape[0] == up.shape[1] == 4 and not down[2:].any() and not up[:, 2:].any()
    unchanged = engine_outputs(adapted(tiny_model_dir, exported["webui"]))
    got = engine_outputs(engine)
    assert np.abs(got[0] - unchanged[0]).max() > 1e-6 and np.abs(got[1] - unchanged[1]).max() > 1e-4


@pytest.mark.parametrize("change,words", [
    (lambda t: t.update({"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": np.ones((2, 32),
                                                                                                 np.float32)}),
     ["SDXL", "lora_te1_"]),
    (lambda t: t.update({"lora_unet_conv_in.hada_w1_a": np.ones((2, 4), np.float32)}), ["LyCORIS", "hada_w1_a"]),
    (lambda t: t.update({"lora_unet_conv_in.dora_scale": np.ones((1, 4), np.float32)}), ["DoRA"]),
    (lambda t: t.update({"lora_unet_conv_in.lora_down.weight": np.ones((2, 4, 3, 3), np.float32),
                         "lora_unet_conv_in.lora_up.weight": np.ones((16, 2, 1, 1), np.float32)}), ["convolution"]),
    (lambda t: t.pop("lora_unet_mid_block_attentions_0_proj_in.lora_up.weight"),
     ["lora_unet_mid_block_attentions_0_proj_in.lora_up.weight", "missing"]),
    (lambda t: t.update({"lora_unet_mid_block_attentions_0_proj_in.alpha": np.array(0.0, np.float32)}), ["> 0"]),
    (lambda t: t["lora_te_text_model_encoder_layers_0_mlp_fc2.lora_up.weight"].fill(np.nan), ["non-finite"]),
    (lambda t: t.update({"lora_unet_mid_block_attentions_0_proj_in.alpha": np.ones(3, np.float32)}), ["one number"]),
])
def test_kohya_files_jdiff_cannot_use_are_refused_before_loading(tiny_model_dir, exported, tmp_path, change, words):
    bad = kohya_variant(exported["webui"], tmp_path / "bad.safetensors", change)
    with pytest.raises(AdapterFileError) as early:
        check_adapter_file(bad)
    engine = torch_engine(tiny_model_dir)
    with pytest.raises(EngineError) as late:
        engine.load_lora(bad)
    for message in (str(early.value), str(late.value)):
        assert str(bad) in message
        for word in words:
            assert word in message, message
    assert not engine.lora_settings


def test_kohya_modules_the_model_lacks_are_refused_by_name(tiny_model_dir, exported, tmp_path):
    """The names need the model: the file check passes, the engine refuses by the kohya name."""
    extra = "lora_unet_down_blocks_3_attentions_0_transformer_blocks_0_attn1_to_q"
    bad = kohya_variant(exported["webui"], tmp_path / "sd15.safetensors", lambda t: t.update({
        extra + ".lora_down.weight": np.ones((4, 16), np.float32),
        extra + ".lora_up.weight": np.ones((16, 4), np.float32),
        extra + ".alpha": np.array(4.0, np.float32)}))
    assert check_adapter_file(bad) == bad
    engine = torch_engine(tiny_model_dir)
    with pytest.raises(EngineError, match=extra) as err:
        engine.load_lora(bad)
    assert "no linear layer" in str(err.value) and "another model" in str(err.value)
    with pytest.raises(AdapterFileError, match="kohya"):
        load_adapters(bad)  # without the model's names a kohya file cannot be named


def test_lora_path_takes_a_webui_file_and_makes_the_same_images(jdiff_root, live, exported, tmp_path):
    from jdiff.pipeline import run

    images = {}
    for name, lora in (("jdiff", live), ("webui", exported["webui"])):
        cfg = compose_config(QUICK + ["engine=torch", "engine.device=cpu", "stages=[generate]", f"lora.path={lora}",
                                      "init=noise", "infer.steps=2"], jdiff_root)
        write_demo_styles(Path(cfg.data.root))
        run(cfg, tmp_path / name)
        images[name] = snapshot(tmp_path / name / rundir.IMAGES)
    assert images["jdiff"] and images["jdiff"] == images["webui"]


# -- the command line and the run folder --------------------------------------------------------------------------

@pytest.fixture()
def run_folder(jdiff_root, live, tmp_path) -> Path:
    """A finished jdiff run (its resolved config, its adapter, COMPLETE) that trained a rank-4, alpha-10 LoRA."""
    from omegaconf import OmegaConf

    cfg = compose_config(QUICK + ["lora.unet_rank=4", "lora.unet_alpha=10", "lora.text_encoder_rank=2",
                                  "lora.text_encoder_alpha=3", "data.resolution=64", "train.steps=12"], jdiff_root)
    run = tmp_path / "run"
    run.mkdir()
    (run / rundir.CONFIG).write_text(OmegaConf.to_yaml(cfg, resolve=True))
    (run / rundir.LORA).write_bytes(live.read_bytes())
    (run / rundir.COMPLETE).write_text(json.dumps({"final_score": 0.5, "seconds": 1.0}))
    assert rundir.inspect(run).status == "complete"
    return run


def metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="numpy") as f:
        return f.metadata()


def test_a_run_folder_exports_beside_its_adapter_with_kohya_metadata_from_its_config(run_folder, tmp_path):
    done = jdiff_cli([run_folder, "--format", "webui"], tmp_path, module=EXPORT)
    assert done.returncode == 0, done.stderr
    out = run_folder / "lora.webui.safetensors"
    assert str(out) in done.stdout and "models/Lora" in done.stdout and "Traceback" not in done.stderr
    meta = metadata(out)
    assert {k: meta[k] for k in ("ss_v2", "ss_base_model_version", "ss_network_module", "ss_network_dim",
                                 "ss_network_alpha", "ss_resolution", "ss_steps", "ss_max_train_steps")} == {
        "ss_v2": "True", "ss_base_model_version": "sd_v2", "ss_network_module": "networks.lora",
        "ss_network_dim": "4", "ss_network_alpha": "10.0", "ss_resolution": "(64, 64)", "ss_steps": "12",
        "ss_max_train_steps": "12"}
    assert "ss_output_name" not in meta  # WebUI names the LoRA by its file name, as the user renames it
    assert all(isinstance(v, str) for v in meta.values())
    assert "lora_adapter_metadata" not in meta  # diffusers would read that layout's settings into a kohya file
    # the run folder stays a run folder: the export is a name it knows, and redoing the run removes it
    state = rundir.inspect(run_folder)
    assert state.status == "complete" and state.foreign == []
    again = jdiff_cli([run_folder, "--format", "webui"], tmp_path, module=EXPORT)
    assert_one_line_error(again, str(out), "exists", "--overwrite")
    assert jdiff_cli([run_folder / rundir.LORA, "--format", "webui", "--overwrite"], tmp_path,
                     module=EXPORT).returncode == 0
    assert jdiff_cli([run_folder, "--format", "comfyui"], tmp_path, module=EXPORT).returncode == 0
    assert (run_folder / "lora.comfyui.safetensors").is_file()
    rundir.clear_outputs(run_folder)
    assert not list(run_folder.glob("lora.*"))


def test_a_lone_file_exports_beside_itself_with_metadata_from_the_file(live, tmp_path):
    source = tmp_path / "style.safetensors"
    source.write_bytes(live.read_bytes())
    out, _ = export(source, "comfyui")
    assert out == tmp_path / "style.comfyui.safetensors"
    meta = metadata(out)
    assert meta["ss_steps"] == "12" and meta["ss_network_alpha"] == "10.0" and "ss_resolution" not in meta
    assert json.loads(meta["jdiff"])["style"] == "00"
    diffusers_copy, _ = export(source, "diffusers")
    assert diffusers_copy == tmp_path / "style.diffusers.safetensors"
    assert load_file(str(diffusers_copy)).keys() == load_file(str(live)).keys()
    assert json.loads(metadata(diffusers_copy)["lora_adapter_metadata"]) == json.loads(
        metadata(live)["lora_adapter_metadata"])


@pytest.mark.parametrize("args,words", [
    (["{tmp}/nothing", "--format", "webui"], ["nothing", "does not exist"]),
    (["{live}", "--format", "a1111"], ["--format", "a1111", "invalid choice"]),
    (["{live}"], ["--format", "required"]),
    (["{live}", "--format", "webui", "--out", "{tmp}/taken.safetensors"], ["taken.safetensors", "exists",
                                                                           "--overwrite"]),
    (["{live}", "--format", "webui", "--out", "{tmp}/lora.ckpt"], ["lora.ckpt", ".safetensors"]),
    (["{webui}", "--format", "comfyui", "--out", "{tmp}/x.safetensors"], ["kohya", "already"]),
    (["{tmp}", "--format", "webui"], ["lora.safetensors"]),
    (["{run}", "--format", "webui", "--out", "{run}/mine.safetensors"], ["run folder", "lora.webui.safetensors"]),
])
def test_the_cli_refuses_mistakes_in_one_line(live, exported, run_folder, tmp_path, args, words):
    (tmp_path / "taken.safetensors").write_bytes(b"mine")
    before = snapshot(tmp_path)
    places = {"tmp": tmp_path, "live": live, "webui": exported["webui"], "run": run_folder}
    done = jdiff_cli([a.format(**places) for a in args], tmp_path, module=EXPORT)
    assert_one_line_error(done, *words)
    assert snapshot(tmp_path) == before  # nothing written, nothing replaced
