"""Longer runs: MiniLM on the real data, reproducibility, two processes under torchrun."""

from __future__ import annotations

import gzip
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


def _dev_slice(hh_data_dir: Path, path: Path, lines: int) -> Path:
    with gzip.open(hh_data_dir / "dev.jsonl.gz", "rt") as f:
        path.write_text("".join(line for _, line in zip(range(lines), f, strict=False)))
    return path


@pytest.mark.slow
def test_short_minilm_run_on_real_data(hh_data_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rmserve.training.config import RewardConfig
    from rmserve.training.train import train_reward_model

    out = tmp_path / "minilm"
    config = RewardConfig(
        output_dir=str(out),
        max_length=48,
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=3e-4,
        freeze_embeddings=True,
        freeze_layers=2,
        center_rewards_coefficient=0.01,
        logging_steps=1,
        use_cpu=True,
        disable_tqdm=True,
        normalization_samples=16,
    )
    result = train_reward_model(
        str(hh_data_dir / "train.jsonl.gz"),
        out,
        config,
        base="minilm",
        eval_data=str(_dev_slice(hh_data_dir, tmp_path / "dev10.jsonl", 10)),
        skip_malformed=True,
        limit=16,
    )
    assert len(result.losses) == 3
    assert all(0.0 < loss < 5.0 for loss in result.losses)
    assert result.evaluation is not None
    assert result.evaluation.n == 10
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.num_labels == 1
    assert model.config.model_type == "bert"
    assert AutoTokenizer.from_pretrained(out).is_fast


def _seeded_run(base: Path, data: Path, out: Path, seed: int, extra: list[str]) -> list[float]:
    """`rmserve train` flags, parsed and run in this process; the logged losses."""
    from rmserve.training.commands import build_train_parser, resolve_recipe
    from rmserve.training.train import train_reward_model

    argv = ["--base", str(base), "--data", str(data), "--out", str(out), "--seed", str(seed)]
    argv += ["--logging-steps", "1", "--cpu", "--no-progress", "--normalization-samples", "8"]
    recipe = resolve_recipe(build_train_parser().parse_args([*argv, *extra]), has_eval=False)
    result = train_reward_model(str(data), out, recipe.config, base=recipe.base, limit=32)
    return result.losses


def _same_weights(a: Path, b: Path) -> bool:
    import torch
    from safetensors.torch import load_file

    first, second = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize(
    "base",
    [
        "tiny_encoder",  # dropout and data order follow the seed
        "tiny_decoder",
        pytest.param("minilm", marks=pytest.mark.slow),  # a fresh reward head, too
    ],
)
def test_same_seed_same_weights(
    base: str, request: pytest.FixtureRequest, hh_data_dir: Path, tmp_path: Path
) -> None:
    """Same command, same seed: bit-identical weights and losses; another seed: other ones.
    MiniLM's checkpoint has no 1-output head, so its head is initialised at random: before
    the seed was set first, two runs differed from the first step."""
    path: Path = request.getfixturevalue(
        "minilm_path" if base == "minilm" else f"{base}_checkpoint"
    )
    data = hh_data_dir / "train.jsonl.gz"
    extra = ["--max-steps", "2", "--max-length", "64", "--batch-size", "8"]
    first = _seeded_run(path, data, tmp_path / "a", 42, extra)
    again = _seeded_run(path, data, tmp_path / "b", 42, extra)
    other = _seeded_run(path, data, tmp_path / "c", 7, extra)
    assert len(first) == 2
    assert first == again
    assert _same_weights(tmp_path / "a", tmp_path / "b")
    assert not _same_weights(tmp_path / "a", tmp_path / "c")
    assert first != other


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_two_process_run_with_torchrun(
    tiny_decoder_checkpoint: Path, hh_data_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "ddp"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        "-m",
        "rmserve.cli",
        "train",
        "--base",
        str(tiny_decoder_checkpoint),
        "--data",
        str(hh_data_dir / "train.jsonl.gz"),
        "--eval-data",
        str(_dev_slice(hh_data_dir, tmp_path / "dev16.jsonl", 16)),
        "--limit",
        "32",
        "--max-steps",
        "3",
        "--batch-size",
        "4",
        "--max-length",
        "64",
        "--lr",
        "1e-3",
        "--eval-steps",
        "2",
        "--out",
        str(out),
        "--cpu",
        "--no-progress",
        "--no-freeze-embeddings",
        "--freeze-layers",
        "0",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    done = subprocess.run(
        command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "processes: 2" in done.stderr
    summaries = [line for line in done.stdout.splitlines() if line.startswith('{"out"')]
    assert len(summaries) == 1  # only rank 0 writes and reports
    summary = json.loads(summaries[0])
    assert summary["steps"] == 3
    assert summary["eval_n"] == 16
    from rmserve.training.export import export_bundle

    manifest = export_bundle(out, tmp_path / "bundle")
    assert manifest.architecture.kind == "decoder"
