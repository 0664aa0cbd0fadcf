"""The harness's pieces on their own: metrics parsing, percentiles, workload shapes, targets."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from benchmarks.loadgen import percentile
from benchmarks.offline import layouts
from benchmarks.prometheus import batch_stats, parse_metrics
from benchmarks.report import check_targets
from benchmarks.workload import GROUP_SIZE, build_workload
from rmserve.encoding import PairEncoder
from rmserve.formatting import TextFormat

BEFORE = """# HELP rmserve_batch_size Items per model batch
# TYPE rmserve_batch_size histogram
rmserve_batch_size_bucket{le="1.0"} 2.0
rmserve_batch_size_sum 10.0
rmserve_batch_size_count 4.0
rmserve_batch_tokens_sum 1000.0
rmserve_batch_tokens_count 4.0
rmserve_tokens_total 900.0
rmserve_tokens_created 1.7e+09
"""
AFTER = """rmserve_batch_size_sum 40.0
rmserve_batch_size_count 10.0
rmserve_batch_tokens_sum 4600.0
rmserve_batch_tokens_count 10.0
rmserve_tokens_total 4100.0
rmserve_tokens_created 1.7e+09
"""


def test_batch_stats_are_deltas_over_the_run() -> None:
    stats = batch_stats(BEFORE, AFTER)
    assert stats["batches"] == 6
    assert stats["mean_batch_size"] == pytest.approx(30 / 6)
    # padded 3600 over real 3200: the ratio of the run, not of the whole process life
    assert stats["padding_ratio"] == pytest.approx(3600 / 3200)


def test_parse_metrics_keeps_labels_and_skips_comments() -> None:
    samples = parse_metrics('# HELP x\nrmserve_requests_total{route="/v1/score",status="200"} 7\n')
    assert samples == {'rmserve_requests_total{route="/v1/score",status="200"}': 7.0}


def test_percentile_interpolates() -> None:
    assert percentile([], 50) is None
    assert percentile([5.0], 99) == 5.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == pytest.approx(2.5)
    assert percentile(list(range(101)), 99) == pytest.approx(99.0)


def test_workload_shapes_use_real_pairs(hh_data_dir: Path, tiny_encoder_bundle: Path) -> None:
    encoder = PairEncoder.from_file(str(tiny_encoder_bundle / "tokenizer.json"), 128)
    workload = build_workload(hh_data_dir, encoder, TextFormat(), limit=40)
    assert len(workload.items) == 40
    assert all(2 <= item.tokens <= 128 for item in workload.items)
    singles = workload.requests("single")
    assert [len(r.items) for r in singles] == [1] * 40
    groups = workload.requests("grpo8")
    assert len(groups) == 40 // GROUP_SIZE
    for group in groups:
        assert len(group.items) == GROUP_SIZE
        assert len({item.prompt for item in group.items}) == 1  # one prompt, 8 responses
    with pytest.raises(ValueError, match="unknown shape"):
        workload.requests("grpo9")


def test_targets_compare_the_right_runs() -> None:
    runs: list[dict[str, Any]] = [
        {"system": "onnxruntime-offline", "shape": "offline", "concurrency": None,
         "pairs_per_s": 100.0},
        {"system": "rmserve-fp32", "shape": "single", "concurrency": 64, "pairs_per_s": 95.0},
        {"system": "rmserve-fp32", "shape": "single", "concurrency": 16, "pairs_per_s": 60.0,
         "p50_ms": 100.0, "p99_ms": 400.0, "padding_ratio": 1.1},
        {"system": "naive-torch", "shape": "single", "concurrency": 16, "pairs_per_s": 30.0},
    ]  # fmt: skip
    targets = {t["target"]: t for t in check_targets(runs)}
    assert targets["rmserve-fp32 single c=64 / onnxruntime-offline >= 0.9"]["met"] is True
    assert targets["rmserve-fp32 / naive-torch, single c=16 >= 1.5"]["value"] == 2.0
    assert targets["rmserve-fp32 single c=16 p99/p50 <= 3"]["met"] is False
    assert targets["rmserve-fp32 single c=16 padding ratio <= 1.15"]["met"] is True
    assert not any("int8" in name for name in targets)  # no int8 run, no int8 target


def test_targets_use_the_median_of_side_by_side_rounds() -> None:
    runs: list[dict[str, Any]] = [
        {"system": "onnxruntime-offline", "shape": "offline", "concurrency": None,
         "pairs_per_s": 100.0},
        {"system": "rmserve-fp32", "shape": "single", "concurrency": 64, "pairs_per_s": 50.0},
    ]  # fmt: skip
    rounds = [{"concurrency": 64, "ratio": r} for r in (0.85, 0.95, 0.92)]
    targets = {t["target"]: t for t in check_targets(runs, rounds)}
    median = targets["rmserve-fp32 single c=64 / onnxruntime-offline, median of 3 rounds >= 0.9"]
    assert median["value"] == 0.92
    assert median["met"] is True
    # Without rounds, the one-shot ratio of the two runs.
    (alone,) = check_targets(runs)
    assert alone["value"] == 0.5


def test_offline_layouts_split_the_cores_on_cpu_only() -> None:
    assert layouts(2, "cpu") == [(1, 2), (2, 1)]
    assert layouts(8, "cpu") == [(1, 8), (2, 4), (4, 2), (8, 1)]
    assert layouts(6, "cpu") == [(1, 6), (2, 3)]
    assert layouts(1, "cpu") == [(1, 1)]
    assert layouts(16, "cuda") == [(1, 16)]
