"""The whole harness on a tiny bundle for a few seconds: real servers on loopback, real load,
real files out. Checks the outputs' structure and that every request was answered, never the
timings (those belong to the benchmark itself, not to pass/fail)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.run import main

RUN_KEYS = {"system", "shape", "concurrency", "pairs_per_s", "p50_ms", "p95_ms", "p99_ms", "errors"}


@pytest.mark.slow
def test_harness_writes_results_for_every_system(
    tmp_path: Path, tiny_encoder_bundle: Path, tiny_encoder_checkpoint: Path, hh_data_dir: Path
) -> None:
    out = tmp_path / "results"
    code = main(
        [
            "--bundle", str(tiny_encoder_bundle), "--checkpoint", str(tiny_encoder_checkpoint),
            "--data", str(hh_data_dir), "--out", str(out), "--concurrency", "1,4",
            "--grpo-concurrency", "2", "--duration", "1.5", "--warmup", "0.5", "--limit", "48",
            "--threads", "1", "--rounds", "1",
        ]
    )  # fmt: skip
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    runs = results["runs"]
    expected = {
        (system, shape, c)
        for system in ("rmserve-fp32", "rmserve-int8", "naive-torch")
        for shape, c in (("single", 1), ("single", 4), ("grpo8", 2))
    } | {("onnxruntime-offline", "offline", None)}
    assert {(r["system"], r["shape"], r["concurrency"]) for r in runs} == expected
    for run in runs:
        assert run.keys() >= RUN_KEYS
        assert run["errors"] == 0, run.get("error_samples")
        assert run["pairs_per_s"] > 0
        if run["shape"] != "offline":
            assert run["pairs"] > 0
            assert run["p50_ms"] <= run["p95_ms"] <= run["p99_ms"]
        if run["shape"] == "grpo8":
            assert run["pairs"] % 8 == 0
        if run["system"].startswith("rmserve"):
            # read from the server's /metrics: every batch held at least one item
            assert run["mean_batch_size"] >= 1
            assert run["padding_ratio"] >= 1
    # One side-by-side round: an offline pass, then rmserve-fp32 at the highest concurrency.
    (round_,) = results["side_by_side"]
    assert round_["concurrency"] == 4
    assert round_["errors"] == 0
    assert round_["offline_pairs_per_s"] > 0
    assert round_["rmserve_pairs_per_s"] > 0
    for key in ("cpu_model", "cores", "memory_gib", "onnxruntime", "torch", "date"):
        assert key in results["machine"]
    table = (out / "results.md").read_text()
    assert table.count("| rmserve-int8 |") == 3
    assert "onnxruntime-offline" in table
    assert "## Side by side" in table
    assert (out / "throughput.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_bundle_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="no bundle at"):
        main(["--bundle", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")])


def test_unknown_system_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path), "--systems", "rmserve-fp64"])
