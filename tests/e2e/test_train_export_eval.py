"""The whole training flow through the CLI: train -> export -> eval, checkpoint vs bundle."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from rmserve.cli import main
from rmserve.manifest import load_bundle


def _last_json(capsys: pytest.CaptureFixture[str]) -> dict[str, object]:
    out = capsys.readouterr().out.strip().splitlines()
    return json.loads(out[-1])  # type: ignore[no-any-return]


@pytest.mark.slow
def test_train_export_eval(
    tiny_decoder_checkpoint: Path,
    hh_data_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    dev = tmp_path / "dev50.jsonl"
    with gzip.open(hh_data_dir / "dev.jsonl.gz", "rt") as f:
        dev.write_text("".join(line for _, line in zip(range(50), f, strict=False)))
    checkpoint = tmp_path / "checkpoint"
    bundle = tmp_path / "bundle"

    train = ["train", "--base", str(tiny_decoder_checkpoint), "--out", str(checkpoint)]
    train += ["--data", str(hh_data_dir / "train.jsonl.gz"), "--eval-data", str(dev)]
    train += ["--skip-malformed", "--limit", "64", "--max-steps", "6", "--batch-size", "8"]
    train += ["--lr", "3e-3", "--eval-steps", "3", "--cpu", "--no-progress", "--freeze-layers", "0"]
    assert main(train) == 0
    trained = _last_json(capsys)
    assert trained["steps"] == 6
    assert trained["eval_n"] == 50

    assert main(["export", str(checkpoint), "--out", str(bundle), "--eval-data", str(dev)]) == 0
    exported = _last_json(capsys)
    assert exported["variants"]["fp32"]["max_abs_diff"] <= 1e-4  # type: ignore[index]
    manifest = load_bundle(bundle)
    assert manifest.normalization.reference.startswith("training responses")
    assert manifest.evaluation is not None
    assert manifest.evaluation.n == 50

    results = []
    for model in (checkpoint, bundle):
        assert main(["eval", str(model), "--data", str(dev)]) == 0
        results.append(_last_json(capsys))
    from_checkpoint, from_bundle = results
    # Same ids and fp32 parity: the same margins and (barring exact near-ties) decisions.
    assert from_bundle["mean_margin"] == pytest.approx(from_checkpoint["mean_margin"], abs=1e-4)
    assert from_bundle["accuracy"] == pytest.approx(from_checkpoint["accuracy"], abs=1 / 50)
    assert from_bundle["accuracy"] == pytest.approx(manifest.evaluation.accuracy)
    assert trained["eval_accuracy"] == pytest.approx(from_checkpoint["accuracy"], abs=1 / 50)
