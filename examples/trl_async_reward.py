"""Async rewards from an rmserve server in TRL's GRPOTrainer.

Start a server first (``rmserve serve BUNDLE``). Then:

    # Call the async reward function exactly as GRPOTrainer does (both of TRL's data formats),
    # on prompts from the HH data; needs only httpx.
    python examples/trl_async_reward.py --url http://127.0.0.1:8000

    # A short real GRPO run of a local causal LM against the server (needs trl + torch).
    python examples/trl_async_reward.py --url http://127.0.0.1:8000 --train \\
        --policy path/to/causal-lm --steps 2

    # Against an ensemble bundle (rmserve train --ensemble 4): optimise the conservative
    # reward mean - lambda * variance of the members (UWO, Coste et al. 2023), which resists
    # reward over-optimisation; the members' mean std is logged as rmserve_reward/reward_std.
    python examples/trl_async_reward.py --url http://127.0.0.1:8000 --train \\
        --policy path/to/causal-lm --aggregate uwo --uwo-lambda 0.5

The hook-up:

    import trl_async_reward  # this file, on the path
    trl_async_reward.configure("http://rm:8000")  # or set $RMSERVE_BASE_URL
    trainer = GRPOTrainer(model=..., reward_funcs=[trl_async_reward.rmserve_reward], ...)

How TRL runs it (``trl/trainer/grpo_trainer.py``, TRL 0.27 and later): when a reward function
is async, GRPOTrainer starts an event loop on a daemon thread; each step it awaits every async
reward function concurrently on that loop (``asyncio.gather``) while the sync ones run in
turn, each called as::

    func(prompts=prompts, completions=completions, completion_ids=completion_ids,
         **dataset_columns, trainer_state=..., log_extra=..., log_metric=...)

and logs its rewards under the function's name (``rewards/rmserve_reward/mean``). So the
HTTP round trip to the reward server overlaps with the other reward functions of the step.

Why a module-level ``async def`` rather than ``async_trl_reward_func(...)`` itself: TRL 1.14 and
later recognise the object as async (``trl.trainer.utils.is_async_callable`` looks at its
``__call__``) and take it as is, but TRL 0.27 to 1.13 test
``inspect.iscoroutinefunction(reward_func)``, which is False for any object, and would call
it synchronously and fail on the coroutine it returns. A plain ``async def`` is recognised by
every TRL version with async rewards, names the reward, and pickles by reference. With TRL >=
1.14 ``reward_funcs=[async_trl_reward_func("http://rm:8000")]`` works as well.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import sys
import tempfile
import threading
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

from rmserve.client import (
    Aggregate,
    AsyncTRLRewardFunction,
    RewardClient,
    RewardServerError,
    async_trl_reward_func,
)
from rmserve.formatting import parse_transcript, render

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared/data/hh-harmless/dev.jsonl.gz"
NAME = "rmserve_reward"  # what TRL logs: rewards/rmserve_reward/mean

_reward: AsyncTRLRewardFunction | None = None


def configure(
    url: str | None = None,
    *,
    api_key: str | None = None,
    normalize: bool = False,
    standard_format: Literal["pair", "concat"] = "pair",
    aggregate: Aggregate | None = None,
    uwo_lambda: float | None = None,
) -> AsyncTRLRewardFunction:
    """Set the server behind :func:`rmserve_reward` (``url=None``: ``$RMSERVE_BASE_URL``).

    ``standard_format`` says how string prompts are sent: ``"pair"`` for plain questions,
    ``"concat"`` for prompts already rendered in the reward model's text format (see
    docs/integrations.md). Conversational prompts are always sent as messages.
    ``aggregate`` ("mean", "min" or "uwo" with ``uwo_lambda``) is how an ensemble bundle's
    members become the reward (None: the server's RMSERVE_ENSEMBLE_AGGREGATE).
    """
    global _reward
    _reward = async_trl_reward_func(
        url,
        name=NAME,
        api_key=api_key,
        normalize=normalize,
        standard_format=standard_format,
        aggregate=aggregate,
        uwo_lambda=uwo_lambda,
    )
    return _reward


async def rmserve_reward(
    prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any
) -> list[float]:
    """GRPOTrainer's async reward function: one reward per completion, from rmserve.

    The client underneath belongs to the event loop that runs it (TRL's background loop) and
    reuses its connections from step to step; the fraction of responses cut to the model's
    ``max_length`` is logged through TRL's ``log_metric`` as ``rmserve_reward/truncated_fraction``.
    """
    reward = _reward if _reward is not None else configure()
    return await reward(prompts, completions, **kwargs)


async def aclose() -> None:
    """Close the connections of the running event loop (a later call reconnects)."""
    if _reward is not None:
        await _reward.aclose()


# -- call it as GRPOTrainer does --------------------------------------------------------------

T = TypeVar("T")


class BackgroundLoop:
    """An event loop on a daemon thread, where GRPOTrainer runs its async reward functions."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


def call_like_grpo(
    func: Any,
    loop: BackgroundLoop,
    prompts: list[Any],
    completions: list[Any],
    **columns: list[Any],
) -> tuple[list[float], dict[str, float]]:
    """One step's call of an async reward function, with the arguments GRPOTrainer passes:
    the dataset's other columns (one entry per completion), then trainer_state, log_extra and
    log_metric. Returns the rewards and what the function logged through log_metric."""
    metrics: dict[str, float] = {}

    async def run_async_funcs() -> list[list[float]]:
        # GRPOTrainer gathers all async reward functions of the step; here there is one.
        return list(
            await asyncio.gather(
                func(
                    prompts=prompts,
                    completions=completions,
                    completion_ids=[[0]] * len(completions),
                    **columns,
                    trainer_state=None,
                    log_extra=lambda column, values: None,
                    log_metric=metrics.__setitem__,
                )
            )
        )

    (rewards,) = loop.run(run_async_funcs())
    return [float(r) for r in rewards], metrics


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Use an rmserve reward server as an async TRL GRPO reward function.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="rmserve server URL")
    parser.add_argument(
        "--api-key", default=None, help="API key of the server (default: $RMSERVE_API_KEY)"
    )
    parser.add_argument(
        "--data", type=Path, default=DEFAULT_DATA, help="HH-format JSONL (.gz ok) for prompts"
    )
    parser.add_argument("--prompts", type=int, default=8, help="number of prompts to use")
    parser.add_argument(
        "--normalize", action="store_true", help="rewards on the bundle's reference scale"
    )
    parser.add_argument(
        "--aggregate",
        choices=["mean", "min", "uwo"],
        default=None,
        help="an ensemble's reward: members' mean, min (WCO) or uwo (default: the server's)",
    )
    parser.add_argument(
        "--uwo-lambda", type=float, default=None, help="variance weight of --aggregate uwo"
    )
    parser.add_argument("--train", action="store_true", help="run GRPOTrainer for --steps")
    parser.add_argument("--policy", default=None, help="local causal LM to train (--train)")
    parser.add_argument("--steps", type=int, default=2, help="GRPO steps (--train)")
    parser.add_argument("--generations", type=int, default=4, help="completions per prompt")
    parser.add_argument(
        "--max-completion-length", type=int, default=32, help="tokens per completion (--train)"
    )
    parser.add_argument(
        "--output-dir", default=None, help="trainer output folder (default: a temporary one)"
    )
    return parser.parse_args(argv)


def options(args: argparse.Namespace) -> dict[str, Any]:
    """The reward function's settings from the command line."""
    return {
        "api_key": args.api_key,
        "normalize": args.normalize,
        "aggregate": args.aggregate,
        "uwo_lambda": args.uwo_lambda,
    }


def load_conversations(path: Path, limit: int) -> list[list[dict[str, str]]]:
    """HH transcripts ending with an assistant turn, as chat messages."""
    if not path.is_file():
        sys.exit(f"no data at {path}; pass --data")
    opener = gzip.open if path.suffix == ".gz" else open
    conversations: list[list[dict[str, str]]] = []
    with opener(path, "rt") as f:
        for line in f:
            if len(conversations) >= limit:
                break
            try:
                messages = parse_transcript(json.loads(line)["chosen"])
            except ValueError:
                continue
            if len(messages) >= 2 and messages[-1].role == "assistant":
                conversations.append([{"role": m.role, "content": m.content} for m in messages])
    return conversations


def hh_prompt_text(conversation: list[dict[str, str]]) -> str:
    """The HH transcript up to and including the final "\n\nAssistant: " (for base models)."""
    return render([*conversation[:-1], {"role": "assistant", "content": ""}]).text


def demo(args: argparse.Namespace, conversations: list[list[dict[str, str]]]) -> None:
    """The reward function called as GRPOTrainer calls it, in both of TRL's formats."""
    g = args.generations
    replies = ["I can't help with that.", "Sure! Here is how.", "Let me think.", "No."]
    completions = [replies[i % len(replies)] for i in range(len(conversations) * g)]
    loop = BackgroundLoop()
    metrics: dict[str, float] = {}

    def show(label: str, rewards: list[float]) -> None:
        print(
            f"{label:<16}{len(rewards)} rewards; first group {[round(r, 3) for r in rewards[:g]]}"
        )

    try:
        # Conversational: prompts are message lists, completions one assistant message each.
        configure(args.url, **options(args))
        rewards, logged = call_like_grpo(
            rmserve_reward,
            loop,
            prompts=[c[:-1] for c in conversations for _ in range(g)],
            completions=[[{"role": "assistant", "content": c}] for c in completions],
        )
        metrics.update(logged)
        show("conversational", rewards)
        # Standard format with plain questions: sent as (prompt, response) pairs.
        questions = [c[-2]["content"] for c in conversations for _ in range(g)]
        rewards, _ = call_like_grpo(rmserve_reward, loop, questions, completions)
        show("standard/pair", rewards)
        # Standard format with prompts already in the model's text format: scored as text.
        loop.run(aclose())
        configure(args.url, **options(args), standard_format="concat")
        texts = [hh_prompt_text(c) for c in conversations for _ in range(g)]
        rewards, _ = call_like_grpo(rmserve_reward, loop, texts, completions)
        show("standard/concat", rewards)
        loop.run(aclose())
    finally:
        loop.close()
    print(f"logged metrics: {metrics}")


def train(args: argparse.Namespace, conversations: list[list[dict[str, str]]]) -> None:
    """A short GRPO run; TRL awaits the reward on its background event loop."""
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    if not args.policy:
        sys.exit("--train needs --policy, a local causal LM folder")
    tokenizer = AutoTokenizer.from_pretrained(args.policy)
    rows: list[dict[str, Any]]
    if tokenizer.chat_template:  # a chat model: TRL's conversational format
        rows = [{"prompt": c[:-1]} for c in conversations]
        configure(args.url, **options(args))
    else:  # a base model: the HH transcript text up to the assistant's turn
        rows = [{"prompt": hh_prompt_text(c)} for c in conversations]
        configure(args.url, **options(args), standard_format="concat")
    config = GRPOConfig(
        output_dir=args.output_dir or tempfile.mkdtemp(prefix="grpo-rmserve-async-"),
        max_steps=args.steps,
        per_device_train_batch_size=args.generations,
        num_generations=args.generations,
        max_completion_length=args.max_completion_length,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=not torch.cuda.is_available(),
        bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
    )
    trainer = GRPOTrainer(
        model=args.policy,
        reward_funcs=[rmserve_reward],
        args=config,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    trainer.train()
    key = f"rewards/{NAME}/mean"
    rewards = [row[key] for row in trainer.state.log_history if key in row]
    print(f"mean reward per step: {[round(r, 4) for r in rewards]}")
    cut = [row.get(f"{NAME}/truncated_fraction") for row in trainer.state.log_history if key in row]
    print(f"truncated fraction per step: {cut}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    conversations = load_conversations(args.data, args.prompts)
    try:
        with RewardClient(args.url, api_key=args.api_key) as client:
            print(f"reward model {client.models().model_name}")
        if args.train:
            train(args, conversations)
        else:
            demo(args, conversations)
    except RewardServerError as e:
        print(f"reward server error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
