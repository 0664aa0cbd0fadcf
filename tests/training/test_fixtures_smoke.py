"""The shared bundle fixtures load and carry the promised variants."""

from __future__ import annotations

from pathlib import Path

import pytest

from rmserve.manifest import load_bundle


@pytest.mark.parametrize("name", ["tiny_encoder_bundle", "tiny_decoder_bundle", "minilm_bundle"])
def test_tiny_bundles_load(name: str, request: pytest.FixtureRequest) -> None:
    bundle: Path = request.getfixturevalue(name)
    manifest = load_bundle(bundle)
    assert set(manifest.variants) == {"fp32", "int8"}
    assert manifest.variants["fp32"].parity["max_abs_diff"] <= 1e-4
    assert 0.0 <= manifest.variants["int8"].parity["pairwise_agreement"] <= 1.0
    assert manifest.evaluation is not None
    assert manifest.evaluation.n in (100, 64)
