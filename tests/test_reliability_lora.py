"""Reliability of adapters, weights and images: a LoRA file that cannot work is refused by name (the file, the
key, what to do) before any image is made; engine.allow_pickle=true still loads safetensors models; and images
with NaN or inf pixels are refused instead of being saved black and scored."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from conftest import QUICK, compose_config
from jdiff.demo_data import write_demo_styles
from jdiff.engines.base import EngineError, GenerateRequest, LoraSpec, create_engine, uint8_images
from jdiff.engines.options import JittorOptions
from jdiff.lora_file import METADATA_KEY, AdapterFileError, check_adapter_file, load_adapters

SPEC = LoraSpec(unet_rank=4, unet_alpha=8.0, unet_targets=("to_q", "to_k", "to_v", "to_out.0"),
                text_encoder_rank=2, text_encoder_alpha=2.0,
                text_encoder_targets=("q_proj", "k_proj", "v_proj", "out_proj"), seed=3)
RESOLUTION = 32
PROMPTS = ["an image of cat in style_00", "an image of boat in style_00"]
# one adapted UNet layer, in file and in module spelling
MODULE = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
KEY_A, KEY_B = MODULE + ".lora_A.weight", MODULE + ".lora_B.weight"


def torch_engine(model_dir: Path, **kwargs):
    return create_engine("torch", model_dir, device="cpu", threads=2, **kwargs)


def request(engine, prompts=PROMPTS, steps: int = 2) -> GenerateRequest:
    rng = np.random.default_rng(0)
    shape = engine.latent_shape(RESOLUTION)
    return GenerateRequest(prompts=list(prompts), noise=rng.standard_normal((len(prompts), *shape)).astype(np.float32),
                           steps=steps, guidance_scale=3.0)


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    """An engine without adapters, for the checks that fail before anything is attached."""
    return torch_engine(tiny_model_dir)


@pytest.fixture(scope="module")
def good_lora(tiny_model_dir, tmp_path_factory) -> Path:
    """Adapters on the UNet and the text encoder with B != 0, saved by jdiff."""
    import torch

    engine = torch_engine(tiny_model_dir)
    engine.add_lora(SPEC)
    rng = np.random.default_rng(5)
    with torch.no_grad():
        for prefix in ("unet", "text_encoder"):
            for layer in engine._lora_layers(prefix).values():
                up = layer.lora_B["default"].weight
                up.copy_(torch.from_numpy(0.05 * rng.standard_normal(tuple(up.shape)).astype(np.float32)))
    path = tmp_path_factory.mktemp("good_lora") / "lora.safetensors"
    engine.save_lora(path)
    return path


def tensors_and_meta(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    with safe_open(str(path), framework="numpy") as f:
        metadata = f.metadata()
    return load_file(str(path)), json.loads(metadata[METADATA_KEY])


def variant(good: Path, out: Path, change=None, meta_change=None, raw_meta=None) -> Path:
    """A copy of ``good`` with its tensors changed by ``change(tensors)`` and its adapter metadata by
    ``meta_change(meta)``, or replaced by the string ``raw_meta``."""
    tensors, meta = tensors_and_meta(good)
    if change:
        change(tensors)
    if meta_change:
        meta_change(meta)
    text = raw_meta if raw_meta is not None else json.dumps(meta)
    save_file(tensors, str(out), metadata={"format": "pt", METADATA_KEY: text})
    return out


def in_features(lora: Path) -> int:
    """The in-features of the layer of KEY_A."""
    return load_file(str(lora))[KEY_A].shape[1]


def refused(path: Path, engine, *words: str) -> str:
    """The file check and the engine both refuse ``path``, with a message naming the file and ``words``."""
    with pytest.raises(ValueError) as early:
        check_adapter_file(path)
    assert isinstance(early.value, AdapterFileError)
    with pytest.raises(EngineError) as late:
        engine.load_lora(path)
    for message in (str(early.value), str(late.value)):
        assert str(path) in message
        for word in words:
            assert word in message, f"{word!r} not in {message!r}"
    assert not engine.lora_settings
    return str(late.value)


# -- values, checked without a model ---------------------------------------------------------------------------

def test_a_good_file_passes_the_early_check_and_loads(good_lora, tiny_model_dir):
    assert check_adapter_file(good_lora) == good_lora
    assert check_adapter_file(good_lora.parent) == good_lora  # a run folder
    engine = torch_engine(tiny_model_dir)
    engine.load_lora(good_lora.parent)
    assert engine.lora_settings == {"unet": (4, 8.0), "text_encoder": (2, 2.0)}


@pytest.mark.parametrize("key,value", [(KEY_B, np.nan), (KEY_A, np.inf), (KEY_B, -np.inf)])
def test_non_finite_tensors_are_refused_by_key(good_lora, engine, tmp_path, key, value):
    def poison(tensors):
        tensors[key] = tensors[key].copy()
        tensors[key][0, 0] = value

    bad = variant(good_lora, tmp_path / "bad.safetensors", poison)
    refused(bad, engine, key, "non-finite", "NaN or inf", "train.lr", "lora.path")


def test_non_finite_half_precision_tensors_are_refused(good_lora, engine, tmp_path):
    def half(tensors):
        for k in tensors:
            tensors[k] = tensors[k].astype(np.float16)
        tensors[KEY_A][1, 1] = np.inf

    refused(variant(good_lora, tmp_path / "half.safetensors", half), engine, KEY_A, "non-finite")


@pytest.mark.parametrize("alpha", [float("nan"), float("inf"), 0, -4.0, "8", True, None])
def test_bad_alpha_in_the_metadata_is_refused(good_lora, engine, tmp_path, alpha):
    if alpha is None:  # a missing alpha is not an error: it defaults to the rank
        out = variant(good_lora, tmp_path / "no_alpha.safetensors", meta_change=lambda m: m.pop("unet.lora_alpha"))
        assert load_adapters(out)["unet"].alpha == 4.0
        return
    out = variant(good_lora, tmp_path / "alpha.safetensors", meta_change=lambda m: m.update({"unet.lora_alpha": alpha}))
    refused(out, engine, METADATA_KEY, "'unet.lora_alpha'", "finite number > 0", "lora.path")


@pytest.mark.parametrize("rank", ["4", 4.5, 0, 8, float("nan")])
def test_bad_rank_in_the_metadata_is_refused(good_lora, engine, tmp_path, rank):
    out = variant(good_lora, tmp_path / "rank.safetensors", meta_change=lambda m: m.update({"unet.r": rank}))
    refused(out, engine, METADATA_KEY, "'unet.r'")


@pytest.mark.parametrize("raw,words", [("{not json", ["is not JSON"]), ("", ["is not JSON"]),
                                        ("[4, 8]", ["JSON list", "must be an object"]),
                                        ('"unet.r=4"', ["JSON str"])])
def test_corrupt_metadata_is_refused_by_file_and_key(good_lora, engine, tmp_path, raw, words):
    out = variant(good_lora, tmp_path / "meta.safetensors", raw_meta=raw)
    refused(out, engine, METADATA_KEY, *words)


def test_per_module_alphas_and_dora_are_refused_and_rslora_is_converted(good_lora, engine, tmp_path):
    pattern = variant(good_lora, tmp_path / "pattern.safetensors",
                      meta_change=lambda m: m.update({"unet.alpha_pattern": {"to_q": 1.0}}))
    refused(pattern, engine, "'unet.alpha_pattern'", "own alpha")
    same = variant(good_lora, tmp_path / "same.safetensors",
                   meta_change=lambda m: m.update({"unet.alpha_pattern": {}, "unet.rank_pattern": {"to_q": 4}}))
    assert load_adapters(same)["unet"].alpha == 8.0
    dora = variant(good_lora, tmp_path / "dora.safetensors", meta_change=lambda m: m.update({"unet.use_dora": True}))
    refused(dora, engine, "'unet.use_dora'", "DoRA")
    rslora = variant(good_lora, tmp_path / "rslora.safetensors",
                     meta_change=lambda m: m.update({"unet.use_rslora": True}))
    adapter = load_adapters(rslora)["unet"]
    assert math.isclose(adapter.scale, 8.0 / math.sqrt(4))  # rsLoRA: alpha / sqrt(rank)


@pytest.mark.parametrize("drop,lack,have", [(KEY_B, "lora_B", "lora_A"), (KEY_A, "lora_A", "lora_B")])
def test_a_matrix_without_its_partner_is_refused(good_lora, engine, tmp_path, drop, lack, have):
    out = variant(good_lora, tmp_path / "half_pair.safetensors", lambda t: t.pop(drop))
    refused(out, engine, f"{MODULE}.{lack}.weight is missing", f"{MODULE}.{have}.weight", "lora.path")


def test_a_and_b_of_different_ranks_are_refused(good_lora, engine, tmp_path):
    out = variant(good_lora, tmp_path / "ranks.safetensors", lambda t: t.update({KEY_A: t[KEY_A][:3]}))
    refused(out, engine, f"{KEY_A} has rank 3", f"{KEY_B} has rank 4")


def test_tensors_that_are_no_matrices_of_floats_are_refused(good_lora, engine, tmp_path):
    conv = variant(good_lora, tmp_path / "conv.safetensors", lambda t: t.update({KEY_A: t[KEY_A][:, :, None, None]}))
    refused(conv, engine, KEY_A, "linear layers", f"(4, {in_features(good_lora)}, 1, 1)")
    ints = variant(good_lora, tmp_path / "ints.safetensors", lambda t: t.update({KEY_A: t[KEY_A].astype(np.int32)}))
    refused(ints, engine, KEY_A, "I32", "floating point")


def test_bfloat16_files_load(good_lora, tmp_path):
    import torch
    from safetensors.torch import save_file as save_torch

    tensors, meta = tensors_and_meta(good_lora)
    half = {k: torch.from_numpy(v).to(torch.bfloat16) for k, v in tensors.items()}
    out = tmp_path / "bf16.safetensors"
    save_torch(half, str(out), metadata={"format": "pt", METADATA_KEY: json.dumps(meta)})
    loaded = load_adapters(out)["unet"].layers[MODULE.removeprefix("unet.")]
    np.testing.assert_array_equal(loaded[0], half[KEY_A].float().numpy())
    assert loaded[0].dtype == np.float32


# -- other layouts and files that are no LoRA ------------------------------------------------------------------

def test_kohya_files_load_and_those_of_other_architectures_are_refused(engine, tiny_model_dir, tmp_path):
    """kohya/webui files load (tests/test_export.py checks them in depth); SDXL's are refused by key."""
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    tensors = {f"{key}.lora_down.weight": np.zeros((4, 16), np.float32),
               f"{key}.lora_up.weight": np.zeros((16, 4), np.float32), f"{key}.alpha": np.array(2.0, np.float32)}
    out = tmp_path / "webui.safetensors"
    save_file(tensors, str(out))
    assert check_adapter_file(out) == out
    fresh = torch_engine(tiny_model_dir)
    fresh.load_lora(out)
    assert fresh.lora_settings == {"unet": (4, 2.0)}
    sdxl = tmp_path / "sdxl.safetensors"
    te2 = "lora_te2_text_model_encoder_layers_0_self_attn_q_proj"
    save_file({**tensors, f"{te2}.lora_down.weight": np.zeros((4, 32), np.float32)}, str(sdxl))
    refused(sdxl, engine, "kohya", "SDXL", te2)


@pytest.mark.parametrize("key,words", [
    ("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.down.weight",
     ["attention-processor", "save_lora_weights"]),
    ("base_model.model.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight", ["peft"]),
    ("text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight", ["SDXL"]),
    ("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_magnitude_vector", ["DoRA"]),
    ("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.default.weight", ["unexpected key"]),
])
def test_other_layouts_are_named(engine, tmp_path, key, words):
    out = tmp_path / "other.safetensors"
    save_file({key: np.zeros((4, 64), np.float32)}, str(out))
    refused(out, engine, key, *words)


def test_files_that_are_no_safetensors_are_refused_by_path(engine, tmp_path):
    import torch

    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    refused(empty, engine, "is empty")
    text = tmp_path / "notes.safetensors"
    text.write_text("these are not the weights you are looking for")
    refused(text, engine, "not a readable safetensors file")
    pickle = tmp_path / "pytorch_lora_weights.bin"
    torch.save({KEY_A: torch.zeros(4, 64)}, pickle)
    refused(pickle, engine, "pickle", "not safetensors")
    truncated = tmp_path / "truncated.safetensors"
    save_file({KEY_A: np.zeros((4, 64), np.float32), KEY_B: np.zeros((64, 4), np.float32)}, str(truncated))
    truncated.write_bytes(truncated.read_bytes()[:-100])
    refused(truncated, engine, "not a readable safetensors file", "truncated")
    nothing = tmp_path / "nothing.safetensors"
    save_file({}, str(nothing))
    refused(nothing, engine, "holds no tensors")


def test_a_header_that_starts_like_a_pickle_still_loads(good_lora, tmp_path):
    """The first byte of a safetensors file is the low byte of its header's length: 0x80, a pickle's first byte,
    for some files. Only a file that safetensors cannot read is taken for a pickle."""
    tensors, meta = tensors_and_meta(good_lora)
    out = tmp_path / "lora.safetensors"
    for pad in range(0, 512, 8):
        save_file(tensors, str(out), metadata={"format": "pt", METADATA_KEY: json.dumps(meta), "pad": "x" * pad})
        if out.read_bytes()[0] == 0x80:
            break
    assert out.read_bytes()[0] == 0x80
    assert load_adapters(out)["unet"].rank == 4


def test_folders_without_an_adapter_are_refused_by_path(good_lora, engine, tmp_path):
    empty_run = tmp_path / "run"
    empty_run.mkdir()
    refused(empty_run, engine, "lora.safetensors", "train stage")
    shutil.copy(good_lora, empty_run / "pytorch_lora_weights.safetensors")
    refused(empty_run, engine, "lora.safetensors", "pytorch_lora_weights.safetensors", "lora.path")
    refused(tmp_path / "missing.safetensors", engine, "does not exist", "lora.path")


# -- shapes and names, checked against the model ----------------------------------------------------------------

def test_an_a_matrix_of_other_in_features_is_refused_by_key(good_lora, tiny_model_dir, tmp_path):
    n = in_features(good_lora)
    out = variant(good_lora, tmp_path / "wide.safetensors",
                  lambda t: t.update({KEY_A: np.zeros((4, n + 3), np.float32)}))
    assert check_adapter_file(out) == out  # consistent on its own: only the model tells
    engine = torch_engine(tiny_model_dir)
    with pytest.raises(EngineError) as err:
        engine.load_lora(out)
    message = str(err.value)
    assert str(out) in message and f"{KEY_A} is (4, {n + 3})" in message and f"takes {n} inputs" in message
    assert f"(4, {n})" in message and "another model" in message and "lora.path" in message
    assert "unet" not in engine.lora_settings


def test_an_adapter_of_a_larger_model_is_refused(good_lora, tiny_model_dir, tmp_path):
    def wider(tensors):
        for k, v in tensors.items():
            tensors[k] = np.zeros((v.shape[0], 2 * v.shape[1]) if k.endswith("lora_A.weight") else
                                  (2 * v.shape[0], v.shape[1]), np.float32)

    out = variant(good_lora, tmp_path / "larger.safetensors", wider)
    with pytest.raises(EngineError) as err:
        torch_engine(tiny_model_dir).load_lora(out)
    message = str(err.value)
    assert str(out) in message and "lora_A.weight is (" in message and "more tensors do not fit" in message
    assert "another model" in message


def test_modules_the_model_lacks_are_refused_by_name(good_lora, tiny_model_dir, tmp_path):
    extra = "unet.down_blocks.7.attentions.0.transformer_blocks.0.attn1.to_q"

    def add(tensors):
        tensors[extra + ".lora_A.weight"] = tensors[KEY_A]
        tensors[extra + ".lora_B.weight"] = tensors[KEY_B]

    some = variant(good_lora, tmp_path / "some.safetensors", add)
    with pytest.raises(EngineError) as err:
        torch_engine(tiny_model_dir).load_lora(some)
    assert str(some) in str(err.value) and extra.removeprefix("unet.") in str(err.value)
    assert "another model" in str(err.value)

    def only_foreign(tensors):
        for k in list(tensors):
            tensors[k.replace("down_blocks.", "down_blocks.1").replace("up_blocks.", "up_blocks.1")
                    .replace("mid_block.", "mid_block_9.").replace("layers.", "layers.4")] = tensors.pop(k)

    none = variant(good_lora, tmp_path / "none.safetensors", only_foreign)
    with pytest.raises(EngineError) as err:
        torch_engine(tiny_model_dir).load_lora(none)
    assert str(none) in str(err.value) and "another model" in str(err.value)


def test_an_adapter_of_a_convolution_is_refused(tiny_model_dir, tmp_path):
    """peft adapts convolutions too (its A is rank x in x k x k): a matrix for one is refused by name."""
    engine = torch_engine(tiny_model_dir)
    conv = engine.unet.conv_in
    out = tmp_path / "conv_in.safetensors"
    save_file({"unet.conv_in.lora_A.weight": np.zeros((4, conv.in_channels), np.float32),
               "unet.conv_in.lora_B.weight": np.zeros((conv.out_channels, 4), np.float32)}, str(out))
    with pytest.raises(EngineError) as err:
        engine.load_lora(out)
    assert str(out) in str(err.value) and "unet.conv_in" in str(err.value) and "linear" in str(err.value)
    assert not engine.lora_settings


def test_fresh_adapters_with_an_infinite_alpha_are_refused(tiny_model_dir):
    engine = torch_engine(tiny_model_dir)
    with pytest.raises(EngineError, match=r"lora.unet_alpha=inf .*finite number > 0"):
        engine.add_lora(LoraSpec(unet_rank=4, unet_alpha=float("inf"), unet_targets=("to_q",)))
    with pytest.raises(EngineError, match=r"lora.text_encoder_alpha=nan"):
        engine.add_lora(LoraSpec(unet_rank=4, unet_alpha=4.0, unet_targets=("to_q",), text_encoder_rank=2,
                                 text_encoder_alpha=float("nan"), text_encoder_targets=("q_proj",)))
    assert not engine.lora_settings


# -- through the pipeline: nothing is generated ------------------------------------------------------------------

def generate_only(root: Path, lora: Path):
    cfg = compose_config(QUICK + ["engine=torch", "engine.device=cpu", "stages=[generate]", f"lora.path={lora}",
                                  "init=noise", "infer.steps=1"], root)
    write_demo_styles(Path(cfg.data.root))
    return cfg


def test_a_nan_adapter_makes_no_images(jdiff_root, good_lora, tmp_path):
    from jdiff.pipeline import run

    bad = variant(good_lora, tmp_path / "nan.safetensors", lambda t: t[KEY_B].fill(np.nan))
    run_dir = tmp_path / "run"
    with pytest.raises((EngineError, ValueError)) as err:  # the engine's refusal, or an early config check's
        run(generate_only(jdiff_root, bad), run_dir)
    assert str(bad) in str(err.value) and KEY_B in str(err.value)
    assert not list(run_dir.glob("images/*.png"))


# -- images that are not finite ---------------------------------------------------------------------------------

def test_an_overflowing_adapter_gives_an_error_not_black_images(jdiff_root, good_lora, tmp_path):
    """Huge but finite B matrices pass the file check, and overflow the UNet to inf and NaN."""
    from jdiff.pipeline import run

    def huge(tensors):
        for k in tensors:
            if k.startswith("unet.") and k.endswith("lora_B.weight"):
                tensors[k] = np.full_like(tensors[k], 1e30)

    out = variant(good_lora, tmp_path / "huge.safetensors", huge)
    check_adapter_file(out)
    run_dir = tmp_path / "run"
    with pytest.raises(EngineError) as err:
        run(generate_only(jdiff_root, out), run_dir)
    message = str(err.value)
    assert "non-finite" in message and "NaN or inf" in message and "black" in message
    assert "in style_00" in message and "lora.path" in message and "train.lr" in message
    assert not list(run_dir.glob("images/*.png"))


def test_non_finite_pixels_name_their_prompts(engine, monkeypatch):
    decode = engine.vae.decode

    def half_nan(latents, *args, **kwargs):
        out = decode(latents, *args, **kwargs)
        out.sample[1, 0, 3, 3] = float("nan")
        return out

    monkeypatch.setattr(engine.vae, "decode", half_nan)
    with pytest.raises(EngineError) as err:
        engine.generate(request(engine, steps=1))
    message = str(err.value)
    assert "1 of 2 prompts" in message and repr(PROMPTS[1]) in message and repr(PROMPTS[0]) not in message
    assert "model's weights" in message  # no adapter is loaded


def test_the_non_finite_message_suggests_another_precision():
    images = np.zeros((2, 4, 4, 3), np.float32)
    images[0, 1, 1, 1] = np.inf
    with pytest.raises(EngineError) as err:
        uint8_images(images, ["a", "b"], mixed_precision="fp16", alternatives=["bf16", "no"], adapted=True)
    assert "engine.mixed_precision=bf16 or no" in str(err.value) and "train.lr" in str(err.value)
    images[0, 1, 1, 1] = 2.0  # finite values outside [0, 1] are clipped, as before
    got = uint8_images(images, ["a", "b"])
    assert got[0][1, 1, 1] == 255 and got[0].dtype == np.uint8 and got[1].max() == 0


# -- engine.allow_pickle=true ------------------------------------------------------------------------------------

def pickle_copy(model_dir: Path, out: Path) -> Path:
    """The model with every .safetensors weight file re-saved as a pickle .bin (as older checkpoints come)."""
    import torch
    from safetensors.torch import load_file as load_torch

    shutil.copytree(model_dir, out)
    for file in out.glob("*/*.safetensors"):
        name = "pytorch_model.bin" if file.name == "model.safetensors" else "diffusion_pytorch_model.bin"
        torch.save(load_torch(str(file)), file.parent / name)
        file.unlink()
    return out


@pytest.fixture(scope="module")
def pickle_model(tiny_model_dir, tmp_path_factory) -> Path:
    return pickle_copy(tiny_model_dir, tmp_path_factory.mktemp("pickle_model") / "model")


def test_torch_allow_pickle_loads_safetensors_and_pickle_models(engine, tiny_model_dir, pickle_model):
    want = engine.generate(request(engine))
    allowed = torch_engine(tiny_model_dir, allow_pickle=True)
    assert all(np.array_equal(a, b) for a, b in zip(allowed.generate(request(allowed)), want))
    with pytest.raises(EngineError, match="engine.allow_pickle=true"):
        torch_engine(pickle_model)
    from_pickle = torch_engine(pickle_model, allow_pickle=True)
    assert all(np.array_equal(a, b) for a, b in zip(from_pickle.generate(request(from_pickle)), want))


def test_jittor_allow_pickle_loads_safetensors_and_pickle_models(engine, tiny_model_dir, pickle_model):
    from jdiff.engines.jittor.env import import_jittor

    import_jittor("cpu")
    from jdiff.engines.jittor.engine import JittorEngine

    plain = JittorEngine(tiny_model_dir, JittorOptions(device="cpu"))
    want = plain.generate(request(plain))
    allowed = JittorEngine(tiny_model_dir, JittorOptions(device="cpu", allow_pickle=True))
    assert all(np.array_equal(a, b) for a, b in zip(allowed.generate(request(allowed)), want))
    with pytest.raises(EngineError, match="engine.allow_pickle=true"):
        JittorEngine(pickle_model, JittorOptions(device="cpu"))
    from_pickle = JittorEngine(pickle_model, JittorOptions(device="cpu", allow_pickle=True))
    assert all(np.array_equal(a, b) for a, b in zip(from_pickle.generate(request(from_pickle)), want))


# -- the Jittor engine: the same checks through its own layers ---------------------------------------------------

def test_jittor_refuses_wrong_shapes_and_non_finite_images(good_lora, tiny_model_dir, tmp_path, monkeypatch):
    from jdiff.engines.jittor.env import import_jittor

    jt = import_jittor("cpu")
    from jdiff.engines.jittor.engine import JittorEngine

    n = in_features(good_lora)
    out = variant(good_lora, tmp_path / "wide.safetensors",
                  lambda t: t.update({KEY_A: np.zeros((4, n + 3), np.float32)}))
    with pytest.raises(EngineError) as err:
        JittorEngine(tiny_model_dir, JittorOptions(device="cpu")).load_lora(out)
    message = str(err.value)
    assert str(out) in message and f"{KEY_A} is (4, {n + 3})" in message and f"takes {n} inputs" in message

    engine = JittorEngine(tiny_model_dir, JittorOptions(device="cpu"))
    engine.load_lora(good_lora)
    monkeypatch.setattr(engine.vae, "decode", lambda latents: jt.full((2, 3, RESOLUTION, RESOLUTION), float("nan")))
    with pytest.raises(EngineError) as err:
        engine.generate(request(engine, steps=1))
    assert "2 of 2 prompts" in str(err.value) and repr(PROMPTS[0]) in str(err.value) and "lora.path" in str(err.value)
