"""Provider and precision choice, and the int8 variant on CPU."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from rmserve.manifest import load_bundle
from rmserve.service.runtime import (
    ModelRuntime,
    RuntimeConfigError,
    choose_batch_size,
    choose_instances,
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


def test_instance_layout_choice() -> None:
    # auto on CPU: two instances sharing the cores; one where there is one core
    assert choose_instances(0, 0, "cpu", 2) == (2, 1)
    assert choose_instances(0, 0, "cpu", 16) == (2, 8)
    assert choose_instances(0, 0, "cpu", 1) == (1, 1)
    assert choose_instances(1, 0, "cpu", 8) == (1, 8)
    assert choose_instances(4, 0, "cpu", 6) == (4, 1)
    assert choose_instances(0, 3, "cpu", 8) == (2, 3)  # threads as asked
    # auto on CUDA: one instance, ORT's default threads
    assert choose_instances(0, 0, "cuda", 16) == (1, 0)
    with pytest.raises(RuntimeConfigError, match=">= 0"):
        choose_instances(-1, 0, "cpu", 2)


def test_batch_size_choice() -> None:
    assert choose_batch_size(0, "cpu", 4096) == 8
    assert choose_batch_size(0, "cuda", 4096) == 64
    assert choose_batch_size(0, "cuda", 16) == 16  # never more than the queue holds
    assert choose_batch_size(32, "cpu", 4096) == 32


def test_every_instance_gives_the_same_rewards(tiny_encoder_bundle: Path) -> None:
    import numpy as np

    manifest = load_bundle(tiny_encoder_bundle)
    runtime = ModelRuntime(
        tiny_encoder_bundle, manifest, precision="fp32", provider="cpu", instances=3
    )
    assert runtime.instances == 3
    assert runtime.info.instances == 3
    assert runtime.info.intra_op_threads >= 1
    rng = np.random.default_rng(0)
    ids = rng.integers(5, 90, size=(4, 12)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, 7:] = 0
    first = runtime.run(ids, mask, 0)
    for instance in (1, 2):
        np.testing.assert_array_equal(runtime.run(ids, mask, instance), first)
    assert runtime.warm_up(4) > 0


def test_runtime_rewards_have_one_row_per_item_and_one_column_per_head(
    tiny_decoder_bundle: Path,
) -> None:
    import numpy as np

    manifest = load_bundle(tiny_decoder_bundle)
    runtime = ModelRuntime(tiny_decoder_bundle, manifest, precision="fp32", provider="cpu")
    ids = np.full((3, 5), manifest.pad_token_id, dtype=np.int64)
    ids[:, :2] = 7
    mask = np.zeros_like(ids)
    mask[:, :2] = 1
    rewards = runtime.run(ids, mask)
    assert rewards.shape == (3, 1)  # (B, K): one head
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
