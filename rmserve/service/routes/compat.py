"""Routes that RL frameworks call as they are.

- ``POST /get_reward``: OpenRLHF's remote reward model (``--remote_rm_url
  http://host:port/get_reward``). It posts ``{"query": [...], "prompts": [...], "labels":
  [...]}`` where each query is prompt + response already rendered by the trainer, and reads
  ``rewards`` (newer versions also ``scores`` and ``extra_logs``).
- ``POST /classify``: the subset of vLLM's classification API that verl's reward loop calls:
  ``{"model", "input": str | [str], "activation" | "use_activation": false}``, reading
  ``data[i].probs[-1]``, and vLLM's chat form ``{"messages": [...]}`` (one conversation,
  rendered with the bundle's text format). As vLLM does for a sequence classifier: a model of
  one head answers ``probs = [sigmoid(reward)]`` (``label`` null, as rmserve always has); a
  model of K heads answers the softmax over its K logits, ``label`` naming the largest,
  ``num_classes = K``; without activation the raw values. ``compat_normalize`` applies to
  the one-head reward only: the bundle's statistics describe the reward head, not the logits
  a softmax compares.

- ``POST /slime/reward``: slime's remote reward model (``--rm-type remote_rm --rm-url
  http://host:port/slime/reward``), one sample ``{"prompt", "response", "label"}`` per call.
  slime keeps the JSON answer as the sample's reward, or the field its ``--reward-key`` names:
  ``{"reward", "score", "truncated"}``, and one field per head label for a model of several.
  ``prompt`` is what slime's data loader made of the dataset: the policy's chat template
  already applied, with its generation prompt (``--apply-chat-template``), a plain string,
  or chat messages. Rendered text is completed with the response as the reward model's own
  template renders a finished turn (when the templates are the same: the model card's text);
  a plain prompt or messages are rendered by that template.

OpenRLHF's ``rewards`` are the manifest's reward head, as ``/v1/score``'s ``scores``. The
callers of these doors cannot act on a 422, so a response that alone does not fit max_length
is cut (its start kept) and flagged rather than refused, unless
``RMSERVE_COMPAT_TRUNCATE_RESPONSE=false``; OpenRLHF gets the flags in ``extra_logs``.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import numpy as np
import numpy.typing as npt
from fastapi import APIRouter, Response

from rmserve.activations import sigmoid
from rmserve.service.errors import ApiError
from rmserve.service.pipeline import Scorer
from rmserve.service.routes.common import SCORING_ERRORS
from rmserve.service.schemas import (
    ClassifyData,
    ClassifyRequest,
    ClassifyResponse,
    ClassifyUsage,
    GetRewardRequest,
    GetRewardResponse,
    SlimeRewardRequest,
)
from rmserve.service.state import ScorerDep, StateDep
from rmserve.service.tokenization import ItemInput

__all__ = ["router"]

router = APIRouter(tags=["compatibility"], responses=SCORING_ERRORS)


@router.post("/get_reward", summary="OpenRLHF remote reward model")
async def get_reward(
    body: GetRewardRequest, response: Response, scorer: ScorerDep, state: StateDep
) -> GetRewardResponse:
    """Rewards of OpenRLHF queries (prompt + response rendered by the trainer); no queries
    (a shard OpenRLHF left empty) answer empty lists."""
    if not body.query:
        return GetRewardResponse(rewards=[], scores=[], extra_logs={})
    items = []
    for i, query in enumerate(body.query):
        prompt = body.prompts[i] if body.prompts is not None else None
        # The query starts with its prompt: the boundary lets truncation drop prompt first.
        start = len(prompt) if prompt and query.startswith(prompt) else None
        items.append(ItemInput(text=query, response_start=start))
    settings = state.settings
    result = await scorer.score(items, truncate_response=settings.compat_truncate_response)
    rewards = scorer.rewards(result, normalize=settings.compat_normalize)
    response.headers.update(result.timing_headers())
    values = rewards.scores.tolist()
    extra_logs: dict[str, Any] = {"truncated": [float(t) for t in result.truncated]}
    if scorer.manifest.is_ensemble:  # OpenRLHF logs every key, per query
        extra_logs["reward_std"] = rewards.std.tolist()  # on the scale of the rewards
    return GetRewardResponse(rewards=values, scores=values, extra_logs=extra_logs)


def class_probs(logits: npt.NDArray[np.float64], activated: bool) -> npt.NDArray[np.float64]:
    """vLLM's classify activation over (n, K) values: sigmoid for one class, softmax over
    the classes for several; the values as they are without activation."""
    if not activated:
        return logits
    if logits.shape[1] == 1:
        return sigmoid(logits)
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    soft: npt.NDArray[np.float64] = shifted / shifted.sum(axis=1, keepdims=True)
    return soft


def _check_template(body: ClassifyRequest, scorer: Scorer) -> None:
    """Refuse a chat_template other than the bundle's: scores of a conversation rendered
    another way would not be what the model was exported and checked on."""
    if body.chat_template is None:
        return
    own = getattr(scorer.manifest.text_format, "template", None)
    if body.chat_template != own:
        raise ApiError(
            422,
            "invalid_request",
            "chat_template: this server renders conversations with the bundle's own text "
            "format only (the one the model was exported and checked with); leave "
            "chat_template out",
        )


@router.post("/classify", summary="vLLM-compatible classify (verl)")
async def classify(
    body: ClassifyRequest, response: Response, scorer: ScorerDep, state: StateDep
) -> ClassifyResponse:
    """One entry per input (or for the conversation of ``messages``): ``probs`` the sigmoid
    of the reward for a model of one head, the softmax over the heads for several, or the raw
    values without activation."""
    _check_template(body, scorer)
    truncate = state.settings.compat_truncate_response
    result = await scorer.score(body.items(), truncate_response=truncate)
    manifest = scorer.manifest
    # An ensemble's members are not classes: it answers one reward (the server's aggregate).
    if manifest.has_several_heads and not manifest.is_ensemble:
        logits = result.head_scores.astype(np.float64)  # (n, K)
        # The activations keep the order of the logits: the label of the largest.
        winners: list[str | None] = [manifest.labels[int(i)] for i in logits.argmax(axis=1)]
    else:
        reward = scorer.rewards(result, normalize=state.settings.compat_normalize).scores
        logits = reward[:, None]  # (n, 1)
        # One head has no class to name: label stays null, as rmserve has always answered.
        winners = [None] * len(reward)
    probs = class_probs(logits, body.activated())
    # Probabilities in float32 as vLLM's; raw values exactly as /v1/score gives them.
    values: list[list[float]] = (
        probs.astype(np.float32).tolist() if body.activated() else probs.tolist()
    )
    response.headers.update(result.timing_headers())
    return ClassifyResponse(
        id=f"classify-{uuid.uuid4().hex}",
        created=int(time.time()),
        model=scorer.manifest.model_name,
        data=[
            ClassifyData(
                index=i,
                label=winners[i],
                probs=row,
                num_classes=logits.shape[1],
                truncated=result.truncated[i],
            )
            for i, row in enumerate(values)
        ],
        usage=ClassifyUsage(prompt_tokens=result.tokens, total_tokens=result.tokens),
    )


@router.post("/slime/reward", summary="slime remote reward model")
async def slime_reward(
    body: SlimeRewardRequest, response: Response, scorer: ScorerDep, state: StateDep
) -> dict[str, Any]:
    """One sample's reward: ``reward`` (the reward head, or an ensemble's aggregate; raw, or
    normalized under RMSERVE_COMPAT_NORMALIZE), the same as ``score``, ``truncated``, and
    for a model of several heads each head's raw value under its label (an ensemble's
    members as ``member_k``, and ``std``), so that slime's ``--reward-key`` picks any of
    them."""
    settings = state.settings
    truncate = settings.compat_truncate_response
    result = await scorer.score([body.to_input()], truncate_response=truncate)
    rewards = scorer.rewards(result, normalize=settings.compat_normalize)
    reward = float(rewards.scores[0])
    response.headers.update(result.timing_headers())
    answer: dict[str, Any] = {"reward": reward, "score": reward, "truncated": result.truncated[0]}
    manifest = scorer.manifest
    if manifest.has_several_heads:
        heads = zip(manifest.labels, result.head_scores[0], strict=True)
        answer |= {label: float(v) for label, v in heads}
    if manifest.is_ensemble:
        answer["std"] = float(rewards.std[0])  # on the scale of the reward
    return answer
