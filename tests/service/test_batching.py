"""Batch invariance under concurrent load: an item's score does not depend on its batch.

Each item is scored alone (one request at a time, so a batch of one), then all of them in
concurrent requests of mixed lengths and sizes that the batcher packs together; the scores
must agree to 1e-5 (fp32), and agree with a direct onnxruntime run of the bundle's model.
"""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import pytest

from rmserve.encoding import PairEncoder
from rmserve.formatting import messages_from_pair, render
from rmserve.manifest import load_bundle
from tests.service.conftest import RunningServer


def hh_items(examples: list[Any], count: int) -> list[dict[str, str]]:
    """(prompt, response) items of very different lengths from the real HH dev data."""
    items = []
    for example in examples[:count]:
        prompt = example.prompt[-1].content  # the last user turn
        for response in example.responses[:2]:
            items.append({"prompt": prompt, "response": response[:600]})
    return items


def score(client: httpx.Client, server: RunningServer, items: list[dict[str, str]]) -> list[float]:
    r = client.post(server.url + "/v1/score", json={"items": items, "truncate_response": True})
    assert r.status_code == 200, r.text
    return r.json()["scores"]  # type: ignore[no-any-return]


def direct_ort(bundle: Path, items: list[dict[str, str]]) -> list[float]:
    """The bundle's fp32 model run by onnxruntime on one item at a time, no server."""
    manifest = load_bundle(bundle)
    encoder = PairEncoder.from_file(str(bundle / "tokenizer.json"), manifest.max_length)
    session = ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    out = []
    for item in items:
        rendered = render(
            messages_from_pair(item["prompt"], item["response"]), manifest.text_format
        )
        ids = np.asarray([encoder.encode(rendered, truncate_response=True).ids], dtype=np.int64)
        (reward,) = session.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids)})
        out.append(float(np.asarray(reward).reshape(-1)[0]))
    return out


@pytest.mark.parametrize("which", ["encoder", "decoder"])
def test_scores_do_not_depend_on_the_batch(
    which: str,
    request: pytest.FixtureRequest,
    hh_dev_examples: list[Any],
    pooled_client: httpx.Client,
) -> None:
    server: RunningServer = request.getfixturevalue(f"{which}_server")
    bundle: Path = request.getfixturevalue(f"tiny_{which}_bundle")
    items = hh_items(hh_dev_examples, 40)
    lengths = {len(i["prompt"]) + len(i["response"]) for i in items}
    assert max(lengths) > 5 * min(lengths)  # really mixed lengths

    alone = [score(pooled_client, server, [item])[0] for item in items]

    batches_before = server.metric("rmserve_batch_size_count")
    items_before = server.metric("rmserve_batch_size_sum")
    # Concurrent requests of 1-4 items each, in shuffled order.
    rng = random.Random(0)
    order = list(range(len(items)))
    rng.shuffle(order)
    groups: list[list[int]] = []
    while order:
        take = rng.randint(1, 4)
        groups.append(order[:take])
        order = order[take:]
    with ThreadPoolExecutor(max_workers=24) as pool:
        results = list(
            pool.map(lambda g: score(pooled_client, server, [items[i] for i in g]), groups)
        )
    together = [0.0] * len(items)
    for group, scores in zip(groups, results, strict=True):
        for i, s in zip(group, scores, strict=True):
            together[i] = s
    batches = server.metric("rmserve_batch_size_count") - batches_before
    batched_items = server.metric("rmserve_batch_size_sum") - items_before
    # The concurrent requests really were packed into shared batches.
    assert batched_items == len(items)
    assert batches < len(groups)

    assert np.max(np.abs(np.array(alone) - np.array(together))) <= 1e-5
    direct = direct_ort(bundle, items)
    assert np.max(np.abs(np.array(alone) - np.array(direct))) <= 1e-5
