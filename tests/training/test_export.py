"""Export: the bundle contract, parity at lengths beyond the trace, refusals with numbers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from rmserve.encoding import PairEncoder
from rmserve.formatting import messages_from_pair, render
from rmserve.manifest import MANIFEST_NAME, load_bundle
from rmserve.training.data import PreferenceExample
from rmserve.training.export import ExportError, ExportOptions, export_bundle
from rmserve.training.export import checks as export_checks
from rmserve.training.scoring import BatchScorer, onnx_scorer, pad_batch, torch_scorer
from tests.model_zoo import reward_classifier

TRACE_LENGTH = 8  # export_onnx's default trace shape


def _rows(bundle: Path, count: int = 6) -> list[list[int]]:
    manifest = load_bundle(bundle)
    encoder = PairEncoder.from_file(str(bundle / "tokenizer.json"), manifest.max_length)
    rows = []
    for i in range(count):
        prompt = "Tell me about bread. " * (1 + 5 * i)
        response = "It is baked from dough. " * (1 + 2 * i)
        rendered = render(messages_from_pair(prompt, response), manifest.text_format)
        rows.append(encoder.encode(rendered, truncate_response=True).ids)
    return rows


@pytest.mark.parametrize("name", ["tiny_encoder_bundle", "tiny_decoder_bundle"])
def test_bundle_contract(name: str, request: pytest.FixtureRequest) -> None:
    bundle: Path = request.getfixturevalue(name)
    manifest = load_bundle(bundle)  # verifies every sha256
    assert manifest.padding_side == "right"
    assert manifest.truncation == "prompt_left"
    expected = ("encoder", "first") if "encoder" in name else ("decoder", "last")
    assert (manifest.architecture.kind, manifest.architecture.pooling) == expected
    assert manifest.max_length == 128
    assert manifest.normalization.std > 0
    assert manifest.created_at.endswith("+00:00")
    for variant in manifest.variants.values():
        model = onnx.load(str(bundle / variant.file))
        assert len(model.graph.initializer) > 0
        inputs = {i.name: i for i in model.graph.input}
        assert set(inputs) == {"input_ids", "attention_mask"}
        for tensor in inputs.values():
            assert tensor.type.tensor_type.elem_type == onnx.TensorProto.INT64
            dims = [d.dim_param for d in tensor.type.tensor_type.shape.dim]
            assert dims == ["batch", "sequence"]
        (output,) = model.graph.output
        assert output.name == "reward"
        assert output.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
        assert [d.dim_param for d in output.type.tensor_type.shape.dim] == ["batch"]
    if manifest.packed is None:  # an encoder: every graph self-contained
        assert "encoder" in name
        assert not list(bundle.glob("*.data"))
        return
    # A decoder: the packed graph takes rows of items sharing prompts, and reads the plain
    # graph's weights from model.onnx.data (the bundle stores them once).
    assert [p.name for p in bundle.glob("*.data")] == ["model.onnx.data"]
    packed = onnx.load(str(bundle / manifest.packed.files["fp32"]), load_external_data=False)
    packed_dims = {
        i.name: [d.dim_param for d in i.type.tensor_type.shape.dim] for i in packed.graph.input
    }
    assert packed_dims == {
        "input_ids": ["rows", "sequence"],
        "position_ids": ["rows", "sequence"],
        "segment_ids": ["rows", "sequence"],
        "reward_positions": ["rows", "items"],
    }
    (output,) = packed.graph.output
    assert [d.dim_param for d in output.type.tensor_type.shape.dim] == ["rows", "items"]
    external = [t for t in packed.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert external
    assert {e.value for t in external for e in t.external_data if e.key == "location"} == {
        "model.onnx.data"
    }


@pytest.mark.parametrize("name", ["tiny_encoder", "tiny_decoder"])
def test_onnx_matches_torch_beyond_the_trace_length(
    name: str, request: pytest.FixtureRequest
) -> None:
    checkpoint: Path = request.getfixturevalue(f"{name}_checkpoint")
    bundle: Path = request.getfixturevalue(f"{name}_bundle")
    from rmserve.training.modeling import architecture_of, load_reward_model

    model = load_reward_model(str(checkpoint))
    _, pooling = architecture_of(model)
    rows = _rows(bundle)
    lengths = sorted(len(r) for r in rows)
    assert lengths[-1] > 4 * TRACE_LENGTH
    assert lengths[0] < lengths[-1]
    input_ids, mask = pad_batch(rows, load_bundle(bundle).pad_token_id)
    expected = torch_scorer(model, pooling)(input_ids, mask)
    actual = onnx_scorer(str(bundle / "model.onnx"))(input_ids, mask)
    assert np.max(np.abs(expected - actual)) <= 1e-4
    # Batch invariance: each row alone gives its batched score (right padding + mask).
    scorer = onnx_scorer(str(bundle / "model.onnx"))
    alone = [scorer(*pad_batch([row], 0))[0] for row in rows]
    assert np.max(np.abs(np.array(alone) - actual)) <= 1e-5


def test_manifest_records_parity_and_evaluation(tiny_decoder_bundle: Path) -> None:
    data = json.loads((tiny_decoder_bundle / MANIFEST_NAME).read_text())
    assert data["variants"]["fp32"]["parity"]["max_abs_diff"] <= 1e-4
    assert set(data["variants"]["int8"]["parity"]) == {
        "pairwise_agreement",
        "accuracy_drop",
        "max_abs_diff_vs_fp32",
        "checked_up_to_tokens",  # every check's rows were at most this long
    }
    evaluation = data["evaluation"]
    assert evaluation["n"] == 100
    assert 0.0 <= evaluation["accuracy"] <= 1.0
    assert evaluation["shorter_wins_accuracy"] is not None


def test_export_refuses_failed_fp32_parity(
    tiny_encoder_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = onnx_scorer  # what export_checks.onnx_scorer is

    def perturbed(path: str) -> BatchScorer:
        run = real(path)
        return lambda ids, mask: run(ids, mask) + 1e-3  # an injected numerical error

    monkeypatch.setattr(export_checks, "onnx_scorer", perturbed)
    with pytest.raises(ExportError, match=r"fp32 parity failed: max \|torch - onnxruntime\| = "):
        export_bundle(tiny_encoder_checkpoint, tmp_path / "b")
    assert not (tmp_path / "b" / MANIFEST_NAME).exists()


def test_export_refuses_int8_that_flips_decisions(
    tiny_encoder_checkpoint: Path, hh_dev_examples: list[PreferenceExample], tmp_path: Path
) -> None:
    # Random weights make near-tied rewards, which int8 noise flips: the default check
    # (>= 99% agreement) must refuse, naming the measured numbers.
    with pytest.raises(ExportError) as info:
        export_bundle(
            tiny_encoder_checkpoint,
            tmp_path / "b",
            ExportOptions(int8=True),
            eval_pairs=hh_dev_examples[:60],
        )
    message = str(info.value)
    assert "int8 parity failed on 60 eval pairs" in message
    assert "need >= 99%" in message
    assert "%" in message.split("agree with fp32 on ")[1]
    assert not (tmp_path / "b" / MANIFEST_NAME).exists()


def test_int8_needs_eval_pairs(tiny_encoder_checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="--eval-data"):
        export_bundle(tiny_encoder_checkpoint, tmp_path / "b", ExportOptions(int8=True))


def test_fp16_variant_and_reexport(
    tiny_decoder_checkpoint: Path, hh_dev_examples: list[PreferenceExample], tmp_path: Path
) -> None:
    out = tmp_path / "b"
    manifest = export_bundle(
        tiny_decoder_checkpoint,
        out,
        # random weights: see conftest.RANDOM_WEIGHTS_INT8
        ExportOptions(fp16=True, min_agreement=0.0, max_accuracy_drop=1.0),
        eval_pairs=hh_dev_examples[:40],
    )
    assert set(manifest.variants) == {"fp32", "fp16"}
    model = onnx.load(str(out / "model.fp16.onnx"))
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    # fp16 gets its packed graph too, checked against the fp16 plain graph.
    assert manifest.packed is not None
    assert manifest.packed.files == {"fp32": "model.packed.onnx", "fp16": "model.fp16.packed.onnx"}
    assert manifest.packed.max_abs_diff["fp16"] <= 2e-2
    # Exporting again without --fp16 leaves no stale variant file behind.
    export_bundle(tiny_decoder_checkpoint, out)
    assert set(load_bundle(out).variants) == {"fp32"}
    assert not (out / "model.fp16.onnx").exists()
    assert not (out / "model.fp16.packed.onnx").exists()


def test_gpt2_decoder_exports_with_parity(
    tmp_path: Path, hh_data_dir: Path, tiny_decoder_checkpoint: Path
) -> None:
    import torch
    from transformers import AutoTokenizer, GPT2Config

    tokenizer = AutoTokenizer.from_pretrained(tiny_decoder_checkpoint)
    torch.manual_seed(1)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_embd=32,
        n_layer=2,
        n_head=2,
        n_positions=256,
        pad_token_id=tokenizer.pad_token_id,
    )
    checkpoint = tmp_path / "gpt2"
    reward_classifier(config).save_pretrained(checkpoint)
    tokenizer.save_pretrained(checkpoint)
    manifest = export_bundle(checkpoint, tmp_path / "bundle", ExportOptions(max_length=200))
    assert manifest.architecture.model_type == "gpt2"
    assert manifest.architecture.pooling == "last"
    assert manifest.variants["fp32"].parity["max_abs_diff"] <= 1e-4
    assert manifest.normalization.reference.startswith("not measured")
