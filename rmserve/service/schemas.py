"""Request and response models of every route (DESIGN.md's HTTP API table).

The ``/v1`` routes are strict (unknown fields are refused, so a typo is an error, not a
silently ignored option). The compatibility routes ``/get_reward`` (OpenRLHF) and
``/classify`` (vLLM, as verl calls it) accept and ignore the other fields those projects send.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from rmserve.service.tokenization import ItemInput

__all__ = [
    "ChatMessage",
    "ClassifyData",
    "ClassifyRequest",
    "ClassifyResponse",
    "ClassifyUsage",
    "CompareRequest",
    "CompareResponse",
    "ErrorDetail",
    "ErrorResponse",
    "GetRewardRequest",
    "GetRewardResponse",
    "HealthResponse",
    "ModelCard",
    "ModelsResponse",
    "RankRequest",
    "RankResponse",
    "RankedResponse",
    "ScoreItem",
    "ScoreRequest",
    "ScoreResponse",
    "Usage",
]

_STRICT = ConfigDict(extra="forbid")
_LAX = ConfigDict(extra="allow")


class ChatMessage(BaseModel):
    """One chat turn; other fields (``name``) are ignored."""

    role: Literal["system", "user", "assistant"]
    content: str


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


class Usage(BaseModel):
    tokens: int = Field(description="Tokens the model read (special tokens included).")


class ScoreRequest(BaseModel):
    model_config = _STRICT
    items: list[ScoreItem] = Field(min_length=1, description="Items to score.")
    normalize: bool = Field(
        default=False, description="Return (score - mean) / std with the bundle's statistics."
    )
    truncate_response: bool = Field(
        default=False,
        description="Cut a response that alone does not fit max_length (else 422).",
    )


class ScoreResponse(BaseModel):
    model: str
    scores: list[float]
    truncated: list[bool]
    usage: Usage


class _PromptedRequest(BaseModel):
    model_config = _STRICT
    prompt: str | None = Field(default=None, description="The prompt as a string.")
    messages: list[ChatMessage] | None = Field(
        default=None, description="The conversation before the responses."
    )
    normalize: bool = False
    truncate_response: bool = False

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
    responses: list[str] = Field(min_length=1, description="Candidate responses to rank.")
    top_k: int | None = Field(default=None, ge=1, description="Return only the best k.")


class RankedResponse(BaseModel):
    index: int = Field(description="Position of the response in the request.")
    score: float


class RankResponse(BaseModel):
    model: str
    ranking: list[RankedResponse] = Field(description="Best first.")
    scores: list[float] = Field(description="All scores, in request order.")
    truncated: list[bool]
    usage: Usage


class CompareRequest(_PromptedRequest):
    a: str = Field(description="First response.")
    b: str = Field(description="Second response.")


class CompareResponse(BaseModel):
    model: str
    scores: list[float] = Field(description="[score of a, score of b]")
    p_a_preferred: float = Field(description="sigmoid(raw a - raw b): Bradley-Terry P(a > b).")
    truncated: list[bool]
    usage: Usage


class GetRewardRequest(BaseModel):
    """OpenRLHF's remote reward model request (``--remote_rm_url .../get_reward``)."""

    model_config = _LAX
    query: list[str] = Field(
        min_length=1, description="Prompt + response, rendered by the trainer."
    )
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
    rewards: list[float]
    scores: list[float]
    extra_logs: dict[str, Any] = Field(default_factory=dict)


class ClassifyRequest(BaseModel):
    """The subset of vLLM's /classify that verl sends; other fields are ignored."""

    model_config = _LAX
    model: str | None = Field(default=None, description="Ignored: this server has one model.")
    # An empty list is refused (422) like an empty `items` or `query`, not answered with no data.
    input: str | Annotated[list[str], Field(min_length=1)] = Field(
        description="Rendered text(s) to score."
    )
    activation: bool | None = Field(
        default=None, description="vLLM < 0.11.2 name of use_activation."
    )
    use_activation: bool | None = Field(
        default=None,
        description="Apply sigmoid to the reward (vLLM's default: true); false returns the "
        "raw reward.",
    )

    def activated(self) -> bool:
        if self.use_activation is not None:
            return self.use_activation
        if self.activation is not None:
            return self.activation
        return True

    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


class ClassifyData(BaseModel):
    index: int
    label: str | None = None
    probs: list[float]
    num_classes: int = 1


class ClassifyUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int
    completion_tokens: int = 0
    prompt_tokens_details: None = None


class ClassifyResponse(BaseModel):
    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[ClassifyData]
    usage: ClassifyUsage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "rmserve"
    precision: str = Field(description="The variant running: fp32, int8 or fp16.")
    provider: str = Field(description="The ONNX Runtime provider: cpu or cuda.")
    manifest: dict[str, Any] = Field(description="The bundle manifest, without file hashes.")


class ModelsResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class HealthResponse(BaseModel):
    status: str


class ErrorDetail(BaseModel):
    type: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorDetail
