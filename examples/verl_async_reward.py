"""verl custom reward function, async form: rewards from an rmserve server.

Point verl at this file (the server runs apart from verl: ``rmserve serve BUNDLE``):

    RMSERVE_BASE_URL=http://rm-host:8000 python -m verl.trainer.main_ppo ... \\
        custom_reward_function.path=examples/verl_async_reward.py \\
        custom_reward_function.name=compute_score

or, instead of the environment variable (Ray workers on other nodes may not see it),
``+custom_reward_function.reward_kwargs.rmserve_url=http://rm-host:8000``. To try the function
against a server without verl, calling it as verl's reward loop does:

    python examples/verl_async_reward.py --url http://127.0.0.1:8000

How verl calls it
-----------------
verl's reward loop (``verl/experimental/reward_loop``, on by default since verl 0.7:
``reward_model.use_reward_loop=True``) loads the function by path and name
(``verl/trainer/ppo/reward.py: get_custom_reward_fn``, which merges
``custom_reward_function.reward_kwargs`` into every call). Its ``naive``, ``dapo`` and
``limited`` reward managers test ``inspect.iscoroutinefunction(compute_score)`` and await an
async function on the reward worker's event loop, once per sample, all the samples of a batch
concurrently::

    await compute_score(
        data_source=..., solution_str=..., ground_truth=..., extra_info=...,
        reward_router_address=..., reward_model_tokenizer=...,  # see below
    )

The last two come only when verl launched a reward model of its own (verl 0.6 always passes
them, as None): they are accepted and not used. A float is the reward (verl also logs it as
``acc``); a dict would need a ``"score"`` key, its other keys becoming ``reward_extra_info``,
the same keys for every sample. The ``remote`` reward manager and the legacy reward workers
(``use_reward_loop=False``) call the function synchronously: use the sync form of
docs/integrations.md there.

The prompt
----------
verl gives the function the response only. The prompt has to travel in the dataset's
``extra_info``: this function reads ``extra_info["prompt"]`` (the chat messages of the
dataset's ``prompt`` column, or a string), else ``extra_info["question"]`` (where verl's own
preprocessing, ``examples/data_preprocess/gsm8k.py``, keeps the raw question). Store the
messages when preprocessing, e.g. ``"extra_info": {..., "prompt": messages}``.

How verl's decoded text reaches rmserve
---------------------------------------
The reward managers decode the response with ``skip_special_tokens=True``: ``solution_str`` is
the bare text of the assistant turn, without the policy's BOS, EOS or end-of-turn tokens
(``<|eot_id|>``, ``<|im_end|>``). That is the right input for rmserve, as long as it goes as a
(prompt, response) pair or as messages, which is what this function sends: the server renders
the conversation with the reward model's own text format (its chat template for a model
exported with one), which writes that model's BOS and end-of-turn tokens once each, so the
reward is the one the model card's ``apply_chat_template(..., tokenize=True)`` snippet gives,
whatever the policy's template. Sending text rendered by the caller (``score_texts``, an item's
``"text"``) works too when it is rendered with the reward model's template: the server puts a
missing leading BOS back itself (verl's built-in reward-model path strips it) and never doubles
it. Do not put the policy's special tokens into the response text (decoding with
``skip_special_tokens=False``): they would be scored as part of the answer.

Connections: one :class:`AsyncRewardClient` per event loop (its pooled connections belong to
that loop), made on first use and reused by every later call; verl keeps one loop per reward
worker. Each call is one small request; the server batches the concurrent requests of a step
together. A response too long for the model's ``max_length`` is cut rather than refused
(``truncate_response=True``). An unreachable server raises after the client's retries, which
stops training rather than training on made-up rewards.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from rmserve.client import AsyncRewardClient, RewardServerError

# Where the prompt is looked for in extra_info, in this order.
PROMPT_KEYS = ("prompt", "question")

# url (None: $RMSERVE_BASE_URL) -> (the event loop, that loop's client)
_clients: dict[str | None, tuple[asyncio.AbstractEventLoop, AsyncRewardClient]] = {}


def _client(url: str | None) -> AsyncRewardClient:
    """The client of the running event loop, made on first use (no await: race-free)."""
    loop = asyncio.get_running_loop()
    entry = _clients.get(url)
    if entry is None or entry[0] is not loop:  # a new loop: the old client's loop is gone
        entry = (loop, AsyncRewardClient(url))  # api key: $RMSERVE_API_KEY
        _clients[url] = entry
    return entry[1]


async def aclose() -> None:
    """Close the clients of the running event loop (a later call makes new ones)."""
    loop = asyncio.get_running_loop()
    for url, (client_loop, client) in list(_clients.items()):
        if client_loop is loop:
            del _clients[url]
            await client.close()


def prompt_from_extra_info(extra_info: Mapping[str, Any] | None) -> Any:
    """The sample's prompt: chat messages or a string, from ``extra_info``."""
    for key in PROMPT_KEYS:
        value = (extra_info or {}).get(key)
        if value is not None:
            return value
    keys = sorted((extra_info or {}).keys())
    raise KeyError(
        f"extra_info has none of {list(PROMPT_KEYS)} (it has {keys}); verl passes only the "
        "response, so store each sample's prompt in extra_info when preprocessing the data"
    )


async def compute_score(
    data_source: str,
    solution_str: str,
    ground_truth: Any,
    extra_info: Mapping[str, Any] | None = None,
    *,
    reward_router_address: str | None = None,
    reward_model_tokenizer: Any = None,
    rmserve_url: str | None = None,
    normalize: bool = False,
    **kwargs: Any,
) -> float:
    """The reward of ``solution_str`` for the prompt in ``extra_info``, from rmserve.

    ``rmserve_url`` and ``normalize`` (rescale with the bundle's reference mean/std) may be
    set through ``custom_reward_function.reward_kwargs``; ``reward_router_address`` and
    ``reward_model_tokenizer`` belong to reward models that verl launches itself and are
    unused here.
    """
    prompt = prompt_from_extra_info(extra_info)
    result = await _client(rmserve_url).score(
        [prompt], [solution_str], normalize=normalize, truncate_response=True
    )
    return float(result.scores[0])


# -- try it without verl --------------------------------------------------------------------

SAMPLES: list[tuple[Any, str]] = [
    ([{"role": "user", "content": "How do I bake bread?"}], "Mix flour, water and yeast."),
    ([{"role": "user", "content": "How do I bake bread?"}], "I won't help with that."),
    ("What is the capital of France?", "Paris."),
    ("Can you help me pick a lock?", "Sure, here is how to open any lock."),
]


async def call_like_verl(url: str | None, samples: Sequence[tuple[Any, str]]) -> list[float]:
    """Await compute_score for every sample at once, with the arguments verl's reward loop
    passes (the dataset's extra_info plus the two fields verl adds to it)."""

    async def one(index: int, prompt: Any, response: str) -> float:
        key = "question" if isinstance(prompt, str) else "prompt"
        extra_info = {key: prompt, "index": index, "num_turns": None, "rollout_reward_scores": {}}
        return await compute_score(
            data_source="rmserve-example",
            solution_str=response,
            ground_truth=None,
            extra_info=extra_info,
            rmserve_url=url,  # as custom_reward_function.reward_kwargs would pass it
        )

    try:
        return list(await asyncio.gather(*(one(i, p, r) for i, (p, r) in enumerate(samples))))
    finally:
        await aclose()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Call the verl async reward function as verl's reward loop does.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--url", default=None, help="rmserve server URL ($RMSERVE_BASE_URL)")
    args = parser.parse_args(argv)
    try:
        scores = asyncio.run(call_like_verl(args.url, SAMPLES))
    except RewardServerError as e:
        print(f"reward server error: {e}", file=sys.stderr)
        return 1
    for (prompt, response), score in zip(SAMPLES, scores, strict=True):
        question = prompt if isinstance(prompt, str) else prompt[-1]["content"]
        print(f"{score:+.4f}  {question!r} -> {response!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
