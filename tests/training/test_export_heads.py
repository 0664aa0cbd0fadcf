"""Export of reward heads as they come: renamed, with a bias, several, or missing (refused).

Each case is a tiny model from the model zoo whose expected rewards come from transformers on
a reference build with the same seed (the same weights under transformers' own head name), so
a random head, a dropped bias or a wrong label order fails here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from rmserve.cli import main
from rmserve.encoding import PairEncoder
from rmserve.formatting import render
from rmserve.manifest import MANIFEST_NAME, load_bundle
from rmserve.training.export import ExportError, ExportOptions, export_bundle
from rmserve.training.scoring import onnx_scorer, pad_batch
from tests import model_zoo

CONVERSATIONS = [
    [
        {"role": "user", "content": "How do I bake bread?"},
        {"role": "assistant", "content": "Knead, rise, bake."},
    ],
    [
        {"role": "user", "content": "Tell me a joke."},
        {"role": "assistant", "content": "Too many cheetahs. 🐆"},
    ],
]


def _reference_logits(path: Path) -> np.ndarray:
    """model(**apply_chat_template(conversation)).logits for each conversation: (N, K)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer: Any = AutoTokenizer.from_pretrained(path)
    model: Any = AutoModelForSequenceClassification.from_pretrained(path).eval()
    rows = []
    with torch.no_grad():
        for conversation in CONVERSATIONS:
            inputs = tokenizer.apply_chat_template(
                conversation, tokenize=True, return_tensors="pt", return_dict=True
            )
            rows.append(model(**inputs).logits[0].numpy())
    return np.stack(rows)


def _bundle_scores(bundle: Path) -> np.ndarray:
    manifest = load_bundle(bundle)
    encoder = PairEncoder.from_file(
        str(bundle / "tokenizer.json"), manifest.max_length, manifest.text_format
    )
    rows = [encoder.encode(render(c, manifest.text_format)).ids for c in CONVERSATIONS]
    scores = onnx_scorer(str(bundle / "model.onnx"))(*pad_batch(rows, manifest.pad_token_id))
    return np.asarray(scores).reshape(len(rows), -1)


def test_openrlhf_value_head_is_mapped(tmp_path: Path) -> None:
    reference = model_zoo.build_decoder(tmp_path / "ref", "llama3", seed=3)
    renamed = model_zoo.build_decoder(tmp_path / "openrlhf", "llama3", seed=3, head="value_head")
    export_bundle(renamed, tmp_path / "bundle", ExportOptions(max_length=256))
    expected = _reference_logits(reference)
    assert np.max(np.abs(_bundle_scores(tmp_path / "bundle") - expected)) <= 1e-4


def test_trl_value_head_keeps_its_bias(tmp_path: Path) -> None:
    reference = model_zoo.build_decoder(tmp_path / "ref", "chatml", seed=4)
    trl = model_zoo.build_decoder(tmp_path / "trl", "chatml", seed=4, head="v_head")
    bias = float(model_zoo.expected_head(trl)["v_head.summary.bias"][0])
    assert bias != 0.0
    export_bundle(trl, tmp_path / "bundle", ExportOptions(max_length=256))
    expected = _reference_logits(reference) + bias
    assert np.max(np.abs(_bundle_scores(tmp_path / "bundle") - expected)) <= 1e-4


def test_a_head_name_given_by_flag(tmp_path: Path) -> None:
    reference = model_zoo.build_decoder(tmp_path / "ref", "mistral", seed=5)
    renamed = model_zoo.build_decoder(tmp_path / "m", "mistral", seed=5, head="value_head")
    export_bundle(
        renamed, tmp_path / "bundle", ExportOptions(max_length=256, head_name="value_head")
    )
    assert (
        np.max(np.abs(_bundle_scores(tmp_path / "bundle") - _reference_logits(reference))) <= 1e-4
    )


def test_a_bare_causal_lm_is_refused_and_nothing_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bare = model_zoo.build_decoder(tmp_path / "lm", "chatml", head="none")
    out = tmp_path / "bundle"
    with pytest.raises(ExportError) as refused:
        export_bundle(bare, out, ExportOptions(max_length=256))
    message = str(refused.value)
    assert "score.weight" in message
    assert "newly initialised" in message
    assert "causal LM" in message
    assert not out.exists()
    assert not list(tmp_path.glob(".bundle.partial-*"))  # no half-written bundle either
    # The command line: exit 2 with the reason.
    assert main(["export", str(bare), "--out", str(out), "--quiet"]) == 2
    assert "did not load" in capsys.readouterr().err
    assert not out.exists()


def test_a_failed_export_leaves_the_old_bundle_as_it_was(tmp_path: Path) -> None:
    good = model_zoo.build_decoder(tmp_path / "good", "chatml", seed=1)
    bare = model_zoo.build_decoder(tmp_path / "lm", "chatml", head="none")
    out = tmp_path / "bundle"
    export_bundle(good, out, ExportOptions(max_length=128))
    before = (out / MANIFEST_NAME).read_text()
    with pytest.raises(ExportError):
        export_bundle(bare, out, ExportOptions(max_length=128))
    assert (out / MANIFEST_NAME).read_text() == before
    load_bundle(out)  # every hash still checks


def test_three_heads_with_labels(tmp_path: Path) -> None:
    path = model_zoo.build_decoder(tmp_path / "armo", "llama3", seed=6, num_labels=3)
    manifest = export_bundle(
        path, tmp_path / "bundle", ExportOptions(max_length=256, reward_head="correctness")
    )
    assert manifest.labels == ("helpfulness", "correctness", "coherence")
    assert manifest.reward_head == 1
    assert manifest.ensemble is None  # K objectives, not K members: nothing says otherwise
    scores = _bundle_scores(tmp_path / "bundle")
    assert scores.shape == (len(CONVERSATIONS), 3)
    assert np.max(np.abs(scores - _reference_logits(path))) <= 1e-4
    assert manifest.variants["fp32"].parity["text_path_max_abs_diff"] <= 1e-4


def test_an_unknown_reward_head_is_refused(tmp_path: Path) -> None:
    path = model_zoo.build_decoder(tmp_path / "armo", "chatml", num_labels=3)
    with pytest.raises(ExportError, match="is not one of"):
        export_bundle(
            path, tmp_path / "bundle", ExportOptions(max_length=128, reward_head="honesty")
        )


@pytest.mark.parametrize(
    ("family", "config_class"),
    [("chatml", "Qwen3Config"), ("gemma", "GemmaConfig"), ("llama3", "LlamaConfig")],
)
def test_architectures_of_published_reward_models(
    family: str, config_class: str, tmp_path: Path
) -> None:
    # Skywork-Reward-V2 ships Qwen3 and Llama classifiers; Gemma 1 and 2 differ in their norms.
    path = model_zoo.build_decoder(tmp_path / "m", family, seed=7, config_class=config_class)
    manifest = export_bundle(path, tmp_path / "bundle", ExportOptions(max_length=256))
    assert manifest.architecture.kind == "decoder"
    assert np.max(np.abs(_bundle_scores(tmp_path / "bundle") - _reference_logits(path))) <= 1e-4


def test_max_length_defaults_to_the_model_and_is_bounded_by_its_positions(tmp_path: Path) -> None:
    path = model_zoo.build_pair_encoder(tmp_path / "oa")
    manifest = export_bundle(path, tmp_path / "bundle")
    assert manifest.max_length == 512  # the model's positions, not a fixed cap
    with pytest.raises(ExportError, match="exceeds the 512 positions"):
        export_bundle(path, tmp_path / "bundle2", ExportOptions(max_length=2048))


def test_fp16_export_loads_half_precision_and_makes_a_cuda_bundle(tmp_path: Path) -> None:
    from rmserve.service.runtime import RuntimeConfigError, choose_precision

    path = model_zoo.build_decoder(tmp_path / "m", "llama3", seed=8)
    manifest = export_bundle(path, tmp_path / "bundle", ExportOptions(max_length=256, dtype="fp16"))
    assert set(manifest.variants) == {"fp16"}
    assert (tmp_path / "bundle" / "model.fp16.onnx").is_file()
    parity = manifest.variants["fp16"].parity
    assert parity["max_abs_diff"] <= 2e-2
    assert parity["text_path_max_abs_diff"] <= 2e-2
    assert manifest.packed is not None  # traced in fp16 too, against torch in fp16
    assert manifest.packed.files == {"fp16": "model.fp16.packed.onnx"}
    assert manifest.packed.max_abs_diff["fp16"] <= 2e-2
    # Scores of the fp16 graph (onnxruntime here on CPU) stay close to transformers in fp32.
    manifest_dir = tmp_path / "bundle"
    encoder = PairEncoder.from_file(
        str(manifest_dir / "tokenizer.json"), manifest.max_length, manifest.text_format
    )
    rows = [encoder.encode(render(c, manifest.text_format)).ids for c in CONVERSATIONS]
    scores = onnx_scorer(str(manifest_dir / "model.fp16.onnx"))(
        *pad_batch(rows, manifest.pad_token_id)
    )
    assert np.max(np.abs(np.asarray(scores).reshape(-1, 1) - _reference_logits(path))) <= 2e-2
    # The service picks it on CUDA and says why it cannot serve it on CPU.
    assert choose_precision("auto", "cuda", manifest) == "fp16"
    with pytest.raises(RuntimeConfigError, match="exported with --dtype fp16"):
        choose_precision("auto", "cpu", manifest)
    with pytest.raises(ExportError, match="--dtype fp16 exports the fp16 graph itself"):
        export_bundle(path, tmp_path / "b2", ExportOptions(dtype="fp16", int8=True))


def test_an_encoder_without_its_classifier_or_pooler_is_refused(
    minilm_path: Path, tmp_path: Path
) -> None:
    # all-MiniLM-L6-v2 is an embedding model: it has no classifier, which would be random.
    with pytest.raises(ExportError) as refused:
        export_bundle(minilm_path, tmp_path / "bundle", ExportOptions(max_length=128))
    assert "classifier.weight (missing from the checkpoint: newly initialised)" in str(
        refused.value
    )
    assert not (tmp_path / "bundle").exists()
    # A classifier whose pooler is gone reads a random pooler: refused as well.
    from safetensors.torch import load_file, save_file

    path = model_zoo.build_pair_encoder(tmp_path / "no-pooler")
    weights = load_file(str(path / "model.safetensors"))
    kept = {k: v for k, v in weights.items() if ".pooler." not in k}
    assert len(kept) < len(weights)
    save_file(kept, str(path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ExportError, match=r"bert\.pooler\.dense\.weight \(missing"):
        export_bundle(path, tmp_path / "bundle", ExportOptions(max_length=128))
