"""Every benchmark script runs in its tiny ``--quick`` mode on the CPU and writes the JSON it promises."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
ROW_KEYS = {
    "overhead": {"pair", "batch_size", "steps", "distill_median_s", "plain_median_s", "ratio"},
    "data": {"pipeline", "median_s", "images_per_s", "speedup"},
    "imagenet_data": {"pipeline", "median_s", "images_per_s", "speedup"},
    "pwkd_width": {"teacher", "width", "median_ms", "ratio", "ideal"},
    "gpu_epoch": {"side", "epoch_s", "images_per_s", "projected_240_epochs_h", "epochs_s"},
    "step_overhead": {
        "batch_size",
        "distill_s_per_step",
        "plain_s_per_step",
        "ratio",
        "host_overhead_ms",
        "distill_peak_rss_mb",
        "plain_peak_rss_mb",
    },
    "teacher_cache": {
        "pair",
        "live_median_s",
        "cached_median_s",
        "speedup",
        "cache_pass_vs_epoch",
        "store_bytes_per_epoch",
    },
}


def load_benchmark(name: str):
    """``benchmarks/<name>.py`` as a module."""
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(ROW_KEYS))
def test_benchmark_quick_mode_writes_its_json(tmp_path, name):
    script = load_benchmark(name)
    out = tmp_path / f"{name}.json"
    script.main(["--quick", "--device", "cpu", "--out", str(out)])
    record = json.loads(out.read_text())
    assert record["benchmark"].startswith(name) and record["options"]["quick"]
    assert {"torch", "device", "cpu_count"} <= set(record["environment"])
    assert record["results"] and all(ROW_KEYS[name] <= set(row) for row in record["results"])


@pytest.mark.slow
def test_efficacy_quick_mode_runs_every_row_and_compares_paired_seeds(tmp_path, monkeypatch):
    """The study's machinery on fake Fashion-MNIST files: rows of every kind (no teacher, a teacher, the
    slimmable teacher, a control, phases) × 2 seeds are ordinary fits, read back with their test top-1
    and paired differences; no accuracy is asserted."""
    from fakedata import write_fake_fashion_mnist

    spec = importlib.util.spec_from_file_location("benchmark_efficacy", BENCHMARKS / "efficacy.py")
    script = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, script)  # its dataclasses look their module up
    spec.loader.exec_module(script)
    data = write_fake_fashion_mnist(tmp_path / "data", n_train=400, n_test=20)
    out = tmp_path / "efficacy.json"
    args = ["--quick", "--jobs", "1", "--data-dir", str(data), "--runs", str(tmp_path / "runs"), "--out", str(out)]
    wanted = ["student", "kd", "sskd", "pwkd_kd", "pwkd_whole_only"]
    payload = script.main([*args, "--train-fraction", "0.5", "--rows", *wanted])
    record = json.loads(out.read_text())
    rows = {r["row"]: r for r in record["results"]}
    assert set(rows) == {*wanted, *script.TEACHERS}
    for name in wanted:
        assert rows[name]["n"] == 2 and set(rows[name]["per_seed"]) == {"0", "1"}
        assert rows[name]["command"].startswith("distill fit --config lightning_configs/fashion_mnist/")
    kd = rows["kd"]["per_seed"]
    diff = rows["kd"]["vs_student"]  # re-derived from the per-seed numbers
    student = rows["student"]["per_seed"]
    assert diff["mean"] == pytest.approx(sum(kd[s]["test_top1"] - student[s]["test_top1"] for s in "01") / 2)
    assert rows["pwkd_kd"]["vs_control"]["against"] == "pwkd_whole_only" and rows["kd"]["vs_kd"] is None
    assert (out.with_suffix(".md")).read_text().count("\n| ") == len(rows)
    assert (tmp_path / "efficacy-quick_val_top1.png").read_bytes()[:4] == b"\x89PNG"
    assert payload["wall_s"] > 0 and record["options"]["quick"]
    # the SSKD diagnosis reads the same runs: its own-head number is the study's test top-1, re-derived
    probe = load_benchmark("sskd_probe")
    runs = str(tmp_path / "runs")
    probed = probe.main(["--runs", runs, "--rows", "sskd", "student", "--out", str(tmp_path / "probe.json")])["results"]
    assert [(r["row"], r["seed"]) for r in probed] == [(row, f"seed{s}") for row in ("sskd", "student") for s in "01"]
    for r in probed:
        assert r["own_head_test_top1"] == pytest.approx(rows[r["row"]]["per_seed"][r["seed"][-1]]["test_top1"])
        assert len(r["unexplained_variance_per_stage"]) == 3 and None not in r["unexplained_variance_per_stage"]
        assert 0 <= r["probe_test_top1"] <= 100 and r["teacher_head_test_top1"] is not None


@pytest.mark.slow
def test_step_profile_rows_add_up_to_the_whole_step_without_double_counting(tmp_path):
    script = load_benchmark("step_overhead")
    out = tmp_path / "profile.json"
    script.main(["--quick", "--profile", "--device", "cpu", "--out", str(out)])
    rows = {r["row"]: r["ms_per_step"] for r in json.loads(out.read_text())["results"]}
    whole = rows.pop("the whole training-loop step")
    assert whole > 0 and all(value >= 0 for value in rows.values()), rows  # the remainder row is not negative
    top_level = [value for row, value in rows.items() if not row.startswith(" ")]
    assert sum(top_level) == pytest.approx(whole)


@pytest.mark.slow
def test_step_overhead_same_process_with_bare_lightning_splits_the_overhead_and_reports_no_per_side_rss(tmp_path):
    script = load_benchmark("step_overhead")
    out = tmp_path / "same.json"
    script.main(["--quick", "--same-process", "--lightning", "--device", "cpu", "--out", str(out)])
    (row,) = json.loads(out.read_text())["results"]
    assert row["distill_peak_rss_mb"] is None and row["plain_peak_rss_mb"] is None
    per_step = {side: row["per_repeat"][f"{side}_s_per_step"] for side in ("distill", "lightning", "plain")}
    assert all(len(values) == 1 for values in per_step.values())  # one repeat: every median is that repeat
    (distill,), (bare,), (plain,) = per_step.values()
    assert row["ratio"] == pytest.approx(distill / plain)
    assert row["lightning_overhead_ms"] == pytest.approx(1e3 * (bare - plain))
    assert row["distill_over_lightning_ms"] == pytest.approx(1e3 * (distill - bare))
    assert row["lightning_overhead_ms"] + row["distill_over_lightning_ms"] == pytest.approx(row["host_overhead_ms"])


def test_a_paired_step_is_the_loop_iteration_less_the_plain_step_inside_it(monkeypatch):
    """PairedPlainSteps on a fake clock: iteration i runs from one batch start to the next, and the plain
    step it ran at batch end is subtracted; the last step (no next start) is not recorded."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    pairing = importlib.import_module("pairing")
    now = [0.0]
    pairs = []

    def plain_step():
        now[0] += 0.25

    pairing.ARMED.update(plain_step=plain_step, clock=lambda: now[0], pairs=pairs)
    timer = pairing.PairedPlainSteps()
    for fit_step in (1.0, 2.0, 4.0):
        timer.on_train_batch_start(None, None, None, 0)
        now[0] += fit_step
        timer.on_train_batch_end(None, None, None, None, 0)
    assert pairs == [(1.0, 0.25), (2.0, 0.25)]


@pytest.mark.slow
def test_step_pairs_reports_means_of_the_pairs_and_splits_lightning_from_distill(tmp_path):
    script = load_benchmark("step_pairs")
    out = tmp_path / "pairs.json"
    bar = "--trainer.enable_progress_bar=true"
    script.main(["--quick", "--lightning", "--manual", "--calibrate", f"--variant=bar={bar}", "--out", str(out)])
    (row,) = json.loads(out.read_text())["results"]
    assert row["pairs"] == 5  # 6 steps: the last has no next start
    assert row["ratio"] == pytest.approx(row["distill_s_per_step"] / row["plain_s_per_step"])
    assert row["host_overhead_ms"] == pytest.approx(1e3 * (row["distill_s_per_step"] - row["plain_s_per_step"]))
    low, high = row["host_overhead_ms_ci95"]
    assert low < row["host_overhead_ms"] < high
    assert row["distill_over_lightning_ms"] == pytest.approx(row["host_overhead_ms"] - row["lightning_overhead_ms"])
    low, high = row["lightning_manual_overhead_ms_ci95"]
    assert low < row["lightning_manual_overhead_ms"] < high
    variant = row["variants"]["bar"]
    assert variant["arguments"] == bar and variant["pairs"] == 5
    assert variant["over_distill_ms"] == pytest.approx(variant["overhead_ms"] - row["host_overhead_ms"])
    low, high = variant["over_distill_ms_ci95"]
    assert low < variant["over_distill_ms"] < high
    low, high = row["calibration_ms_ci95"]
    assert low < row["calibration_ms"] < high
