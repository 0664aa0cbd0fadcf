"""Shared-prompt reuse (issue 16): the same scores with and without it, through the server.

Two real servers on loopback over the same decoder bundle, one with ``prefix_reuse`` (the
default) and one without, answer the same requests built from the real HH dev data: a GRPO
group (one prompt, many responses), a group larger than a batch, prompts long enough to be cut
from the left, and rank requests. Mixed batches (groups and lone items in one model batch) are
made deterministic by driving the batcher directly. The encoder bundle has no packed graph and
is served exactly as before.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from rmserve.manifest import load_bundle
from rmserve.service.batcher import Batcher
from rmserve.service.loading import load_model
from rmserve.service.runtime import ModelRuntime
from rmserve.training.data import PreferenceExample
from tests.service.conftest import RunningServer, serve_app, settings_for

TOLERANCE = 1e-5  # fp32; the bound is 1e-4


@pytest.fixture(scope="module")
def servers(tiny_decoder_bundle: Path) -> Iterator[tuple[RunningServer, RunningServer]]:
    common: dict[str, Any] = {"max_wait_ms": 20.0, "max_batch_size": 8}
    with (
        serve_app(settings_for(tiny_decoder_bundle, **common)) as reuse,
        serve_app(settings_for(tiny_decoder_bundle, prefix_reuse=False, **common)) as whole,
    ):
        yield reuse, whole


def _post(server: RunningServer, path: str, body: dict[str, Any]) -> dict[str, Any]:
    r = httpx.post(server.url + path, json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def _group(examples: list[PreferenceExample], size: int, prompt_repeat: int = 1) -> dict[str, Any]:
    """One prompt (the first dev example's last user turn, repeated to lengthen it) and
    ``size`` responses of different lengths from the dev data."""
    prompt = " ".join([examples[0].prompt[-1].content] * prompt_repeat)
    responses = [r[:300] for e in examples[: size // 2 + 1] for r in e.responses][:size]
    return {"prompt": prompt, "responses": responses}


def test_both_servers_load_the_graph_their_setting_asks_for(
    servers: tuple[RunningServer, RunningServer],
) -> None:
    reuse, whole = servers
    assert reuse.state.model.runtime.info.prefix_reuse
    assert reuse.state.model.runtime.info.file == "model.packed.onnx"
    assert not whole.state.model.runtime.info.prefix_reuse
    assert whole.state.model.runtime.info.file == "model.onnx"


def test_a_grpo_group_scores_the_same_with_its_prompt_computed_once(
    servers: tuple[RunningServer, RunningServer], hh_dev_examples: list[PreferenceExample]
) -> None:
    reuse, whole = servers
    group = _group(hh_dev_examples, 8, prompt_repeat=3)
    items = [{"prompt": group["prompt"], "response": r} for r in group["responses"]]
    shared_before = reuse.metric("rmserve_shared_prefix_tokens_total")
    got = _post(reuse, "/v1/score", {"items": items})
    expected = _post(whole, "/v1/score", {"items": items})
    np.testing.assert_allclose(got["scores"], expected["scores"], atol=TOLERANCE, rtol=0)
    assert reuse.metric("rmserve_shared_prefix_tokens_total") > shared_before
    assert whole.metric("rmserve_shared_prefix_tokens_total") == 0


def test_a_group_larger_than_a_batch_and_rank_requests_agree(
    servers: tuple[RunningServer, RunningServer], hh_dev_examples: list[PreferenceExample]
) -> None:
    reuse, whole = servers
    group = _group(hh_dev_examples, 19, prompt_repeat=2)  # batches of 8: 8 + 8 + 3 at least
    items = [{"prompt": group["prompt"], "response": r} for r in group["responses"]]
    got = _post(reuse, "/v1/score", {"items": items})["scores"]
    expected = _post(whole, "/v1/score", {"items": items})["scores"]
    np.testing.assert_allclose(got, expected, atol=TOLERANCE, rtol=0)
    ranked = _post(reuse, "/v1/rank", group)
    ranked_whole = _post(whole, "/v1/rank", group)
    np.testing.assert_allclose(ranked["scores"], ranked_whole["scores"], atol=TOLERANCE, rtol=0)
    order = [entry["index"] for entry in ranked["ranking"]]
    assert order == [entry["index"] for entry in ranked_whole["ranking"]]


def test_prompts_cut_from_the_left_still_score_as_whole_items(
    servers: tuple[RunningServer, RunningServer], hh_dev_examples: list[PreferenceExample]
) -> None:
    # max_length is 128: a prompt of ~20 copies of a turn is cut, and by a different number
    # of tokens for each response length, so the group's items no longer share a prefix.
    reuse, whole = servers
    group = _group(hh_dev_examples, 6, prompt_repeat=20)
    items = [{"prompt": group["prompt"], "response": r[:120]} for r in group["responses"]]
    got = _post(reuse, "/v1/score", {"items": items})
    expected = _post(whole, "/v1/score", {"items": items})
    assert all(got["truncated"])
    np.testing.assert_allclose(got["scores"], expected["scores"], atol=TOLERANCE, rtol=0)


def _dev_sequences(bundle: Path, examples: list[PreferenceExample]) -> list[np.ndarray]:
    """Token ids of a mixed batch: a group of 5 responses to one prompt, the two responses
    of each of 3 other prompts, and 3 lone items, interleaved."""
    from rmserve.service.tokenization import ItemInput

    settings = settings_for(bundle)
    model = load_model(settings)
    try:
        group = _group(examples, 5, prompt_repeat=4)
        items = [ItemInput(prompt=group["prompt"], response=r[:60]) for r in group["responses"]]
        for example in examples[5:8]:
            prompt = example.prompt[-1].content
            items += [ItemInput(prompt=prompt, response=r[:200]) for r in example.responses]
        items += [ItemInput(prompt=e.prompt[-1].content, response="ok") for e in examples[9:12]]
        encoded = model.tokenizer.encode_sync(items[::2] + items[1::2], truncate_response=True)
        return [np.asarray(ids, dtype=np.int64) for ids in encoded.ids]
    finally:
        model.close()


@pytest.mark.anyio
async def test_mixed_groups_and_lone_items_in_one_batch(
    tiny_decoder_bundle: Path, hh_dev_examples: list[PreferenceExample]
) -> None:
    sequences = _dev_sequences(tiny_decoder_bundle, hh_dev_examples)
    manifest = load_bundle(tiny_decoder_bundle)
    packed = ModelRuntime(tiny_decoder_bundle, manifest, provider="cpu", instances=1)
    plain = ModelRuntime(
        tiny_decoder_bundle, manifest, provider="cpu", instances=1, prefix_reuse=False
    )
    assert packed.packed
    assert not plain.packed
    seen: list[Any] = []

    def run(batch_sequences: list[np.ndarray]) -> Any:
        scores, batch = packed.run_sequences(batch_sequences)
        seen.append(batch)
        return scores, batch

    batcher = Batcher(
        functools.partial(packed.run, instance=0),
        packed=[run],
        pad_token_id=manifest.pad_token_id,
        max_batch_size=len(sequences),  # one full batch: every item at once
        max_batch_tokens=10**6,
        max_wait_s=60.0,
        max_queue_items=1000,
        max_padding_ratio=100.0,
    )
    batcher.start()
    try:
        # Concurrent requests: single items and a multi-item one, queued in one tick.
        singles = [batcher.submit([s]) for s in sequences[:-4]]
        results = await asyncio.gather(*singles, batcher.submit(sequences[-4:]))
    finally:
        await batcher.close()
    got = np.concatenate([r.scores for r in results])
    assert len(seen) == 1  # one model batch held them all
    (batch,) = seen
    assert batch.shared_tokens > 0
    assert batch.input_ids.shape[0] < len(sequences)  # some items shared rows
    assert (batch.reward_positions.shape[1]) > 1
    expected = np.concatenate(
        [plain.run(s[None, :], np.ones((1, s.size), np.int64)) for s in sequences]
    )
    np.testing.assert_allclose(got, expected[:, 0], atol=TOLERANCE, rtol=0)


def test_a_packed_runtime_answers_padded_batches_too(tiny_decoder_bundle: Path) -> None:
    # Warm-up and any caller of run() give padded batches: scored as lone rows.
    manifest = load_bundle(tiny_decoder_bundle)
    packed = ModelRuntime(tiny_decoder_bundle, manifest, provider="cpu", instances=1)
    plain = ModelRuntime(
        tiny_decoder_bundle, manifest, provider="cpu", instances=1, prefix_reuse=False
    )
    rng = np.random.default_rng(0)
    ids = rng.integers(5, 200, size=(3, 20)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, 12:] = 0
    ids[1, 12:] = manifest.pad_token_id
    np.testing.assert_allclose(packed.run(ids, mask), plain.run(ids, mask), atol=TOLERANCE)


def test_bundles_without_a_packed_graph_serve_as_before(
    tiny_encoder_bundle: Path, tiny_decoder_bundle: Path
) -> None:
    encoder = ModelRuntime(tiny_encoder_bundle, load_bundle(tiny_encoder_bundle), provider="cpu")
    assert not encoder.packed
    assert encoder.info.file == "model.onnx"
    manifest = load_bundle(tiny_decoder_bundle)
    int8 = ModelRuntime(tiny_decoder_bundle, manifest, provider="cpu", precision="int8")
    assert not int8.packed
    assert int8.info.file == "model.int8.onnx"
