"""The service over a real MiniLM (BERT) bundle: every scoring route and batch invariance."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.service.conftest import RunningServer, serve_app, settings_for
from tests.service.test_batching import direct_ort, hh_items, score

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def minilm_server(minilm_bundle: Path) -> Iterator[RunningServer]:
    with serve_app(settings_for(minilm_bundle, max_wait_ms=20.0)) as running:
        yield running


def test_minilm_batch_invariance_and_direct_parity(
    minilm_server: RunningServer,
    minilm_bundle: Path,
    hh_dev_examples: list[Any],
    pooled_client: httpx.Client,
) -> None:
    items = hh_items(hh_dev_examples, 12)
    alone = [score(pooled_client, minilm_server, [item])[0] for item in items]
    with ThreadPoolExecutor(max_workers=12) as pool:
        together = list(
            pool.map(lambda item: score(pooled_client, minilm_server, [item])[0], items)
        )
    whole = score(pooled_client, minilm_server, items)
    assert np.max(np.abs(np.array(alone) - np.array(together))) <= 1e-5
    assert np.max(np.abs(np.array(alone) - np.array(whole))) <= 1e-5
    assert np.max(np.abs(np.array(alone) - np.array(direct_ort(minilm_bundle, items)))) <= 1e-5


def test_minilm_every_scoring_route(minilm_server: RunningServer) -> None:
    url = minilm_server.url
    prompt = "How can I keep my houseplants alive?"
    good, bad = "Water them when the soil is dry and give them light.", "Ignore them."
    scores = httpx.post(
        url + "/v1/score",
        json={"items": [{"prompt": prompt, "response": good}, {"prompt": prompt, "response": bad}]},
    ).json()["scores"]
    rank = httpx.post(url + "/v1/rank", json={"prompt": prompt, "responses": [good, bad]}).json()
    assert [e["index"] for e in rank["ranking"]] == list(np.argsort(-np.array(scores)))
    compare = httpx.post(url + "/v1/compare", json={"prompt": prompt, "a": good, "b": bad}).json()
    assert compare["scores"] == pytest.approx(scores, abs=1e-5)
    text = f"\n\nHuman: {prompt}\n\nAssistant: {good}"
    reward = httpx.post(url + "/get_reward", json={"query": [text]}).json()["rewards"][0]
    probs = httpx.post(url + "/classify", json={"input": text, "use_activation": False}).json()
    assert reward == pytest.approx(scores[0], abs=1e-5)
    assert probs["data"][0]["probs"][0] == pytest.approx(scores[0], abs=1e-5)
