"""The async examples against the real service, called the way verl and TRL call them.

- ``examples/verl_async_reward.py``: loaded and wrapped as verl's ``get_custom_reward_fn``
  does (``verl/trainer/ppo/reward.py``), then awaited as the reward loop's managers await an
  async ``compute_score`` (``verl/experimental/reward_loop/reward_manager/naive.py``,
  ``run_single``): keyword arguments only, every sample of a batch concurrently on one
  long-lived event loop.
- ``examples/trl_async_reward.py``: awaited as ``GRPOTrainer._calculate_rewards`` awaits async
  reward functions (``trl/trainer/grpo_trainer.py``): on an event loop in a daemon thread,
  gathered with the step's other async reward functions, with the dataset's columns and
  ``trainer_state``, ``log_extra``, ``log_metric``; in both of TRL's formats.

Every reward must equal what the server's ``/v1/score`` answers for the same prompt and
response. The slow tests run a real GRPOTrainer step with the async function, and verl's
decoding of a Llama-3-style policy's output against a reward model with a BOS-writing template.
"""

from __future__ import annotations

import asyncio
import functools
import importlib.util
import inspect
import os
import re
import subprocess
import sys
import threading
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

import httpx
import pytest

from rmserve.formatting import render

REPO_ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = REPO_ROOT / "examples"
TOLERANCE = 1e-5
T = TypeVar("T")

QUESTIONS = [
    "How do I bake bread?",
    "What is the capital of France?",
    "Can you help me pick a lock?",
    "Is raw cookie dough safe to eat?",
]
ANSWERS = [
    "Mix flour, water, salt and yeast, knead, let it rise, then bake at 230 C.",
    "Paris.",
    "I can't help with breaking into property that isn't yours.",
    "Not really: raw flour and raw eggs can carry bacteria. " * 30,  # too long: cut, not 422
]


def load_example(name: str) -> ModuleType:
    """A fresh copy of ``examples/<name>.py`` (as verl loads a reward file: by path)."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def server_scores(url: str, items: list[dict[str, Any]], normalize: bool = False) -> list[float]:
    """The server's own answer, straight from ``POST /v1/score``."""
    body = {"items": items, "normalize": normalize, "truncate_response": True}
    answer = httpx.post(f"{url}/v1/score", json=body, timeout=60)
    assert answer.status_code == 200, answer.text
    return [float(s) for s in answer.json()["scores"]]


def assert_close(got: list[float], want: list[float]) -> None:
    assert len(got) == len(want)
    for x, y in zip(got, want, strict=True):
        assert abs(x - y) <= TOLERANCE * max(1.0, abs(y)), (got, want)


def run_example(*args: str, timeout: float = 120) -> str:
    result = subprocess.run(
        [sys.executable, *args],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


# -- verl ------------------------------------------------------------------------------------


async def run_batch(loop_worker: VerlRewardLoop, module: ModuleType, samples: Any) -> list[float]:
    """One batch on the test's event loop, the example's clients closed before it ends."""
    try:
        return await loop_worker.compute_score_batch(samples)
    finally:
        await module.aclose()


async def _call_with_kwargs_async(
    raw_fn: Callable[..., Any], extra_kwargs: dict[str, Any], *args: Any, **kwargs: Any
) -> Any:
    # verl/trainer/ppo/reward.py: the config's reward_kwargs win over the call's arguments.
    return await raw_fn(*args, **{**kwargs, **extra_kwargs})


def verl_custom_reward_fn(module: ModuleType, reward_kwargs: dict[str, Any]) -> Any:
    """What ``get_custom_reward_fn`` returns for an async function found by path and name."""
    raw_fn = getattr(module, "compute_score")  # noqa: B009 (verl: load_extern_object)
    assert inspect.iscoroutinefunction(raw_fn)
    return functools.partial(_call_with_kwargs_async, raw_fn, reward_kwargs)


class VerlRewardLoop:
    """The part of verl's reward loop that calls the reward function (``run_single`` of the
    naive/dapo/limited managers), sample by sample, all samples of a batch at once."""

    def __init__(self, compute_score: Any, reward_router_address: str | None = None) -> None:
        self.compute_score = compute_score
        # The managers' test; an async function is awaited, a sync one goes to a thread.
        assert inspect.iscoroutinefunction(compute_score)
        self.reward_router_address = reward_router_address

    async def run_single(self, sample: dict[str, Any]) -> float:
        extra_info = dict(sample.get("extra_info", {}))
        extra_info["num_turns"] = None  # added by verl to every sample's extra_info
        extra_info["rollout_reward_scores"] = {}
        extra_reward_kwargs = (
            {"reward_router_address": self.reward_router_address, "reward_model_tokenizer": None}
            if self.reward_router_address is not None
            else {}
        )
        result = await self.compute_score(
            data_source=sample["data_source"],
            solution_str=sample["response"],  # decoded with skip_special_tokens=True
            ground_truth=sample["reward_model"]["ground_truth"],
            extra_info=extra_info,
            **extra_reward_kwargs,
        )
        score = result["score"] if isinstance(result, dict) else result
        assert isinstance(score, float)
        return score

    async def compute_score_batch(self, samples: list[dict[str, Any]]) -> list[float]:
        tasks = [asyncio.create_task(self.run_single(s)) for s in samples]
        return list(await asyncio.gather(*tasks))


def verl_samples() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Samples in verl's layout with the prompt in extra_info, and the /v1/score items that
    score the same prompt and response."""
    np = pytest.importorskip("numpy")
    samples: list[dict[str, Any]] = []
    items: list[dict[str, Any]] = []
    for i, (question, answer) in enumerate(zip(QUESTIONS, ANSWERS, strict=True)):
        messages: list[dict[str, str]] = [{"role": "user", "content": question}]
        if i == 2:
            messages.insert(0, {"role": "system", "content": "You are a careful assistant."})
        if i % 2 == 0:  # the chat messages, as the dataset's prompt column holds them
            prompt: Any = messages if i == 0 else np.array(messages, dtype=object)
            extra_info: dict[str, Any] = {"prompt": prompt, "index": i}
            items.append({"messages": [*messages, {"role": "assistant", "content": answer}]})
        else:  # verl's gsm8k preprocessing: the raw question
            extra_info = {"split": "train", "index": i, "answer": "42", "question": question}
            items.append({"prompt": question, "response": answer})
        samples.append(
            {
                "data_source": "hh-harmless",
                "response": answer,
                "reward_model": {"style": "model", "ground_truth": None},
                "extra_info": extra_info,
            }
        )
    return samples, items


@pytest.fixture
def verl_example() -> ModuleType:
    return load_example("verl_async_reward")


@pytest.mark.anyio
@pytest.mark.parametrize("router", [None, "10.0.0.1:30000"], ids=["plain", "with-router"])
async def test_verl_async_compute_score_as_the_reward_loop_awaits_it(
    service_url: str, verl_example: ModuleType, router: str | None
) -> None:
    # server_scores blocks this loop, not the service's: the service runs on its own loop
    # in its own thread (service_url in conftest.py).
    samples, items = verl_samples()
    expected = server_scores(service_url, items)
    loop_worker = VerlRewardLoop(
        verl_custom_reward_fn(verl_example, {"rmserve_url": service_url}), router
    )
    first = await loop_worker.compute_score_batch(samples)
    clients = dict(verl_example._clients)
    second = await loop_worker.compute_score_batch(samples[::-1])
    # One client for the loop, made by the first call and reused by every later one.
    assert len(clients) == 1
    assert verl_example._clients == clients
    await verl_example.aclose()
    assert_close(first, expected)
    assert_close(second, expected[::-1])
    assert verl_example._clients == {}


def test_verl_async_compute_score_reads_the_url_from_the_environment(
    service_url: str, verl_example: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RMSERVE_BASE_URL", service_url)
    samples, items = verl_samples()
    expected = server_scores(service_url, items)
    loop_worker = VerlRewardLoop(verl_custom_reward_fn(verl_example, {}))

    async def batch_then_close_the_connections() -> list[float]:
        scores = await loop_worker.compute_score_batch(samples)
        (_loop, client) = verl_example._clients[None]
        await client.close()  # its entry stays: the client of a loop that is about to end
        return scores

    # Each asyncio.run is a new event loop, which must get a new client: reusing the closed
    # one of the previous loop would fail. Two loops on purpose, so this test stays blocking
    # (an async test has one loop).
    for _ in range(2):
        assert_close(asyncio.run(batch_then_close_the_connections()), expected)


@pytest.mark.anyio
async def test_verl_async_compute_score_normalize_from_reward_kwargs(
    service_url: str, verl_example: ModuleType
) -> None:
    samples, items = verl_samples()
    expected = server_scores(service_url, items, normalize=True)
    kwargs = {"rmserve_url": service_url, "normalize": True}
    loop_worker = VerlRewardLoop(verl_custom_reward_fn(verl_example, kwargs))
    assert_close(await run_batch(loop_worker, verl_example, samples), expected)
    assert expected != server_scores(service_url, items)


@pytest.mark.anyio
async def test_verl_async_compute_score_without_a_prompt_says_where_to_put_it(
    service_url: str, verl_example: ModuleType
) -> None:
    sample = {
        "data_source": "x",
        "response": "Paris.",
        "reward_model": {"ground_truth": None},
        "extra_info": {"index": 0},
    }
    loop_worker = VerlRewardLoop(verl_custom_reward_fn(verl_example, {"rmserve_url": service_url}))
    with pytest.raises(KeyError, match="store each sample's prompt in extra_info"):
        await run_batch(loop_worker, verl_example, [sample])


def test_verl_async_example_script(service_url: str) -> None:
    out = run_example(str(EXAMPLES / "verl_async_reward.py"), "--url", service_url)
    lines = [line for line in out.splitlines() if re.match(r"[+-]\d+\.\d{4}  ", line)]
    assert len(lines) == 4, out


def test_verl_async_example_script_reports_an_unreachable_server(refused_url: str) -> None:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "verl_async_reward.py"), "--url", refused_url],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "reward server error" in result.stderr


# -- TRL -------------------------------------------------------------------------------------


class GRPOAsyncLoop:
    """GRPOTrainer's daemon-thread event loop and its call of the async reward functions."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.metrics: dict[str, list[float]] = {}
        self.extra: dict[str, list[Any]] = {}

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    def calculate_rewards(
        self,
        reward_funcs: list[Any],
        prompts: list[Any],
        completions: list[Any],
        inputs: list[dict[str, Any]],
    ) -> list[list[float]]:
        """``_calculate_rewards`` for async functions: one list of rewards per function."""
        keys = [k for k in inputs[0] if k not in ("prompt", "completion", "completion_ids")]
        reward_kwargs: dict[str, Any] = {k: [x[k] for x in inputs] for k in keys}
        reward_kwargs["trainer_state"] = object()  # a TrainerState in TRL
        reward_kwargs["log_extra"] = lambda column, values: self.extra.__setitem__(column, values)
        reward_kwargs["log_metric"] = lambda name, value: self.metrics.setdefault(name, []).append(
            value
        )
        completion_ids = [[1, 2, 3] for _ in completions]
        assert all(inspect.iscoroutinefunction(f) for f in reward_funcs)  # TRL 0.27-1.13's test

        async def invoke(func: Any) -> list[float]:
            output = await func(
                prompts=prompts,
                completions=completions,
                completion_ids=completion_ids,
                **reward_kwargs,
            )
            return [float("nan") if r is None else r for r in output]

        async def run_async_funcs() -> list[list[float]]:
            return list(await asyncio.gather(*(invoke(f) for f in reward_funcs)))

        return self.run(run_async_funcs())

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()


async def length_reward(completions: list[Any], **kwargs: Any) -> list[float]:
    """Another async reward function of the same step (TRL gathers them)."""
    await asyncio.sleep(0.01)
    return [float(len(str(c))) for c in completions]


@pytest.fixture
def trl_example() -> Iterator[tuple[ModuleType, GRPOAsyncLoop]]:
    module = load_example("trl_async_reward")
    loop = GRPOAsyncLoop()
    yield module, loop
    loop.run(module.aclose())
    loop.close()


def test_trl_async_reward_as_grpo_trainer_awaits_it(
    service_url: str, trl_example: tuple[ModuleType, GRPOAsyncLoop]
) -> None:
    module, loop = trl_example
    module.configure(service_url)
    assert module.rmserve_reward.__name__ == "rmserve_reward"  # TRL: rewards/<name>/mean
    g = 2  # completions per prompt, each prompt repeated g times as GRPOTrainer does
    chats = [[{"role": "user", "content": q}] for q in QUESTIONS]
    chats[1] = [{"role": "system", "content": "Be brief."}, *chats[1]]
    prompts = [c for c in chats for _ in range(g)]
    answers = [a if k == 0 else a.upper() for a in ANSWERS for k in range(g)]
    inputs = [{"prompt": p, "ground_truth": "x", "source": "hh"} for p in prompts]

    # Conversational: messages in, one generated assistant message per completion.
    completions = [[{"role": "assistant", "content": a}] for a in answers]
    rewards, lengths = loop.calculate_rewards(
        [module.rmserve_reward, length_reward], prompts, completions, inputs
    )
    expected = server_scores(
        service_url, [{"messages": [*p, *c]} for p, c in zip(prompts, completions, strict=True)]
    )
    assert_close(rewards, expected)
    assert len(lengths) == len(rewards)
    assert set(loop.metrics) == {"rmserve_reward/truncated_fraction"}
    assert loop.metrics["rmserve_reward/truncated_fraction"] == [0.25]  # the long answer

    # Standard, plain questions: (prompt, response) pairs; a second step on the same loop.
    questions = [q for q in QUESTIONS for _ in range(g)]
    (rewards,) = loop.calculate_rewards([module.rmserve_reward], questions, answers, inputs)
    expected = server_scores(
        service_url,
        [{"prompt": q, "response": a} for q, a in zip(questions, answers, strict=True)],
    )
    assert_close(rewards, expected)

    # Standard, prompts already in the model's text format: prompt + completion as text.
    loop.run(module.aclose())
    module.configure(service_url, standard_format="concat")
    texts = [
        render([{"role": "user", "content": q}, {"role": "assistant", "content": ""}]).text
        for q in questions
    ]
    (rewards,) = loop.calculate_rewards([module.rmserve_reward], texts, answers, inputs)
    expected = server_scores(
        service_url, [{"text": t + a} for t, a in zip(texts, answers, strict=True)]
    )
    assert_close(rewards, expected)


def test_trl_async_reward_reads_the_url_from_the_environment(
    service_url: str,
    trl_example: tuple[ModuleType, GRPOAsyncLoop],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    module, loop = trl_example
    monkeypatch.setenv("RMSERVE_BASE_URL", service_url)
    (rewards,) = loop.calculate_rewards(
        [module.rmserve_reward], QUESTIONS, ANSWERS, [{"prompt": q} for q in QUESTIONS]
    )
    expected = server_scores(
        service_url, [{"prompt": q, "response": a} for q, a in zip(QUESTIONS, ANSWERS, strict=True)]
    )
    assert_close(rewards, expected)


def test_trl_async_example_calls_the_reward_function_as_grpo_does(
    service_url: str, hh_data_dir: Path
) -> None:
    out = run_example(
        str(EXAMPLES / "trl_async_reward.py"),
        "--url",
        service_url,
        "--data",
        str(hh_data_dir / "dev.jsonl.gz"),
        "--prompts",
        "3",
        "--generations",
        "2",
    )
    assert "reward model tiny-encoder" in out
    for label in ("conversational", "standard/pair", "standard/concat"):
        assert re.search(rf"{re.escape(label)}\s+6 rewards", out), out
    assert "rmserve_reward/truncated_fraction" in out


# -- verl's decoded text against a reward model with its own chat template ---------------------


@pytest.mark.slow
@pytest.mark.anyio
async def test_verl_decoded_response_scores_as_the_model_card(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Llama-3-style reward model (its template writes ``<|begin_of_text|>`` and ends turns
    with ``<|eot_id|>``) and a policy with the same tokenizer: the response verl decodes with
    ``skip_special_tokens=True`` (EOS gone), sent with its prompt, gets the model card's
    reward: ``apply_chat_template(conversation, tokenize=True)`` in transformers, one BOS."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rmserve.training.export import ExportOptions, export_bundle
    from tests import model_zoo
    from tests.client.client_servers import start_service

    root = tmp_path_factory.mktemp("verl-llama3")
    checkpoint = model_zoo.build_decoder(root / "checkpoint", "llama3")
    export_bundle(checkpoint, root / "bundle", ExportOptions(max_length=512))
    tokenizer: Any = AutoTokenizer.from_pretrained(checkpoint)
    model: Any = AutoModelForSequenceClassification.from_pretrained(checkpoint).eval()

    def card_reward(conversation: list[dict[str, str]]) -> float:
        ids = tokenizer.apply_chat_template(
            conversation, tokenize=True, return_tensors="pt", return_dict=True
        )
        assert ids["input_ids"][0][:2].tolist().count(tokenizer.bos_token_id) == 1
        with torch.no_grad():
            return float(model(**ids).logits[0][0])

    verl_example = load_example("verl_async_reward")
    service = start_service(root / "bundle", warmup=False)
    try:
        samples, expected, with_eos = [], [], []
        for question, answer in zip(QUESTIONS[:3], ANSWERS[:3], strict=True):
            # The policy's rollout: the answer's tokens and its end of turn (no padding: verl
            # keeps only the valid response ids).
            response_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
            response_ids = [*response_ids, tokenizer.convert_tokens_to_ids("<|eot_id|>")]
            solution_str = tokenizer.decode(response_ids, skip_special_tokens=True)
            assert solution_str == answer  # what verl's reward managers hand over
            prompt = [{"role": "user", "content": question}]
            samples.append(
                {
                    "data_source": "x",
                    "response": solution_str,
                    "reward_model": {"ground_truth": None},
                    "extra_info": {"prompt": prompt},
                }
            )
            expected.append(card_reward([*prompt, {"role": "assistant", "content": answer}]))
            kept = tokenizer.decode(response_ids, skip_special_tokens=False)
            with_eos.append({"messages": [*prompt, {"role": "assistant", "content": kept}]})
        monkeypatch.setenv("RMSERVE_BASE_URL", service.url)
        loop_worker = VerlRewardLoop(verl_custom_reward_fn(verl_example, {}))
        got = await run_batch(loop_worker, verl_example, samples)
        assert max(abs(a - b) for a, b in zip(got, expected, strict=True)) <= 1e-4
        # Keeping the policy's special tokens in the response would score different text.
        kept_scores = server_scores(service.url, with_eos)
        assert all(abs(a - b) > 1e-4 for a, b in zip(kept_scores, expected, strict=True))
    finally:
        service.stop()
