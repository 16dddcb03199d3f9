"""What jdiff protects, tried from the command line as a user would: the user's folders, finished runs, run
folders that never collide, broken results never reported as complete, and one line (no traceback) for every
mistake in what was asked. Each case checks the exit status, the message, and that every file that was there
before is unchanged. engine=torch where the engine does not matter (it starts faster)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, assert_one_line_error, jdiff_cli, snapshot
from jdiff import rundir
from jdiff.rundir import COMPLETE


@pytest.fixture(scope="module")
def cache(jdiff_root, tiny_model_dir) -> Path:
    """The session's shared cache (the tiny model is built there once)."""
    return jdiff_root / "data" / "cache"


def quick(cache: Path, *extra: str) -> list[str]:
    return ["experiment=demo", "engine=torch", "train.steps=3", "infer.steps=2", "prior.images_per_object=1",
            f"paths.cache={cache}", *extra]


def cli_env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO)}


def run_ok(cwd: Path, args: list[str]):
    done = jdiff_cli(args, cwd)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done


def user_styles(root: Path) -> Path:
    """A user's own style folder: one style, two images, a prompt file."""
    images = root / "07" / "images"
    images.mkdir(parents=True)
    for k, name in enumerate(("cat", "house")):
        Image.fromarray(np.full((80, 80, 3), 60 * k + 20, np.uint8)).save(images / f"{name}.jpg")
    (root / "07" / "prompt.json").write_text(json.dumps({"0": "Dog", "1": "Tree"}))
    return root


# -- 1. the user's data ---------------------------------------------------------------------------------------


def test_the_demo_never_replaces_a_users_style_folder(tmp_path, cache):
    styles = user_styles(tmp_path / "my_styles")
    before = snapshot(styles)
    done = jdiff_cli(quick(cache, f"data.root={styles}", "style=07"), tmp_path)
    assert_one_line_error(done, str(styles), "data.builder=null", "did not write")
    assert snapshot(styles) == before
    assert not (tmp_path / "outputs").exists()  # refused before any run folder was made


def test_the_users_styles_run_with_the_demo_settings_when_asked(tmp_path, cache):
    styles = user_styles(tmp_path / "my_styles")
    before = snapshot(styles)
    run_ok(tmp_path, quick(cache, f"data.root={styles}", "data.builder=null", "style=07", "hydra.run.dir=r"))
    assert sorted(p.name for p in (tmp_path / "r" / "images").iterdir()) == ["Dog.png", "Tree.png"]
    assert snapshot(styles) == before


@pytest.mark.parametrize("where", ["missing", "file"])
def test_the_demo_builder_makes_nothing_outside_the_cache(tmp_path, cache, where):
    target = tmp_path / "elsewhere" / "styles"
    if where == "file":
        target.parent.mkdir()
        target.write_text("mine")
    done = jdiff_cli(quick(cache, f"data.root={target}"), tmp_path)
    assert_one_line_error(done, str(target))
    assert (target.read_text() == "mine") if where == "file" else not target.parent.exists()


def test_the_demo_builder_fills_an_empty_folder_it_is_given(tmp_path, cache):
    target = tmp_path / "empty"
    target.mkdir()
    run_ok(tmp_path, quick(cache, f"data.root={target}", "stages=[prior]", "hydra.run.dir=r"))
    assert sorted(p.name for p in target.iterdir()) == [".complete", "00", "01"]


def test_a_model_path_for_real_weights_is_not_built_into(tmp_path, cache):
    missing = tmp_path / "nonexistent" / "sd21"
    done = jdiff_cli(quick(cache, f"model.path={missing}"), tmp_path)
    assert_one_line_error(done, f"model.path={missing}", "model=sd21")
    assert not (tmp_path / "nonexistent").exists()


# -- 2. run folders --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished(tmp_path_factory, cache) -> Path:
    """A finished single run in ``<cwd>/done``."""
    cwd = tmp_path_factory.mktemp("finished")
    run_ok(cwd, quick(cache, "hydra.run.dir=done"))
    return cwd


@pytest.mark.parametrize("extra", [[], ["train.lr=1e30"], ["style=01"], ["stages=[generate,score]",
                                                                           "lora.path=done"]])
def test_a_finished_run_is_never_touched(finished, cache, extra):
    run_dir = finished / "done"
    before = snapshot(run_dir)  # .hydra/ and run.log included
    done = jdiff_cli(quick(cache, "hydra.run.dir=done", *extra), finished)
    assert_one_line_error(done, str(run_dir), "finished run", "overwrite=true")
    assert snapshot(run_dir) == before


def test_overwrite_replaces_a_finished_run_leaving_nothing_of_it(tmp_path, cache):
    run_ok(tmp_path, quick(cache, "hydra.run.dir=r"))  # style 00: Apple, Lion, Boat
    first = json.loads((tmp_path / "r" / COMPLETE).read_text())
    (tmp_path / "r" / "run.log").write_text("the first run's log\n")
    run_ok(tmp_path, quick(cache, "hydra.run.dir=r", "style=01", "overwrite=true"))  # Fish, House, Moon
    assert sorted(p.stem for p in (tmp_path / "r" / "images").iterdir()) == ["Fish", "House", "Moon"]
    assert "style: '01'" in (tmp_path / "r" / "config.yaml").read_text()
    assert json.loads((tmp_path / "r" / COMPLETE).read_text()) != first
    assert "the first run's log" not in (tmp_path / "r" / "run.log").read_text()


def test_a_folder_of_somebody_elses_is_refused(tmp_path, cache):
    folder = tmp_path / "Documents"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    (folder / "config.yaml").write_text("not jdiff's")
    before = snapshot(folder)
    done = jdiff_cli(quick(cache, f"hydra.run.dir={folder}"), tmp_path)
    assert_one_line_error(done, str(folder), "notes.txt", "did not write")
    assert snapshot(folder) == before and not (folder / ".hydra").exists()


def test_an_unfinished_run_with_other_settings_is_not_resumed_over(tmp_path, cache):
    run_dir = tmp_path / "r"
    run_ok(tmp_path, quick(cache, "hydra.run.dir=r", "stages=[prior,train]"))
    (run_dir / COMPLETE).unlink()  # as if it had been killed before the end
    before = snapshot(run_dir)
    done = jdiff_cli(quick(cache, "hydra.run.dir=r", "stages=[prior,train]", "lora.unet_rank=4"), tmp_path)
    assert_one_line_error(done, "unfinished run with other settings", "lora.unet_rank", "overwrite=true")
    assert snapshot(run_dir) == before


def test_runs_started_together_get_folders_of_their_own(tmp_path, cache):
    """Default run folders are named by the second; two runs started at once must not share one."""
    command = [sys.executable, "-m", "jdiff.main", *quick(cache, "stages=[prior,train]")]
    procs = [subprocess.Popen(command, cwd=tmp_path, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for _ in range(3)]
    outputs = [p.communicate(timeout=600)[0].decode() for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    folders = [p for p in (tmp_path / "outputs").glob("*/*") if p.is_dir()]
    assert len(folders) == 3
    for folder in folders:
        assert (folder / COMPLETE).is_file() and (folder / "lora.safetensors").is_file()
        assert len(list((folder / ".hydra").iterdir())) == 3


def test_a_claimed_run_folder_name_is_never_given_twice(tmp_path, monkeypatch):
    monkeypatch.setattr(rundir, "_claimed", {})
    first = rundir.new_run_dir(str(tmp_path / "outputs"), "00")
    assert rundir.new_run_dir(str(tmp_path / "outputs"), "00") == first  # one process, one answer
    monkeypatch.setattr(rundir, "_claimed", {})  # as another process started in the same second
    second = rundir.new_run_dir(str(tmp_path / "outputs"), "00")
    assert second != first and Path(first).is_dir() and Path(second).is_dir()
    if Path(second).parent == Path(first).parent and Path(second).name.startswith(Path(first).name):
        assert second == first + "_2"


def test_a_run_folder_that_cannot_be_written_is_one_line(tmp_path, cache):
    blocker = tmp_path / "a_file"
    blocker.write_text("mine")
    done = jdiff_cli(quick(cache, f"hydra.run.dir={blocker}/run"), tmp_path)
    assert_one_line_error(done, f"cannot write into {blocker}/run")
    assert blocker.read_text() == "mine"


# -- 3. broken results are never complete ---------------------------------------------------------------------


def test_a_diverging_training_stops_with_the_step_and_what_to_try(tmp_path, cache):
    done = jdiff_cli(quick(cache, "hydra.run.dir=r", "train.lr=1e30", "train.steps=6"), tmp_path)
    line = assert_one_line_error(done, "training diverged at step", "train.lr=1e+30", "smaller train.lr")
    run_dir = tmp_path / "r"
    assert not (run_dir / COMPLETE).exists() and not (run_dir / "scores.json").exists()
    assert not (run_dir / "images").exists() and not (run_dir / "lora.safetensors").exists()
    step = int(line.split("at step ")[1].split()[0])
    rows = (run_dir / "loss.csv").read_text().splitlines()[1:]
    assert len(rows) == step and "nan" in rows[-1].lower()  # the losses up to the failing step are kept


def test_non_finite_metrics_are_never_a_complete_run(jdiff_root, tmp_path, monkeypatch):
    from conftest import QUICK, compose_config
    from jdiff.pipeline import run
    from jdiff.scoring.scorer import Scorer, ScoreResult

    monkeypatch.setattr(Scorer, "score", lambda self, styles: ScoreResult(metrics={"hist": float("nan")},
                                                                           skipped={}, per_style={}, seconds=0.0))
    from jdiff.engines.base import EngineError

    with pytest.raises(EngineError, match="hist"):
        run(compose_config(QUICK + ["engine=torch"], jdiff_root), tmp_path / "r")
    assert not (tmp_path / "r" / COMPLETE).exists() and not (tmp_path / "r" / "scores.json").exists()


# -- 5 and 8. mistakes in what was asked: one line, nothing written ---------------------------------------------


@pytest.mark.parametrize("extra,words", [
    (["seed=-1"], ["seed=-1"]),
    (["~seed"], ["seed", "~seed"]),
    (["style=../../etc"], ["style="]),
    (["lora.unet_rank=100000"], ["lora.unet_rank=100000", "1024"]),
    (["stages=[prior]", "prior=off"], ["stages", "prior=on"]),
    (["lora.path=somewhere.safetensors"], ["lora.path", "stages=[generate,score]"]),
    (["train.lr=0"], ["train.lr=0"]),
    (["init.strength=2"], ["init.strength"]),
    (["train.lr=${nope}"], ["train.lr cannot be resolved", "nope"]),
    (["lora.unet_alpha=inf"], ["lora.unet_alpha"]),
    (["prior.template='an image of {object} {x}'"], ["prior.template", "{object} and {style}"]),
    (["data.infer_template='{object} in {0}'"], ["data.infer_template"]),
    (["init.strength=0.01"], ["init.strength=0.01", "no denoising step"]),
    (["augment.crop_scale=10000"], ["augment.crop_scale"]),
    (["score.metrics=[]"], ["score.metrics", "score=hist"]),
    (["lora.text_encoder_rank=4", "lora.text_encoder_targets=[]"], ["lora.text_encoder_targets"]),
])
def test_a_mistake_in_the_config_is_one_line_and_writes_nothing(tmp_path, cache, extra, words):
    done = jdiff_cli(quick(cache, *extra), tmp_path)
    assert_one_line_error(done, *words)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_no_style_at_all_is_one_line(tmp_path, cache):
    done = jdiff_cli(["engine=torch", f"paths.cache={cache}"], tmp_path)
    assert_one_line_error(done, "style is not set", "style=03")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_an_unknown_style_is_one_line_listing_the_styles(tmp_path, cache):
    done = jdiff_cli(quick(cache, "style=zz"), tmp_path)
    assert_one_line_error(done, "style=zz", "00, 01")


def test_pickle_permission_still_loads_safetensors_models(tmp_path, cache):
    run_ok(tmp_path, quick(cache, "hydra.run.dir=r", "engine.allow_pickle=true", "stages=[prior,train]"))


def test_ctrl_c_is_one_line_and_the_run_resumes(tmp_path, cache):
    args = quick(cache, "hydra.run.dir=r", "train.steps=60")
    proc = subprocess.Popen([sys.executable, "-m", "jdiff.main", *args], cwd=tmp_path, env=cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    losses = tmp_path / "r" / "loss.csv"  # first written at step 50: training is under way
    deadline = time.time() + 300
    while time.time() < deadline and not losses.exists() and proc.poll() is None:
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    done = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    assert_one_line_error(done, "hydra.run.dir=", "resume", code=130, prefix="interrupted:")
    assert not (tmp_path / "r" / COMPLETE).exists()
    run_ok(tmp_path, args)
    assert len((tmp_path / "r" / "loss.csv").read_text().splitlines()) == 61


def test_a_sweep_run_redone_by_hand_needs_a_run_folder(tmp_path):
    done = jdiff_cli([tmp_path / "not_a_run"], tmp_path, module="jdiff.job")
    assert_one_line_error(done, "holds no config.yaml", "multirun/")


def test_a_folder_that_only_looks_like_a_run_is_not_cleared(tmp_path, cache):
    """Top-level names like a run's (images/) without the config a run writes first: somebody else's folder."""
    folder = tmp_path / "mystuff"
    (folder / "images").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "images" / "holiday.jpg")
    before = snapshot(folder)
    assert_one_line_error(jdiff_cli(quick(cache, f"hydra.run.dir={folder}"), tmp_path), str(folder), "did not write")
    assert snapshot(folder) == before


def test_a_file_of_the_users_in_an_unfinished_runs_images_stops_the_resume(tmp_path, cache):
    run_ok(tmp_path, quick(cache, "hydra.run.dir=r"))
    (tmp_path / "r" / COMPLETE).unlink()
    (tmp_path / "r" / "images" / "my_notes.txt").write_text("mine")
    before = snapshot(tmp_path / "r")
    assert_one_line_error(jdiff_cli(quick(cache, "hydra.run.dir=r"), tmp_path), "images/my_notes.txt")
    assert snapshot(tmp_path / "r") == before


def test_a_run_killed_while_safetensors_wrote_its_file_resumes(tmp_path, cache):
    """jdiff before 2026-12-03 wrote its LoRA files with safetensors' own file writer, which makes a ".tmpXXXXXX"
    beside the file: a run killed then (seen on the GPU) was refused at its resume as holding foreign files."""
    run_ok(tmp_path, quick(cache, "hydra.run.dir=r"))
    (tmp_path / "r" / COMPLETE).unlink()
    (tmp_path / "r" / ".tmpkYJ7Ny").write_bytes(b"half a safetensors file")
    run_ok(tmp_path, quick(cache, "hydra.run.dir=r"))
    assert (tmp_path / "r" / COMPLETE).is_file()
    assert not (tmp_path / "r" / ".tmpkYJ7Ny").exists()


def test_jdiff_writes_safetensors_files_itself_leaving_nothing_beside_them(tmp_path, monkeypatch):
    """Every safetensors file jdiff writes goes through its own atomic write (so a kill leaves only a temporary
    file jdiff knows), never through safetensors' file writer, with what it held and its metadata."""
    import safetensors.numpy
    from safetensors import safe_open

    from jdiff.files import save_safetensors

    def refused(*args, **kwargs):
        raise AssertionError("safetensors' own file writer was used")

    monkeypatch.setattr(safetensors.numpy, "save_file", refused)
    tensors = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(4, np.float16)}
    save_safetensors(tmp_path / "x.safetensors", tensors, {"format": "pt"})
    assert [p.name for p in tmp_path.iterdir()] == ["x.safetensors"]
    with safe_open(str(tmp_path / "x.safetensors"), framework="numpy") as f:
        assert f.metadata() == {"format": "pt"}
        assert all(np.array_equal(f.get_tensor(k), v) for k, v in tensors.items())
    for module in ("lora_file", "export", "checkpoint"):  # the writers of run files and exports
        source = (REPO / "jdiff" / f"{module}.py").read_text()
        assert "save_file(" not in source.replace("safetensors.torch.save_file(torch.load", ""), module


def test_two_runs_into_one_folder_at_once_never_mix(tmp_path, cache):
    commands = [[sys.executable, "-m", "jdiff.main", *quick(cache, "hydra.run.dir=r", f"seed={seed}")]
                for seed in (1, 2)]
    procs = [subprocess.Popen(c, cwd=tmp_path, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for c in commands]
    done = [subprocess.CompletedProcess(p.args, p.wait(timeout=600), *p.communicate()) for p in procs]
    winners = [d for d in done if d.returncode == 0]
    assert len(winners) == 1, [d.stderr[-1000:] for d in done]
    loser = next(d for d in done if d.returncode != 0)
    assert_one_line_error(loser, str(tmp_path / "r"))
    seed = winners[0].args[-1]
    assert f"\n{seed.replace('=', ': ')}\n" in (tmp_path / "r" / "config.yaml").read_text()
    assert rundir.inspect(tmp_path / "r").status == "complete"


def test_a_finished_run_redone_by_hand_is_refused_without_a_trace(finished):
    before = snapshot(finished / "done")
    assert_one_line_error(jdiff_cli([finished / "done"], finished, module="jdiff.job"), "finished run")
    assert snapshot(finished / "done") == before


def test_scores_are_never_written_into_a_runs_folder(finished, cache):
    submission = finished / "submission" / "00"
    submission.mkdir(parents=True, exist_ok=True)
    for image in (finished / "done" / "images").iterdir():
        (submission / image.name).write_bytes(image.read_bytes())
    before = snapshot(finished / "done")
    done = jdiff_cli([finished / "submission", "score=hist", f"data.root={cache / 'demo_styles'}", "--out",
                      finished / "done" / "scores.json"], finished, module="jdiff.score")
    assert_one_line_error(done, "folder of a jdiff run")
    assert snapshot(finished / "done") == before


def test_lora_targets_the_model_lacks_are_one_line(tmp_path, cache):
    done = jdiff_cli(quick(cache, "lora.unet_targets=[bogus]", "hydra.run.dir=r"), tmp_path)
    assert_one_line_error(done, "lora.unet_targets=['bogus']", "to_q", code=2)
    assert not (tmp_path / "r" / COMPLETE).exists()


def test_a_run_folder_holding_the_cache_is_refused(tmp_path, tiny_model_dir):
    """paths.cache (here the default, ./data/cache) inside the run folder would be foreign files at a resume."""
    done = jdiff_cli(["experiment=demo", "engine=torch", f"model.path={tiny_model_dir.parent}", "hydra.run.dir=."],
                     tmp_path)
    assert_one_line_error(done, "paths.cache=", "inside the run folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == []
