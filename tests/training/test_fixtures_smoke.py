"""The MiniLM bundle fixture that the service tests use is a valid, well-formed bundle."""

from __future__ import annotations

from pathlib import Path

import pytest

from rmserve.manifest import load_bundle


@pytest.mark.slow
def test_minilm_bundle(minilm_bundle: Path) -> None:
    manifest = load_bundle(minilm_bundle)
    assert set(manifest.variants) == {"fp32", "int8"}
    assert manifest.architecture.model_type == "bert"
    assert manifest.max_length == 256
    assert manifest.variants["fp32"].parity["max_abs_diff"] <= 1e-4
    assert manifest.evaluation is not None
    assert manifest.evaluation.n == 64
    assert (minilm_bundle / "model.onnx").stat().st_size > 50_000_000  # the real weights
