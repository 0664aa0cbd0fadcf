"""Best-of-n selection: score n candidates for one prompt and keep the highest reward.

Given either the candidates or a ``generate(prompt, n)`` callable that samples them (from a
vLLM server, a transformers pipeline, an API), rank them with the server and return the
winner with every score, so callers can also log the spread or keep the top few.
Ties go to the earlier candidate, as in the server's ranking.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Sequence

from rmserve.client._async_client import AsyncRewardClient
from rmserve.client._client import RewardClient
from rmserve.client._payloads import check_sequence
from rmserve.client._types import BestOfN, Prompt, RankResult

__all__ = ["Generate", "async_best_of_n", "best_of_n"]

# generate(prompt, n) -> n candidate responses (sync, or async for async_best_of_n).
Generate = Callable[[Prompt, int], Sequence[str]]
AsyncGenerate = Callable[[Prompt, int], Sequence[str] | Awaitable[Sequence[str]]]


def _check_arguments(candidates: Sequence[str] | None, generate: object, n: int | None) -> None:
    if (candidates is None) == (generate is None):
        raise ValueError("pass exactly one of candidates=[...] or generate=callable")
    if candidates is not None and n is not None and n != len(candidates):
        raise ValueError(f"n={n} but {len(candidates)} candidates were given; drop n")
    if generate is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ValueError(f"generate= needs n, the number of candidates to sample (>= 1), got {n!r}")


def _check_candidates(candidates: object, expected: int | None) -> tuple[str, ...]:
    texts = check_sequence(candidates, "candidates")
    if not texts:
        raise ValueError("best_of_n needs at least one candidate")
    for i, candidate in enumerate(texts):
        if not isinstance(candidate, str):
            raise TypeError(f"candidates[{i}] must be a str, got {type(candidate).__name__}")
    if expected is not None and len(texts) != expected:
        raise ValueError(f"generate returned {len(texts)} candidates, expected n={expected}")
    return tuple(texts)


def _select(candidates: tuple[str, ...], ranking: RankResult) -> BestOfN:
    best = ranking.best
    return BestOfN(
        best=candidates[best.index],
        best_index=best.index,
        best_score=best.score,
        candidates=candidates,
        scores=ranking.scores,
    )


def best_of_n(
    client: RewardClient,
    prompt: Prompt,
    candidates: Sequence[str] | None = None,
    *,
    generate: Generate | None = None,
    n: int | None = None,
    normalize: bool = False,
    truncate_response: bool | None = None,
) -> BestOfN:
    """Return the candidate with the highest reward for ``prompt``, with all scores.

    Pass the ``candidates``, or ``generate`` and ``n``: ``generate(prompt, n)`` must return n
    strings. More candidates than ``client.max_items_per_request`` are scored in chunks.
    ``normalize`` and ``truncate_response`` are passed to the server as for ``score``.
    """
    _check_arguments(candidates, generate, n)
    if generate is not None:
        texts = _check_candidates(generate(prompt, n or 0), n)
    else:
        texts = _check_candidates(candidates, None)
    ranking = client.rank(prompt, texts, normalize=normalize, truncate_response=truncate_response)
    return _select(texts, ranking)


async def async_best_of_n(
    client: AsyncRewardClient,
    prompt: Prompt,
    candidates: Sequence[str] | None = None,
    *,
    generate: AsyncGenerate | None = None,
    n: int | None = None,
    normalize: bool = False,
    truncate_response: bool | None = None,
) -> BestOfN:
    """The async form of :func:`best_of_n`; ``generate`` may be sync or async."""
    _check_arguments(candidates, generate, n)
    if generate is not None:
        sampled = generate(prompt, n or 0)
        if inspect.isawaitable(sampled):
            sampled = await sampled
        texts = _check_candidates(sampled, n)
    else:
        texts = _check_candidates(candidates, None)
    ranking = await client.rank(
        prompt, texts, normalize=normalize, truncate_response=truncate_response
    )
    return _select(texts, ranking)
