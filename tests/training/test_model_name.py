"""The manifest's model name when `rmserve export` is given none: the model's, never the bundle
folder's (so that the served model is not called "bundle")."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from rmserve.cli import main
from rmserve.formatting import TextFormat
from rmserve.manifest import load_bundle
from rmserve.training import commands
from rmserve.training.export import default_model_name
from rmserve.training.metadata import TrainingInfo


def _copy(checkpoint: Path, folder: Path, preset: str | None = None) -> Path:
    shutil.copytree(checkpoint, folder)
    if preset is not None:
        info = TrainingInfo.read(folder)
        assert info is not None
        TrainingInfo(
            base_model=info.base_model,
            max_length=info.max_length,
            text_format=info.text_format,
            preset=preset,
        ).write(folder)
    return folder


def test_default_model_name(tmp_path: Path) -> None:
    hub_id = "Skywork/Skywork-Reward-V2-Qwen3-0.6B"
    assert default_model_name(hub_id) == hub_id
    plain = tmp_path / "my-rm"
    plain.mkdir()
    assert default_model_name(plain) == "my-rm"  # a transformers folder: its name
    assert default_model_name(str(plain) + "/") == "my-rm"
    info = TrainingInfo(base_model="b", max_length=8, text_format=TextFormat())
    info.write(plain)
    assert default_model_name(plain) == "my-rm"  # trained without a preset
    TrainingInfo(base_model="b", max_length=8, text_format=TextFormat(), preset="minilm-hh").write(
        plain
    )
    assert default_model_name(plain) == "minilm-hh"
    assert TrainingInfo.read(plain) == TrainingInfo(
        base_model="b", max_length=8, text_format=TextFormat(), preset="minilm-hh"
    )


def test_a_training_record_without_a_preset_still_reads(tmp_path: Path) -> None:
    TrainingInfo(base_model="b", max_length=8, text_format=TextFormat()).write(tmp_path)
    data = json.loads((tmp_path / "rmserve_training.json").read_text())
    del data["preset"]  # written before the field existed
    (tmp_path / "rmserve_training.json").write_text(json.dumps(data))
    info = TrainingInfo.read(tmp_path)
    assert info is not None
    assert info.preset is None
    data["preset"] = 3
    (tmp_path / "rmserve_training.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="preset is 3"):
        TrainingInfo.read(tmp_path)


def test_export_names_the_model_not_the_bundle_folder(
    tiny_encoder_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoint = _copy(tiny_encoder_checkpoint, tmp_path / "my-rm")
    out = tmp_path / "bundle"
    assert main(["export", str(checkpoint), "--out", str(out), "--quiet"]) == 0
    assert load_bundle(out).model_name == "my-rm"
    trained = _copy(tiny_encoder_checkpoint, tmp_path / "checkpoint", preset="minilm-hh")
    assert main(["export", str(trained), "--out", str(out), "--quiet"]) == 0
    assert load_bundle(out).model_name == "minilm-hh"
    argv = ["export", str(trained), "--out", str(out), "--quiet", "--model-name", "my-model"]
    assert main(argv) == 0
    assert load_bundle(out).model_name == "my-model"  # --model-name wins
    capsys.readouterr()


def test_export_help_names_the_default() -> None:
    subparsers = argparse.ArgumentParser().add_subparsers()
    commands.register(subparsers)
    export = subparsers.choices["export"]
    flag = next(a for a in export._actions if "--model-name" in a.option_strings)
    assert flag.help is not None
    assert "hub id" in flag.help
    assert "preset" in flag.help
    assert "BUNDLE" not in flag.help


def _recipe(argv: list[str]) -> commands.TrainRecipe:
    return commands.resolve_recipe(commands.build_train_parser().parse_args(argv), has_eval=True)


def test_the_preset_recorded_is_the_one_that_trained_its_own_base() -> None:
    assert _recipe([]).recorded_preset == "minilm-hh"
    assert _recipe(["--preset", "minilm-hh", "--lr", "1e-3"]).recorded_preset == "minilm-hh"
    assert _recipe(["--preset", "minilm-hh", "--base", "minilm"]).recorded_preset == "minilm-hh"
    assert _recipe(["--preset", "none"]).recorded_preset is None
    assert _recipe(["--base", "some/model"]).recorded_preset is None
    # The recipe on another model: the preset's name would misname it.
    assert _recipe(["--preset", "minilm-hh", "--base", "some/model"]).recorded_preset is None


def test_rmserve_train_passes_the_preset_to_training(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from rmserve.training import train

    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(train, "train_reward_model", lambda *a, **k: calls.append(k))
    data = str(tmp_path / "train.jsonl")
    assert main(["train", "--data", data, "--out", str(tmp_path / "a")]) == 0
    assert main(["train", "--data", data, "--base", "other", "--out", str(tmp_path / "b")]) == 0
    assert [c["preset"] for c in calls] == ["minilm-hh", None]


def test_training_records_the_preset(
    tiny_encoder_checkpoint: Path, hh_data_dir: Path, tmp_path: Path
) -> None:
    from rmserve.training.config import RewardConfig
    from rmserve.training.train import train_reward_model

    out = tmp_path / "out"
    config = RewardConfig(
        output_dir=str(out),
        max_length=64,
        max_steps=1,
        per_device_train_batch_size=4,
        use_cpu=True,
        disable_tqdm=True,
        report_to="none",
        normalization_samples=8,
    )
    train_reward_model(
        str(hh_data_dir / "train.jsonl.gz"),
        out,
        config,
        base=str(tiny_encoder_checkpoint),
        limit=8,
        skip_malformed=True,
        summary=False,
        preset="minilm-hh",
    )
    info = TrainingInfo.read(out)
    assert info is not None
    assert info.preset == "minilm-hh"
    assert default_model_name(out) == "minilm-hh"
