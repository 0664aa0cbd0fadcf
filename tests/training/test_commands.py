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
    parsers["train"] = commands.build_train_parser()  # the registered one passes flags through
    for name, parser in parsers.items():
        for action in parser._actions:
            assert action.help, f"rmserve {name} {action.option_strings or action.dest}"
    flags = {s for a in parsers["train"]._actions for s in a.option_strings}
    required = {"--data", "--eval-data", "--base", "--out", "--epochs", "--max-steps"}
    required |= {"--max-length", "--lr", "--batch-size", "--skip-malformed", "--seed"}
    required |= {"--preset", "--freeze-layers", "--center-rewards", "--warmup-ratio", "--cpu"}
    required |= {"--no-truncate-long-responses", "--no-progress", "--eval-batch-size"}
    required |= {"--grad-accum", "--eval-steps", "--logging-steps", "--bf16", "--weight-decay"}
    assert required <= flags


def test_train_flags_are_generated_from_reward_config() -> None:
    """One flag per listed RewardConfig field, named after it, with its help and default."""
    import dataclasses

    from rmserve.training.config import REWARD_FIELDS, TRAINING_FIELDS, RewardConfig

    fields = {f.name: f for f in dataclasses.fields(RewardConfig)}
    actions = {s: a for a in commands.build_train_parser()._actions for s in a.option_strings}
    for name in (*REWARD_FIELDS, *TRAINING_FIELDS):
        action = actions["--" + name.replace("_", "-")]
        assert action.dest == name
        assert action.default is argparse.SUPPRESS  # absent flags leave the preset's value
        assert action.help is not None
        help_text = " ".join(str(fields[name].metadata["help"]).split())
        assert action.help.startswith(help_text.replace("%", "%%")), name
    assert "(default: 1e-05; minilm-hh: 0.0002)" in str(actions["--lr"].help)
    assert "(default: none; minilm-hh: 128)" in str(actions["--max-length"].help)


def test_export_flags_are_generated_from_export_options() -> None:
    """One flag per ExportOptions field that names its --help section, with the field's
    default: no flags give ExportOptions(), and each flag sets its field."""
    import dataclasses

    from rmserve.training.export.options import GROUPS, ExportOptions

    parser = _training_parsers()["export"]
    actions = {a.dest: a for a in parser._actions}
    for field in dataclasses.fields(ExportOptions):
        if "group" in field.metadata:
            assert field.metadata["group"] in GROUPS
            assert actions[field.name].default == field.default, field.name
            assert actions[field.name].help == field.metadata["help"], field.name
        else:
            assert field.name not in actions, field.name
    assert commands.export_options(parser.parse_args(["M", "--out", "B"])) == ExportOptions()
    flags = "--int8 --no-packed --opset 18 --text-format transcript --reward-head correctness"
    given = parser.parse_args(["M", "--out", "B", *flags.split(), "--min-agreement", "0.5"])
    assert commands.export_options(given) == ExportOptions(
        int8=True,
        packed=False,
        opset=18,
        text_format_choice="transcript",
        reward_head="correctness",
        min_agreement=0.5,
    )
    with pytest.raises(SystemExit):
        parser.parse_args(["M", "--out", "B", "--exporter", "onnx"])


def test_train_help_shows_flags_and_presets(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["train", "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: rmserve train")
    for expected in ("--learning-rate X, --lr X", "--preset {minilm-hh,none}", "presets:"):
        assert expected in text
    assert "minilm-hh (base minilm):" in text
    assert "freeze_layers=3" in text


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
    before = (out / "rmserve.json").read_text()
    # The random encoder's int8 flips near-ties: the default check refuses, with the numbers,
    # exits 2 and leaves the bundle that was there as it was.
    argv = ["export", str(tiny_encoder_checkpoint), "--out", str(out), "--int8"]
    code = main([*argv, "--eval-data", str(data)])
    assert code == 2
    err = capsys.readouterr().err
    assert "int8 parity failed on 30 eval pairs" in err
    assert (out / "rmserve.json").read_text() == before
    assert not list(tmp_path.glob(".bundle.partial-*"))


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
    assert main([*argv, "--freeze-layers", "-1"]) == 2
    assert "freeze_layers must be 0 or more" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:  # argparse: usage and the bad flag, exit 2
        main([*argv, "--no-such-flag"])
    assert info.value.code == 2
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err


def test_train_progress_goes_through_logging(capsys: pytest.CaptureFixture[str]) -> None:
    from rmserve.training.train import _log

    commands.log_to_stderr("rmserve train")
    commands.log_to_stderr("rmserve train")  # a second command in one process: one handler
    _log("step one")
    assert capsys.readouterr().err == "rmserve train: step one\n"


def test_default_data_is_found_from_any_directory(
    hh_data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # not the repo: falls back to the repo root's ../shared/data
    assert (
        commands.default_data_path("train.jsonl.gz") == (hh_data_dir / "train.jsonl.gz").resolve()
    )
    with pytest.raises(SystemExit, match="pass --data FILE"):
        commands.default_data_path("missing.jsonl.gz")


def _recipe(argv: list[str], has_eval: bool = True) -> commands.TrainRecipe:
    return commands.resolve_recipe(
        commands.build_train_parser().parse_args(argv), has_eval=has_eval
    )


def test_no_flags_is_the_minilm_preset() -> None:
    recipe = _recipe([])
    config = recipe.config
    assert (recipe.preset, recipe.base, recipe.explicit) == ("minilm-hh", "minilm", ())
    assert (config.max_length, config.num_train_epochs, config.learning_rate) == (128, 1.0, 2e-4)
    assert (config.per_device_train_batch_size, config.freeze_layers) == (32, 3)
    assert (config.center_rewards_coefficient, config.warmup_steps) == (0.01, 0.1)
    assert config.freeze_embeddings
    assert (config.eval_strategy, config.eval_steps) == ("steps", 25)
    assert config.output_dir == "artifacts/checkpoint"
    args = _training_parsers()["train"].parse_args([])
    assert args.argv == []  # data resolved to ../shared/data/hh-harmless at run time


def test_base_without_preset_gets_the_generic_defaults() -> None:
    recipe = _recipe(["--base", "some/model"], has_eval=False)
    config = recipe.config
    assert (recipe.preset, recipe.base) == ("none", "some/model")
    assert (config.freeze_embeddings, config.freeze_layers) == (False, 0)
    assert config.learning_rate == 1e-5
    assert config.max_length is None  # what the model supports, resolved at training
    assert config.center_rewards_coefficient is None
    assert config.eval_strategy == "no"
    # --preset none keeps MiniLM but drops its recipe; an explicit preset applies to any base.
    assert _recipe(["--preset", "none"]).config.freeze_layers == 0
    assert _recipe(["--preset", "none"]).base == "minilm"
    tuned = _recipe(["--preset", "minilm-hh", "--base", "some/model"])
    assert (tuned.base, tuned.config.freeze_layers, tuned.config.max_length) == (
        "some/model",
        3,
        128,
    )


def test_explicit_flags_win_over_the_preset() -> None:
    recipe = _recipe(["--lr", "1e-3", "--max-length", "64", "--no-freeze-embeddings"])
    config = recipe.config
    assert (config.learning_rate, config.max_length, config.freeze_embeddings) == (
        1e-3,
        64,
        False,
    )
    assert config.freeze_layers == 3  # not given: the preset's
    assert set(recipe.explicit) == {"learning_rate", "max_length", "freeze_embeddings"}
    # --eval-steps 0 (or no eval data): the eval data is scored once at the end.
    assert _recipe(["--eval-steps", "0"]).config.eval_strategy == "no"
    assert _recipe([], has_eval=False).config.eval_strategy == "no"


def test_old_flag_names_still_work() -> None:
    argv = ["--epochs", "2", "--batch-size", "4", "--grad-accum", "2", "--warmup-ratio", "0.2"]
    argv += ["--center-rewards", "0", "--cpu", "--no-progress", "--out", "ckpt"]
    argv += ["--eval-batch-size", "3", "--seed", "7", "--no-truncate-long-responses"]
    config = _recipe(argv).config
    assert (config.num_train_epochs, config.per_device_train_batch_size) == (2.0, 4)
    assert (config.gradient_accumulation_steps, config.warmup_steps) == (2, 0.2)
    assert (config.center_rewards_coefficient, config.use_cpu, config.disable_tqdm) == (
        0.0,
        True,
        True,
    )
    assert (config.output_dir, config.per_device_eval_batch_size, config.seed) == ("ckpt", 3, 7)
    assert config.truncate_long_responses is False
