"""Typed results of the client's methods, and the shapes of its inputs.

Results are frozen dataclasses holding tuples, so a result can be cached, hashed and shared
between threads without anyone changing it underneath. ``list(result.scores)`` gives a list.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypedDict

__all__ = [
    "Aggregate",
    "BestOfN",
    "CompareResult",
    "Conversation",
    "ItemError",
    "Message",
    "ModelInfo",
    "Prompt",
    "RankResult",
    "RankedResponse",
    "ScoreOptions",
    "ScoreResult",
    "Usage",
]


class Message(TypedDict):
    """One chat turn, as in OpenAI/TRL chat data. rmserve knows system, user and assistant."""

    role: str
    content: str


# How an ensemble's members become one reward (the server's RMSERVE_ENSEMBLE_AGGREGATE when
# not given): their mean, their minimum (worst case), or mean - uwo_lambda * variance.
Aggregate = Literal["mean", "min", "uwo"]
AGGREGATES: tuple[Aggregate, ...] = ("mean", "min", "uwo")

# A conversation whose last message is the assistant response to score.
Conversation = Sequence[Mapping[str, Any]]
# A prompt is plain text or the chat messages before the response.
Prompt = str | Sequence[Mapping[str, Any]]


@dataclass(frozen=True)
class Usage:
    tokens: int  # tokens the server ran through the model for this call (all chunks)


@dataclass(frozen=True)
class ItemError:
    """Why one item got no score (its score is NaN); the other items were scored."""

    index: int  # position of the item in the call's inputs (across chunks)
    type: str  # response_too_long, item_too_long or invalid_item
    message: str  # what was wrong and what to change
    details: Mapping[str, Any] = field(default_factory=dict)  # lengths and limits


@dataclass(frozen=True)
class ScoreResult:
    """Scores in the order of the inputs; ``truncated[i]`` says whether item i was cut.

    An item the server could not score (a response that does not fit, a conversation the
    chat template refuses) has ``nan`` as its score and an entry in ``errors``; the others are
    scored (``math.isnan`` or numpy's ``nan*`` functions skip it).
    """

    model: str
    scores: tuple[float, ...]
    truncated: tuple[bool, ...]
    usage: Usage
    errors: tuple[ItemError, ...] = ()
    # An ensemble's members' standard deviation per item (0.0 for one model; () from a server
    # that predates ensembles), the aggregate ``scores`` holds, and with return_members=True
    # each item's reward by every member.
    std: tuple[float, ...] = ()
    aggregate: str | None = None
    members: tuple[tuple[float, ...], ...] | None = None

    def __len__(self) -> int:
        return len(self.scores)


@dataclass(frozen=True)
class RankedResponse:
    index: int  # position of the response in the request's ``responses``
    score: float


@dataclass(frozen=True)
class RankResult:
    """Responses best first (highest reward first), and every score in request order."""

    model: str
    ranking: tuple[RankedResponse, ...]  # best first; only the best top_k when asked
    scores: tuple[float, ...]  # all responses' scores, in request order (nan: see errors)
    truncated: tuple[bool, ...]  # in request order
    usage: Usage
    errors: tuple[ItemError, ...] = ()  # responses not scored, hence not ranked
    std: tuple[float, ...] = ()  # the members' std per response, request order
    aggregate: str | None = None
    members: tuple[tuple[float, ...], ...] | None = None  # with return_members=True

    @property
    def best(self) -> RankedResponse:
        return self.ranking[0]

    @property
    def indices(self) -> tuple[int, ...]:
        return tuple(entry.index for entry in self.ranking)


@dataclass(frozen=True)
class CompareResult:
    """Two rewards and the Bradley-Terry probability that ``a`` is preferred to ``b``."""

    model: str
    scores: tuple[float, float]  # (reward of a, reward of b), normalized if asked
    p_a_preferred: float  # sigmoid(raw_a - raw_b), whatever normalize says
    truncated: tuple[bool, bool]
    usage: Usage
    std: tuple[float, ...] = ()  # the members' std of a and of b
    aggregate: str | None = None
    members: tuple[tuple[float, ...], ...] | None = None  # with return_members=True

    @property
    def preferred(self) -> Literal["a", "b"]:
        return "a" if self.scores[0] >= self.scores[1] else "b"


@dataclass(frozen=True)
class ModelInfo:
    """The served model (``GET /v1/models``): its bundle manifest without file hashes.

    The named fields are the ones a trainer usually needs; ``manifest`` keeps the whole
    public manifest, so fields added to it later stay reachable.
    """

    model_name: str
    precision: str | None  # the variant running: fp32, int8 or fp16
    provider: str | None  # the ONNX Runtime provider: cpu or cuda
    base_model: str | None
    max_length: int | None
    architecture: Mapping[str, Any] | None
    normalization: Mapping[str, Any] | None
    evaluation: Mapping[str, Any] | None
    variants: Mapping[str, Any]
    manifest: Mapping[str, Any] = field(repr=False)


@dataclass(frozen=True)
class BestOfN:
    """The winner of a best-of-n selection, with every candidate's score."""

    best: str  # the best candidate's text
    best_index: int  # its position in ``candidates``
    best_score: float
    candidates: tuple[str, ...]
    scores: tuple[float, ...]  # one per candidate, in candidate order


@dataclass(frozen=True)
class ScoreOptions:
    """How the items of a scoring call are scored; checked when made, so a bad value fails
    before anything is sent. None leaves a choice to the server.

    ``normalize``: rewards rescaled with the bundle's reference mean and std.
    ``truncate_response``: True lets the server cut a response too long to fit, False refuses
    it (nan and an :class:`ItemError`), None follows RMSERVE_TRUNCATE_RESPONSE.
    ``aggregate``: an ensemble's reward (``mean``, ``min``, or ``uwo``, the mean minus
    ``uwo_lambda`` times the members' variance); None: RMSERVE_ENSEMBLE_AGGREGATE.
    ``return_members``: each member's reward in ``ScoreResult.members``.
    """

    normalize: bool = False
    truncate_response: bool | None = None
    aggregate: Aggregate | None = None
    uwo_lambda: float | None = None
    return_members: bool = False

    def __post_init__(self) -> None:
        if self.aggregate is not None and self.aggregate not in AGGREGATES:
            raise ValueError(
                f"aggregate must be one of {', '.join(AGGREGATES)}, not {self.aggregate!r}"
            )
        lam = self.uwo_lambda
        if lam is not None:
            if isinstance(lam, bool) or not isinstance(lam, (int, float)):
                raise TypeError(f"uwo_lambda must be a number, got {type(lam).__name__}")
            if not (math.isfinite(lam) and lam >= 0):
                raise ValueError(f"uwo_lambda must be a finite number >= 0, got {lam}")

    def body_fields(self) -> dict[str, Any]:
        """The request body's fields for these options (a None choice is left out)."""
        fields: dict[str, Any] = {"normalize": self.normalize}
        if self.truncate_response is not None:
            fields["truncate_response"] = self.truncate_response
        if self.aggregate is not None:
            fields["aggregate"] = self.aggregate
        if self.uwo_lambda is not None:
            fields["uwo_lambda"] = float(self.uwo_lambda)
        if self.return_members:
            fields["return_members"] = True
        return fields
