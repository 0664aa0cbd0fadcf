"""Rewards from an rmserve server in TRL's GRPOTrainer.

Start a server first (``rmserve serve BUNDLE``). Then:

    # Call the reward function exactly as GRPOTrainer does (both of TRL's data formats),
    # on prompts from the HH data; needs only httpx.
    python examples/grpo_reward_func.py --url http://127.0.0.1:8000

    # A short real GRPO run of a local causal LM against the server (needs trl + torch).
    python examples/grpo_reward_func.py --url http://127.0.0.1:8000 --train \\
        --policy path/to/causal-lm --steps 2

The hook-up itself is two lines:

    from rmserve.client import trl_reward_func
    trainer = GRPOTrainer(model=..., reward_funcs=[trl_reward_func("http://rm:8000")], ...)
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from rmserve.client import RewardClient, RewardServerError, trl_reward_func
from rmserve.formatting import parse_transcript, render

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared/data/hh-harmless/dev.jsonl.gz"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Use an rmserve reward server as a TRL GRPO reward function.",
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
        "--normalize",
        action="store_true",
        help="ask for normalized rewards (bundle mean/std), handy next to other reward funcs",
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


def load_conversations(path: Path, limit: int) -> list[list[dict[str, str]]]:
    """The prompt turns (everything before the final assistant turn) of HH transcripts."""
    if not path.is_file():
        sys.exit(f"no data at {path}; pass --data")
    opener = gzip.open if path.suffix == ".gz" else open
    conversations = []
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


def call_like_grpo(args: argparse.Namespace, conversations: list[list[dict[str, str]]]) -> None:
    """Invoke the reward functions with the arguments GRPOTrainer passes (G per prompt)."""
    g = args.generations
    metrics: dict[str, float] = {}
    replies = ["I can't help with that.", "Sure! Here is how.", "Let me think.", "No."]
    completions = [replies[i % len(replies)] for i in range(len(conversations) * g)]

    def show(label: str, rewards: list[float]) -> None:
        print(
            f"{label:<16}{len(rewards)} rewards; first group {[round(r, 3) for r in rewards[:g]]}"
        )

    # Conversational format: prompts are message lists, completions one assistant message.
    reward = trl_reward_func(args.url, api_key=args.api_key, normalize=args.normalize)
    rewards = reward(
        prompts=[c[:-1] for c in conversations for _ in range(g)],
        completions=[[{"role": "assistant", "content": c}] for c in completions],
        completion_ids=[[0]] * len(completions),
        trainer_state=None,
        log_metric=lambda name, value: metrics.__setitem__(name, value),
    )
    show("conversational", rewards)
    # Standard format with plain questions: sent as (prompt, response) pairs.
    questions = [c[-2]["content"] for c in conversations for _ in range(g)]
    show("standard/pair", reward(prompts=questions, completions=completions))
    reward.close()
    # Standard format with prompts already in the model's text format: scored as text.
    rendered = trl_reward_func(args.url, api_key=args.api_key, standard_format="concat")
    texts = [hh_prompt_text(c) for c in conversations for _ in range(g)]
    show("standard/concat", rendered(prompts=texts, completions=completions))
    rendered.close()
    print(f"logged metrics: {metrics}")


def train(args: argparse.Namespace, conversations: list[list[dict[str, str]]]) -> None:
    """A short GRPO run; the reward comes from the server over HTTP."""
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    if not args.policy:
        sys.exit("--train needs --policy, a local causal LM folder")
    tokenizer = AutoTokenizer.from_pretrained(args.policy)
    standard_format: Literal["pair", "concat"] = "pair"  # for string prompts only
    rows: list[dict[str, Any]]
    if tokenizer.chat_template:  # a chat model: TRL's conversational format
        rows = [{"prompt": c[:-1]} for c in conversations]
    else:  # a base model: the HH transcript text up to the assistant's turn
        rows = [{"prompt": hh_prompt_text(c)} for c in conversations]
        standard_format = "concat"
    reward = trl_reward_func(
        args.url,
        api_key=args.api_key,
        normalize=args.normalize,
        standard_format=standard_format,
    )
    config = GRPOConfig(
        output_dir=args.output_dir or tempfile.mkdtemp(prefix="grpo-rmserve-"),
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
        reward_funcs=[reward],
        args=config,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    trainer.train()
    key = f"rewards/{reward.__name__}/mean"
    rewards = [row[key] for row in trainer.state.log_history if key in row]
    print(f"mean reward per step: {[round(r, 4) for r in rewards]}")
    reward.close()


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    conversations = load_conversations(args.data, args.prompts)
    try:
        with RewardClient(args.url, api_key=args.api_key) as client:
            print(f"reward model {client.models().model_name}")
        if args.train:
            train(args, conversations)
        else:
            call_like_grpo(args, conversations)
    except RewardServerError as e:
        print(f"reward server error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
