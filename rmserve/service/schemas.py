"""Request and response models of every route (docs/architecture.md: The wire API).

The ``/v1`` routes are strict: unknown fields are refused, so a typo is an error, not a
silently ignored option, and a flag is JSON ``true`` or ``false`` (``"yes"``, ``"false"`` or
``1`` is a 422 naming the field, not a guess). The compatibility routes ``/get_reward``
(OpenRLHF), ``/classify`` (vLLM, as verl calls it) and ``/slime/reward`` accept and ignore
the other fields those projects send, and ``/classify`` reads its flags leniently, as pydantic
does (``"false"``, ``0``, ``"off"``), whatever form its callers send them in.

Chat messages are checked only for shape here (a non-empty role, a string or a list of content
parts): which roles and contents a conversation may have is the bundle's text format's call
(the HH transcript knows system/user/assistant and plain text; a chat template decides
itself), answered as a 422 ``invalid_item`` naming the item.

A model of several heads (the manifest's ``labels``) answers ``scores`` with its reward head
and adds ``head_scores`` and ``labels``; for a model of one head those two fields are absent.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, model_validator

from rmserve.service.tokenization import ItemInput

__all__ = [
    "ChatMessage",
    "ClassifyData",
    "ClassifyRequest",
    "ClassifyResponse",
    "ClassifyUsage",
    "CompareRequest",
    "CompareResponse",
    "EnsembleOptions",
    "ErrorDetail",
    "ErrorResponse",
    "GetRewardRequest",
    "GetRewardResponse",
    "HealthResponse",
    "ItemError",
    "ModelCard",
    "ModelsResponse",
    "RankRequest",
    "RankResponse",
    "RankedResponse",
    "ScoreItem",
    "ScoreRequest",
    "ScoreResponse",
    "ScoringOptions",
    "SlimeRewardRequest",
    "Usage",
]

_STRICT = ConfigDict(extra="forbid")
_LAX = ConfigDict(extra="allow")


class ChatMessage(BaseModel):
    """One chat turn as OpenAI clients send it; other fields (``name``, ``tool_calls``) pass
    through to a chat template, which may use them."""

    model_config = ConfigDict(extra="allow")
    role: str = Field(
        min_length=1,
        description="The speaker; which roles work is the model's text format's call (the "
        "HH transcript: system, user, assistant).",
    )
    content: str | list[dict[str, Any]] = Field(
        description='The text, or a list of content parts ({"type": "text", "text": ...}) '
        "for a chat template that reads them."
    )


class ScoreItem(BaseModel):
    """Exactly one form: prompt + response, messages (last = response), or rendered text."""

    model_config = _STRICT
    prompt: str | list[ChatMessage] | None = Field(
        default=None, description="The prompt: a string or the conversation before the response."
    )
    response: str | None = Field(default=None, description="The response to score.")
    messages: list[ChatMessage] | None = Field(
        default=None, description="A conversation whose last message (assistant) is scored."
    )
    text: str | None = Field(
        default=None, description="Text already rendered by the caller, scored as is."
    )

    @model_validator(mode="after")
    def _one_form(self) -> ScoreItem:
        forms = [
            self.prompt is not None or self.response is not None,
            self.messages is not None,
            self.text is not None,
        ]
        if sum(forms) != 1:
            raise ValueError("give exactly one of: prompt and response, messages, or text")
        if forms[0] and (self.prompt is None or self.response is None):
            raise ValueError("prompt and response go together; give both")
        return self

    def to_input(self) -> ItemInput:
        if self.text is not None:
            return ItemInput(text=self.text)
        if self.messages is not None:
            return ItemInput(messages=[m.model_dump() for m in self.messages])
        prompt = self.prompt if isinstance(self.prompt, str) else _dump(self.prompt or [])
        return ItemInput(prompt=prompt, response=self.response)


def _dump(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    return [m.model_dump() for m in messages]


class EnsembleOptions(BaseModel):
    """How an ensemble's members become the reward (one model is an ensemble of one)."""

    aggregate: Literal["mean", "min", "uwo"] | None = Field(
        default=None,
        description="mean of the members, min (worst-case optimisation) or uwo (mean - "
        "uwo_lambda * variance; uncertainty-weighted). Absent: the server's "
        "RMSERVE_ENSEMBLE_AGGREGATE (default mean).",
    )
    uwo_lambda: float | None = Field(
        default=None,
        ge=0,
        allow_inf_nan=False,
        description="The variance weight of uwo (absent: RMSERVE_UWO_LAMBDA); only with uwo.",
    )
    return_members: StrictBool = Field(
        default=False, description="Add members: each item's reward by every member."
    )


class ScoringOptions(EnsembleOptions):
    """What every /v1 scoring request may ask besides its items: the scale of the rewards,
    the truncation policy and the ensemble options."""

    model_config = _STRICT
    normalize: StrictBool = Field(
        default=False, description="Return (score - mean) / std with the bundle's statistics."
    )
    truncate_response: StrictBool | None = Field(
        default=None,
        description="A response that alone does not fit max_length: cut its end and flag it "
        "(true) or refuse that item (false). Absent: the server's RMSERVE_TRUNCATE_RESPONSE "
        "(default false).",
    )


_STD = Field(
    description="The ensemble members' standard deviation per item (0 for one model; null for "
    "an item in errors); in normalized units when normalize is true."
)
_MEMBERS = Field(
    default=None,
    description="Only with return_members: each item's reward by every member (one for a "
    "single model), normalized when asked; null for an item in errors.",
)
_AGGREGATE = Field(description="The aggregate scores holds: mean, min or uwo.")


class ItemError(BaseModel):
    """Why one item of a multi-item request got no score (its score is null)."""

    index: int = Field(description="Position of the item in the request.")
    type: str = Field(description="response_too_long, item_too_long or invalid_item.")
    message: str = Field(description="What was wrong and what to change.")
    details: dict[str, Any] = Field(default_factory=dict, description="Lengths and limits.")


_ITEM_ERRORS = Field(
    default=None,
    description="Only when some items could not be scored (their score is null; the others "
    "are scored): one entry per such item. A request none of whose items can be scored "
    "answers 422 instead.",
)


class Usage(BaseModel):
    """What the request cost the model."""

    tokens: int = Field(description="Tokens the model read (special tokens included).")


class ScoreRequest(ScoringOptions):
    """Items to score, each a (prompt, response) pair, a conversation whose last message is
    the response, or text already rendered in the model's format."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "items": [
                        {"prompt": "How do I bake bread?", "response": "Knead, rise, bake."},
                        {
                            "messages": [
                                {"role": "user", "content": "How do I bake bread?"},
                                {"role": "assistant", "content": "Buy some."},
                            ]
                        },
                    ]
                },
                {
                    "items": [{"prompt": "Say hi.", "response": "Hi!"}],
                    "normalize": True,
                    "truncate_response": True,
                    "aggregate": "uwo",
                    "uwo_lambda": 1.0,
                    "return_members": True,
                },
            ]
        },
    )
    items: list[ScoreItem] = Field(min_length=1, description="Items to score.")


_HEAD_SCORES = Field(
    default=None,
    description="Models of several heads only: every head's raw value per item, in the order "
    "of labels (never normalized). Absent for a model of one head.",
)
_LABELS = Field(
    default=None,
    description="Models of several heads only: the name of each head; scores is the "
    "manifest's reward_head among them. Absent for a model of one head.",
)


class ScoreResponse(BaseModel):
    """The reward of every item, in request order, with what the server did to each."""

    model: str
    scores: list[float | None] = Field(
        description="The reward of each item, in order (the reward head, or the ensemble's "
        "aggregate); null for an item in errors."
    )
    aggregate: str = _AGGREGATE
    std: list[float | None] = _STD
    members: list[list[float] | None] | None = _MEMBERS
    head_scores: list[list[float] | None] | None = _HEAD_SCORES
    labels: list[str] | None = _LABELS
    truncated: list[bool]
    errors: list[ItemError] | None = _ITEM_ERRORS
    usage: Usage


class _PromptedRequest(ScoringOptions):
    """Responses to one prompt: the prompt as a string or as the conversation before them."""

    model_config = _STRICT
    prompt: str | None = Field(default=None, description="The prompt as a string.")
    messages: list[ChatMessage] | None = Field(
        default=None, description="The conversation before the responses."
    )

    @model_validator(mode="after")
    def _one_prompt(self) -> _PromptedRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        return self

    def item(self, response: str) -> ItemInput:
        if self.prompt is not None:
            return ItemInput(prompt=self.prompt, response=response)
        return ItemInput(prompt=_dump(self.messages or []), response=response)


class RankRequest(_PromptedRequest):
    """Candidate responses to one prompt, to rank best first (best-of-n, a GRPO group)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "prompt": "How do I bake bread?",
                    "responses": ["Knead, rise, bake.", "Buy some.", "I cannot help."],
                    "top_k": 2,
                },
                {
                    "messages": [
                        {"role": "system", "content": "Be brief."},
                        {"role": "user", "content": "How do I bake bread?"},
                    ],
                    "responses": ["Knead, rise, bake.", "Buy some."],
                },
            ]
        },
    )
    responses: list[str] = Field(min_length=1, description="Candidate responses to rank.")
    top_k: int | None = Field(default=None, ge=1, description="Return only the best k.")


class RankedResponse(BaseModel):
    """One response of the ranking."""

    index: int = Field(description="Position of the response in the request.")
    score: float


class RankResponse(BaseModel):
    """The responses best first, and every score in request order."""

    model: str
    ranking: list[RankedResponse] = Field(
        description="Best first; a response in errors is left out."
    )
    scores: list[float | None] = Field(
        description="All scores, in request order; null for a response in errors."
    )
    aggregate: str = _AGGREGATE
    std: list[float | None] = _STD
    members: list[list[float] | None] | None = _MEMBERS
    head_scores: list[list[float] | None] | None = _HEAD_SCORES
    labels: list[str] | None = _LABELS
    truncated: list[bool]
    errors: list[ItemError] | None = _ITEM_ERRORS
    usage: Usage


class CompareRequest(_PromptedRequest):
    """Two responses to one prompt: which one the model prefers, and how surely."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"prompt": "How do I bake bread?", "a": "Knead, rise, bake.", "b": "Buy some."}
            ]
        },
    )
    a: str = Field(description="First response.")
    b: str = Field(description="Second response.")


class CompareResponse(BaseModel):
    """Both rewards and the Bradley-Terry probability that ``a`` is preferred."""

    model: str
    scores: list[float] = Field(description="[score of a, score of b]")
    p_a_preferred: float = Field(
        description="sigmoid(raw a - raw b): Bradley-Terry P(a > b), of the raw aggregate."
    )
    aggregate: str = _AGGREGATE
    std: list[float] = _STD
    members: list[list[float]] | None = _MEMBERS
    head_scores: list[list[float]] | None = _HEAD_SCORES
    labels: list[str] | None = _LABELS
    truncated: list[bool]
    usage: Usage


class GetRewardRequest(BaseModel):
    """OpenRLHF's remote reward model request (``--remote_rm_url .../get_reward``)."""

    model_config = ConfigDict(
        extra="allow",
        json_schema_extra={
            "examples": [
                {
                    "query": ["Human: How do I bake bread?\n\nAssistant: Knead, rise, bake."],
                    "prompts": ["Human: How do I bake bread?\n\nAssistant:"],
                }
            ]
        },
    )
    # Empty lists are valid: OpenRLHF shards each call over its --reward.remote_url servers,
    # and every server past the first gets [] when there are fewer queries than servers.
    query: list[str] = Field(description="Prompt + response, rendered by the trainer.")
    prompts: list[str] | None = Field(
        default=None,
        description="The prompt part of each query; lets truncation drop prompt tokens first.",
    )
    labels: list[Any] | None = Field(default=None, description="Ignored (for rule rewards).")

    @model_validator(mode="after")
    def _same_lengths(self) -> GetRewardRequest:
        if self.prompts is not None and len(self.prompts) != len(self.query):
            raise ValueError(
                f"prompts has {len(self.prompts)} entries but query has {len(self.query)}"
            )
        return self


class GetRewardResponse(BaseModel):
    """OpenRLHF's answer shape: one reward per query (``rewards`` and ``scores`` alike)."""

    rewards: list[float]
    scores: list[float]
    extra_logs: dict[str, Any] = Field(
        default_factory=dict,
        description="Per query, what OpenRLHF logs beside the reward: `truncated` (1.0 when "
        "tokens were cut to fit max_length, else 0.0) and, for an ensemble bundle, "
        "`reward_std` (the members' standard deviation).",
    )


class SlimeRewardRequest(BaseModel):
    """slime's remote reward model request (``--rm-type remote_rm --rm-url URL``), one sample:
    ``prompt`` is the rendered prompt (slime's ``--apply-chat-template``), a plain prompt, or
    chat messages; ``label`` is ignored."""

    model_config = _LAX
    prompt: str | Annotated[list[ChatMessage], Field(min_length=1)] = Field(
        description="The rendered prompt (ending with the template's generation prompt), a "
        "plain prompt, or the conversation before the response.",
        examples=["How do I bake bread?"],
    )
    response: str = Field(description="The generated response.", examples=["Knead, rise, bake."])
    label: Any = Field(default=None, description="Ignored (for rule-based rewards).")

    def to_input(self) -> ItemInput:
        if isinstance(self.prompt, str):
            return ItemInput(
                prompt=self.prompt, response=self.response, prompt_may_be_rendered=True
            )
        return ItemInput(prompt=_dump(self.prompt), response=self.response)


class ClassifyRequest(BaseModel):
    """The subset of vLLM's /classify that verl sends, and vLLM's chat form (one conversation
    as ``messages``); other fields are ignored."""

    model_config = ConfigDict(
        extra="allow",
        json_schema_extra={
            "examples": [
                {"model": "rm", "input": ["Human: Hi\n\nAssistant: Hello!"]},
                {
                    "messages": [
                        {"role": "user", "content": "How do I bake bread?"},
                        {"role": "assistant", "content": "Knead, rise, bake."},
                    ]
                },
            ]
        },
    )
    model: str | None = Field(default=None, description="Ignored: this server has one model.")
    # An empty list is refused (422) like an empty `items` or `query`, not answered with no data.
    input: str | Annotated[list[str], Field(min_length=1)] | None = Field(
        default=None, description="Rendered text(s) to score; or give messages."
    )
    messages: Annotated[list[ChatMessage], Field(min_length=1)] | None = Field(
        default=None,
        description="One conversation whose last message (assistant) is scored, rendered "
        "with the model's text format; instead of input.",
    )
    add_generation_prompt: bool = Field(
        default=False,
        description="Must stay false: a reward model scores a finished conversation.",
    )
    continue_final_message: bool = Field(
        default=False,
        description="Must stay false: the last message is scored as a finished response.",
    )
    chat_template: str | None = Field(
        default=None,
        description="Must be absent (or the model's own): the model was exported and checked "
        "with its own template.",
    )
    chat_template_kwargs: dict[str, Any] | None = Field(
        default=None, description="Ignored: the template renders with the model's defaults."
    )
    activation: bool | None = Field(
        default=None, description="vLLM < 0.11.2 name of use_activation."
    )
    use_activation: bool | None = Field(
        default=None,
        description="Apply the activation (vLLM's default: true): sigmoid of the reward for a "
        "model of one head, softmax over the heads for several; false returns raw values.",
    )

    @model_validator(mode="after")
    def _one_input(self) -> ClassifyRequest:
        if (self.input is None) == (self.messages is None):
            raise ValueError("give exactly one of input (rendered text) or messages")
        if self.messages is not None and self.add_generation_prompt:
            raise ValueError(
                "add_generation_prompt=true renders a conversation awaiting a reply, but a "
                "reward model scores a finished one whose last message is the assistant "
                "response; send add_generation_prompt false (the default)"
            )
        if self.messages is not None and self.continue_final_message:
            raise ValueError(
                "continue_final_message=true renders the last message as unfinished, but a "
                "reward model scores it as a finished response; send continue_final_message "
                "false (the default)"
            )
        return self

    def activated(self) -> bool:
        if self.use_activation is not None:
            return self.use_activation
        if self.activation is not None:
            return self.activation
        return True

    def items(self) -> list[ItemInput]:
        """One item per input text, or the one conversation of ``messages``."""
        if self.messages is not None:
            return [ItemInput(messages=_dump(self.messages))]
        texts = [self.input] if isinstance(self.input, str) else list(self.input or [])
        return [ItemInput(text=text) for text in texts]


class ClassifyData(BaseModel):
    """One input's result, as vLLM answers it."""

    index: int
    label: str | None = None
    probs: list[float]
    num_classes: int = 1
    truncated: bool = Field(
        default=False, description="Tokens were cut to fit max_length (rmserve's addition)."
    )


class ClassifyUsage(BaseModel):
    """vLLM's usage block."""

    prompt_tokens: int
    total_tokens: int
    completion_tokens: int = 0
    prompt_tokens_details: None = None


class ClassifyResponse(BaseModel):
    """vLLM's /classify answer, one entry of ``data`` per input."""

    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[ClassifyData]
    usage: ClassifyUsage


class ModelCard(BaseModel):
    """The model served: OpenAI's model card with the bundle's manifest and what runs it."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "rmserve"
    precision: str = Field(description="The variant running: fp32, int8 or fp16.")
    provider: str = Field(description="The ONNX Runtime provider: cpu or cuda.")
    max_length: int = Field(
        description="Tokens per item in force: the bundle's max_length, or RMSERVE_MAX_LENGTH "
        "when set below it."
    )
    manifest: dict[str, Any] = Field(description="The bundle manifest, without file hashes.")


class ModelsResponse(BaseModel):
    """OpenAI-style model list (one model per server)."""

    object: Literal["list"] = "list"
    data: list[ModelCard]


class HealthResponse(BaseModel):
    """The process's state: ``ok``, ``ready``, ``loading`` or ``draining``."""

    status: str


class ErrorDetail(BaseModel):
    """What went wrong: a stable ``type`` to branch on and a message for people."""

    type: str
    message: str


class ErrorResponse(BaseModel):
    """Every failure's body, whatever the route and status."""

    error: ErrorDetail
