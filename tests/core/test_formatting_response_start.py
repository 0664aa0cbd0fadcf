"""Where the response starts in text that a model's own chat template rendered, and what a
conversation given to a chat template must be.

The boundary is found by rendering the conversation a second time with a marker in place of
the response; it is trusted only when the text before the marker is the real text's start.
Each template below is small and does one thing that real templates do (role headers, a BOS
string, a trim, a response shown twice, a length written before the response, a refusal), so
that each rule of that search is pinned by one test.
"""

from __future__ import annotations

from typing import Any

import pytest

from rmserve.formatting import (
    ChatTemplateFormat,
    FormattingError,
    Message,
    RenderedText,
    render,
    render_completion,
)

# Llama 3's shape: a BOS string, a header per turn, trimmed content, an end-of-turn token, and
# the assistant header as the generation prompt.
HEADERS = ChatTemplateFormat(
    template=(
        "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}"
        "<|end_header_id|>\n\n{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n"
        "{% endif %}"
    ),
    special_tokens={"bos_token": "<|begin_of_text|>"},
    bos_text="<|begin_of_text|>",
)
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Why?"},
    {"role": "assistant", "content": "Because."},
]
RENDERED = (
    "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nWhy?<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\nBecause.<|eot_id|>"
)


def plain(template: str) -> ChatTemplateFormat:
    return ChatTemplateFormat(template=template, special_tokens={})


def test_the_response_starts_after_every_earlier_turn() -> None:
    rendered = render(CONVERSATION, HEADERS)
    assert rendered == RenderedText(RENDERED, RENDERED.index("Because."))


def test_message_objects_render_as_their_dicts() -> None:
    messages = [Message(m["role"], m["content"]) for m in CONVERSATION]
    assert render(messages, HEADERS) == render(CONVERSATION, HEADERS)
    mixed: list[Message | dict[str, Any]] = [CONVERSATION[0], *messages[1:]]
    assert render(mixed, HEADERS) == render(CONVERSATION, HEADERS)


def test_a_response_at_the_very_start_of_the_text_starts_at_0() -> None:
    fmt = plain("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    assert render([{"role": "assistant", "content": "Hi."}], fmt) == RenderedText("Hi.", 0)


def test_a_response_shown_twice_starts_at_its_first_place() -> None:
    fmt = plain(
        "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
        "(reply: {{ messages[-1]['content'] }})"
    )
    rendered = render(CONVERSATION[1:], fmt)
    assert rendered.text == "[user] Why?\n[assistant] Because.\n(reply: Because.)"
    assert rendered.response_start == len("[user] Why?\n[assistant] ")


def test_no_boundary_when_the_text_before_the_response_depends_on_it() -> None:
    # The response's length is written before it: the marker's length is not the response's,
    # so the text before the marker is not the real text's start.
    fmt = plain(
        "{% for m in messages %}{{ m['content'] | length }}:{{ m['content'] }};{% endfor %}"
    )
    rendered = render(CONVERSATION[1:], fmt)
    assert rendered == RenderedText("4:Why?;8:Because.;", None)


def test_no_boundary_when_the_template_hides_the_response() -> None:
    fmt = plain("{% for m in messages %}{{ m['role'] }};{% endfor %}")
    assert render(CONVERSATION[1:], fmt) == RenderedText("user;assistant;", None)


def test_no_boundary_when_the_template_refuses_the_probe() -> None:
    # A template that takes lower-case responses only refuses the marker, not the response.
    fmt = plain(
        "{% if messages[-1]['content'] != messages[-1]['content'] | lower %}"
        "{{ raise_exception('lower case only') }}{% endif %}"
        "{% for m in messages %}{{ m['content'] }}|{% endfor %}"
    )
    conversation = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "yes"}]
    assert render(conversation, fmt) == RenderedText("q|yes|", None)


def test_no_boundary_for_a_response_given_as_parts() -> None:
    fmt = plain(
        "{% for m in messages %}{% if m['content'] is string %}{{ m['content'] }}"
        "{% else %}{% for p in m['content'] %}{{ p['text'] }}{% endfor %}{% endif %}|{% endfor %}"
    )
    parts = [{"type": "text", "text": "ye"}, {"type": "text", "text": "s"}]
    conversation: list[dict[str, Any]] = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": parts},
    ]
    assert render(conversation, fmt) == RenderedText("q|yes|", None)


@pytest.mark.parametrize(
    ("messages", "problem"),
    [
        ([], r"^a conversation needs at least one message \(the response\)$"),
        (["hi"], r"^message 0 must be an object with a string role$"),
        ([{"role": 1, "content": "x"}], r"^message 0 must be an object with a string role$"),
        (
            [{"role": "assistant", "content": 1}],
            r"^message 0 content must be a string or a list of parts$",
        ),
        (
            [CONVERSATION[1], CONVERSATION[2], {"role": "user", "content": "And?"}],
            r"^the last message is the response and must have role 'assistant', got 'user'$",
        ),
    ],
)
def test_a_bad_conversation_for_a_chat_template_names_its_message(
    messages: list[Any], problem: str
) -> None:
    with pytest.raises(FormattingError, match=problem):
        render(messages, HEADERS)


def test_a_refusal_of_the_template_is_a_formatting_error() -> None:
    fmt = plain(
        "{% for m in messages %}{% if m['role'] == 'system' %}"
        "{{ raise_exception('System role not supported') }}{% endif %}{{ m['content'] }}"
        "{% endfor %}"
    )
    with pytest.raises(
        FormattingError,
        match=r"^the model's chat template refused the conversation: System role not supported$",
    ):
        render(CONVERSATION, fmt)


def test_a_rendered_prompt_completed_gets_the_bos_and_its_boundary() -> None:
    """slime sends the prompt rendered with the generation prompt; verl's has lost the BOS."""
    prompt = (
        "<|start_header_id|>user<|end_header_id|>\n\nWhy?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    completed = render_completion(prompt, " Because. ", HEADERS)
    head = "<|begin_of_text|>" + prompt
    assert completed == RenderedText(head + "Because.<|eot_id|>", len(head))
    assert render_completion("<|begin_of_text|>" + prompt, " Because. ", HEADERS) == completed


def test_a_completion_the_template_refuses_is_a_formatting_error() -> None:
    fmt = plain(
        "{% for m in messages %}{% if m['content'] == 'bad' %}{{ raise_exception('no') }}"
        "{% endif %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    with pytest.raises(
        FormattingError, match=r"^the model's chat template refused the conversation: no$"
    ):
        render_completion("<user>q<assistant>", "bad", fmt)
