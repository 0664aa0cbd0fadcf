"""Client for an rmserve reward server; depends on httpx only.

Import this in an RL trainer's environment: it pulls in nothing heavier than httpx (no
torch, numpy, fastapi or onnxruntime), and nothing from ``rmserve.service`` or
``rmserve.training``.

    from rmserve.client import RewardClient

    with RewardClient("http://127.0.0.1:8000") as client:
        result = client.score(["How do I bake bread?"], ["Mix flour, water, yeast..."])
        print(result.scores, result.truncated)

Clients: :class:`RewardClient` (blocking) and :class:`AsyncRewardClient` (asyncio/trio),
with ``score``, ``score_messages``, ``score_texts``, ``score_items``, ``rank``, ``compare``,
``models``, ``ready``, ``health``; how items are scored (normalization, truncation, an
ensemble's aggregate) is a :class:`ScoreOptions`, given as keyword arguments. Integrations:
:func:`trl_reward_func` / :func:`async_trl_reward_func` for TRL's GRPOTrainer,
:func:`best_of_n` / :func:`async_best_of_n`.

Exceptions (all carry the server's message; status errors also ``status_code``,
``error_type`` and ``retry_after``)::

    RewardServerError
    ├── APIConnectionError             server unreachable (after retries)
    │   └── APITimeoutError            request timed out (after retries)
    ├── APIResponseValidationError     2xx with a body that breaks the API contract
    └── APIStatusError                 any 4xx/5xx; retried only for 408, 429, 5xx
        ├── BadRequestError            400, 422 (e.g. response too long to fit)
        ├── AuthenticationError        401, 403
        ├── NotFoundError              404
        ├── RequestTooLargeError       413
        ├── OverloadedError            429, 503 (queue full, not ready)
        └── InternalServerError        other 5xx
"""

from rmserve.client._async_client import AsyncRewardClient
from rmserve.client._base import API_KEY_ENV, BASE_URL_ENV
from rmserve.client._best_of_n import async_best_of_n, best_of_n
from rmserve.client._client import RewardClient
from rmserve.client._errors import (
    APIConnectionError,
    APIResponseValidationError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    InternalServerError,
    NotFoundError,
    OverloadedError,
    RequestTooLargeError,
    RewardServerError,
)
from rmserve.client._trl import (
    AsyncTRLRewardFunction,
    TRLRewardFunction,
    async_trl_reward_func,
    trl_reward_func,
)
from rmserve.client._types import (
    Aggregate,
    BestOfN,
    CompareResult,
    ItemError,
    Message,
    ModelInfo,
    RankedResponse,
    RankResult,
    ScoreOptions,
    ScoreResult,
    Usage,
)

__all__ = [
    "API_KEY_ENV",
    "BASE_URL_ENV",
    "APIConnectionError",
    "APIResponseValidationError",
    "APIStatusError",
    "APITimeoutError",
    "Aggregate",
    "AsyncRewardClient",
    "AsyncTRLRewardFunction",
    "AuthenticationError",
    "BadRequestError",
    "BestOfN",
    "CompareResult",
    "InternalServerError",
    "ItemError",
    "Message",
    "ModelInfo",
    "NotFoundError",
    "OverloadedError",
    "RankResult",
    "RankedResponse",
    "RequestTooLargeError",
    "RewardClient",
    "RewardServerError",
    "ScoreOptions",
    "ScoreResult",
    "TRLRewardFunction",
    "Usage",
    "async_best_of_n",
    "async_trl_reward_func",
    "best_of_n",
    "trl_reward_func",
]
