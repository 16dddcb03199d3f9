"""Sweep-level class images (jdiff/prior_plan.py, the gpu_pool launcher): each image planned and made once, over
the sweep's (fake) GPUs, before the runs, which then only load them; prior.share=sweep; several planners on one
cache; an interrupted plan resumed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import QUICK, compose_config
from jdiff.demo_data import write_demo_styles
from jdiff.pipeline import Run
from jdiff.prior import ClassImageSettings, capped, class_images, image_path
from jdiff.rundir import changed_keys
from jdiff.validate import ConfigError, validate_config

REPO = Path(__file__).resolve().parents[1]
SWEEP = ["experiment=demo", "engine=torch", "infer.steps=2", "prior.images_per_object=2", "stages=[prior]"]


def sweep(root: Path, name: str, *overrides: str) -> Path:
    done = subprocess.run([sys.executable, "-m", "jdiff.main", "-m", *SWEEP, f"sweep.name={name}", *overrides],
                          cwd=root, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return root / "multirun" / name


def runs(sweep_dir: Path) -> list[Path]:
    return sorted(p for p in sweep_dir.iterdir() if p.is_dir() and (p / "config.yaml").is_file())


def read(path: Path) -> dict:
    return json.loads(path.read_text())


def test_a_sweep_makes_each_class_image_once_over_its_gpus_before_its_runs(jdiff_root, tiny_model_dir):
    # 4 runs, 2 styles: each style's class images are needed by two runs, and made once
    sweep_dir = sweep(jdiff_root, "plan_once", "seed=7", "style=00,01", "lora.unet_rank=2,4", "gpus=[0,1]")
    plan = read(sweep_dir / "class_images.json")
    made = [tuple(item) for share in plan["shares"] for item in share["generated"]]
    assert len(made) == len(set(made)), "an image was generated twice"
    wanted = set()
    for run_dir in runs(sweep_dir):
        used = read(run_dir / "class_set.json")
        cache = jdiff_root / "data" / "cache" / used["cache"]  # class_set.json names it under paths.cache
        wanted |= {(cache.name, o, k) for o in used["objects"] for k in range(2)}
        log = (run_dir / "run.log").read_text()
        assert f"all {2 * len(used['objects'])} class images found" in log and "generating" not in log
    assert len(runs(sweep_dir)) == 4 and set(made) == wanted and plan["generated"] == len(wanted) == 28
    assert all(image_path(cache, o, k).stat().st_size > 0 for _, o, k in wanted)
    # two children, one per fake GPU, each with its own part of the work
    shares = plan["shares"]
    assert len(shares) == 2 and {s["gpu"] for s in shares} == {"0", "1"} and all(s["exit_code"] == 0 for s in shares)
    first, second = ({tuple(i) for i in s["generated"]} for s in shares)
    assert first and second and not first & second
    # launched again: the runs are finished and every image is there, so nothing is planned
    stamps = {item: image_path(cache, *item[1:]).stat().st_mtime_ns for item in wanted}
    sweep(jdiff_root, "plan_once", "seed=7", "style=00,01", "lora.unet_rank=2,4", "gpus=[0,1]")
    assert read(sweep_dir / "class_images.json")["shares"] == []
    assert {item: image_path(cache, *item[1:]).stat().st_mtime_ns for item in wanted} == stamps


def test_share_sweep_gives_every_run_one_class_set_capped(jdiff_root, tiny_model_dir):
    sweep_dir = sweep(jdiff_root, "plan_shared", "seed=8", "style=00,01", "prior.share=sweep", "prior.max_objects=5",
                      "gpus=[]")
    sets = [read(run_dir / "class_set.json") for run_dir in runs(sweep_dir)]
    assert len(sets) == 2 and sets[0]["objects"] == sets[1]["objects"] and len(sets[0]["objects"]) == 5
    assert all(s["share"] == "sweep" and s["styles"] == ["00", "01"] for s in sets)
    for run_dir in runs(sweep_dir):  # recorded in the run's config, so that the run redone alone uses the same set
        assert OmegaConf.load(run_dir / "config.yaml").prior.styles == ["00", "01"]
    assert read(sweep_dir / "class_images.json")["generated"] == 10


def test_a_single_run_shares_the_class_set_of_every_style_under_data_root(jdiff_root, tmp_path):
    cfg = compose_config(QUICK + ["prior.share=sweep"], jdiff_root)
    write_demo_styles(Path(cfg.data.root))
    alone = Run(cfg, tmp_path / "a").class_set()
    assert alone.styles == ("00", "01") and len(alone.objects) == 14
    cfg = compose_config(QUICK + ["prior.share=sweep", "style=01", "prior.styles=[00,01]", "prior.max_objects=3"],
                         jdiff_root)
    chosen = Run(cfg, tmp_path / "b").class_set()
    assert len(chosen.objects) == 3 and set(chosen.objects) < set(alone.objects)
    assert Run(cfg, tmp_path / "c").class_set() == chosen  # deterministic


def test_the_cap_keeps_the_objects_most_styles_name_then_a_seeded_choice():
    styles = [["cat", "dog", "sun"], ["cat", "sea"], ["cat", "dog", "moon"]]
    assert capped(styles, 2, seed=0) == ["cat", "dog"]
    assert capped(styles, None, seed=0) == ["cat", "dog", "sun", "sea", "moon"]
    picks = {tuple(capped(styles, 3, seed=s)) for s in range(20)}
    assert all(p[:2] == ("cat", "dog") for p in picks) and len(picks) > 1  # the third is the seed's pick
    assert capped(styles, 3, seed=5) == capped(styles, 3, seed=5)


@pytest.mark.parametrize("override, key", [
    ("prior.share=style", "prior.share"),
    ("prior.max_objects=0", "prior.max_objects"),
    ("prior.batch_size=0", "prior.batch_size"),
    ("prior.styles=[00]", "prior.styles"),  # without share=sweep
])
def test_bad_prior_settings_are_refused(jdiff_root, override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate_config(compose_config(QUICK + [override], jdiff_root))


def test_batch_size_and_keys_newer_than_a_run_are_not_other_settings():
    old = {"prior": {"weight": 1.0, "images_per_object": 8}}
    new = {"prior": {"weight": 1.0, "images_per_object": 8, "share": "object", "styles": None, "max_objects": None,
                     "batch_size": 64}}
    assert changed_keys(old, new) == []
    assert changed_keys(old, {"prior": {**new["prior"], "share": "sweep"}}) == ["prior.share"]
    assert changed_keys({"prior": {**new["prior"], "batch_size": 4}}, new) == []


# -- the cache under concurrency and interruption -------------------------------------------------------------

SETTINGS = dict(template="an image of {object}", resolution=64, steps=2, guidance_scale=7.5, negative_prompt="",
                sampler="model", prediction_type="v_prediction")

PLANNER = """
import json, sys, time
from pathlib import Path
import jdiff.prior as prior
from jdiff.engines.base import create_engine

model_dir, cache, go, report, batch = sys.argv[1:6]
saved = []
save = prior.save_png
def recording_save(path, image):
    saved.append(str(path))
    time.sleep(0.2)  # slow writes: the other planner is at work meanwhile
    return save(path, image)
prior.save_png = recording_save
settings = prior.ClassImageSettings(seed=11, **json.loads(sys.argv[6]))
while not Path(go).exists():
    time.sleep(0.05)
prior.class_images(Path(cache), ["Apple", "Boat", "Cat"], 3, settings, lambda: create_engine("torch", Path(model_dir)),
                   int(batch))
Path(report).write_text(json.dumps(saved))
"""


def test_two_planners_on_one_cache_make_each_image_once(tiny_model_dir, tmp_path):
    script, go, cache = tmp_path / "planner.py", tmp_path / "go", tmp_path / "prior"
    script.write_text(PLANNER)
    reports = [tmp_path / f"report{i}" for i in range(2)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    # other batch sizes: the two plans' batches overlap without being the same
    procs = [subprocess.Popen([sys.executable, str(script), str(tiny_model_dir), str(cache), str(go), str(r), batch,
                               json.dumps(SETTINGS)], env=env) for r, batch in zip(reports, ("4", "2"))]
    time.sleep(0.5)
    go.touch()
    assert [p.wait(timeout=600) for p in procs] == [0, 0]
    saved = [path for r in reports for path in json.loads(r.read_text())]
    assert len(saved) == len(set(saved)) == 9  # 3 objects x 3, each written by one planner
    assert all(Path(p).stat().st_size > 0 for p in saved)


class Interrupted(Exception):
    pass


def test_an_interrupted_plan_resumed_makes_the_same_images(tiny_model_dir, tmp_path):
    from jdiff.engines.base import create_engine

    settings = ClassImageSettings(seed=12, **SETTINGS)
    objects = ["Apple", "Boat", "Cat"]
    engine = create_engine("torch", tiny_model_dir)
    whole = tmp_path / "whole"
    items = class_images(whole, objects, 3, settings, lambda: engine, 4)

    calls = []
    real = engine.generate

    def dies_on_the_second_batch(request):
        calls.append(len(request.prompts))
        if len(calls) == 2:
            raise Interrupted
        return real(request)

    resumed = tmp_path / "resumed"
    engine.generate = dies_on_the_second_batch
    with pytest.raises(Interrupted):
        class_images(resumed, objects, 3, settings, lambda: engine, 4)
    leftover = image_path(resumed, "Cat", 2).parent / ".002.png.x1y2.tmp.png"  # a write cut short
    leftover.parent.mkdir(parents=True, exist_ok=True)
    leftover.write_bytes(b"broken")
    made_before = {p.name for p in resumed.rglob("*.png")}
    assert 0 < len(made_before) < 9
    engine.generate = real
    again = class_images(resumed, objects, 3, settings, lambda: engine, 4)
    for a, b in zip(items, again):
        assert a.path.relative_to(whole) == b.path.relative_to(resumed)
        assert a.path.read_bytes() == b.path.read_bytes()
    assert not leftover.exists()
