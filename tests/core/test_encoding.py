"""PairEncoder: the truncation policy of docs/architecture.md (Truncation), on the real
MiniLM tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest

from rmserve.encoding import PairEncoder, ResponseTooLongError
from rmserve.formatting import messages_from_pair, render, render_text


@pytest.fixture(scope="module")
def encoder_factory(minilm_path: Path):  # type: ignore[no-untyped-def]
    def make(max_length: int) -> PairEncoder:
        return PairEncoder.from_file(str(minilm_path / "tokenizer.json"), max_length)

    return make


def test_short_pair_is_not_truncated(encoder_factory) -> None:  # type: ignore[no-untyped-def]
    encoder = encoder_factory(64)
    encoded = encoder.encode(render(messages_from_pair("hello", "world")))
    assert not encoded.truncated
    assert encoded.ids[0] == 101  # [CLS]
    assert encoded.ids[-1] == 102  # [SEP]


def test_prompt_is_dropped_from_the_left(encoder_factory) -> None:  # type: ignore[no-untyped-def]
    encoder = encoder_factory(32)
    long_prompt = " ".join(f"word{i}" for i in range(100))
    rendered = render(messages_from_pair(long_prompt, "the final answer"))
    encoded = encoder.encode(rendered)
    assert encoded.truncated
    assert len(encoded.ids) == 32
    text = encoder.tokenizer.decode(encoded.ids)
    assert text.endswith("the final answer")
    assert "word0 " not in text  # the start of the prompt went first


def test_response_too_long(encoder_factory) -> None:  # type: ignore[no-untyped-def]
    encoder = encoder_factory(16)
    rendered = render(messages_from_pair("q", " ".join(["yes"] * 40)))
    with pytest.raises(ResponseTooLongError) as info:
        encoder.encode(rendered)
    assert info.value.budget == 14
    assert info.value.response_tokens > 14
    assert "truncate_response" in str(info.value)
    cut = encoder.encode(rendered, truncate_response=True)
    assert cut.truncated
    assert len(cut.ids) == 16


def test_rendered_text_keeps_its_end(encoder_factory) -> None:  # type: ignore[no-untyped-def]
    encoder = encoder_factory(8)
    encoded = encoder.encode(render_text("one two three four five six seven eight nine ten"))
    assert encoded.truncated
    assert encoder.tokenizer.decode(encoded.ids).endswith("ten")


def test_batch_equals_single(encoder_factory) -> None:  # type: ignore[no-untyped-def]
    encoder = encoder_factory(24)
    items = [render(messages_from_pair("p " * n, "r " * (n % 5 + 1))) for n in range(1, 30, 4)]
    assert encoder.encode_batch(items) == [encoder.encode(item) for item in items]


def test_max_length_must_fit_special_tokens() -> None:
    from tokenizers import Tokenizer, models

    with pytest.raises(ValueError, match="at least 2"):
        PairEncoder(Tokenizer(models.BPE()), 1)
