"""The packed graph (issue 16): rows of items that share a prompt, scored as if each were whole.

Three layers of evidence: the layout and the mask, checked without any model (every query of
a packed row must see exactly the (position, token) pairs its own item shows it, which is what
makes any causal model's hidden state the whole-item one); the exported graph of real model
families against the plain graph on real dev texts; and the cases export must refuse.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rmserve.encoding import PairEncoder
from rmserve.manifest import PACKED_FILES, load_bundle
from rmserve.packing import pack
from rmserve.training.data import PreferenceExample
from rmserve.training.export import ExportOptions, export_bundle
from rmserve.training.export.packed import _segment_mask, unpackable
from rmserve.training.pairs import encode_examples
from rmserve.training.scoring import pad_batch
from tests.model_zoo import reward_classifier

PAD = 0


def _visible(
    batch_ids: np.ndarray, positions: np.ndarray, mask: np.ndarray, row: int, q: int
) -> list[tuple[int, int]]:
    """The (position, token) pairs query ``q`` of ``row`` attends to, in position order."""
    keys = np.flatnonzero(mask[row, 0, q] == 0)
    return sorted((int(positions[row, k]), int(batch_ids[row, k])) for k in keys)


@st.composite
def item_groups(draw: st.DrawFn) -> list[np.ndarray]:
    """Items drawn as groups over shared prompts (some prompts empty, some responses empty,
    some items identical), shuffled together."""
    items: list[np.ndarray] = []
    for _ in range(draw(st.integers(1, 4))):
        prompt = draw(st.lists(st.integers(1, 6), min_size=0, max_size=12))
        for _ in range(draw(st.integers(1, 4))):
            response = draw(st.lists(st.integers(0, 6), min_size=0, max_size=6))
            if prompt or response:
                items.append(np.asarray(prompt + response, dtype=np.int64))
    if not items:
        items.append(np.asarray([1], dtype=np.int64))
    return draw(st.permutations(items))


@settings(max_examples=150, deadline=None, derandomize=True)
@given(item_groups(), st.sampled_from(["auto", "always", "never"]))
def test_every_query_sees_exactly_its_own_item(items: list[np.ndarray], share: str) -> None:
    # Token 0 is the pad and the skip token here: items that end in it read their reward
    # earlier, as transformers does.
    batch = pack(items, PAD, skip_token_id=PAD, share=share)  # type: ignore[arg-type]
    mask = _segment_mask(torch.from_numpy(batch.segment_ids), torch.float32).numpy()
    ids, positions = batch.input_ids, batch.position_ids
    for i, item in enumerate(items):
        row, column = batch.slots[i]
        at = int(batch.reward_positions[row, column])
        real = np.flatnonzero(item != PAD)
        expected_position = int(real[-1]) if real.size else 0
        # The reward is read at the item's own position ...
        assert positions[row, at] == expected_position
        assert ids[row, at] == item[expected_position]
        # ... and the query there, and every key it sees, sees exactly its item's prefix.
        seen = _visible(ids, positions, mask, row, at)
        assert seen == [(j, int(item[j])) for j in range(expected_position + 1)]
        for _, key in zip(seen, np.flatnonzero(mask[row, 0, at] == 0), strict=True):
            p = int(positions[row, key])
            assert _visible(ids, positions, mask, row, int(key)) == [
                (j, int(item[j])) for j in range(p + 1)
            ]
    assert batch.item_tokens == sum(len(x) for x in items)
    assert batch.real_tokens == int((batch.segment_ids >= 0).sum())


def test_a_group_shares_its_prompt_once_and_lone_items_keep_their_rows() -> None:
    prompt = list(range(1, 41))
    group = [np.asarray(prompt + [50 + k] * (3 + k), dtype=np.int64) for k in range(3)]
    lone = np.asarray([7, 8, 9], dtype=np.int64)
    batch = pack([group[0], lone, group[1], group[2]], PAD, skip_token_id=PAD)
    assert batch.input_ids.shape == (2, 40 + 3 + 4 + 5)
    assert batch.shared_tokens == 2 * 40
    assert {int(batch.slots[i][0]) for i in (0, 2, 3)} != {int(batch.slots[1][0])}
    row = int(batch.slots[0][0])
    assert list(batch.segment_ids[row]) == [0] * 40 + [1] * 3 + [2] * 4 + [3] * 5
    assert list(batch.position_ids[row, 40:43]) == [40, 41, 42]
    assert list(batch.position_ids[row, 43:47]) == [40, 41, 42, 43]


def test_short_prompts_with_long_responses_stay_whole() -> None:
    # Packed, the row's attention would cost (2 + 2 * 50)^2 > 2 * 52^2: not worth it.
    items = [np.asarray([1, 2, *[3 + k] * 50], dtype=np.int64) for k in range(2)]
    assert pack(items, PAD, skip_token_id=None).input_ids.shape[0] == 2
    assert pack(items, PAD, skip_token_id=None, share="always").input_ids.shape[0] == 1


def test_which_models_can_be_packed(tiny_decoder_checkpoint: Path) -> None:
    from transformers import AutoModelForSequenceClassification, Gemma2Config

    qwen = AutoModelForSequenceClassification.from_pretrained(tiny_decoder_checkpoint)
    assert unpackable(qwen, "last", 128) is None
    assert "encoder" in str(unpackable(qwen, "first", 128))
    config = Gemma2Config(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        sliding_window=16,
        pad_token_id=0,
    )
    gemma = reward_classifier(config)
    assert "sliding window of 16" in str(unpackable(gemma, "last", 128))
    assert unpackable(gemma, "last", 16) is None  # no item is longer than the window


def _run(path: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    (scores, *_) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, feeds
    )
    return np.asarray(scores)


def test_the_exported_packed_graph_scores_dev_groups_as_whole_items(
    tiny_decoder_bundle: Path, hh_dev_examples: list[PreferenceExample]
) -> None:
    manifest = load_bundle(tiny_decoder_bundle)
    assert manifest.packed is not None
    assert manifest.packed.files == {"fp32": PACKED_FILES["fp32"]}
    assert PACKED_FILES["fp32"] in manifest.files  # hashed like every file
    assert manifest.packed.max_abs_diff["fp32"] <= 1e-4
    encoder = PairEncoder.from_file(
        str(tiny_decoder_bundle / "tokenizer.json"), manifest.max_length, manifest.text_format
    )
    encoded = encode_examples(hh_dev_examples[:24], encoder, manifest.text_format)
    # Real dev pairs: both responses of a pair share the prompt; a prompt cut from the left
    # (max_length 128) may leave them different prefixes, which must still score right.
    rows = [np.asarray(r, dtype=np.int64) for r in encoded.ids]
    input_ids, mask = pad_batch(encoded.ids, manifest.pad_token_id)
    whole = _run(
        tiny_decoder_bundle / "model.onnx", {"input_ids": input_ids, "attention_mask": mask}
    )
    for share in ("auto", "always"):
        batch = pack(
            rows, manifest.pad_token_id, skip_token_id=manifest.packed.skip_token_id, share=share
        )
        packed = batch.item_rows(_run(tiny_decoder_bundle / PACKED_FILES["fp32"], batch.feeds()), 1)
        np.testing.assert_allclose(packed[:, 0], whole, atol=1e-5, rtol=0)
    assert pack(rows, manifest.pad_token_id, skip_token_id=None, share="always").shared_tokens > 0


def test_no_packed_graph_when_asked_or_for_an_encoder(
    tiny_decoder_checkpoint: Path, tiny_encoder_bundle: Path, tmp_path: Path
) -> None:
    manifest = export_bundle(
        tiny_decoder_checkpoint, tmp_path / "plain", ExportOptions(packed=False)
    )
    assert manifest.packed is None
    assert not (tmp_path / "plain" / PACKED_FILES["fp32"]).exists()
    assert load_bundle(tiny_encoder_bundle).packed is None
    raw = json.loads((tiny_encoder_bundle / "rmserve.json").read_text())
    assert raw["packed"] is None
