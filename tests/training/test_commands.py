"""The train / eval / export command lines: help, JSON output, reports, errors."""

from __future__ import annotations

import argparse
import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest

from rmserve.cli import main
from rmserve.training import commands

EVAL_KEYS = {"accuracy", "n", "mean_margin", "shorter_wins_accuracy"}


def _training_parsers() -> dict[str, argparse.ArgumentParser]:
    parser = argparse.ArgumentParser()
    subparsers = parser.add_subparsers()
    commands.register(subparsers)
    return dict(subparsers.choices)


def test_every_flag_has_help() -> None:
    parsers = _training_parsers()
    assert set(parsers) == {"train", "eval", "export"}
    for name, parser in parsers.items():
        for action in parser._actions:
            assert action.help, f"rmserve {name} {action.option_strings or action.dest}"
    flags = {s for a in parsers["train"]._actions for s in a.option_strings}
    required = {"--data", "--eval-data", "--base", "--out", "--epochs", "--max-steps"}
    required |= {"--max-length", "--lr", "--batch-size", "--skip-malformed", "--seed"}
    assert required <= flags


def test_importing_the_commands_imports_no_heavy_dependency() -> None:
    code = (
        "import sys, rmserve.training.commands as c, argparse\n"
        "p = argparse.ArgumentParser(); c.register(p.add_subparsers())\n"
        "heavy = {'torch', 'transformers', 'onnxruntime', 'numpy'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def _dev_slice(hh_data_dir: Path, path: Path, lines: int = 30) -> Path:
    with gzip.open(hh_data_dir / "dev.jsonl.gz", "rt") as f:
        path.write_text("".join(line for _, line in zip(range(lines), f, strict=False)))
    return path


def test_eval_prints_json_for_checkpoint_and_bundle(
    tiny_encoder_checkpoint: Path,
    tiny_encoder_bundle: Path,
    hh_data_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    data = _dev_slice(hh_data_dir, tmp_path / "dev30.jsonl")
    results = {}
    for model in (tiny_encoder_checkpoint, tiny_encoder_bundle):
        assert main(["eval", str(model), "--data", str(data)]) == 0
        line = capsys.readouterr().out.strip().splitlines()[-1]
        results[model] = json.loads(line)
        assert results[model].keys() >= EVAL_KEYS
        assert results[model]["n"] == 30
    checkpoint, bundle = results[tiny_encoder_checkpoint], results[tiny_encoder_bundle]
    assert (checkpoint["kind"], bundle["kind"]) == ("checkpoint", "bundle")
    # fp32 parity: the same rewards, so the same margin (to ~1e-4) on the same pairs.
    assert bundle["mean_margin"] == pytest.approx(checkpoint["mean_margin"], abs=1e-4)
    assert bundle["shorter_wins_accuracy"] == checkpoint["shorter_wins_accuracy"]


def test_eval_report(
    tiny_decoder_bundle: Path, hh_data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report = tmp_path / "report"
    data = str(hh_data_dir / "dev.jsonl.gz")
    argv = ["eval", str(tiny_decoder_bundle), "--data", data, "--skip-malformed"]
    code = main([*argv, "--limit", "60", "--precision", "int8", "--report", str(report)])
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["precision"] == "int8"
    text = (report / "report.md").read_text()
    for png in ("rewards.png", "accuracy_by_length.png", "calibration.png"):
        assert (report / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"({png})" in text
    assert f"| accuracy | {result['accuracy']:.4f} |" in text


def test_eval_errors(
    tiny_encoder_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": 3}\n')
    assert main(["eval", str(tiny_encoder_bundle), "--data", str(bad)]) == 2
    assert f"{bad}:2: " in capsys.readouterr().err
    assert main(["eval", str(tiny_encoder_bundle), "--data", str(bad), "--precision", "fp16"]) == 2
    assert "no fp16 variant" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "nope"), "--data", str(bad)]) == 2


def test_export_command(
    tiny_decoder_checkpoint: Path,
    tiny_encoder_checkpoint: Path,
    hh_data_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "bundle"
    data = _dev_slice(hh_data_dir, tmp_path / "dev30.jsonl")
    assert main(["export", str(tiny_decoder_checkpoint), "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["variants"]["fp32"]["max_abs_diff"] <= 1e-4
    assert (out / "rmserve.json").is_file()
    # The random encoder's int8 flips near-ties: the default check refuses, with the numbers.
    argv = ["export", str(tiny_encoder_checkpoint), "--out", str(out), "--int8"]
    code = main([*argv, "--eval-data", str(data)])
    assert code == 1
    err = capsys.readouterr().err
    assert "int8 parity failed on 30 eval pairs" in err
    assert not (out / "rmserve.json").exists()


def test_train_errors_name_the_problem(
    tmp_path: Path, tiny_encoder_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": "p"}\n')
    argv = ["train", "--data", str(bad), "--base", str(tiny_encoder_checkpoint)]
    argv += ["--out", str(tmp_path / "out"), "--cpu", "--no-progress", "--freeze-layers", "0"]
    assert main(argv) == 2
    assert f"{bad}:2: unrecognised row" in capsys.readouterr().err
    assert main([*argv[:2], str(tmp_path / "missing.jsonl"), *argv[3:]]) == 2
    assert "no such data file" in capsys.readouterr().err
    assert main([*argv, "--max-length", "4096"]) == 2
    assert "exceeds the 512 positions" in capsys.readouterr().err
    assert main([*argv, "--freeze-layers", "3"]) == 2
    assert "cannot freeze 3 layers: the model has 2" in capsys.readouterr().err


def test_default_data_is_found_from_any_directory(
    hh_data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # not the repo: falls back to the repo root's ../shared/data
    assert (
        commands.default_data_path("train.jsonl.gz") == (hh_data_dir / "train.jsonl.gz").resolve()
    )
    with pytest.raises(SystemExit, match="pass --data FILE"):
        commands.default_data_path("missing.jsonl.gz")


def test_default_recipe_flags() -> None:
    args = _training_parsers()["train"].parse_args([])
    assert (args.base, args.max_length, args.epochs, args.lr) == ("minilm", 128, 1.0, 2e-4)
    assert (args.batch_size, args.freeze_layers, args.center_rewards) == (32, 3, 0.01)
    assert args.freeze_embeddings
    assert args.data is None  # resolved to ../shared/data/hh-harmless at run time
