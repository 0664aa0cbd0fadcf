"""Request bodies and response parsing, shared by the sync and async clients.

Everything here is pure (no I/O), so both clients send byte-identical requests and read
responses the same way. Inputs are checked before anything is sent: a caller's bug gets a
``TypeError``/``ValueError`` naming the argument and index, not a 422 from far away.
Responses are checked too: a 2xx body without the promised fields raises
:class:`APIResponseValidationError` instead of an ``IndexError`` deep in a trainer.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import replace
from typing import Any, NamedTuple

import httpx

from rmserve.client._errors import APIResponseValidationError, APIStatusError
from rmserve.client._types import (
    CompareResult,
    ItemError,
    ModelInfo,
    Prompt,
    RankedResponse,
    RankResult,
    ScoreOptions,
    ScoreResult,
    Usage,
)

__all__ = [
    "ScoreChunk",
    "check_sequence",
    "chunked",
    "compare_body",
    "conversation_items",
    "merge_score_chunks",
    "pair_items",
    "parse_compare",
    "parse_models",
    "parse_rank",
    "parse_score_chunk",
    "prompt_fields",
    "rank_body",
    "rank_from_scores",
    "score_body",
    "shift_item_index",
    "text_items",
]

JSON = dict[str, Any]


# -- inputs ---------------------------------------------------------------------------------


def _check_str(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{where} must be a str, got {type(value).__name__}")
    return value


def check_sequence(value: object, where: str) -> list[Any]:
    """A list of the items of an ordered collection (list, tuple, numpy array...)."""
    # A str is a Sequence too; treating "abc" as three items would be a silent bug. A set or
    # a dict has no order to keep the scores in.
    unordered = isinstance(value, (AbstractSet, Mapping))
    if isinstance(value, (str, bytes)) or unordered or not isinstance(value, Collection):
        raise TypeError(f"{where} must be a list, got {type(value).__name__}")
    return list(value)


def _messages(value: object, where: str) -> list[dict[str, str]]:
    """Chat messages as ``[{"role", "content"}]``; extra keys (tool_calls, name) are dropped."""
    sequence = check_sequence(value, where)
    messages = []
    for i, message in enumerate(sequence):
        if not isinstance(message, Mapping):
            raise TypeError(
                f"{where}[{i}] must be a chat message {{'role': ..., 'content': ...}}, "
                f"got {type(message).__name__}"
            )
        if "role" not in message or "content" not in message:
            raise ValueError(f"{where}[{i}] needs both 'role' and 'content' keys")
        role = _check_str(message["role"], f"{where}[{i}]['role']")
        content = _check_str(message["content"], f"{where}[{i}]['content']")
        messages.append({"role": role, "content": content})
    return messages


def prompt_fields(prompt: object, where: str = "prompt") -> JSON:
    """``{"prompt": text}`` for a string, ``{"messages": [...]}`` for chat messages."""
    if isinstance(prompt, str):
        return {"prompt": prompt}
    try:
        return {"messages": _messages(prompt, where)}
    except TypeError as e:
        if not str(e).startswith(f"{where} must be a list"):
            raise
        kind = type(prompt).__name__
        raise TypeError(f"{where} must be a str or a list of chat messages, got {kind}") from None


def pair_items(prompts: Sequence[Prompt], responses: Sequence[str]) -> list[JSON]:
    """One item per (prompt, response); a chat prompt gets the response as assistant turn."""
    prompts = check_sequence(prompts, "prompts")
    responses = check_sequence(responses, "responses")
    if len(prompts) != len(responses):
        raise ValueError(
            f"prompts and responses must have the same length, got {len(prompts)} prompts and "
            f"{len(responses)} responses; repeat a shared prompt with [prompt] * len(responses)"
        )
    items = []
    for i, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
        response = _check_str(response, f"responses[{i}]")
        fields = prompt_fields(prompt, f"prompts[{i}]")
        if "prompt" in fields:
            items.append({"prompt": fields["prompt"], "response": response})
        else:
            messages = fields["messages"]
            items.append({"messages": [*messages, {"role": "assistant", "content": response}]})
    return items


def conversation_items(conversations: Sequence[Sequence[Mapping[str, Any]]]) -> list[JSON]:
    """One item per conversation; the last message of each is the response scored."""
    conversations = check_sequence(conversations, "conversations")
    items = []
    for i, conversation in enumerate(conversations):
        messages = _messages(conversation, f"conversations[{i}]")
        if not messages:
            raise ValueError(f"conversations[{i}] is empty; it needs at least the response")
        items.append({"messages": messages})
    return items


def text_items(texts: Sequence[str]) -> list[JSON]:
    """Text the caller already rendered in the model's text format (OpenRLHF's ``query``)."""
    texts = check_sequence(texts, "texts")
    return [{"text": _check_str(text, f"texts[{i}]")} for i, text in enumerate(texts)]


def chunked(items: Sequence[JSON], size: int) -> list[Sequence[JSON]]:
    if size < 1:
        raise ValueError(f"chunk size must be >= 1, got {size}")
    return [items[start : start + size] for start in range(0, len(items), size)]


def shift_item_index(error: APIStatusError, offset: int) -> None:
    """Make a chunk's error name the item's index in the caller's input, not in the chunk.

    The server reports the failing item (``details["index"]``) within the request it got;
    a caller who passed 500 items and got chunk 3's "index 2" would look at the wrong item.
    """
    index = error.details.get("index")
    if offset and isinstance(index, int) and not isinstance(index, bool):
        error.details["index"] = index + offset
        error.message = f"{error.message} (item {index + offset} of the call)"
        error.args = (str(error.args[0]) + f" (item {index + offset} of the call)",)


def score_body(items: Sequence[JSON], options: ScoreOptions) -> JSON:
    return {"items": list(items), **options.body_fields()}


def rank_body(
    prompt: Prompt,
    responses: Sequence[str],
    top_k: int | None,
    options: ScoreOptions,
) -> JSON:
    responses = check_sequence(responses, "responses")
    if not responses:
        raise ValueError("responses is empty; rank needs at least one response")
    body = prompt_fields(prompt) | options.body_fields()
    body["responses"] = [_check_str(r, f"responses[{i}]") for i, r in enumerate(responses)]
    if top_k is not None:
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
        body["top_k"] = top_k
    return body


def compare_body(prompt: Prompt, a: str, b: str, options: ScoreOptions) -> JSON:
    body = prompt_fields(prompt) | options.body_fields()
    body["a"] = _check_str(a, "a")
    body["b"] = _check_str(b, "b")
    return body


# -- responses ------------------------------------------------------------------------------


def _json_object(response: httpx.Response) -> JSON:
    try:
        body = response.json()
    except ValueError as e:
        raise APIResponseValidationError(
            f"{response.request.url.path} answered {response.status_code} with a body that is not "
            f"JSON: {response.text[:200]!r}",
            response=response,
        ) from e
    if not isinstance(body, dict):
        raise _invalid(response, f"expected a JSON object, got {type(body).__name__}")
    return body


def _invalid(response: httpx.Response, problem: str) -> APIResponseValidationError:
    return APIResponseValidationError(
        f"unexpected response from {response.request.url.path}: {problem}; is base_url an "
        "rmserve server of a compatible version?",
        response=response,
    )


def _float(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _float_list(
    response: httpx.Response,
    body: JSON,
    key: str,
    n: int | None,
    refused: AbstractSet[int] = frozenset(),
) -> list[float]:
    """The numbers of ``body[key]``; a null is allowed (read as nan) only at an index the
    answer's ``errors`` lists (``refused``)."""
    raw = body.get(key)
    if not isinstance(raw, list):
        raise _invalid(response, f"'{key}' is missing or not a list")
    values = [_float(v) for v in raw]
    if any(v is None and not (raw[i] is None and i in refused) for i, v in enumerate(values)):
        raise _invalid(response, f"'{key}' holds a value that is not a number")
    if n is not None and len(values) != n:
        raise _invalid(response, f"'{key}' has {len(values)} entries for {n} items sent")
    return [math.nan if v is None else v for v in values]


def _item_errors(response: httpx.Response, body: JSON, n: int) -> list[ItemError]:
    raw = body.get("errors") or []
    if not isinstance(raw, list):
        raise _invalid(response, "'errors' is not a list")
    errors = []
    for entry in raw:
        index = entry.get("index") if isinstance(entry, dict) else None
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < n:
            raise _invalid(response, f"errors entry {entry!r} has no index in range")
        details = entry.get("details")
        errors.append(
            ItemError(
                index=index,
                type=str(entry.get("type", "")),
                message=str(entry.get("message", "")),
                details=details if isinstance(details, dict) else {},
            )
        )
    return errors


class ScoreChunk:
    """The parsed answer to one ``/v1/score`` request (one chunk of a call)."""

    __slots__ = ("aggregate", "errors", "members", "model", "scores", "std", "tokens", "truncated")

    def __init__(
        self,
        model: str,
        scores: list[float],
        truncated: list[bool],
        tokens: int,
        errors: list[ItemError] | None = None,
        spread: Spread | None = None,
    ):
        self.model = model
        self.scores = scores
        self.truncated = truncated
        self.tokens = tokens
        self.errors = errors or []  # indices within this chunk
        spread = spread or Spread((), None, None)
        self.std, self.aggregate, self.members = spread


class Spread(NamedTuple):
    """An answer's ensemble fields: the members' std, the aggregate, the members if asked."""

    std: tuple[float, ...]
    aggregate: str | None
    members: tuple[tuple[float, ...], ...] | None


def _spread(response: httpx.Response, body: JSON, n: int, refused: AbstractSet[int]) -> Spread:
    """The ensemble fields of an answer; empty from a server that predates them."""
    std = tuple(_float_list(response, body, "std", n, refused)) if "std" in body else ()
    aggregate = body.get("aggregate")
    raw = body.get("members")
    members = None
    if raw is not None:
        if not isinstance(raw, list) or len(raw) != n:
            raise _invalid(response, f"'members' is not a list of {n} rows")
        members = tuple(
            (math.nan,)
            if row is None and i in refused
            else tuple(_float_list(response, {"members": row}, "members", None))
            for i, row in enumerate(raw)
        )
    return Spread(std, aggregate if isinstance(aggregate, str) else None, members)


def _model(response: httpx.Response, body: JSON) -> str:
    model = body.get("model")
    if not isinstance(model, str):
        raise _invalid(response, "'model' is missing or not a string")
    return model


def parse_score_chunk(response: httpx.Response, n_items: int) -> ScoreChunk:
    body = _json_object(response)
    errors = _item_errors(response, body, n_items)
    refused = {e.index for e in errors}
    scores = _float_list(response, body, "scores", n_items, refused)
    truncated = _truncated(response, body, n_items)
    tokens = _tokens(response, body)
    spread = _spread(response, body, n_items, refused)
    return ScoreChunk(_model(response, body), scores, truncated, tokens, errors, spread)


def merge_score_chunks(chunks: Sequence[ScoreChunk]) -> ScoreResult:
    """Concatenate chunk answers in request order; usage adds up; item errors are indexed
    in the whole call."""
    scores: list[float] = []
    truncated: list[bool] = []
    errors: list[ItemError] = []
    std: list[float] = []
    members: list[tuple[float, ...]] = []
    for chunk in chunks:
        errors.extend(replace(e, index=e.index + len(scores)) for e in chunk.errors)
        scores.extend(chunk.scores)
        truncated.extend(chunk.truncated)
        std.extend(chunk.std)
        members.extend(chunk.members or ())
    model = chunks[0].model if chunks else ""
    tokens = sum(chunk.tokens for chunk in chunks)
    return ScoreResult(
        model,
        tuple(scores),
        tuple(truncated),
        Usage(tokens),
        tuple(errors),
        std=tuple(std),
        aggregate=chunks[0].aggregate if chunks else None,
        members=tuple(members) if any(c.members is not None for c in chunks) else None,
    )


def _truncated(response: httpx.Response, body: JSON, n: int) -> list[bool]:
    raw = body.get("truncated", [False] * n)
    if not isinstance(raw, list) or len(raw) != n:
        raise _invalid(response, f"'truncated' is not a list of {n} booleans")
    return [bool(t) for t in raw]


def _tokens(response: httpx.Response, body: JSON) -> int:
    usage = body.get("usage")
    tokens = usage.get("tokens", 0) if isinstance(usage, dict) else 0
    if isinstance(tokens, bool) or not isinstance(tokens, int):
        raise _invalid(response, "'usage.tokens' is not an integer")
    return tokens


def parse_rank(response: httpx.Response, n_responses: int) -> RankResult:
    body = _json_object(response)
    raw = body.get("ranking")
    if not isinstance(raw, list):
        raise _invalid(response, "'ranking' is missing or not a list")
    ranking = []
    for entry in raw:
        index = entry.get("index") if isinstance(entry, dict) else None
        score = _float(entry.get("score")) if isinstance(entry, dict) else None
        if (
            not isinstance(index, int)
            or isinstance(index, bool)
            or score is None
            or not 0 <= index < n_responses
        ):
            raise _invalid(response, f"ranking entry {entry!r} is not {{index, score}} in range")
        ranking.append(RankedResponse(index, score))
    errors = _item_errors(response, body, n_responses)
    refused = {e.index for e in errors}
    if "scores" in body:
        scores = _float_list(response, body, "scores", n_responses, refused)
    elif len(ranking) == n_responses:  # an older server: rebuild request order from ranking
        scores = [0.0] * n_responses
        for entry in ranking:
            scores[entry.index] = entry.score
    else:
        raise _invalid(response, "'scores' is missing and the ranking does not cover all")
    return RankResult(
        _model(response, body),
        tuple(ranking),
        tuple(scores),
        tuple(_truncated(response, body, n_responses)),
        Usage(_tokens(response, body)),
        tuple(errors),
        *_spread(response, body, n_responses, refused),
    )


def rank_from_scores(result: ScoreResult, top_k: int | None) -> RankResult:
    """Rank locally from a score call: highest first, ties by original position.

    Used when a rank call has more responses than one request may carry. A score does not
    depend on what it is batched with (docs/architecture.md: serving) and the server sorts
    the same way (stable, descending), so this equals the server's own ranking.
    """
    scores = result.scores
    refused = {e.index for e in result.errors}
    kept = [i for i in range(len(scores)) if i not in refused]
    order = sorted(kept, key=lambda i: (-scores[i], i))
    if top_k is not None:
        order = order[:top_k]
    ranking = tuple(RankedResponse(i, scores[i]) for i in order)
    return RankResult(result.model, ranking, scores, result.truncated, result.usage, result.errors)


def parse_compare(response: httpx.Response) -> CompareResult:
    body = _json_object(response)
    scores = _float_list(response, body, "scores", 2)
    p = _float(body.get("p_a_preferred"))
    if p is None or not 0.0 <= p <= 1.0:
        raise _invalid(response, "'p_a_preferred' is missing or not a probability")
    truncated = _truncated(response, body, 2)
    return CompareResult(
        _model(response, body),
        (scores[0], scores[1]),
        p,
        (truncated[0], truncated[1]),
        Usage(_tokens(response, body)),
        *_spread(response, body, 2, frozenset()),
    )


def _optional_mapping(value: object) -> Mapping[str, Any] | None:
    return value if isinstance(value, Mapping) else None


def parse_models(response: httpx.Response) -> ModelInfo:
    """Read rmserve's OpenAI-style model list (one card holding the manifest)."""
    body = _json_object(response)
    card: JSON = body
    data = body.get("data")
    if isinstance(data, list):
        if not data or not isinstance(data[0], dict):
            raise _invalid(response, "'data' holds no model card")
        card = data[0]
    manifest = card.get("manifest", card)
    if not isinstance(manifest, dict):
        raise _invalid(response, "'manifest' is not an object")
    name = manifest.get("model_name", card.get("id"))
    if not isinstance(name, str):
        raise _invalid(response, "'model_name' is missing or not a string")
    base_model = manifest.get("base_model")
    max_length = manifest.get("max_length")
    variants = manifest.get("variants")
    precision = card.get("precision")
    provider = card.get("provider")
    return ModelInfo(
        model_name=name,
        precision=precision if isinstance(precision, str) else None,
        provider=provider if isinstance(provider, str) else None,
        base_model=base_model if isinstance(base_model, str) else None,
        max_length=max_length if isinstance(max_length, int) else None,
        architecture=_optional_mapping(manifest.get("architecture")),
        normalization=_optional_mapping(manifest.get("normalization")),
        evaluation=_optional_mapping(manifest.get("evaluation")),
        variants=variants if isinstance(variants, Mapping) else {},
        manifest=manifest,
    )
