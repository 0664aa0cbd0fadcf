"""``rmserve export --exporter fused``: the decoder graph in ONNX Runtime's fused operators.

The fused graph must score what transformers scores (the model card's snippet) and what the
unfused graph scores, with every item's score independent of its batch; the fusions must
really have happened (the contrib operators are in the graph), or the option would be a no-op
with a slower export.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from rmserve.encoding import PairEncoder
from rmserve.formatting import messages_from_pair, render
from rmserve.manifest import load_bundle
from rmserve.training.export import ExportOptions, export_bundle
from rmserve.training.scoring import onnx_scorer, pad_batch
from tests import model_zoo

FUSED_OPS = {"MultiHeadAttention", "SkipSimplifiedLayerNormalization"}


def _ops(path: Path) -> set[str]:
    import onnx

    return {node.op_type for node in onnx.load(str(path), load_external_data=False).graph.node}


def _rows(bundle: Path) -> tuple[list[list[int]], int]:
    """Ids of real HH exchanges of many lengths, through the bundle's own text path."""
    manifest = load_bundle(bundle)
    encoder = PairEncoder.from_file(
        str(bundle / "tokenizer.json"), manifest.max_length, manifest.text_format
    )
    texts = model_zoo.hh_texts(12)
    rows = []
    for i, text in enumerate(texts):
        rendered = render(messages_from_pair(text[: 40 * (i + 1)], "Sure."), manifest.text_format)
        rows.append(encoder.encode(rendered, truncate_response=True).ids)
    return rows, manifest.pad_token_id


@pytest.mark.parametrize(
    ("family", "config_class"),
    [("chatml", None), pytest.param("llama3", None, marks=pytest.mark.slow)],
)
def test_a_fused_decoder_scores_like_transformers_and_the_plain_graph(
    tmp_path: Path, family: str, config_class: Any
) -> None:
    checkpoint = model_zoo.build_decoder(tmp_path / "model", family, config_class=config_class)
    lines: list[str] = []
    fused = export_bundle(
        checkpoint,
        tmp_path / "fused",
        ExportOptions(max_length=256, exporter="fused"),
        progress=lines.append,
    )
    plain = export_bundle(checkpoint, tmp_path / "plain", ExportOptions(max_length=256))
    ops = _ops(tmp_path / "fused" / "model.onnx")
    assert ops >= FUSED_OPS, ops
    assert not FUSED_OPS & _ops(tmp_path / "plain" / "model.onnx")
    assert any("fused for onnxruntime: MultiHeadAttention 2" in line for line in lines), lines
    # Export certified the fused graph against transformers (text, ids and scores).
    assert fused.variants["fp32"].parity["max_abs_diff"] <= 1e-4
    assert fused.variants["fp32"].parity["text_path_max_abs_diff"] <= 1e-4

    rows, pad = _rows(tmp_path / "fused")
    fused_scorer = onnx_scorer(str(tmp_path / "fused" / "model.onnx"))
    plain_scorer = onnx_scorer(str(tmp_path / "plain" / "model.onnx"))
    batched = np.asarray(fused_scorer(*pad_batch(rows, pad)))
    alone = np.concatenate([np.asarray(fused_scorer(*pad_batch([r], pad))) for r in rows])
    np.testing.assert_allclose(batched, alone, atol=1e-5)  # batch-invariant
    np.testing.assert_allclose(batched, np.asarray(plain_scorer(*pad_batch(rows, pad))), atol=1e-5)
    assert plain.max_length == fused.max_length
