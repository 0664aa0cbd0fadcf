"""The examples run against the real service, as a user would run them (subprocesses)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = REPO_ROOT / "examples"


def run_example(*args: str, timeout: float = 120) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run(
        [sys.executable, *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_best_of_n_example_on_hh_pairs_and_on_given_candidates(
    service_url: str, hh_data_dir: Path
) -> None:
    out = run_example(
        str(EXAMPLES / "best_of_n.py"),
        "--url",
        service_url,
        "--data",
        str(hh_data_dir / "dev.jsonl.gz"),
        "--limit",
        "12",
    )
    assert "reward model tiny-encoder" in out
    match = re.search(r"picked the human-preferred response in (\d+)/(\d+) pairs", out)
    assert match, out
    assert int(match.group(2)) == 12
    out = run_example(
        str(EXAMPLES / "best_of_n.py"),
        "--url",
        service_url,
        "--prompt",
        "How do I keep basil alive?",
        "--candidate",
        "Water it and give it sun.",
        "--candidate",
        "Ignore it.",
    )
    lines = [line for line in out.splitlines() if line.startswith((" *", "  "))]
    assert len(lines) == 2
    assert sum(line.startswith(" *") for line in lines) == 1  # exactly one winner


def test_best_of_n_example_reports_an_unreachable_server(refused_url: str) -> None:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "best_of_n.py"), "--url", refused_url, "--limit", "1"],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "reward server error" in result.stderr


def test_grpo_example_calls_the_reward_function_as_grpo_does(
    service_url: str, hh_data_dir: Path
) -> None:
    out = run_example(
        str(EXAMPLES / "grpo_reward_func.py"),
        "--url",
        service_url,
        "--data",
        str(hh_data_dir / "dev.jsonl.gz"),
        "--prompts",
        "3",
        "--generations",
        "2",
    )
    for label in ("conversational", "standard/pair", "standard/concat"):
        assert re.search(rf"{re.escape(label)}\s+6 rewards", out), out
    assert "rmserve_reward/truncated_fraction" in out


@pytest.mark.slow
@pytest.mark.parametrize("script", ["grpo_reward_func.py", "trl_async_reward.py"])
def test_grpo_example_trains_a_tiny_policy_with_trl(
    script: str, service_url: str, hh_data_dir: Path, minilm_path: Path, tmp_path: Path
) -> None:
    """A real GRPOTrainer run (1 step) whose reward comes from the server over HTTP, with the
    sync reward function and with the async one that TRL awaits on its own event loop."""
    pytest.importorskip("trl")
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    tokenizer.eos_token = "[SEP]"
    config = Qwen2Config(
        vocab_size=tokenizer.vocab_size,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=32,
        max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.sep_token_id,
        bos_token_id=tokenizer.cls_token_id,
    )
    policy = tmp_path / "policy"
    Qwen2ForCausalLM(config).save_pretrained(policy)
    tokenizer.save_pretrained(policy)
    out = run_example(
        str(EXAMPLES / script),
        "--url",
        service_url,
        "--data",
        str(hh_data_dir / "dev.jsonl.gz"),
        "--train",
        "--policy",
        str(policy),
        "--steps",
        "1",
        "--prompts",
        "2",
        "--generations",
        "2",
        "--max-completion-length",
        "4",
        "--output-dir",
        str(tmp_path / "out"),
        timeout=400,
    )
    match = re.search(r"mean reward per step: \[(-?[\d.e+-]+)\]", out)
    assert match, out  # TRL logged rewards/rmserve_reward/mean for the one step
    assert float(match.group(1)) != 0.0
    if script == "trl_async_reward.py":  # the async function's log_metric reached TRL too
        assert re.search(r"truncated fraction per step: \[[\d.]+\]", out), out
