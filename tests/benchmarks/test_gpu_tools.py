"""The GPU run's helpers that work without a GPU: the fatbin cut and the results merge."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from benchmarks.device_carry import FATBIN_MAGIC, keep_only_arch
from benchmarks.merge import merge


def _entry(kind: int, arch: int, payload: bytes) -> bytes:
    header = bytearray(64)
    struct.pack_into("<HHI", header, 0, kind, 0x101, len(header))
    struct.pack_into("<Q", header, 8, len(payload))
    struct.pack_into("<I", header, 28, arch)
    return bytes(header) + payload


def test_keep_only_arch_zeroes_other_gpus_and_keeps_headers() -> None:
    entries = _entry(2, 80, b"A" * 100) + _entry(2, 90, b"H" * 50) + _entry(1, 80, b"P" * 10)
    fatbin = FATBIN_MAGIC + struct.pack("<HHQ", 1, 16, len(entries)) + entries
    library = b"\x7fELF-prefix" + fatbin + b"suffix"
    cut, zeroed = keep_only_arch(library, 90)
    assert zeroed == 100  # the sm_80 SASS only: not sm_90, not the PTX entry (kind 1)
    assert len(cut) == len(library)
    assert b"A" not in cut
    assert b"H" * 50 in cut
    assert b"P" * 10 in cut
    assert cut.count(FATBIN_MAGIC) == 1


def test_merge_adds_the_ceiling_and_parity(tmp_path: Path) -> None:
    machine = {"cpu_model": "x", "cores": 16, "memory_gib": 1.0, "load_average": [0.1],
               "onnxruntime": "1.31.1", "torch": "2.11", "date": "today"}  # fmt: skip
    served = tmp_path / "served"
    served.mkdir()
    (served / "results.json").write_text(json.dumps({
        "runs": [{"system": "rmserve-fp16", "shape": "grpo8", "concurrency": 64,
                  "pairs_per_s": 500.0, "p50_ms": 10.0, "p95_ms": 20.0, "p99_ms": 30.0,
                  "errors": 0}],
        "machine": machine, "config": {"command": "python -m benchmarks.run", "mean_tokens": 100},
    }))  # fmt: skip
    (served / "limit.json").write_text(json.dumps({
        "tokens_per_sequence": 100,
        "best_fp16": {"dtype": "fp16", "batch": 64, "tokens_per_s": 100000, "pairs_per_s": 1000},
    }))  # fmt: skip
    (served / "parity.json").write_text(json.dumps(
        {"pairs": 8, "max_abs_diff": 0.01, "pairwise_agreement": 1.0, "reward_std_fp32": 0.5}
    ))  # fmt: skip
    out = tmp_path / "merged"
    merge(out, [served])
    table = (out / "results.md").read_text()
    assert "| rmserve-fp16 | grpo8 | 64 | 50,000 | 50.0% |" in table  # 500 pairs x 100 tokens
    assert "pairwise agreement 100.0%" in table
    assert json.loads((out / "results.json").read_text())["limit"]["best_fp16"]["batch"] == 64
    assert (out / "throughput.png").is_file()
