"""A model's own chat template, rendered exactly as transformers renders it, without transformers.

A reward model published on the hub carries a Jinja chat template in its tokenizer, and its
model card scores ``tokenizer.apply_chat_template(conversation, tokenize=True)``. To give the
same number, rmserve must produce the same string, byte for byte, in a service that imports
neither torch nor transformers. So this module rebuilds the environment that transformers 5
compiles templates in (``transformers/utils/chat_template_utils.py``,
``_cached_compile_jinja_template``), piece by piece:

- jinja2's ``ImmutableSandboxedEnvironment`` (templates from the hub are untrusted code) with
  ``trim_blocks`` and ``lstrip_blocks``, and the ``loopcontrols`` extension;
- a ``{% generation %}`` block tag that renders its body (transformers uses it to track
  assistant tokens; the text is the same);
- ``tojson`` without HTML escaping, with ``indent``/``separators``/``sort_keys``;
- the globals ``raise_exception`` (raises jinja2's ``TemplateError`` with the template's own
  message), ``strftime_now``, and the restricted ``dict`` and ``namespace``;
- the render call's variables: ``messages``, ``tools``, ``documents``,
  ``add_generation_prompt`` and the tokenizer's special tokens (``bos_token``, ``eos_token``,
  ...), as ``apply_chat_template`` passes them.

``tests/core/test_chat_template.py`` pins the equality with transformers on hundreds of
generated conversations across template families. jinja2 is imported lazily, so ``import
rmserve`` stays free of it.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import jinja2

__all__ = ["ChatTemplateError", "compile_chat_template", "render_chat_template"]


class ChatTemplateError(ValueError):
    """The template refused the conversation (``raise_exception``) or failed while rendering;
    the message carries the template's own words."""


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # jinja2's own tojson escapes <, >, & and ' for HTML; chat templates need the plain JSON.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return dt.datetime.now().strftime(fmt)


class _TemplateDict:
    """``dict(...)`` inside templates, without attribute access to the real type."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict.fromkeys(*args, **kwargs)


@lru_cache(maxsize=8)
def compile_chat_template(source: str) -> jinja2.Template:
    """Compile ``source`` in a sandbox configured as transformers configures it."""
    import jinja2
    import jinja2.ext
    import jinja2.nodes
    import jinja2.utils
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(jinja2.ext.Extension):
        """``{% generation %}...{% endgeneration %}``: renders its body unchanged."""

        tags = {"generation"}  # noqa: RUF012 - jinja2's own class attribute

        def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            call = self.call_method("_body")
            return jinja2.nodes.CallBlock(call, [], [], body).set_lineno(lineno)

        def _body(self, caller: Any) -> str:
            return str(caller())

    class TemplateNamespace(jinja2.utils.Namespace):
        """``namespace(...)`` that refuses underscore names (no reach into CPython)."""

        def __init__(*args: Any, **kwargs: Any) -> None:
            self, rest = args[0], args[1:]
            attrs = dict(*rest, **kwargs)
            for name in attrs:
                TemplateNamespace.check_name(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name: str, value: Any) -> None:
            TemplateNamespace.check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def check_name(name: object) -> None:
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(
                    f"chat templates cannot store underscore-prefixed attributes ({name!r})"
                )

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = TemplateNamespace
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateError as e:
        raise ChatTemplateError(f"the chat template does not compile: {e}") from e


def _plain(value: Any) -> Any:
    """Plain JSON data only reaches the template (as transformers' ``_plain_template_data``)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return f"<{type(value).__name__}>"


def render_chat_template(
    source: str,
    messages: Sequence[Mapping[str, Any]],
    special_tokens: Mapping[str, Any],
    *,
    add_generation_prompt: bool = False,
) -> str:
    """The text ``apply_chat_template(messages, tokenize=False)`` gives for this template and
    these special tokens; raises :class:`ChatTemplateError` with the template's message."""
    import jinja2

    template = compile_chat_template(source)
    # transformers drops keys whose value is None before rendering (templates test `in`).
    chat = [{k: _plain(v) for k, v in m.items() if v is not None} for m in messages]
    variables = {
        **{k: _plain(v) for k, v in special_tokens.items()},
        "messages": chat,
        "tools": None,
        "documents": None,
        "add_generation_prompt": add_generation_prompt,
    }
    try:
        return template.render(**variables)
    except jinja2.exceptions.TemplateError as e:
        raise ChatTemplateError(str(e)) from e
    except (TypeError, ValueError, KeyError, AttributeError, IndexError) as e:
        # A template fed what it cannot handle (a content list it concatenates as a string).
        raise ChatTemplateError(f"the chat template failed on this conversation: {e}") from e
