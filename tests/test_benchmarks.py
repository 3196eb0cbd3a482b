"""Every benchmark script runs in its tiny ``--quick`` mode on the CPU and writes the JSON it promises."""

import importlib.util
import json
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


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(ROW_KEYS))
def test_benchmark_quick_mode_writes_its_json(tmp_path, name):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / f"{name}.json"
    script.main(["--quick", "--device", "cpu", "--out", str(out)])
    record = json.loads(out.read_text())
    assert record["benchmark"].startswith(name) and record["options"]["quick"]
    assert {"torch", "device", "cpu_count"} <= set(record["environment"])
    assert record["results"] and all(ROW_KEYS[name] <= set(row) for row in record["results"])
