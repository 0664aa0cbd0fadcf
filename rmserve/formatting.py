"""The one function that turns (prompt, response) pairs and chat messages into model text.

Training and serving both call :func:`render`, so the string the model sees for a pair is
byte-identical at both ends; ``tests/core/test_formatting.py`` pins that. The format is
stored in the bundle's manifest (``text_format``) so the server renders exactly as the
trainer did.

The default format is the Anthropic HH transcript format that the bundled preference data
uses::

    \\n\\nHuman: <user turn>\\n\\nAssistant: <assistant turn> ...

Three input forms exist (docs/architecture: the wire API): a prompt and a response, a
conversation as chat messages whose last one is the response, or text already rendered by the
caller.

A bundle has one of three text formats:

- :class:`TextFormat` (``kind: "transcript"``): role prefixes, the HH format above; what
  rmserve-trained models use, with the tokenizer's own special tokens around the text;
- :class:`ChatTemplateFormat` (``kind: "chat_template"``): the model's own Jinja chat
  template, rendered as transformers renders it (:mod:`rmserve.chat_template`) and tokenized
  as ``apply_chat_template(tokenize=True)`` does: no special tokens added around the text (the
  template writes them). Text rendered by the caller gets the template's BOS string in front
  when it lacks it (verl strips it; OpenRLHF keeps it), so both give the model card's ids;
- :class:`TextPairFormat` (``kind: "text_pair"``): encoders without a chat template that
  score ``tokenizer(question, answer)``, as OpenAssistant's DeBERTa reward models do.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any

__all__ = [
    "ROLES",
    "AnyTextFormat",
    "ChatTemplateFormat",
    "FormattingError",
    "Message",
    "RenderedText",
    "TextFormat",
    "TextPairFormat",
    "messages_from_pair",
    "parse_transcript",
    "render",
    "render_completion",
    "render_text",
    "text_format_from_dict",
]

ROLES = ("system", "user", "assistant")


class FormattingError(ValueError):
    """Input that cannot be rendered: unknown role, empty conversation, bad types."""


@dataclass(frozen=True)
class Message:
    role: str  # one of ROLES
    content: str


@dataclass(frozen=True)
class TextFormat:
    """How chat turns become one string. Each turn is ``<role prefix><content>``."""

    system_prefix: str = "\n\nSystem: "  # prefix of a system turn
    user_prefix: str = "\n\nHuman: "  # prefix of a user turn
    assistant_prefix: str = "\n\nAssistant: "  # prefix of an assistant turn (also the response)

    def prefix(self, role: str) -> str:
        if role == "system":
            return self.system_prefix
        if role == "user":
            return self.user_prefix
        if role == "assistant":
            return self.assistant_prefix
        raise FormattingError(f"unknown message role {role!r}; expected one of {', '.join(ROLES)}")

    def to_dict(self) -> dict[str, str]:
        return {"kind": "transcript", **asdict(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TextFormat:
        known = {"system_prefix", "user_prefix", "assistant_prefix"}
        data = {k: v for k, v in data.items() if not (k == "kind" and v == "transcript")}
        unknown = set(data) - known
        if unknown:
            raise FormattingError(f"unknown text_format fields: {sorted(unknown)}")
        for key, value in data.items():
            if not isinstance(value, str):
                raise FormattingError(f"text_format.{key} must be a string, got {value!r}")
        return cls(**dict(data))


@dataclass(frozen=True)
class ChatTemplateFormat:
    """The model's own chat template and the special tokens transformers passes to it."""

    template: str  # the Jinja source, from the tokenizer's chat_template
    special_tokens: dict[str, str]  # tokenizer.special_tokens_map: bos_token, eos_token, ...
    # The BOS string the template writes at the start of every conversation (Llama 3, Gemma,
    # Mistral), or None (Qwen's ChatML has none). Caller-rendered text without it gets it.
    bos_text: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "chat_template", **asdict(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ChatTemplateFormat:
        template, tokens, bos = (
            data.get("template"),
            data.get("special_tokens"),
            data.get("bos_text"),
        )
        if not isinstance(template, str) or not template:
            raise FormattingError("text_format.template must be a non-empty string")
        if not isinstance(tokens, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in tokens.items()
        ):
            raise FormattingError("text_format.special_tokens must map names to strings")
        if bos is not None and not isinstance(bos, str):
            raise FormattingError("text_format.bos_text must be a string or null")
        unknown = set(data) - {"kind", "template", "special_tokens", "bos_text"}
        if unknown:
            raise FormattingError(f"unknown text_format fields: {sorted(unknown)}")
        return cls(template=template, special_tokens=dict(tokens), bos_text=bos or None)


@dataclass(frozen=True)
class TextPairFormat:
    """Encoders scored as ``tokenizer(question, answer)``: the prompt turns' contents joined by
    ``separator`` are the first text, the response the second."""

    separator: str = "\n"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "text_pair", **asdict(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TextPairFormat:
        separator = data.get("separator", "\n")
        if not isinstance(separator, str):
            raise FormattingError("text_format.separator must be a string")
        unknown = set(data) - {"kind", "separator"}
        if unknown:
            raise FormattingError(f"unknown text_format fields: {sorted(unknown)}")
        return cls(separator=separator)


AnyTextFormat = TextFormat | ChatTemplateFormat | TextPairFormat


def text_format_from_dict(data: Mapping[str, Any]) -> AnyTextFormat:
    """A text format from its manifest form; ``kind`` absent means the transcript format."""
    kind = data.get("kind", "transcript")
    if kind == "chat_template":
        return ChatTemplateFormat.from_dict(data)
    if kind == "text_pair":
        return TextPairFormat.from_dict(data)
    if kind == "transcript":
        return TextFormat.from_dict(data)  # it drops kind: transcript
    raise FormattingError(
        f"unknown text_format kind {kind!r}; expected transcript, chat_template or text_pair"
    )


@dataclass(frozen=True)
class RenderedText:
    """A rendered pair. ``response_start`` is the character offset where the response begins,
    or None for text rendered by the caller, whose prompt/response boundary is unknown.
    ``pair`` is the second text of a text-pair format (the response; ``text`` is then the
    prompt), tokenized as the tokenizer's sequence pair."""

    text: str
    response_start: int | None
    pair: str | None = None


def _coerce_messages(messages: Sequence[Message | Mapping[str, Any]]) -> list[Message]:
    out: list[Message] = []
    for i, m in enumerate(messages):
        if isinstance(m, Message):
            out.append(m)
            continue
        if not isinstance(m, Mapping):
            raise FormattingError(f"message {i} must be an object with role and content")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise FormattingError(
                f"message {i} has role {role!r}; expected one of {', '.join(ROLES)}"
            )
        if not isinstance(content, str):
            raise FormattingError(f"message {i} content must be a string")
        out.append(Message(role=role, content=content))
    return out


def messages_from_pair(
    prompt: str | Sequence[Message | Mapping[str, Any]], response: str
) -> list[Message | Mapping[str, Any]]:
    """A prompt (plain string or conversation) plus a response, as one conversation."""
    turns: list[Message | Mapping[str, Any]] = (
        [Message("user", prompt)] if isinstance(prompt, str) else list(prompt)
    )
    return [*turns, Message("assistant", response)]


def render(
    messages: Sequence[Message | Mapping[str, Any]], text_format: AnyTextFormat | None = None
) -> RenderedText:
    """Render a conversation whose last message is the assistant response being scored."""
    fmt = text_format or TextFormat()
    if isinstance(fmt, ChatTemplateFormat):
        return _render_chat_template(messages, fmt)
    turns = _coerce_messages(messages)
    if not turns:
        raise FormattingError("a conversation needs at least one message (the response)")
    if turns[-1].role != "assistant":
        raise FormattingError(
            f"the last message is the response and must have role 'assistant', "
            f"got {turns[-1].role!r}"
        )
    if isinstance(fmt, TextPairFormat):
        question = fmt.separator.join(turn.content for turn in turns[:-1])
        return RenderedText(text=question, response_start=None, pair=turns[-1].content)
    parts: list[str] = []
    for turn in turns[:-1]:
        parts.append(fmt.prefix(turn.role))
        parts.append(turn.content)
    parts.append(fmt.assistant_prefix)
    head = "".join(parts)
    return RenderedText(text=head + turns[-1].content, response_start=len(head))


# Stands in for the response while the template is rendered a second time, to find where the
# response starts: plain ASCII without spaces, so trim/strip filters leave it whole.
_RESPONSE_MARKER = "RMSERVExRESPONSExMARKERx7f3a9c"


def _chat_dicts(messages: Sequence[Message | Mapping[str, Any]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        if isinstance(m, Message):
            out.append({"role": m.role, "content": m.content})
            continue
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str):
            raise FormattingError(f"message {i} must be an object with a string role")
        content = m.get("content")
        if not isinstance(content, (str, list)):
            raise FormattingError(f"message {i} content must be a string or a list of parts")
        out.append(dict(m))
    return out


def _render_chat_template(
    messages: Sequence[Message | Mapping[str, Any]], fmt: ChatTemplateFormat
) -> RenderedText:
    from rmserve.chat_template import ChatTemplateError, render_chat_template

    chat = _chat_dicts(messages)
    if not chat:
        raise FormattingError("a conversation needs at least one message (the response)")
    if chat[-1]["role"] != "assistant":
        raise FormattingError(
            f"the last message is the response and must have role 'assistant', "
            f"got {chat[-1]['role']!r}"
        )
    try:
        text = render_chat_template(fmt.template, chat, fmt.special_tokens)
    except ChatTemplateError as e:
        raise FormattingError(f"the model's chat template refused the conversation: {e}") from e
    start: int | None = None
    if isinstance(chat[-1]["content"], str):
        probe = [*chat[:-1], {**chat[-1], "content": _RESPONSE_MARKER}]
        try:
            marked = render_chat_template(fmt.template, probe, fmt.special_tokens)
        except ChatTemplateError:
            marked = ""
        at = marked.find(_RESPONSE_MARKER)
        # The boundary is trusted only when the text before the marker is the real text's
        # start (a template that rewrites the response would move it).
        if at >= 0 and text.startswith(marked[:at]):
            start = at
    return RenderedText(text=text, response_start=start)


_USER_MARKER = _RESPONSE_MARKER + "user"


@lru_cache(maxsize=16)
def _generation_prompt(template: str, tokens: tuple[tuple[str, str], ...]) -> tuple[str, str]:
    """(a one-turn conversation rendered with ``add_generation_prompt``, the text after its
    user turn: the template's generation prompt); empty strings when the template refuses."""
    from rmserve.chat_template import ChatTemplateError, render_chat_template

    user = [{"role": "user", "content": _USER_MARKER}]
    try:
        prompt = render_chat_template(template, user, dict(tokens), add_generation_prompt=True)
    except ChatTemplateError:
        return "", ""
    return prompt, prompt[prompt.index(_USER_MARKER) + len(_USER_MARKER) :]


def render_completion(
    prompt: str, response: str, text_format: ChatTemplateFormat
) -> RenderedText | None:
    """A prompt that the model's own template rendered with its generation prompt (slime's
    ``--apply-chat-template``), completed with the response the way the template renders a
    finished assistant turn (its trims and end-of-turn tokens included); None when ``prompt``
    does not end with that generation prompt (it is then a plain prompt, not rendered text),
    or when the template renders a finished turn otherwise than after its generation prompt."""
    from rmserve.chat_template import ChatTemplateError, render_chat_template

    special = tuple(sorted(text_format.special_tokens.items()))
    rendered, generation = _generation_prompt(text_format.template, special)
    if not generation or not prompt.endswith(generation):
        return None
    chat = [{"role": "user", "content": _USER_MARKER}, {"role": "assistant", "content": response}]
    try:
        full = render_chat_template(text_format.template, chat, text_format.special_tokens)
    except ChatTemplateError as e:
        raise FormattingError(f"the model's chat template refused the conversation: {e}") from e
    if not full.startswith(rendered):
        return None
    head = render_text(prompt, text_format)
    return RenderedText(text=head.text + full[len(rendered) :], response_start=len(head.text))


def render_text(
    text: str, text_format: AnyTextFormat | None = None, response_start: int | None = None
) -> RenderedText:
    """Text rendered by the caller (OpenRLHF's ``query``, vLLM's ``input``): taken as is, with
    the chat template's BOS string put in front when the text lacks it, so that text whose
    BOS was stripped (verl) and text that kept it (OpenRLHF) give the same ids.
    ``response_start`` is where the response begins in ``text``, when the caller knows."""
    bos = text_format.bos_text if isinstance(text_format, ChatTemplateFormat) else None
    if bos and not text.startswith(bos):
        shift = len(bos)
        return RenderedText(
            text=bos + text,
            response_start=None if response_start is None else response_start + shift,
        )
    return RenderedText(text=text, response_start=response_start)


def parse_transcript(transcript: str, text_format: TextFormat | None = None) -> list[Message]:
    """Split a transcript in ``text_format`` back into messages (the inverse of render).

    The split is on the full role prefixes (``"\\n\\nHuman: "``), so a turn that contains
    blank lines stays whole. Raises FormattingError when the text does not start with one.
    """
    fmt = text_format or TextFormat()
    prefixes = sorted(((fmt.prefix(role), role) for role in ROLES), key=lambda pr: -len(pr[0]))
    messages: list[Message] = []
    role: str | None = None
    content_start = 0
    pos = 0
    while pos < len(transcript):
        hit = next((pr for pr in prefixes if pr[0] and transcript.startswith(pr[0], pos)), None)
        if hit is None:
            if role is None:
                raise FormattingError(
                    "transcript does not start with a role prefix "
                    f"({', '.join(repr(p) for p, _ in prefixes)})"
                )
            pos += 1
            continue
        if role is not None:
            messages.append(Message(role=role, content=transcript[content_start:pos]))
        role, content_start = hit[1], pos + len(hit[0])
        pos = content_start
    if role is None:
        raise FormattingError("transcript is empty")
    messages.append(Message(role=role, content=transcript[content_start:]))
    return messages
