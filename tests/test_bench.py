"""The benchmark script end to end on the tiny model and the CPU: every section, the baseline and an engine,
one process per measurement, the JSON and the table. (Its numbers are only meaningful on a GPU.)"""

from __future__ import annotations

import json

from jdiff.bench import main


def test_bench_measures_every_section_and_compares_with_the_baseline(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["--model", "tiny", "--device", "cpu", "--resolution", "64", "--steps", "2", "--warmup", "1",
                 "--images", "3", "--batch", "2", "--infer-steps", "3", "--e2e-steps", "3",
                 "--variants", "baseline,torch", "--cache", str(tmp_path / "cache"), "--out", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    for variant in ("baseline", "torch"):
        assert results[variant]["train"]["steps_per_s"] > 0, results[variant]
        assert results[variant]["generate"]["images"] == 3 and results[variant]["generate"]["generate_s"] > 0
    assert "skipped" in results["baseline"]["e2e"]
    e2e = results["torch"]["e2e"]
    assert e2e["e2e_s"] > 0 and e2e["first_step_s"] > 0 and e2e["loop_steps_per_s"] > 0, e2e
    run_dir = tmp_path / "cache" / "e2e" / "runs" / results["torch"]["e2e"]["run_dir"].rsplit("/", 1)[-1]
    assert (run_dir / "COMPLETE").exists() and len(list((run_dir / "images").glob("*.png"))) == 25
    printed = capsys.readouterr().out
    assert "| torch |" in printed and "torch vs baseline: train" in printed


def test_bench_checks_each_speed_path_against_the_fp32_engine(tmp_path, capsys):
    out = tmp_path / "check.json"
    assert main(["--model", "tiny", "--device", "cpu", "--resolution", "64", "--batch", "2", "--infer-steps", "3",
                 "--sections", "check", "--variants", "torch-bf16", "--cache", str(tmp_path), "--out",
                 str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert list(results) == ["torch", "torch-bf16"]  # the fp32 reference runs first
    bf16 = results["torch-bf16"]["check"]
    assert bf16["ok"] and 0 < bf16["loss_rel_error"] <= 3e-2, bf16  # within the limit, and really bf16
    assert "torch-bf16 vs fp32 torch: loss rel error" in capsys.readouterr().out


def test_ab_script_runs_each_tree_in_turn_on_one_cache(tmp_path):
    """bench/ab_bench.sh: the bench from tree A, then from tree B (its own jdiff package, not the checkout's),
    sharing one model cache; a folder that is not a jdiff tree is refused before anything runs."""
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    other = tmp_path / "other"
    shutil.copytree(root / "jdiff", other / "jdiff", ignore=shutil.ignore_patterns("__pycache__"))
    env = {**os.environ, "OUT": str(tmp_path / "ab"), "AB_CACHE": str(tmp_path / "cache"), "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(root / "bench" / "ab_bench.sh"), str(root), str(other), "1", "--",
                           "--model", "tiny", "--device", "cpu", "--resolution", "64", "--sections", "train",
                           "--variants", "torch", "--steps", "1", "--warmup", "1"],
                          env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    for side, tree in (("A", root), ("B", other)):
        result = json.loads((tmp_path / "ab" / f"ab-{side}-1.json").read_text())
        assert result["machine"]["jdiff"] == str(tree / "jdiff")
        assert result["results"]["torch"]["train"]["steps_per_s"] > 0
    assert done.stdout.count("| torch |") == 2
    refused = subprocess.run(["bash", str(root / "bench" / "ab_bench.sh"), str(root), str(tmp_path), "--",
                              "--sections", "train"], env=env, capture_output=True, text=True)
    assert refused.returncode == 2 and "not a jdiff source tree" in refused.stderr


def test_loop_speed_reads_the_pace_after_the_first_step_and_leaves_a_zero_span_unknown(tmp_path):
    from jdiff.bench import loop_speed
    from jdiff.train import write_loss_log
    log = tmp_path / "loss.csv"
    row = {"step": 1, "lr": 1e-4, "loss": 0.1, "style_loss": 0.1, "prior_loss": 0.0}
    write_loss_log(log, [{**row, "step": i + 1, "seconds": s} for i, s in enumerate([4.0, 4.5, 5.0])])
    assert loop_speed(log) == {"first_step_s": 4.0, "loop_steps_per_s": 2.0}
    write_loss_log(log, [{**row, "step": i + 1, "seconds": 4.0} for i in range(2)])
    assert loop_speed(log) == {"first_step_s": 4.0, "loop_steps_per_s": None}


def test_bench_times_the_images_stylised_by_styleid(tmp_path):
    out = tmp_path / "styleid.json"
    assert main(["--model", "tiny", "--device", "cpu", "--resolution", "32", "--images", "2", "--batch", "2",
                 "--infer-steps", "2", "--inject", "styleid", "--inversion-steps", "2", "--sections", "generate",
                 "--variants", "baseline,torch", "--cache", str(tmp_path), "--out", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    generate = results["torch"]["generate"]
    assert generate["images"] == 2 and generate["generate_s"] > 0 and generate["inject"] == "styleid", generate
    assert "skipped" in results["baseline"]["generate"]
