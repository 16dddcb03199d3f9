"""The trainer's features (issue #21): min-SNR weighting, noise offset, checkpoints with resume mid-training,
samples during training, the TensorBoard log; each on both engines, which must agree."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file

from conftest import QUICK, compose_config
from jdiff import checkpoint, report, rundir, tensorboard
from jdiff.data import load_style
from jdiff.demo_data import write_demo_styles
from jdiff.pipeline import LORA_FILE, run
from jdiff.schedule import NoiseSchedule
from jdiff.train import make_batch, min_snr_weights
from jdiff.validate import ConfigError, validate_config

# Training only, short, no class images: a step takes well under a second on the tiny model
TRAIN = QUICK + ["stages=[train]", "prior=off", "train.steps=4", "lora.unet_rank=4"]
ENGINES = ["torch", "jittor"]
# jittor_replay: Jittor's recorded step (engine.compile=replay), which keeps AdamW's moments itself
SETUPS = {"torch": ["engine=torch"], "jittor": ["engine=jittor"],
          "jittor_replay": ["engine=jittor", "engine.compile=replay"]}


def train_run(root: Path, run_dir: Path, engine: str, *extra: str) -> Path:
    run(compose_config(TRAIN + SETUPS[engine] + list(extra), root), run_dir)
    return run_dir


def adapter(run_dir: Path) -> dict[str, np.ndarray]:
    return load_file(str(run_dir / LORA_FILE))


def loss_rows(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(open(run_dir / "loss.csv"))]


def assert_same_adapter(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b) and a
    for key in a:
        assert np.array_equal(a[key], b[key]), key


class PlainRuns(dict):
    """The uninterrupted, unsampled run of each engine, made when first asked for: what the features below must
    leave as it is."""

    def __init__(self, root: Path, factory):
        super().__init__()
        self.root, self.factory = root, factory

    def __missing__(self, name: str) -> Path:
        self[name] = train_run(self.root, self.factory.mktemp(f"plain_{name}"), name)
        return self[name]


@pytest.fixture(scope="module")
def plain(jdiff_root, tmp_path_factory) -> PlainRuns:
    return PlainRuns(jdiff_root, tmp_path_factory)


# -- min-SNR weighting and noise offset ------------------------------------------------------------------------

@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights_are_diffusers_formula(jdiff_root, tiny_model_dir, prediction_type):
    """The weights against diffusers' own SNR (diffusers.training_utils.compute_snr) and its training scripts'
    rule: min(SNR, gamma) / SNR for epsilon, / (SNR + 1) for v."""
    import torch
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    cfg = compose_config(QUICK + ["train.snr_gamma=5", "train.batch_size=3", "prior.weight=0.5"], jdiff_root)
    write_demo_styles(Path(cfg.data.root))
    style = load_style(Path(cfg.data.root), "00")
    schedule = NoiseSchedule.from_model(tiny_model_dir, prediction_type)
    views, classes = style.images(), [np.full((64, 64, 3), 9, np.uint8)] * 2
    batch = make_batch(2, cfg, views, ["s"] * len(views), classes, ["c"] * 2, schedule, (4, 8, 8))
    cfg.train.snr_gamma = 0.0
    unweighted = make_batch(2, cfg, views, ["s"] * len(views), classes, ["c"] * 2, schedule, (4, 8, 8))
    np.testing.assert_allclose(unweighted.weights, [1 / 3] * 3 + [0.5 / 3] * 3, rtol=1e-6)
    assert np.array_equal(batch.noise, unweighted.noise) and np.array_equal(batch.timesteps, unweighted.timesteps)

    scheduler = DDPMScheduler.from_pretrained(tiny_model_dir, subfolder="scheduler")
    snr = compute_snr(scheduler, torch.from_numpy(batch.timesteps)).double().numpy()
    gamma = np.minimum(snr, 5.0)
    want = gamma / snr if prediction_type == "epsilon" else gamma / (snr + 1)
    np.testing.assert_allclose(batch.weights, unweighted.weights * want, rtol=1e-5)
    # the rule over the whole schedule: 1 where SNR <= gamma (epsilon), always below 1 for v
    every = np.arange(schedule.num_train_timesteps)
    w = min_snr_weights(schedule, every, 5.0)
    acp = schedule.alphas_cumprod.astype(np.float64)
    low = acp / (1 - acp) <= 5.0
    if prediction_type == "epsilon":
        np.testing.assert_allclose(w[low], 1.0)
        np.testing.assert_array_less(w[~low], 1.0)
    else:
        np.testing.assert_array_less(w, 1.0)


def test_noise_offset_is_one_shift_per_sample_and_channel(jdiff_root, tiny_model_dir):
    cfg = compose_config(QUICK + ["train.batch_size=2"], jdiff_root)
    write_demo_styles(Path(cfg.data.root))
    views = load_style(Path(cfg.data.root), "00").images()
    schedule = NoiseSchedule.from_model(tiny_model_dir)
    draw = lambda: make_batch(5, cfg, views, ["s"] * len(views), [], [], schedule, (4, 8, 8))
    plain = draw()
    cfg.train.noise_offset = 0.1
    offset = draw()
    shift = offset.noise - plain.noise  # everything else is drawn as before: the offset comes last
    assert np.array_equal(offset.pixels, plain.pixels) and np.array_equal(offset.posterior_noise, plain.posterior_noise)
    np.testing.assert_allclose(shift, shift[:, :, :1, :1] * np.ones((1, 1, 8, 8)), atol=1e-6)  # constant over h, w
    per_channel = shift[:, :, 0, 0]
    assert np.all(np.abs(per_channel) > 0) and len(np.unique(per_channel.round(6))) == per_channel.size
    assert np.abs(per_channel).max() < 0.1 * 5  # offset * N(0, 1)


def test_both_engines_train_alike_with_min_snr_and_noise_offset(jdiff_root, tmp_path, plain):
    extra = ("train.snr_gamma=1", "train.noise_offset=0.1", "model.prediction_type=v_prediction")
    runs = {name: train_run(jdiff_root, tmp_path / name, name, *extra) for name in ENGINES}
    losses = {name: np.array([float(r["loss"]) for r in loss_rows(d)]) for name, d in runs.items()}
    np.testing.assert_allclose(losses["jittor"], losses["torch"], rtol=1e-3)
    before = np.array([float(r["loss"]) for r in loss_rows(plain["torch"])])
    assert not np.allclose(losses["torch"], before, rtol=1e-3)  # the options did change the training
    theirs, ours = adapter(runs["torch"]), adapter(runs["jittor"])
    for key in theirs:
        assert np.linalg.norm(ours[key] - theirs[key]) <= 1e-2 * np.linalg.norm(theirs[key]) + 1e-7, key


# -- checkpoints and resume ------------------------------------------------------------------------------------

class Killed(KeyboardInterrupt):
    """Stands for the run being stopped right after a checkpoint."""


def kill_after_checkpoint(monkeypatch, at_step: int) -> list[int]:
    saved, save = [], checkpoint.save

    def saving(run_dir, engine, step, rows):
        out = save(run_dir, engine, step, rows)
        saved.append(step)
        if step == at_step and saved.count(step) == 1:  # once: a run that starts over passes it again
            raise Killed()
        return out
    monkeypatch.setattr(checkpoint, "save", saving)
    return saved


def count_steps(monkeypatch, engine_class) -> list[int]:
    taken, start = [], engine_class.start_train_step
    monkeypatch.setattr(engine_class, "start_train_step",
                        lambda self, batch, lr: taken.append(1) or start(self, batch, lr))
    return taken


def engine_class(name: str):
    if name == "torch":
        from jdiff.engines.torch.engine import TorchEngine
        return TorchEngine
    from jdiff.engines.jittor.engine import JittorEngine
    return JittorEngine


@pytest.mark.parametrize("name", [*ENGINES, "jittor_replay"])
def test_a_run_killed_after_a_checkpoint_resumes_to_the_same_adapter(jdiff_root, tmp_path, monkeypatch, plain, name):
    run_dir = tmp_path / "r"
    args = (jdiff_root, run_dir, name, "train.checkpoint_every=2")
    saved = kill_after_checkpoint(monkeypatch, at_step=2)
    with pytest.raises(Killed):
        train_run(*args)
    assert saved == [2]
    ck = rundir.inspect(run_dir)
    assert ck.status == "unfinished" and not ck.foreign
    assert sorted(p.name for p in (run_dir / "checkpoint").iterdir()) == sorted(checkpoint.FILES)
    state = checkpoint.read(run_dir, 4)
    assert state["step"] == 2 and [r["step"] for r in state["rows"]] == [1, 2] and state["engine"] == SETUPS[name][0][7:]
    optimizer = load_file(str(run_dir / "checkpoint" / checkpoint.OPTIMIZER))
    assert optimizer["step"].tolist() == [2] and any(np.abs(v).max() > 0 for k, v in optimizer.items() if "exp_avg" in k)

    taken = count_steps(monkeypatch, engine_class(name))
    train_run(*args)  # the same command again: the pipeline resumes the unfinished run
    assert len(taken) == 2 and saved == [2, 4]  # steps 3 and 4 only, then the final checkpoint
    assert_same_adapter(adapter(run_dir), adapter(plain[name]))
    assert loss_rows(run_dir) == loss_rows(plain[name])
    assert not (run_dir / "checkpoint").exists() and (run_dir / rundir.COMPLETE).exists()  # gone once complete


def test_a_torch_checkpoint_resumes_on_static_buffers_too(jdiff_root, tmp_path, monkeypatch, plain):
    """The CUDA-graph path (engine.compile=cuda-graphs) eagerly on its static buffers, as on the CPU: the
    optimizer state is loaded before the recorded step exists."""
    from jdiff.engines.torch.engine import TorchEngine

    setup = TorchEngine.setup_training
    monkeypatch.setattr(TorchEngine, "setup_training",
                        lambda self, settings: (self.use_static_calls(False), setup(self, settings))[1])
    kill_after_checkpoint(monkeypatch, at_step=2)
    with pytest.raises(Killed):
        train_run(jdiff_root, tmp_path / "r", "torch", "train.checkpoint_every=2")
    train_run(jdiff_root, tmp_path / "r", "torch", "train.checkpoint_every=2")
    assert_same_adapter(adapter(tmp_path / "r"), adapter(plain["torch"]))


def test_the_checkpoint_keys_are_the_same_from_both_engines(jdiff_root, tmp_path, monkeypatch):
    files = {}
    for name in ENGINES:
        kill_after_checkpoint(monkeypatch, at_step=2)  # armed again for each run
        with pytest.raises(Killed):
            train_run(jdiff_root, tmp_path / name, name, "train.checkpoint_every=2")
        files[name] = load_file(str(tmp_path / name / "checkpoint" / checkpoint.OPTIMIZER))
    assert sorted(files["torch"]) == sorted(files["jittor"])
    assert files["torch"]["step"].tolist() == files["jittor"]["step"].tolist() == [2]
    for key, value in files["torch"].items():  # float noise only (the optimizer is checked strictly elsewhere)
        assert np.linalg.norm(files["jittor"][key] - value) <= 1e-2 * np.linalg.norm(value) + 1e-12, key


def test_a_broken_checkpoint_is_not_resumed_from(jdiff_root, tmp_path, monkeypatch, plain, caplog):
    kill_after_checkpoint(monkeypatch, at_step=2)
    with pytest.raises(Killed):
        train_run(jdiff_root, tmp_path / "r", "torch", "train.checkpoint_every=2")
    (tmp_path / "r" / "checkpoint" / checkpoint.STATE).write_text("{not json")
    train_run(jdiff_root, tmp_path / "r", "torch", "train.checkpoint_every=2")
    assert "cannot be resumed from" in caplog.text
    assert_same_adapter(adapter(tmp_path / "r"), adapter(plain["torch"]))


def test_checkpoint_and_sample_settings_may_change_on_resume_but_nothing_else(tmp_path):
    old = {"train": {"steps": 4, "checkpoint_every": 2, "sample_every": 0, "sample_prompts": None}}
    new = {"train": {"steps": 4, "checkpoint_every": 3, "sample_every": 2, "sample_prompts": ["a cat"]}}
    assert rundir.changed_keys(old, new) == []
    assert rundir.changed_keys(old, {"train": {**new["train"], "steps": 7}}) == ["train.steps"]


def test_files_of_somebody_elses_in_the_run_s_new_folders_make_it_foreign(tmp_path):
    run_dir = tmp_path / "r"
    (run_dir / "checkpoint").mkdir(parents=True)
    (run_dir / "config.yaml").write_text("style: '00'\nstages: [train]\nengine: {}\nlora: {}\n")
    for name in checkpoint.FILES:
        (run_dir / "checkpoint" / name).write_text("x")
    (run_dir / "samples" / "step_2").mkdir(parents=True)
    (run_dir / "samples" / "step_2" / "Apple.png").write_bytes(b"")
    (run_dir / "tensorboard").mkdir()
    (run_dir / "tensorboard" / tensorboard.EVENTS).write_bytes(b"")
    assert rundir.inspect(run_dir).foreign == []
    (run_dir / "checkpoint" / "notes.txt").write_text("mine")
    (run_dir / "samples" / "step_2" / "notes.txt").write_text("mine")
    (run_dir / "samples" / "best").mkdir()
    (run_dir / "tensorboard" / "notes.txt").write_text("mine")
    assert sorted(rundir.inspect(run_dir).foreign) == ["checkpoint/notes.txt", "samples/best", "samples/step_2/notes.txt",
                                               "tensorboard/notes.txt"]


def test_overwrite_removes_the_checkpoint_and_resume_keeps_it(tmp_path):
    run_dir = tmp_path / "r"
    (run_dir / "checkpoint").mkdir(parents=True)
    (run_dir / "samples" / "step_2").mkdir(parents=True)
    (run_dir / ".checkpoint.ab12cd.tmp").mkdir()  # one being written when the run was killed
    (run_dir / "loss.csv").write_text("step\n")
    rundir.clear_outputs(run_dir, keep=rundir.KEPT_ON_RESUME)
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoint", "samples"]
    rundir.clear_outputs(run_dir)
    assert list(run_dir.iterdir()) == []


# -- samples during training -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ENGINES)
def test_samples_during_training_leave_the_training_as_it_was(jdiff_root, tmp_path, plain, name):
    run_dir = train_run(jdiff_root, tmp_path / "r", name, "train.sample_every=2", "stages=[train,generate]",
                        "infer.batch_size=1")
    assert_same_adapter(adapter(run_dir), adapter(plain[name]))
    style = load_style(Path(compose_config(TRAIN, jdiff_root).data.root), "00")
    objects = list(style.prompt_objects)[:2]
    steps = sorted(p.name for p in (run_dir / "samples").iterdir())
    assert steps == ["step_2", "step_4"]
    for step in steps:
        assert sorted(p.stem for p in (run_dir / "samples" / step).iterdir()) == sorted(objects)
    for o in objects:  # the last samples are the final adapter's images: the same noise and settings
        last = np.asarray(Image.open(run_dir / "samples" / "step_4" / f"{o}.png"))
        assert np.array_equal(last, np.asarray(Image.open(run_dir / "images" / f"{o}.png"))), o
    record = report.read_run(run_dir)
    assert [label for label, _ in record.samples] == [f"step 2: {objects[0]}", f"step 4: {objects[0]}"]
    assert all(uri.startswith("data:image/jpeg;base64,") for _, uri in record.samples)
    html = report.report_html([record], tmp_path)
    assert "class='grid samples'" in html and f"title=\"step 4: {objects[0]}\"" in html


def test_samples_of_given_prompts_on_the_torch_static_buffers(jdiff_root, tmp_path, monkeypatch, plain):
    """The sampling calls drop the recorded training step (the CUDA-graph path, run eagerly here), which is
    recorded again after: the training goes on exactly."""
    from jdiff.engines.torch.engine import TorchEngine

    setup, dropped = TorchEngine.setup_training, []
    monkeypatch.setattr(TorchEngine, "setup_training",
                        lambda self, settings: (self.use_static_calls(False), setup(self, settings))[1])
    drop = TorchEngine._drop_train_call
    monkeypatch.setattr(TorchEngine, "_drop_train_call",
                        lambda self: dropped.append(self._train_call is not None) or drop(self))
    run_dir = train_run(jdiff_root, tmp_path / "r", "torch", "train.sample_every=2",
                        "train.sample_prompts=[a red apple,a lion in style_00,a boat]", "infer.batch_size=2")
    assert dropped.count(True) == 2  # at steps 2 and 4
    assert_same_adapter(adapter(run_dir), adapter(plain["torch"]))
    for step in (2, 4):
        names = sorted(p.name for p in (run_dir / "samples" / f"step_{step}").iterdir())
        assert names == ["prompt_00.png", "prompt_01.png", "prompt_02.png"]


def test_sample_prompts_and_steps_are_checked(jdiff_root):
    for extra, words in ((["train.sample_every=-1"], "train.sample_every=-1"),
                         (["train.checkpoint_every=-2"], "train.checkpoint_every=-2"),
                         (["train.snr_gamma=-1"], "train.snr_gamma=-1.0"),
                         (["train.noise_offset=-0.1"], "train.noise_offset=-0.1"),
                         (["train.sample_prompts=[]"], "train.sample_prompts=[]")):
        with pytest.raises(ConfigError) as err:
            validate_config(compose_config(QUICK + extra, jdiff_root))
        assert words in str(err.value) and "\n" not in str(err.value)


# -- TensorBoard -------------------------------------------------------------------------------------------------

def test_the_tensorboard_format_round_trips(tmp_path):
    assert tensorboard.crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    data = tensorboard.tfrecord(tensorboard.event(12.5, 300, scalars={"loss": 0.25, "lr": 1e-4}))
    file = tmp_path / tensorboard.EVENTS
    file.write_bytes(data)
    (e,) = tensorboard.read_log(file)
    assert e["wall_time"] == 12.5 and e["step"] == 300 and e["scalars"] == {"loss": 0.25, "lr": np.float32(1e-4)}
    file.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(ValueError, match="CRC"):
        tensorboard.read_log(file)


@pytest.mark.parametrize("name", ENGINES)
def test_a_tensorboard_log_holds_every_step_once_after_a_resume(jdiff_root, tmp_path, monkeypatch, name):
    monkeypatch.setattr(tensorboard, "available", lambda: True)
    kill_after_checkpoint(monkeypatch, at_step=3)
    run_dir = tmp_path / "r"
    with pytest.raises(Killed):
        train_run(jdiff_root, run_dir, name, "train.checkpoint_every=3")
    train_run(jdiff_root, run_dir, name, "train.checkpoint_every=3")
    rows = list(csv.DictReader(open(run_dir / "loss.csv")))
    events = tensorboard.read_log(run_dir / "tensorboard" / tensorboard.EVENTS)
    assert events[0]["file_version"] == "brain.Event:2"
    assert [e["step"] for e in events[1:]] == [1, 2, 3, 4]
    for e, row in zip(events[1:], rows):
        for tag in tensorboard.TAGS:
            assert e["scalars"][tag] == np.float32(float(row[tag])), tag
    try:  # TensorBoard's own reader, where it is installed
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        return
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    assert sorted(acc.Tags()["scalars"]) == sorted(tensorboard.TAGS)
    assert [s.step for s in acc.Scalars("loss")] == [1, 2, 3, 4]
    np.testing.assert_allclose([s.value for s in acc.Scalars("loss")], [float(r["loss"]) for r in rows], rtol=1e-6)
