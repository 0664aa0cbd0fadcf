"""Routes that RL frameworks call as they are.

- ``POST /get_reward``: OpenRLHF's remote reward model (``--remote_rm_url
  http://host:port/get_reward``). It posts ``{"query": [...], "prompts": [...], "labels":
  [...]}`` where each query is prompt + response already rendered by the trainer, and reads
  ``rewards`` (newer versions also ``scores`` and ``extra_logs``).
- ``POST /classify``: the subset of vLLM's classification API that verl's reward loop calls:
  ``{"model", "input": str | [str], "activation" | "use_activation": false}``, reading
  ``data[i].probs[-1]``. With activation (vLLM's default) the probability is the sigmoid of
  the reward; without, the raw reward.
"""

from __future__ import annotations

import time
import uuid

import numpy as np
from fastapi import APIRouter, Response

from rmserve.service.routes.common import SCORING_ERRORS
from rmserve.service.schemas import (
    ClassifyData,
    ClassifyRequest,
    ClassifyResponse,
    ClassifyUsage,
    GetRewardRequest,
    GetRewardResponse,
)
from rmserve.service.state import ScorerDep, StateDep
from rmserve.service.tokenization import ItemInput

__all__ = ["router"]

router = APIRouter(tags=["compatibility"], responses=SCORING_ERRORS)


@router.post("/get_reward", summary="OpenRLHF remote reward model")
async def get_reward(
    body: GetRewardRequest, response: Response, scorer: ScorerDep, state: StateDep
) -> GetRewardResponse:
    """Rewards of OpenRLHF queries (prompt + response rendered by the trainer)."""
    items = []
    for i, query in enumerate(body.query):
        prompt = body.prompts[i] if body.prompts is not None else None
        # The query starts with its prompt: the boundary lets truncation drop prompt first.
        start = len(prompt) if prompt and query.startswith(prompt) else None
        items.append(ItemInput(text=query, response_start=start))
    result = await scorer.score(items, truncate_response=False)
    scores = scorer.normalize(result.scores) if state.settings.compat_normalize else result.scores
    response.headers.update(result.timing_headers())
    values = scores.tolist()
    return GetRewardResponse(rewards=values, scores=values, extra_logs={})


@router.post("/classify", summary="vLLM-compatible classify (verl)")
async def classify(
    body: ClassifyRequest, response: Response, scorer: ScorerDep, state: StateDep
) -> ClassifyResponse:
    """One class per input: ``probs = [sigmoid(reward)]``, or the raw reward without
    activation."""
    texts = body.texts()
    result = await scorer.score([ItemInput(text=t) for t in texts], truncate_response=False)
    scores = scorer.normalize(result.scores) if state.settings.compat_normalize else result.scores
    if body.activated():
        scores = (1.0 / (1.0 + np.exp(-scores.astype(np.float64)))).astype(np.float32)
    response.headers.update(result.timing_headers())
    return ClassifyResponse(
        id=f"classify-{uuid.uuid4().hex}",
        created=int(time.time()),
        model=scorer.manifest.model_name,
        data=[ClassifyData(index=i, probs=[float(s)]) for i, s in enumerate(scores.tolist())],
        usage=ClassifyUsage(prompt_tokens=result.tokens, total_tokens=result.tokens),
    )
