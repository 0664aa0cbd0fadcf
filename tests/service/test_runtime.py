"""Provider and precision choice, and the int8 variant on CPU."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from rmserve.manifest import load_bundle
from rmserve.service.runtime import (
    ModelRuntime,
    RuntimeConfigError,
    choose_precision,
    choose_provider,
)
from tests.service.conftest import serve_app, settings_for

CPU = ["CPUExecutionProvider"]
GPU = ["CUDAExecutionProvider", "CPUExecutionProvider"]


def test_provider_choice() -> None:
    assert choose_provider("auto", CPU) == "cpu"
    assert choose_provider("auto", GPU) == "cuda"
    assert choose_provider("cpu", GPU) == "cpu"
    with pytest.raises(RuntimeConfigError, match="onnxruntime-gpu"):
        choose_provider("cuda", CPU)


def test_precision_choice(tiny_encoder_bundle: Path) -> None:
    manifest = load_bundle(tiny_encoder_bundle)  # fp32 + int8
    assert choose_precision("auto", "cpu", manifest) == "fp32"
    assert choose_precision("auto", "cuda", manifest) == "fp32"  # no fp16 variant here
    assert choose_precision("int8", "cpu", manifest) == "int8"
    with pytest.raises(RuntimeConfigError, match="CPU only"):
        choose_precision("int8", "cuda", manifest)
    with pytest.raises(RuntimeConfigError, match="has only"):
        choose_precision("fp16", "cuda", manifest)


def test_runtime_rewards_have_one_value_per_row(tiny_decoder_bundle: Path) -> None:
    import numpy as np

    manifest = load_bundle(tiny_decoder_bundle)
    runtime = ModelRuntime(tiny_decoder_bundle, manifest, precision="fp32", provider="cpu")
    ids = np.full((3, 5), manifest.pad_token_id, dtype=np.int64)
    ids[:, :2] = 7
    mask = np.zeros_like(ids)
    mask[:, :2] = 1
    rewards = runtime.run(ids, mask)
    assert rewards.shape == (3,)
    assert rewards.dtype == np.float32
    assert runtime.warm_up(4) > 0


def test_int8_variant_serves_and_is_reported(tiny_encoder_bundle: Path) -> None:
    with serve_app(settings_for(tiny_encoder_bundle, precision="int8")) as server:
        card = httpx.get(server.url + "/v1/models").json()["data"][0]
        assert card["precision"] == "int8"
        assert 'precision="int8"' in httpx.get(server.url + "/metrics").text
        body = {"items": [{"prompt": "Hi", "response": "Hello."}]}
        r = httpx.post(server.url + "/v1/score", json=body)
        assert r.status_code == 200
