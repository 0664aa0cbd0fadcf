"""PairEncoder at its edges, on the model zoo's real tokenizers (WordPiece, byte-level BPE of the
Qwen and Llama 3 kinds, SentencePiece-style BPE of the Gemma and Mistral kinds).

The truncation policy (docs/architecture.md, Truncation) decides at three edges that the tests
of test_encoding.py do not pin: the prompt/response boundary inside a BPE token (``" word"``
starts one character before the response, and belongs to the response), the exact length
(``max_length`` ids fit, one more does not), and which end of a response that is cut survives
(its start). Every response here is made of distinct words, so keeping the wrong end shows.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import pytest
from tokenizers import Encoding, Tokenizer

from rmserve.encoding import EncodedPair, PairEncoder, ResponseTooLongError
from rmserve.formatting import (
    ChatTemplateFormat,
    RenderedText,
    TextPairFormat,
    messages_from_pair,
    render,
    render_text,
)
from tests import model_zoo

KINDS = ["wordpiece", "chatml", "llama3", "gemma", "mistral"]
BPE_KINDS = ["chatml", "llama3", "gemma", "mistral"]  # pieces carry the space before a word
PROMPT = "Why is the sky blue at noon but red in the evening over the sea?"
RESPONSE = (
    "Because sunlight scatters off air molecules, and blue light scatters more than red "
    "light does, while at sunset the light crosses much more air before it reaches us."
)
LLAMA3_BOS = "<|begin_of_text|>"


@cache
def backend(kind: str) -> Tokenizer:
    return Tokenizer.from_str(model_zoo._tokenizer_json(kind))


def token_id(kind: str, token: str) -> int:
    found = backend(kind).token_to_id(token)
    assert found is not None, token
    return found


def plain(kind: str, text: str) -> Encoding:
    return backend(kind).encode(text, add_special_tokens=False)


def added(kind: str) -> tuple[int, int]:
    """(leading, trailing) special tokens the tokenizer's post-processor puts around a text."""
    mask = backend(kind).encode("a").special_tokens_mask
    lead = mask.index(0)
    return lead, len(mask) - lead - mask[lead:].count(0)


def strip(kind: str, ids: list[int]) -> list[int]:
    lead, trail = added(kind)
    return ids[lead : len(ids) - trail]


def response_ids(kind: str, rendered: RenderedText) -> list[int]:
    """The ids of the response: every token that holds a character of it, so a token that
    straddles the boundary is the response's first."""
    assert rendered.response_start is not None
    encoding = plain(kind, rendered.text)
    return [
        i
        for i, (_, end) in zip(encoding.ids, encoding.offsets, strict=True)
        if end > rendered.response_start
    ]


def straddler(kind: str, rendered: RenderedText) -> int:
    """The id of the token that begins before the response and ends inside it."""
    assert rendered.response_start is not None
    encoding = plain(kind, rendered.text)
    ids = [
        i
        for i, (start, end) in zip(encoding.ids, encoding.offsets, strict=True)
        if start < rendered.response_start < end
    ]
    assert len(ids) == 1, "the fixture text must have a token across the boundary"
    return ids[0]


def pair() -> RenderedText:
    return render(messages_from_pair(PROMPT, RESPONSE))


@pytest.mark.parametrize("kind", KINDS)
def test_a_pair_of_exactly_max_length_ids_is_kept_whole(kind: str) -> None:
    rendered = pair()
    full = backend(kind).encode(rendered.text).ids  # what the tokenizer gives, specials and all
    exact = PairEncoder(backend(kind), len(full)).encode(rendered)
    assert exact == PairEncoder(backend(kind), len(full)).encode(rendered)
    assert not exact.truncated
    assert exact.ids == full
    shorter = PairEncoder(backend(kind), len(full) - 1).encode(rendered)
    assert shorter.truncated
    assert len(shorter.ids) == len(full) - 1
    # One prompt token less: the first.
    assert strip(kind, shorter.ids) == strip(kind, full)[1:]


@pytest.mark.parametrize("kind", KINDS)
def test_a_cut_response_keeps_its_start(kind: str) -> None:
    rendered = pair()
    response = response_ids(kind, rendered)
    lead, trail = added(kind)
    budget = 12
    encoder = PairEncoder(backend(kind), budget + lead + trail)
    with pytest.raises(ResponseTooLongError):
        encoder.encode(rendered)
    cut = encoder.encode(rendered, truncate_response=True)
    assert cut.truncated
    assert len(cut.ids) == budget + lead + trail
    assert strip(kind, cut.ids) == response[:budget]  # the start, not the end
    assert backend(kind).decode(strip(kind, cut.ids)).strip().lower().startswith("because sun")


@pytest.mark.parametrize("kind", BPE_KINDS)
def test_a_token_across_the_boundary_belongs_to_the_response(kind: str) -> None:
    rendered = pair()
    response = response_ids(kind, rendered)
    assert response[0] == straddler(kind, rendered)
    prompt_tokens = len(plain(kind, rendered.text).ids) - len(response)
    lead, trail = added(kind)

    # Room for the whole response, straddling token included: the prompt goes, all of it.
    fits = PairEncoder(backend(kind), len(response) + lead + trail).encode(rendered)
    assert fits.truncated
    assert strip(kind, fits.ids) == response

    # One id less: the response does not fit, and the error counts the straddling token in it.
    short = PairEncoder(backend(kind), len(response) - 1 + lead + trail)
    with pytest.raises(ResponseTooLongError) as refused:
        short.encode(rendered)
    error = refused.value
    assert (error.response_tokens, error.prompt_tokens) == (len(response), prompt_tokens)
    assert (error.budget, error.max_length) == (len(response) - 1, short.max_length)
    assert str(error).startswith(
        f"the response is {len(response)} tokens but at most {len(response) - 1} fit "
        f"(max_length {short.max_length} minus special tokens; the prompt had "
        f"{prompt_tokens} tokens and was dropped first)"
    )
    assert str(error).endswith("shorten the response or ask for truncate_response=true")
    with pytest.raises(ResponseTooLongError):
        short.encode_batch([rendered])  # refused by default in a batch too
    cut = short.encode(rendered, truncate_response=True)
    assert strip(kind, cut.ids) == response[:-1]  # starts with the straddling token


@pytest.mark.parametrize("kind", KINDS)
def test_a_batch_encodes_each_item_as_alone(kind: str) -> None:
    items = [
        pair(),
        render(messages_from_pair("short", "answer")),
        render_text("one two three four five six seven eight nine ten eleven twelve"),
    ]
    encoder = PairEncoder(backend(kind), 20)
    assert encoder.encode_batch(items, truncate_response=True) == [
        encoder.encode(item, truncate_response=True) for item in items
    ]


def test_max_length_two_is_the_smallest() -> None:
    assert PairEncoder(backend("chatml"), 2).budget == 2
    with pytest.raises(ValueError, match=r"^max_length must be at least 2, got 1$"):
        PairEncoder(backend("chatml"), 1)


def test_a_tokenizer_without_a_post_processor_adds_nothing() -> None:
    # tokenizer.json may have "post_processor": null; nothing is added around the text then.
    data = json.loads(model_zoo._tokenizer_json("chatml"))
    data["post_processor"] = None
    tokenizer = Tokenizer.from_str(json.dumps(data))
    rendered = pair()
    full = plain("chatml", rendered.text).ids
    encoder = PairEncoder(tokenizer, len(full))
    assert (encoder.budget, encoder.pair_budget) == (len(full), len(full))
    assert encoder.encode(rendered) == EncodedPair(ids=full, truncated=False)
    text_pair = render(messages_from_pair("question", "answer"), TextPairFormat())
    assert text_pair.pair is not None
    both = PairEncoder(tokenizer, 64, TextPairFormat()).encode(text_pair)
    assert both.ids == plain("chatml", "question").ids + plain("chatml", "answer").ids


# --- a chat template's BOS (Llama 3): kept in front when the prompt is cut ---------------


def llama3_format() -> ChatTemplateFormat:
    return ChatTemplateFormat(
        template="{{ bos_token }}{% for m in messages %}{{ m.content }}{% endfor %}",
        special_tokens={"bos_token": LLAMA3_BOS},
        bos_text=LLAMA3_BOS,
    )


def bos_pair() -> RenderedText:
    """The transcript pair as caller-rendered text with its boundary, BOS put in front."""
    rendered = pair()
    return render_text(rendered.text, llama3_format(), rendered.response_start)


def test_a_template_format_adds_no_special_tokens() -> None:
    rendered = bos_pair()
    full = plain("llama3", rendered.text).ids
    assert full[0] == token_id("llama3", LLAMA3_BOS)
    encoder = PairEncoder(backend("llama3"), len(full), llama3_format())
    assert encoder.budget == len(full)
    exact = encoder.encode(rendered)
    assert (exact.ids, exact.truncated) == (full, False)
    # Without a BOS string in the format, there is no BOS to keep: plain left truncation.
    no_bos = ChatTemplateFormat(template="x", special_tokens={}, bos_text=None)
    cut = PairEncoder(backend("llama3"), len(full) - 1, no_bos).encode(rendered)
    assert (cut.ids, cut.truncated) == (full[1:], True)


def test_the_templates_bos_survives_a_cut_prompt() -> None:
    rendered = bos_pair()
    bos = token_id("llama3", LLAMA3_BOS)
    full = plain("llama3", rendered.text).ids
    response = response_ids("llama3", rendered)
    assert response[0] == straddler("llama3", rendered)
    fmt = llama3_format()

    shorter = PairEncoder(backend("llama3"), len(full) - 1, fmt).encode(rendered)
    assert shorter == EncodedPair(ids=[bos, *full[2:]], truncated=True)

    fits = PairEncoder(backend("llama3"), len(response) + 1, fmt).encode(rendered)
    assert fits == EncodedPair(ids=[bos, *response], truncated=True)

    short = PairEncoder(backend("llama3"), len(response), fmt)
    with pytest.raises(ResponseTooLongError) as refused:
        short.encode(rendered)
    prompt_tokens = len(full) - 1 - len(response)  # the BOS is neither prompt nor response
    assert (refused.value.response_tokens, refused.value.prompt_tokens) == (
        len(response),
        prompt_tokens,
    )
    assert (refused.value.budget, refused.value.max_length) == (len(response) - 1, len(response))
    cut = short.encode(rendered, truncate_response=True)
    assert cut == EncodedPair(ids=[bos, *response[:-1]], truncated=True)


def test_from_file_keeps_the_text_format(tmp_path: Path) -> None:
    path = tmp_path / "tokenizer.json"
    backend("llama3").save(str(path))
    rendered = bos_pair()
    full = plain("llama3", rendered.text).ids
    encoder = PairEncoder.from_file(str(path), len(full) - 1, llama3_format())
    assert not encoder.add_special_tokens
    assert encoder.bos_id == token_id("llama3", LLAMA3_BOS)
    assert encoder.encode(rendered) == EncodedPair(ids=[full[0], *full[2:]], truncated=True)


def test_caller_text_without_a_boundary_keeps_its_bos_and_its_end() -> None:
    text = render_text(pair().text, llama3_format())
    assert text.response_start is None
    full = plain("llama3", text.text).ids
    cut = PairEncoder(backend("llama3"), 10, llama3_format()).encode(text)
    assert cut == EncodedPair(ids=[full[0], *full[-9:]], truncated=True)


# --- a text-pair format (tokenizer(question, answer)) ---------------------------------------


def text_pair() -> RenderedText:
    return render(messages_from_pair(PROMPT, RESPONSE), TextPairFormat())


def pair_ids() -> tuple[list[int], list[int], int, int]:
    """(prompt ids, response ids, [CLS], [SEP]) of the WordPiece tokenizer."""
    rendered = text_pair()
    assert rendered.pair is not None
    return (
        plain("wordpiece", rendered.text).ids,
        plain("wordpiece", rendered.pair).ids,
        token_id("wordpiece", "[CLS]"),
        token_id("wordpiece", "[SEP]"),
    )


def test_a_text_pair_of_exactly_max_length_is_kept_whole() -> None:
    rendered = text_pair()
    prompt, response, cls, sep = pair_ids()
    full = backend("wordpiece").encode(rendered.text, rendered.pair).ids
    assert full == [cls, *prompt, sep, *response, sep]
    encoder = PairEncoder(backend("wordpiece"), len(full), TextPairFormat())
    assert encoder.encode(rendered) == EncodedPair(ids=full, truncated=False)
    shorter = PairEncoder(backend("wordpiece"), len(full) - 1, TextPairFormat())
    assert shorter.encode(rendered) == EncodedPair(
        [cls, *prompt[1:], sep, *response, sep], truncated=True
    )


def test_a_text_pairs_response_that_just_fits_drops_the_whole_prompt() -> None:
    rendered = text_pair()
    _, response, cls, sep = pair_ids()
    encoder = PairEncoder(backend("wordpiece"), len(response) + 3, TextPairFormat())
    assert encoder.encode(rendered) == EncodedPair(ids=[cls, sep, *response, sep], truncated=True)


def test_a_text_pairs_response_too_long_is_refused_or_keeps_its_start() -> None:
    rendered = text_pair()
    prompt, response, cls, sep = pair_ids()
    encoder = PairEncoder(backend("wordpiece"), len(response) + 2, TextPairFormat())
    with pytest.raises(ResponseTooLongError) as refused:
        encoder.encode(rendered)
    error = refused.value
    assert (error.response_tokens, error.prompt_tokens) == (len(response), len(prompt))
    assert (error.budget, error.max_length) == (len(response) - 1, len(response) + 2)
    cut = encoder.encode(rendered, truncate_response=True)
    assert cut == EncodedPair(ids=[cls, sep, *response[:-1], sep], truncated=True)
    batch = [rendered, render(messages_from_pair("hi", "there"), TextPairFormat())]
    assert encoder.encode_batch(batch, truncate_response=True) == [
        encoder.encode(item, truncate_response=True) for item in batch
    ]
