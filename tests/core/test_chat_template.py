"""Chat templates: rmserve's rendering and ids equal transformers' on generated conversations.

For each template family of the model zoo (ChatML with a default system prompt, Llama 3 with
the double-BOS trap, Gemma, Mistral ``[INST]``, one that raises), hypothesis draws
conversations (unicode, empty strings, text that looks like template syntax or special tokens)
and each must render to the same text as ``apply_chat_template(tokenize=False)`` and encode
to the same ids as ``apply_chat_template(tokenize=True)``, through the functions the service
uses (:func:`rmserve.formatting.render`, :class:`rmserve.encoding.PairEncoder` over the saved
``tokenizer.json``). Caller-rendered text with and without its BOS string gets the same ids.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings

from rmserve.encoding import PairEncoder
from rmserve.formatting import ChatTemplateFormat, FormattingError, render, render_text
from rmserve.training.text_path import choose_text_format
from tests import model_zoo

TEMPLATE_FAMILIES = [f for f in model_zoo.FAMILIES if f != "raising"]
MAX_LENGTH = 100_000  # no truncation here: transformers' path does not truncate


class Family:
    """A zoo model's tokenizer, its bundle text format and the bundle's encoder."""

    def __init__(self, path: Path):
        from transformers import AutoTokenizer

        self.tokenizer: Any = AutoTokenizer.from_pretrained(path)
        fmt, _ = choose_text_format("auto", self.tokenizer, "decoder", None)
        assert isinstance(fmt, ChatTemplateFormat)
        self.format = fmt
        self.tokenizer.backend_tokenizer.save(str(path / "tokenizer-for-test.json"))
        self.encoder = PairEncoder.from_file(str(path / "tokenizer-for-test.json"), MAX_LENGTH, fmt)

    def transformers_text(self, conversation: list[dict[str, str]]) -> str:
        return str(self.tokenizer.apply_chat_template(conversation, tokenize=False))

    def transformers_ids(self, conversation: list[dict[str, str]]) -> list[int]:
        ids = self.tokenizer.apply_chat_template(conversation, tokenize=True, return_dict=False)
        return [int(i) for i in ids]


@pytest.fixture(scope="module")
def families(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Family]:
    out = {}
    for family in model_zoo.FAMILIES:
        path = model_zoo.build_decoder(tmp_path_factory.mktemp(family), family)
        out[family] = Family(path)
    return out


@pytest.mark.parametrize("family", TEMPLATE_FAMILIES)
def test_text_and_ids_equal_transformers(family: str, families: dict[str, Family]) -> None:
    model = families[family]
    checked = 0

    @settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
    @given(conversation=model_zoo.conversations())
    def check(conversation: list[dict[str, str]]) -> None:
        nonlocal checked
        expected_text = model.transformers_text(conversation)
        rendered = render(conversation, model.format)
        assert rendered.text == expected_text
        encoded = model.encoder.encode(rendered)
        assert encoded.ids == model.transformers_ids(conversation)
        assert not encoded.truncated
        # The same text sent back already rendered (with or without BOS) gives the same ids.
        bos = model.format.bos_text or ""
        for text in {expected_text, expected_text.removeprefix(bos)}:
            assert model.encoder.encode(render_text(text, model.format)).ids == encoded.ids
        checked += 1

    check()
    assert checked >= 200


@pytest.mark.parametrize("family", ["llama3", "gemma", "mistral"])
def test_never_a_doubled_bos(family: str, families: dict[str, Family]) -> None:
    model = families[family]
    conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    text = model.transformers_text(conversation)
    doubled = model.tokenizer(text)["input_ids"]  # the trap: the tokenizer adds BOS again
    bos_id = model.tokenizer.bos_token_id
    assert doubled[:2] == [bos_id, bos_id]
    ids = model.encoder.encode(render(conversation, model.format)).ids
    assert ids[:1] == [bos_id]
    assert ids[1] != bos_id
    assert ids == model.transformers_ids(conversation)


def test_chatml_has_no_bos_and_inserts_its_default_system_prompt(
    families: dict[str, Family],
) -> None:
    model = families["chatml"]
    assert model.format.bos_text is None
    conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
    rendered = render(conversation, model.format)
    assert rendered.text.startswith("<|im_start|>system\n")
    assert rendered.text == model.transformers_text(conversation)


@pytest.mark.parametrize("family", TEMPLATE_FAMILIES)
def test_response_start_marks_the_response(family: str, families: dict[str, Family]) -> None:
    model = families[family]
    conversation = [
        {"role": "user", "content": "What is bread?"},
        {"role": "assistant", "content": "Baked dough."},
    ]
    rendered = render(conversation, model.format)
    assert rendered.response_start is not None
    assert rendered.text[rendered.response_start :].startswith("Baked dough.")


def test_truncation_drops_prompt_tokens_and_keeps_bos(
    families: dict[str, Family], tmp_path: Path
) -> None:
    model = families["llama3"]
    conversation = [
        {"role": "user", "content": "tell me about bread " * 60},
        {"role": "assistant", "content": "It is baked."},
    ]
    rendered = render(conversation, model.format)
    full = model.encoder.encode(rendered).ids
    short = PairEncoder.from_file(_saved(model, tmp_path), 64, model.format)
    cut = short.encode(rendered)
    assert cut.truncated
    assert len(cut.ids) == 64
    assert cut.ids[0] == model.tokenizer.bos_token_id  # BOS survives
    assert cut.ids[1:] == full[len(full) - 63 :]  # the end (with the response) is kept


def _saved(model: Family, tmp_path: Path) -> str:
    path = tmp_path / "tokenizer.json"
    model.tokenizer.backend_tokenizer.save(str(path))
    return str(path)


@pytest.mark.parametrize("family", model_zoo.FAMILIES)
def test_a_refusing_template_says_why(family: str, families: dict[str, Family]) -> None:
    model = families[family]
    for conversation, message in model_zoo.refused_conversations(family):
        with pytest.raises(FormattingError) as refused:
            render(conversation, model.format)
        if conversation[-1]["role"] == "assistant":  # the template's own refusal, verbatim
            assert "the model's chat template refused the conversation" in str(refused.value)
            assert message in str(refused.value)
        else:  # a conversation that does not end with a response is refused before rendering
            assert "must have role 'assistant'" in str(refused.value)


@pytest.mark.parametrize("family", ["gemma", "mistral"])
def test_strict_templates_refuse_non_alternating_roles(
    family: str, families: dict[str, Family]
) -> None:
    model = families[family]
    conversation = [
        {"role": "user", "content": "a"},
        {"role": "user", "content": "b"},
        {"role": "assistant", "content": "c"},
    ]
    with pytest.raises(FormattingError, match="alternate"):
        render(conversation, model.format)


@pytest.mark.parametrize("family", ["llama3", "chatml"])
def test_a_response_that_alone_does_not_fit_is_never_cut_silently(
    family: str, families: dict[str, Family], tmp_path: Path
) -> None:
    from rmserve.encoding import ResponseTooLongError

    model = families[family]
    conversation = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "bread and butter " * 40},
    ]
    rendered = render(conversation, model.format)
    short = PairEncoder.from_file(_saved(model, tmp_path), 32, model.format)
    with pytest.raises(ResponseTooLongError) as refused:
        short.encode(rendered)
    assert refused.value.response_tokens > 32
    cut = short.encode(rendered, truncate_response=True)
    assert cut.truncated
    assert len(cut.ids) == 32
    full = model.encoder.encode(rendered).ids
    start = len(model.encoder.encode(render_text(rendered.text[: rendered.response_start])).ids)
    if model.format.bos_text:  # BOS kept, then the response's start
        assert cut.ids[0] == model.tokenizer.bos_token_id
        assert cut.ids[1:] == full[start : start + 31]
    else:
        assert cut.ids == full[start : start + 32]


@pytest.mark.parametrize("family", ["chatml", "llama3"])
def test_tool_calls_and_results_render_through_tojson(
    family: str, families: dict[str, Family]
) -> None:
    # Agentic turns: the templates write tool calls and results with tojson, which must keep
    # non-ASCII text and HTML characters as they are (transformers' tojson, not jinja2's).
    model = families[family]
    conversation: list[dict[str, Any]] = [
        {"role": "user", "content": "Wie ist das Wetter in Zürich? <b>kurz</b>"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"function": {"name": "weather", "arguments": {"city": "Zürich", "unit": "°C"}}}
            ],
        },
        {"role": "tool", "content": "12 °C & sonnig <sun>"},
        {"role": "assistant", "content": "12 °C und sonnig."},
    ]
    expected = model.transformers_text(conversation)
    written_by_tojson = {
        "chatml": '{"city": "Zürich", "unit": "°C"}',
        "llama3": '{"output": "12 °C & sonnig <sun>"}',
    }
    assert written_by_tojson[family] in expected  # no \\u escapes, no HTML escapes
    rendered = render(conversation, model.format)
    assert rendered.text == expected
    assert model.encoder.encode(rendered).ids == model.transformers_ids(conversation)


@pytest.mark.parametrize("family", TEMPLATE_FAMILIES)
def test_a_rendered_prompt_completes_to_the_templates_text(
    family: str, families: dict[str, Family]
) -> None:
    # slime sends the policy's rendered prompt (add_generation_prompt=True) and the response:
    # completed by the bundle, it must be the text of the whole conversation, byte for byte.
    from rmserve.formatting import render_completion

    model = families[family]
    checked = 0

    @settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
    @given(conversation=model_zoo.conversations())
    def check(conversation: list[dict[str, str]]) -> None:
        nonlocal checked
        prompt = model.tokenizer.apply_chat_template(
            conversation[:-1], tokenize=False, add_generation_prompt=True
        )
        completed = render_completion(str(prompt), conversation[-1]["content"], model.format)
        assert completed is not None
        assert completed.text == model.transformers_text(conversation)
        assert model.encoder.encode(completed).ids == model.transformers_ids(conversation)
        checked += 1

    check()
    assert checked >= 100
    # A plain prompt is not rendered text: the caller renders it as a user turn instead.
    assert render_completion("How do I bake bread?", "Knead.", model.format) is None
