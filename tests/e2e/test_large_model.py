"""A reward model past ONNX's 2 GB protobuf limit: exported, hashed, served and matched once.

The model zoo's large Llama-3 decoder holds 557 M parameters (2.23e9 bytes in fp32, most of
them a tiled embedding, so its forward pass stays cheap). ``rmserve export`` must write its
weights as ONNX external data inside the bundle (one ``model.onnx.data``), hash that file in
the manifest, and the server must refuse the bundle when the file is damaged and otherwise
score conversations as transformers does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from rmserve.cli import main
from rmserve.manifest import BundleError, load_bundle
from tests import model_zoo
from tests.client.client_servers import start_service

pytestmark = pytest.mark.slow

CONVERSATION = [
    {"role": "user", "content": "How do I bake bread?"},
    {"role": "assistant", "content": "Mix flour, water, salt and yeast; knead; bake."},
]


def _transformers_reward(path: Path) -> float:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer: Any = AutoTokenizer.from_pretrained(path)
    model: Any = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32)
    inputs = tokenizer.apply_chat_template(
        CONVERSATION, tokenize=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        return float(model.eval()(**inputs).logits[0][0])


def test_a_model_past_2gb_exports_serves_and_matches(tmp_path: Path) -> None:
    checkpoint = model_zoo.build_large_decoder(tmp_path / "checkpoint")
    bundle = tmp_path / "bundle"
    assert main(["export", str(checkpoint), "--out", str(bundle), "--max-length", "256"]) == 0

    manifest = load_bundle(bundle)  # checks every hash, the data file's included
    data = bundle / "model.onnx.data"
    assert data.stat().st_size > 2**31
    assert (bundle / "model.onnx").stat().st_size < 2**20  # the graph alone
    # The packed graph (shared-prompt reuse) reads the same weights: stored once.
    assert (bundle / "model.packed.onnx").stat().st_size < 2**20
    assert data.stat().st_size < 2.4e9  # 2.23e9 bytes of fp32 weights, not twice that
    assert sorted(manifest.files) == ["model.onnx.data", "model.packed.onnx"]
    assert sorted(p.name for p in bundle.iterdir()) == [
        "model.onnx",
        "model.onnx.data",
        "model.packed.onnx",
        "rmserve.json",
        "tokenizer.json",
    ]
    assert manifest.variants["fp32"].parity["text_path_max_abs_diff"] <= 1e-4

    expected = _transformers_reward(checkpoint)
    service = start_service(bundle, model_instances=1, log_level="warning")
    try:
        answer = httpx.post(
            service.url + "/v1/score", json={"items": [{"messages": CONVERSATION}]}, timeout=60
        )
    finally:
        service.stop()
    assert answer.status_code == 200, answer.text
    assert abs(answer.json()["scores"][0] - expected) <= 1e-4

    # One flipped byte deep in the weights: the bundle is refused before any port opens.
    with open(data, "r+b") as f:
        f.seek(2**31)
        byte = f.read(1)
        f.seek(2**31)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(BundleError, match=r"model\.onnx\.data does not match its sha256"):
        load_bundle(bundle)
