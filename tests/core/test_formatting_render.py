"""Rendering and the text formats' manifest form at their edges: the boundary a caller gives
with text that gets the template's BOS, the defaults of each format, and the refusals that
name the field (test_formatting.py covers the ordinary renderings)."""

from __future__ import annotations

import re
from typing import Any

import pytest

from rmserve.formatting import (
    ChatTemplateFormat,
    FormattingError,
    Message,
    RenderedText,
    TextFormat,
    TextPairFormat,
    messages_from_pair,
    parse_transcript,
    render,
    render_text,
    text_format_from_dict,
)

LLAMA = ChatTemplateFormat(template="x", special_tokens={}, bos_text="<|begin_of_text|>")


def test_caller_text_given_a_bos_keeps_its_boundary_on_the_response() -> None:
    shifted = render_text("Q: hi A: yes", LLAMA, response_start=9)
    assert shifted == RenderedText("<|begin_of_text|>Q: hi A: yes", 9 + len("<|begin_of_text|>"))
    assert shifted.text[shifted.response_start or 0 :] == "yes"
    kept = render_text("<|begin_of_text|>Q: hi A: yes", LLAMA, response_start=26)
    assert kept == RenderedText("<|begin_of_text|>Q: hi A: yes", 26)
    assert render_text("Q", LLAMA) == RenderedText("<|begin_of_text|>Q", None)
    assert render_text("Q", TextFormat(), response_start=0) == RenderedText("Q", 0)


def test_each_format_has_its_defaults_in_the_manifest_form() -> None:
    assert text_format_from_dict({}) == TextFormat()
    assert text_format_from_dict({"kind": "text_pair"}) == TextPairFormat(separator="\n")
    chat = text_format_from_dict(
        {"kind": "chat_template", "template": "t", "special_tokens": {}, "bos_text": ""}
    )
    assert chat == ChatTemplateFormat(template="t", special_tokens={}, bos_text=None)
    for fmt in (TextFormat(user_prefix="U: "), TextPairFormat(" | "), LLAMA):
        assert text_format_from_dict(fmt.to_dict()) == fmt


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        ({"user_prefix": 1}, r"^text_format\.user_prefix must be a string, got 1$"),
        (
            {"kind": "chat_template", "template": "", "special_tokens": {}},
            r"^text_format\.template must be a non-empty string$",
        ),
        ({"kind": "transcript", "speaker": "x"}, r"^unknown text_format fields: \['speaker'\]$"),
        (
            {"kind": "chat_template", "template": "t", "special_tokens": {"bos": 1}},
            r"^text_format\.special_tokens must map names to strings$",
        ),
        (
            {"kind": "chat_template", "template": "t", "special_tokens": {}, "bos_text": 1},
            r"^text_format\.bos_text must be a string or null$",
        ),
        (
            {"kind": "chat_template", "template": "t", "special_tokens": {}, "extra": 1},
            r"^unknown text_format fields: \['extra'\]$",
        ),
        ({"kind": "text_pair", "separator": None}, r"^text_format\.separator must be a string$"),
        ({"kind": "text_pair", "sep": "x"}, r"^unknown text_format fields: \['sep'\]$"),
        (
            {"kind": "jinja"},
            r"^unknown text_format kind 'jinja'; expected transcript, chat_template or text_pair$",
        ),
    ],
)
def test_a_bad_format_names_its_field(data: dict[str, Any], problem: str) -> None:
    with pytest.raises(FormattingError, match=problem):
        text_format_from_dict(data)


@pytest.mark.parametrize(
    ("messages", "problem"),
    [
        ([], r"^a conversation needs at least one message \(the response\)$"),
        (["hi"], r"^message 0 must be an object with role and content$"),
        (
            [{"role": "bot", "content": "x"}],
            r"^message 0 has role 'bot'; expected one of system, user, assistant$",
        ),
        ([{"role": "user", "content": 1}], r"^message 0 content must be a string$"),
        (
            [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}],
            r"^the last message is the response and must have role 'assistant', got 'user'$",
        ),
    ],
)
def test_a_bad_conversation_names_its_message(messages: list[Any], problem: str) -> None:
    with pytest.raises(FormattingError, match=problem):
        render(messages)


def test_a_text_pair_joins_the_prompt_turns_with_its_separator() -> None:
    conversation: list[Message | dict[str, str]] = [
        Message("system", "be brief"),
        {"role": "user", "content": "why?"},
        Message("assistant", "because"),
    ]
    assert render(conversation, TextPairFormat(" | ")) == RenderedText(
        "be brief | why?", None, "because"
    )
    assert render(messages_from_pair("q", "a"), TextPairFormat()) == RenderedText("q", None, "a")


def test_an_unknown_role_prefix_and_bad_transcripts_are_refused() -> None:
    with pytest.raises(
        FormattingError,
        match=r"^unknown message role 'bot'; expected one of system, user, assistant$",
    ):
        TextFormat().prefix("bot")
    with pytest.raises(FormattingError, match=r"^transcript is empty$"):
        parse_transcript("")
    with pytest.raises(
        FormattingError,
        match=r"^transcript does not start with a role prefix "
        + re.escape(r"('\n\nAssistant: ', '\n\nSystem: ', '\n\nHuman: ')")
        + "$",
    ):
        parse_transcript("hello\n\nHuman: hi")


def test_a_prefix_value_that_reads_transcript_is_kept() -> None:
    fmt = text_format_from_dict({"kind": "transcript", "user_prefix": "transcript"})
    assert fmt == TextFormat(user_prefix="transcript")


def test_a_transcript_splits_on_the_longest_prefix_that_matches() -> None:
    """One role's prefix may begin another's: the longer one wins wherever both match."""
    fmt = TextFormat(system_prefix="\nQ: [system] ", user_prefix="\nQ: ", assistant_prefix="\nA: ")
    text = render(
        [Message("system", "be kind"), Message("user", "why?"), Message("assistant", "so.")], fmt
    ).text
    assert text == "\nQ: [system] be kind\nQ: why?\nA: so."
    assert parse_transcript(text, fmt) == [
        Message("system", "be kind"),
        Message("user", "why?"),
        Message("assistant", "so."),
    ]


def test_an_empty_prefix_never_starts_a_turn() -> None:
    fmt = TextFormat(system_prefix="")
    assert parse_transcript("\n\nHuman: hi\n\nAssistant: yo", fmt) == [
        Message("user", "hi"),
        Message("assistant", "yo"),
    ]
