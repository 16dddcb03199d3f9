"""The benchmark script end to end on the tiny model and the CPU: every section, the baseline and an engine,
one process per measurement, the JSON and the table. (Its numbers are only meaningful on a GPU.)"""

from __future__ import annotations

import json

from jdiff.bench import main


def test_bench_measures_every_section_and_compares_with_the_baseline(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["--model", "tiny", "--device", "cpu", "--resolution", "64", "--steps", "2", "--warmup", "1",
                 "--images", "3", "--batch", "2", "--infer-steps", "3", "--e2e-steps", "2",
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
