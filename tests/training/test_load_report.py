"""Training's backbone load: a new reward head is one line, not transformers' load report table,
and any other weight that did not load keeps the whole report."""

from __future__ import annotations

import contextlib
import logging
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from rmserve.training.modeling import load_reward_model

REPO = Path(__file__).resolve().parents[2]
NEW_HEAD = "reward head {} newly initialised (expected for a new reward model)"


class _ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.NOTSET)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def _shown(name: str) -> Iterator[list[str]]:
    """What logger ``name`` hands its handlers (at INFO and up) during the block. A handler on
    the logger itself: transformers' loggers do not propagate to the root, and `rmserve train`
    stops rmserve.training's from propagating (log_to_stderr)."""
    log = logging.getLogger(name)
    handler, level = _ListHandler(), log.level
    log.addHandler(handler)
    log.setLevel(min(level or logging.INFO, logging.INFO))
    try:
        yield handler.messages
    finally:
        log.removeHandler(handler)
        log.setLevel(level)


@contextlib.contextmanager
def _load_logs() -> Iterator[tuple[list[str], list[str]]]:
    """(transformers' load reports shown, rmserve's modeling lines) during the block."""
    with (
        _shown("transformers.modeling_utils") as shown,
        _shown("rmserve.training.modeling") as ours,
    ):
        reports: list[str] = []
        yield reports, ours
        reports += [m for m in shown if "LOAD REPORT" in m]


def _without(checkpoint: Path, folder: Path, *names: str) -> Path:
    """A copy of ``checkpoint`` whose safetensors lack the weights ``names``."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(checkpoint, folder)
    weights = load_file(folder / "model.safetensors")
    for name in names:
        del weights[name]
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def test_a_backbone_without_a_head_says_one_line(minilm_path: Path) -> None:
    with _load_logs() as (reports, ours):
        load_reward_model(str(minilm_path))
    assert reports == []
    assert ours == [NEW_HEAD.format("classifier.{weight,bias}")]


def test_a_decoder_without_its_score_head_says_one_line(
    tiny_decoder_checkpoint: Path, tmp_path: Path
) -> None:
    backbone = _without(tiny_decoder_checkpoint, tmp_path / "backbone", "score.weight")
    with _load_logs() as (reports, ours):
        load_reward_model(str(backbone))
    assert reports == []
    assert ours == [NEW_HEAD.format("score.weight")]


def test_a_checkpoint_with_its_head_says_nothing(tiny_encoder_checkpoint: Path) -> None:
    with _load_logs() as (reports, ours):
        load_reward_model(str(tiny_encoder_checkpoint))
    assert (reports, ours) == ([], [])


def test_a_head_resized_for_an_ensemble_says_one_line(tiny_encoder_checkpoint: Path) -> None:
    with _load_logs() as (reports, ours):
        model = load_reward_model(str(tiny_encoder_checkpoint), num_labels=3)
    assert model.config.num_labels == 3
    assert reports == []
    assert ours == [NEW_HEAD.format("classifier.{weight,bias}")]


def test_another_missing_weight_keeps_the_whole_report(
    tiny_encoder_checkpoint: Path, tmp_path: Path
) -> None:
    pooler = "bert.pooler.dense.weight"
    broken = _without(
        tiny_encoder_checkpoint, tmp_path / "broken", pooler, "classifier.weight", "classifier.bias"
    )
    with _load_logs() as (reports, ours):
        load_reward_model(str(broken))
    assert len(reports) == 1
    assert "MISSING" in reports[0]
    assert pooler in reports[0]
    assert "classifier.weight" in reports[0]
    assert ours == []


def test_a_load_that_fails_still_shows_its_report(tiny_encoder_checkpoint: Path) -> None:
    # A head of another size without ignore_mismatched_sizes: transformers logs the report,
    # then raises; the report must not be swallowed with the exception.
    with _load_logs() as (reports, ours), pytest.raises(RuntimeError, match="mismatched"):
        load_reward_model(str(tiny_encoder_checkpoint), num_labels=2, ignore_mismatched_sizes=False)
    assert len(reports) == 1
    assert "MISMATCH" in reports[0]
    assert ours == []


def test_rmserve_train_stderr_has_the_line_not_the_table(minilm_path: Path) -> None:
    """What a user sees: `rmserve train`'s logging set-up, transformers' own handlers."""
    code = (
        "from rmserve.training.commands import log_to_stderr\n"
        "from rmserve.training.modeling import load_reward_model\n"
        "log_to_stderr('rmserve train')\n"
        f"load_reward_model({str(minilm_path)!r})\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert "LOAD REPORT" not in result.stderr
    assert "MISSING" not in result.stderr
    line = "rmserve train: " + NEW_HEAD.format("classifier.{weight,bias}")
    assert line in result.stderr.splitlines()
