"""The one formatting function: rendering, parsing back, and the three input forms."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rmserve.formatting import (
    FormattingError,
    Message,
    TextFormat,
    messages_from_pair,
    parse_transcript,
    render,
    render_text,
)


def test_render_pair_in_hh_format() -> None:
    rendered = render(messages_from_pair("Hi there", "Hello!"))
    assert rendered.text == "\n\nHuman: Hi there\n\nAssistant: Hello!"
    assert rendered.text[rendered.response_start :] == "Hello!"


def test_prompt_string_and_messages_render_the_same() -> None:
    as_string = render(messages_from_pair("Hi", "Yo"))
    as_messages = render(
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
    )
    assert as_string == as_messages


def test_custom_format_and_system_turn() -> None:
    fmt = TextFormat(system_prefix="<s>", user_prefix="<u>", assistant_prefix="<a>")
    rendered = render(
        [Message("system", "Be brief."), Message("user", "Q"), Message("assistant", "A")], fmt
    )
    assert rendered.text == "<s>Be brief.<u>Q<a>A"
    assert TextFormat.from_dict(fmt.to_dict()) == fmt


@pytest.mark.parametrize(
    ("messages", "problem"),
    [
        ([], "at least one message"),
        ([{"role": "user", "content": "x"}], "must have role 'assistant'"),
        ([{"role": "robot", "content": "x"}], "role 'robot'"),
        ([{"role": "assistant", "content": 3}], "content must be a string"),
        (["not a message"], "must be an object"),
    ],
)
def test_bad_conversations(messages: list[object], problem: str) -> None:
    with pytest.raises(FormattingError, match=problem):
        render(messages)  # type: ignore[arg-type]


def test_render_text_is_taken_as_is() -> None:
    rendered = render_text("anything at all")
    assert rendered.text == "anything at all"
    assert rendered.response_start is None


def test_parse_transcript_keeps_blank_lines_inside_turns() -> None:
    text = "\n\nHuman: line one\n\nline two\n\nAssistant: answer"
    # "\n\nline two" is not a role prefix, so it stays inside the human turn.
    assert parse_transcript(text) == [
        Message("user", "line one\n\nline two"),
        Message("assistant", "answer"),
    ]
    with pytest.raises(FormattingError, match="does not start with a role prefix"):
        parse_transcript("Human: no leading blank line")
    with pytest.raises(FormattingError, match="empty"):
        parse_transcript("")


texts = st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=40).filter(
    lambda s: "\n\nHuman: " not in s and "\n\nAssistant: " not in s and "\n\nSystem: " not in s
)


@given(
    st.lists(st.tuples(st.sampled_from(["user", "assistant", "system"]), texts), max_size=4), texts
)
def test_parse_inverts_render(turns: list[tuple[str, str]], response: str) -> None:
    messages = [Message(role, content) for role, content in turns]
    messages.append(Message("assistant", response))
    rendered = render(messages)
    parsed = parse_transcript(rendered.text)
    # Content ending in a prefix fragment can merge with the next prefix; render is stable.
    assert render(parsed).text == rendered.text


def test_text_formats_round_trip_through_the_manifest_form() -> None:
    from rmserve.formatting import (
        AnyTextFormat,
        ChatTemplateFormat,
        TextFormat,
        TextPairFormat,
        text_format_from_dict,
    )

    formats: list[AnyTextFormat] = [
        TextFormat(),
        TextPairFormat(separator=" | "),
        ChatTemplateFormat(
            template="{{ bos_token }}{% for m in messages %}{{ m.content }}{% endfor %}",
            special_tokens={"bos_token": "<s>", "eos_token": "</s>"},
            bos_text="<s>",
        ),
    ]
    for fmt in formats:
        assert text_format_from_dict(fmt.to_dict()) == fmt
    # Manifests of format version 1 had no kind: the transcript format.
    assert text_format_from_dict({"user_prefix": "\n\nUser: "}) == TextFormat(
        user_prefix="\n\nUser: "
    )


def test_caller_text_gets_the_templates_bos_once() -> None:
    from rmserve.formatting import ChatTemplateFormat, render_text

    fmt = ChatTemplateFormat(template="x", special_tokens={"bos_token": "<s>"}, bos_text="<s>")
    assert render_text("<s>[INST] hi [/INST]ok", fmt).text == "<s>[INST] hi [/INST]ok"
    stripped = render_text("[INST] hi [/INST]ok", fmt, response_start=17)
    assert stripped.text == "<s>[INST] hi [/INST]ok"
    assert stripped.text[stripped.response_start or 0 :] == "ok"  # the boundary moved with it
    no_bos = ChatTemplateFormat(template="x", special_tokens={}, bos_text=None)
    assert render_text("<|im_start|>user", no_bos).text == "<|im_start|>user"


def test_text_pair_format_splits_prompt_and_response() -> None:
    from rmserve.formatting import TextPairFormat

    conversation = [
        Message("user", "Hi"),
        Message("assistant", "Hello"),
        Message("user", "Bake bread?"),
        Message("assistant", "Knead, rise, bake."),
    ]
    rendered = render(conversation, TextPairFormat())
    assert (rendered.text, rendered.pair) == ("Hi\nHello\nBake bread?", "Knead, rise, bake.")
