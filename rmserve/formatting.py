"""The one function that turns (prompt, response) pairs and chat messages into model text.

Training and serving both call :func:`render`, so the string the model sees for a pair is
byte-identical at both ends; ``tests/core/test_formatting.py`` pins that. The format is
stored in the bundle's manifest (``text_format``) so the server renders exactly as the
trainer did.

The default format is the Anthropic HH transcript format that the bundled preference data
uses::

    \\n\\nHuman: <user turn>\\n\\nAssistant: <assistant turn> ...

Three input forms exist (DESIGN.md): a prompt and a response, a conversation as chat
messages whose last one is the response, or text already rendered by the caller.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

__all__ = [
    "ROLES",
    "FormattingError",
    "Message",
    "RenderedText",
    "TextFormat",
    "messages_from_pair",
    "parse_transcript",
    "render",
    "render_text",
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
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TextFormat:
        known = {"system_prefix", "user_prefix", "assistant_prefix"}
        unknown = set(data) - known
        if unknown:
            raise FormattingError(f"unknown text_format fields: {sorted(unknown)}")
        for key, value in data.items():
            if not isinstance(value, str):
                raise FormattingError(f"text_format.{key} must be a string, got {value!r}")
        return cls(**dict(data))


@dataclass(frozen=True)
class RenderedText:
    """A rendered pair. ``response_start`` is the character offset where the response begins,
    or None for text rendered by the caller, whose prompt/response boundary is unknown."""

    text: str
    response_start: int | None


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
) -> list[Message]:
    """A prompt (plain string or conversation) plus a response, as one conversation."""
    turns = [Message("user", prompt)] if isinstance(prompt, str) else _coerce_messages(prompt)
    return [*turns, Message("assistant", response)]


def render(
    messages: Sequence[Message | Mapping[str, Any]], text_format: TextFormat | None = None
) -> RenderedText:
    """Render a conversation whose last message is the assistant response being scored."""
    fmt = text_format or TextFormat()
    turns = _coerce_messages(messages)
    if not turns:
        raise FormattingError("a conversation needs at least one message (the response)")
    if turns[-1].role != "assistant":
        raise FormattingError(
            f"the last message is the response and must have role 'assistant', "
            f"got {turns[-1].role!r}"
        )
    parts: list[str] = []
    for turn in turns[:-1]:
        parts.append(fmt.prefix(turn.role))
        parts.append(turn.content)
    parts.append(fmt.assistant_prefix)
    head = "".join(parts)
    return RenderedText(text=head + turns[-1].content, response_start=len(head))


def render_text(text: str) -> RenderedText:
    """Text rendered by the caller (OpenRLHF's ``query``, vLLM's ``input``): taken as is."""
    return RenderedText(text=text, response_start=None)


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
