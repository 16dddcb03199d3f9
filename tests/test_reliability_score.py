"""Bad submissions and ``--out`` paths for ``python -m jdiff.score``: each ends in one line ``error: ...`` and exit
status 2 (never a traceback), every file that was there before is left as it was, and OS clutter is ignored."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import jdiff.files
import jdiff.score
from jdiff.score import main as score_main
from test_data import make_style, random_rgb

REPO = Path(__file__).resolve().parents[1]
PROMPTS = {"00": ["Dolphin", "Hat"], "01": ["Lighthouse", "Bread"]}


@pytest.fixture()
def root(tmp_path) -> Path:
    """data.root with styles 00 and 01 (references sun.png, wheat_field.png; PROMPTS to generate)."""
    styles = tmp_path / "styles"
    for style, objects in PROMPTS.items():
        make_style(styles, style, prompts=dict(enumerate(objects)))
    return styles


@pytest.fixture()
def submission(tmp_path) -> Path:
    folder = tmp_path / "results"
    for k, (style, objects) in enumerate(PROMPTS.items()):
        (folder / style).mkdir(parents=True)
        for j, obj in enumerate(objects):
            Image.fromarray(random_rgb(20 + 3 * k + j)).save(folder / style / f"{obj}.png")
    return folder


def files_of(*folders: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for folder in folders for p in sorted(folder.rglob("*")) if p.is_file()}


def score(submission: Path, root: Path, *extra: str, capsys) -> tuple[int, str, str]:
    code = score_main([str(submission), f"data.root={root}", f"paths.root={root.parent}", "score=hist",
                       "score.device=cpu", *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def refused(submission: Path, root: Path, *extra: str, capsys) -> str:
    """Score, expecting a refusal that leaves every file as it was; the error message."""
    before = files_of(submission.parent)
    code, out, err = score(submission, root, *extra, capsys=capsys)
    assert code == 2, (out, err)
    assert err.startswith("error: ") and "Traceback" not in err + out
    assert files_of(submission.parent) == before
    return err


def earlier_scores(path: Path) -> bytes:
    data = (json.dumps({"metrics": {"hist": 0.5}, "final": {"value": 0.1}}, indent=2) + "\n").encode()
    path.write_bytes(data)
    return data


# -- --out ------------------------------------------------------------------------------------------------


def test_out_in_a_missing_folder_is_made(submission, root, tmp_path, capsys):
    out = tmp_path / "new" / "deeper" / "scores.json"
    code, printed, _ = score(submission, root, "--out", str(out), capsys=capsys)
    assert code == 0 and f"wrote {out}" in printed
    assert "hist" in json.loads(out.read_text())["metrics"]


def test_out_below_a_file(submission, root, tmp_path, capsys):
    (tmp_path / "notes").write_text("mine")
    err = refused(submission, root, "--out", str(tmp_path / "notes" / "scores.json"), capsys=capsys)
    assert str(tmp_path / "notes") in err and "is a file, not a folder" in err


def test_out_is_a_folder(submission, root, tmp_path, capsys):
    (tmp_path / "outdir").mkdir()
    (tmp_path / "outdir" / "keep.txt").write_text("mine")
    err = refused(submission, root, "--out", str(tmp_path / "outdir"), capsys=capsys)
    assert "is a folder" in err and str(tmp_path / "outdir" / "scores.json") in err
    assert sorted(p.name for p in (tmp_path / "outdir").iterdir()) == ["keep.txt"]


def test_out_in_a_read_only_folder(submission, root, tmp_path, capsys, monkeypatch):
    earlier = earlier_scores(submission / "scores.json")
    real_access = os.access
    monkeypatch.setattr(jdiff.score.os, "access",
                        lambda p, mode: False if Path(p) == submission else real_access(p, mode))
    err = refused(submission, root, capsys=capsys)
    assert f"no permission to write in {submission}" in err and "--out" in err
    assert (submission / "scores.json").read_bytes() == earlier


def test_out_that_is_not_a_scores_file_is_not_overwritten(submission, root, capsys):
    for victim in (root / "00" / "prompt.json", submission / "00" / "Dolphin.png"):
        err = refused(submission, root, "--out", str(victim), capsys=capsys)
        assert str(victim) in err and "not a scores file" in err


def test_failed_write_keeps_the_earlier_scores(submission, root, capsys, monkeypatch):
    earlier = earlier_scores(submission / "scores.json")

    def replace(src, dst):
        raise PermissionError(13, "Permission denied", str(dst))

    monkeypatch.setattr(jdiff.files.os, "replace", replace)
    code, printed, err = score(submission, root, capsys=capsys)
    assert code == 2 and "final score" in printed  # the scores are not lost: they are printed
    assert err.startswith(f"error: cannot write {submission / 'scores.json'}") and "Traceback" not in err
    assert (submission / "scores.json").read_bytes() == earlier
    assert sorted(p.name for p in submission.iterdir()) == ["00", "01", "scores.json"]  # no temporary file left


def test_interrupted_scoring_keeps_the_earlier_scores(submission, root, capsys, monkeypatch):
    earlier = earlier_scores(submission / "scores.json")

    def interrupted(self, styles):
        raise KeyboardInterrupt

    monkeypatch.setattr(jdiff.score.Scorer, "score", interrupted)
    code, printed, err = score(submission, root, capsys=capsys)
    assert code == 130 and "interrupted" in err and "Traceback" not in err
    assert (submission / "scores.json").read_bytes() == earlier


def test_earlier_scores_file_is_replaced(submission, root, capsys):
    earlier_scores(submission / "scores.json")
    code, _, _ = score(submission, root, capsys=capsys)
    result = json.loads((submission / "scores.json").read_text())
    assert code == 0 and set(result["per_style"]) == {"00", "01"} and result["metrics"]["hist"] != 0.5


def test_unwritable_out_as_a_command(submission, root, tmp_path):
    (tmp_path / "notes").write_text("mine")
    before = files_of(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "jdiff.score", str(submission), f"data.root={root}",
                           f"paths.root={tmp_path}", "score=hist", "score.device=cpu",
                           "--out", str(tmp_path / "notes" / "scores.json")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "is a file, not a folder" in errors[0]
    assert files_of(tmp_path) == before


# -- the submission ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("names", [("Hat.png", "Hat.jpg"), ("Hat.png", "hat.png"), ("Hat.png", "HAT.webp")])
def test_two_images_of_one_object(submission, root, capsys, names):
    (submission / "00" / names[0]).unlink(missing_ok=True)
    for name in names:
        Image.fromarray(random_rgb(7)).save(submission / "00" / name)
    err = refused(submission, root, capsys=capsys)
    assert all(name in err for name in names) and "one object" in err


def test_hidden_entries_are_ignored(submission, root, capsys, caplog):
    junk = np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8).tobytes()
    (submission / ".ipynb_checkpoints" / "00").mkdir(parents=True)
    (submission / ".ipynb_checkpoints" / "00" / "Dolphin-checkpoint.png").write_bytes(junk)
    (submission / "00" / ".ipynb_checkpoints").mkdir()
    (submission / "00" / "._Dolphin.png").write_bytes(junk)
    (submission / "00" / ".DS_Store").write_bytes(junk)
    (submission / ".DS_Store").write_bytes(junk)
    (submission / "__MACOSX").mkdir()
    with caplog.at_level(logging.WARNING):
        code, printed, err = score(submission, root, capsys=capsys)
    assert code == 0, err
    assert "scored 4 images of 2 styles" in printed
    assert json.loads((submission / "scores.json").read_text())["per_style"]["00"]["images"] == 2
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_submission_is_a_file(root, tmp_path, capsys):
    (tmp_path / "results.zip").write_bytes(b"PK")
    err = refused(tmp_path / "results.zip", root, capsys=capsys)
    assert "is not a folder (it is a file)" in err and str(tmp_path / "results.zip") in err


def test_submission_does_not_exist(root, tmp_path, capsys):
    err = refused(tmp_path / "nowhere", root, capsys=capsys)
    assert "it does not exist" in err


def test_style_folder_named_like_no_style(submission, root, capsys):
    (root / ".ipynb_checkpoints").mkdir()
    (submission / "07").mkdir()
    Image.fromarray(random_rgb(1)).save(submission / "07" / "Dolphin.png")
    err = refused(submission, root, capsys=capsys)
    assert "style=07" in err and "Available styles in data.root: 00, 01." in err


def test_two_folders_of_one_style(submission, root, capsys):
    (submission / "1").mkdir()
    Image.fromarray(random_rgb(1)).save(submission / "1" / "Bread.png")
    err = refused(submission, root, capsys=capsys)
    assert str(submission / "01") in err and str(submission / "1") in err and "both style 01" in err


def test_broken_images_in_the_submission(submission, root, tmp_path, capsys):
    link = submission / "00" / "Hat.png"
    link.unlink()
    link.symlink_to(tmp_path / "gone.png")
    err = refused(submission, root, capsys=capsys)
    assert str(link) in err and "does not exist" in err
    link.unlink()
    link.write_bytes(b"")
    err = refused(submission, root, capsys=capsys)
    assert str(link) in err and "0 bytes" in err
    link.write_bytes(b"GIF89a not really")
    err = refused(submission, root, capsys=capsys)
    assert str(link) in err and "cannot read image" in err


def test_broken_style_in_the_data_root(submission, root, capsys):
    (root / "01" / "prompt.json").write_text('{"0": "Lighthouse", "0": "Bread"}')
    err = refused(submission, root, capsys=capsys)
    assert str(root / "01" / "prompt.json") in err and "key '0'" in err


def test_bad_override(submission, root, capsys):
    err = refused(submission, root, "score.batch_size=many", capsys=capsys)
    assert "batch_size" in err


def test_unlistable_submission(submission, root, capsys, monkeypatch):
    real_iterdir = Path.iterdir

    def iterdir(self):
        if self == submission / "01":
            raise PermissionError(13, "Permission denied", str(self))
        return real_iterdir(self)

    monkeypatch.setattr(Path, "iterdir", iterdir)
    err = refused(submission, root, capsys=capsys)
    assert f"cannot list {submission / '01'}" in err


def test_clutter_and_mismatches_are_warned_about(submission, root, capsys, caplog):
    (submission / "00" / "notes.txt").write_text("mine")
    (submission / "logs").mkdir()
    (submission / "logs" / "run.log").write_text("mine")
    (submission / "01" / "Bread.png").rename(submission / "01" / "Breadd.png")
    with caplog.at_level(logging.WARNING):
        code, printed, err = score(submission, root, capsys=capsys)
    assert code == 0, err
    messages = [r.getMessage() for r in caplog.records]
    assert any("notes.txt" in m and "not images" in m for m in messages)
    assert any(str(submission / "logs") in m and "no images" in m for m in messages)
    assert any("no image for Bread" in m for m in messages)
    assert any("Breadd.png not listed" in m for m in messages)


def test_objects_are_matched_by_their_file_names(tmp_path, capsys, caplog):
    # jdiff saves the object "a/b" as a_b.png and "Dolphin" may be saved as dolphin.png by another tool
    root = tmp_path / "styles"
    make_style(root, "00", prompts={"0": "a/b", "1": "Dolphin"})
    (tmp_path / "results" / "00").mkdir(parents=True)
    for k, name in enumerate(("a_b.png", "dolphin.png")):
        Image.fromarray(random_rgb(k)).save(tmp_path / "results" / "00" / name)
    with caplog.at_level(logging.WARNING):
        code, printed, err = score(tmp_path / "results", root, capsys=capsys)
    assert code == 0, err
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_json_files_never_say_minus_zero(tmp_path):
    """A final score that rounds to zero from below is written as 0.0, in nested metrics and lists too; NaN stays."""
    import json
    import math

    from jdiff.files import write_json

    path = write_json(tmp_path / "scores.json", {"final": {"value": -0.0, "terms": [-0.0, 1.5]},
                                                 "metrics": {"hist": -0.0, "lpips": float("nan")}})
    text = path.read_text()
    assert "-0.0" not in text
    data = json.loads(text)
    assert math.copysign(1.0, data["final"]["value"]) == 1.0 and data["final"]["terms"] == [0.0, 1.5]
    assert math.isnan(data["metrics"]["lpips"])
