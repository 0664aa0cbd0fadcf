"""The service's one settings object: environment variables ``RMSERVE_*`` and CLI flags.

Every field is read from the environment with the prefix ``RMSERVE_`` (``RMSERVE_MAX_WAIT_MS``)
and is also a flag of ``rmserve serve`` (``--max-wait-ms``); the flag wins over the variable.
The descriptions here are the flags' help text and the settings table of docs/service.md.

The defaults are safe: loopback only, bounded queue and request sizes. Settings that would be
unsafe or contradictory are refused when the object is built, with a message naming the fix.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["AUTO_MAX_BATCH_TOKENS", "MIN_API_KEY_LENGTH", "ServiceSettings"]

# Shorter keys can be guessed; 16 characters of a random token is the floor we accept.
MIN_API_KEY_LENGTH = 16

# The token budget of a batch when max_batch_tokens is 0 (auto) and one item of the max_length
# in force needs less. It binds only on long items: a full batch of CUDA's 64 items of 256
# tokens, or of the CPU's 8 of 2048, fits; longer items make smaller batches, which bounds a
# batch's activation memory.
AUTO_MAX_BATCH_TOKENS = 16384

PrecisionChoice = Literal["auto", "fp32", "int8", "fp16"]
ProviderChoice = Literal["auto", "cpu", "cuda"]
LogLevel = Literal["debug", "info", "warning", "error"]


class ServiceSettings(BaseSettings):
    """Settings of ``rmserve serve``; environment prefix ``RMSERVE_``."""

    model_config = SettingsConfigDict(env_prefix="RMSERVE_", extra="forbid", frozen=True)

    bundle: Path | None = Field(
        default=None,
        description="Bundle directory to serve (made by `rmserve export`); the positional "
        "BUNDLE argument of `rmserve serve`.",
    )
    host: str = Field(
        default="127.0.0.1",
        description="Interface to listen on; 0.0.0.0 for all (in a container).",
    )
    port: int = Field(default=8000, ge=0, le=65535, description="TCP port to listen on.")
    api_keys: SecretStr = Field(
        default=SecretStr(""),
        description="Comma-separated API keys; when set, scoring routes need "
        "`Authorization: Bearer KEY`. Empty = no authentication. Never logged.",
    )
    open_health: bool = Field(
        default=True,
        description="Serve /healthz and /readyz without an API key (for probes).",
    )
    open_metrics: bool = Field(
        default=True, description="Serve /metrics without an API key (for Prometheus)."
    )
    precision: PrecisionChoice = Field(
        default="auto",
        description="Model variant to run: auto = fp16 on CUDA when the bundle has it, else "
        "fp32; int8 runs on CPU only, fp16 on CUDA only.",
    )
    provider: ProviderChoice = Field(
        default="auto",
        description="ONNX Runtime execution provider: auto = CUDA when available, else CPU.",
    )
    model_instances: int = Field(
        default=0,
        ge=0,
        le=64,
        description="ONNX Runtime sessions of the model, each running its own batch; 0 = auto: "
        "2 on a CPU of 2 cores or more (more pairs/s than one session of all the cores), "
        "1 on CUDA. Each instance holds its own copy of the weights.",
    )
    intra_op_threads: int = Field(
        default=0,
        ge=0,
        description="ONNX Runtime intra-op threads of each instance; 0 = auto: on CPU the "
        "cores this process may use shared out between the instances, on CUDA ORT's default.",
    )
    max_batch_size: int = Field(
        default=0,
        ge=0,
        le=4096,
        description="Most items in one model batch; 0 = auto: 8 on CPU (larger batches cost "
        "more per pair there), 64 on CUDA.",
    )
    max_length: int = Field(
        default=0,
        ge=0,
        description="Most tokens per item, to serve below the bundle's max_length (memory, "
        "latency): longer items lose prompt tokens from the left, as at the bundle's length; "
        "0 = the bundle's max_length.",
    )
    max_batch_tokens: int = Field(
        default=0,
        ge=0,
        description="Most padded tokens (items x longest item) in one model batch; 0 = auto: "
        f"the larger of {AUTO_MAX_BATCH_TOKENS} and the max_length in force. A value below "
        "that max_length is refused.",
    )
    max_padding_ratio: float = Field(
        default=1.15,
        ge=1.0,
        description="Most padded/real tokens in one batch: items of too different lengths go "
        "to separate batches. Set it high (100) to batch by size and tokens only.",
    )
    max_wait_ms: float = Field(
        default=5.0,
        ge=0.0,
        le=10_000.0,
        description="Longest time the first queued item waits for a batch to fill.",
    )
    max_queue_items: int = Field(
        default=4096,
        ge=1,
        description="Most items queued; beyond it requests get 429 with Retry-After.",
    )
    max_items_per_request: int = Field(
        default=1024, ge=1, description="Most items in one request; beyond it 413."
    )
    max_concurrent_requests: int = Field(
        default=1024,
        ge=1,
        description="Most POST requests being parsed, tokenized, queued or scored at once; "
        "beyond it 429 with Retry-After before the body is parsed, so that an overload "
        "costs little and the accepted requests keep their throughput.",
    )
    max_request_bytes: int = Field(
        default=8 * 1024 * 1024,
        ge=1024,
        description="Largest request body in bytes; beyond it 413, refused before it is "
        "read whole.",
    )
    max_item_chars: int = Field(
        default=200_000,
        ge=1,
        description="Most characters in one rendered item (prompt + response); beyond it 422.",
    )
    drain_timeout_s: float = Field(
        default=30.0,
        ge=0.0,
        description="On SIGTERM, how long queued and in-flight work may take before the "
        "process exits anyway.",
    )
    log_level: LogLevel = Field(
        default="info", description="Least severe log level written (debug, info, ...)."
    )
    log_json: bool = Field(
        default=True, description="Log one JSON object per line (with the request id)."
    )
    cors_origins: str = Field(
        default="",
        description="Comma-separated origins allowed by CORS; empty = no CORS headers.",
    )
    warmup: bool = Field(
        default=True,
        description="Run a few batches at start-up before /readyz turns 200.",
    )
    prefix_reuse: bool = Field(
        default=True,
        description="Decoder bundles with a packed graph: items of a batch that share a "
        "prompt (a GRPO group, one /v1/rank) are scored in one row, the prompt computed once; "
        "the scores equal whole-item scoring to float rounding. false: every item whole, with "
        "the plain graph (for comparison and debugging).",
    )
    # One thread by default: encode_batch already spreads a batch over the cores in Rust, and
    # on a small machine a second Python thread only competes with the model
    # (docs/performance.md).
    tokenizer_threads: int = Field(
        default=1,
        ge=1,
        le=64,
        description="Threads that render and tokenize requests off the event loop.",
    )
    truncate_response: bool = Field(
        default=False,
        description="On the /v1 doors, when the request does not say (truncate_response "
        "absent): cut a response that alone does not fit max_length, keeping its start, and "
        "flag it (true), or refuse that item with a 422 (false).",
    )
    compat_truncate_response: bool = Field(
        default=True,
        description="On the doors whose callers cannot act on a 422 (OpenRLHF /get_reward, "
        "vLLM /classify, slime /slime/reward), cut a response that alone does not fit "
        "max_length (keeping its start) and flag it, instead of refusing it; /v1 doors follow "
        "their request's truncate_response, else RMSERVE_TRUNCATE_RESPONSE.",
    )
    ensemble_aggregate: Literal["mean", "min", "uwo"] = Field(
        default="mean",
        description="For an ensemble bundle, the reward of the requests that do not choose: "
        "the members' mean, their minimum (worst-case), or uwo (mean - uwo_lambda * "
        "variance); /get_reward, /classify and the slime door always use it. One model is an "
        "ensemble of one (every aggregate is its reward).",
    )
    uwo_lambda: float = Field(
        default=1.0,
        ge=0,
        allow_inf_nan=False,
        description="The variance weight of the uwo aggregate when the request does not say; "
        "in squared reward units, so it depends on the model's reward scale.",
    )
    compat_normalize: bool = Field(
        default=False,
        description="Normalize rewards (bundle mean/std) in the OpenRLHF /get_reward and "
        "vLLM /classify routes, which have no per-request option; /classify of a model of "
        "several heads answers their softmax or raw values, never normalized.",
    )

    @field_validator("port", mode="before")
    @classmethod
    def _ignore_kubernetes_service_link(cls, value: Any) -> Any:
        # Kubernetes injects RMSERVE_PORT=tcp://10.x.y.z:8000 into pods (docker-link style
        # service links) when a Service is named "rmserve"; that is not our setting.
        if isinstance(value, str) and value.startswith(("tcp://", "udp://")):
            logging.getLogger("rmserve.service.settings").warning(
                f"ignoring RMSERVE_PORT={value!r}: it is a Kubernetes service link, not a port; "
                "listening on 8000. Set enableServiceLinks: false or pass --port"
            )
            return 8000
        return value

    @model_validator(mode="after")
    def _refuse_unsafe(self) -> ServiceSettings:
        for key in self.api_key_list():
            if len(key) < MIN_API_KEY_LENGTH:
                raise ValueError(
                    f"RMSERVE_API_KEYS holds a key of {len(key)} characters; use keys of at "
                    f"least {MIN_API_KEY_LENGTH} (e.g. `python -c 'import secrets; "
                    "print(secrets.token_urlsafe(32))'`)"
                )
            if any(c.isspace() for c in key):
                raise ValueError("RMSERVE_API_KEYS holds a key with whitespace; keys are tokens")
        if self.max_length == 1:
            raise ValueError(
                "max_length 1 leaves no room for a prompt and a response; set at least 2, or 0 "
                "for the bundle's max_length"
            )
        if self.max_batch_size and self.max_queue_items < self.max_batch_size:
            raise ValueError(
                f"max_queue_items ({self.max_queue_items}) is below max_batch_size "
                f"({self.max_batch_size}); a full batch could never queue. Raise max_queue_items"
            )
        if self.max_items_per_request > self.max_queue_items:
            raise ValueError(
                f"max_items_per_request ({self.max_items_per_request}) exceeds max_queue_items "
                f"({self.max_queue_items}); such a request could never be accepted. Lower it"
            )
        if "*" in self.cors_origin_list() and self.api_key_list():
            raise ValueError(
                "cors_origins '*' with API keys lets any web page spend the keys of a browser "
                "user; list the allowed origins explicitly"
            )
        return self

    def item_max_length(self, bundle_max_length: int) -> int:
        """The tokens per item in force for a bundle exported with ``bundle_max_length``.

        Only lower than the bundle's: the model was exported and checked up to its own
        max_length (a decoder's position embeddings or a template's budget may end there)."""
        if self.max_length > bundle_max_length:
            raise ValueError(
                f"max_length ({self.max_length}, RMSERVE_MAX_LENGTH) is above the bundle's "
                f"max_length ({bundle_max_length}), the longest input it was exported for; "
                f"set at most {bundle_max_length}, or 0 for the bundle's"
            )
        return self.max_length or bundle_max_length

    def batch_token_budget(self, max_length: int) -> int:
        """The padded-token budget of a batch when items have up to ``max_length`` tokens.

        Auto (0) grows with max_length so that a bundle of long items (32768 tokens) serves
        with the defaults; an explicit budget below max_length is refused, since one item of
        max_length would then never fit a batch."""
        if not self.max_batch_tokens:
            return max(AUTO_MAX_BATCH_TOKENS, max_length)
        if self.max_batch_tokens < max_length:
            raise ValueError(
                f"max_batch_tokens ({self.max_batch_tokens}) is below the max_length in force "
                f"({max_length}); one item that long would never fit a batch. Raise "
                f"RMSERVE_MAX_BATCH_TOKENS to at least {max_length} (or 0 for auto), or lower "
                "RMSERVE_MAX_LENGTH"
            )
        return self.max_batch_tokens

    def api_key_list(self) -> list[str]:
        """The configured keys; empty when authentication is off."""
        raw = self.api_keys.get_secret_value()
        return [key.strip() for key in raw.split(",") if key.strip()]

    def cors_origin_list(self) -> list[str]:
        return [origin.strip() for origin in self.cors_origins.split(",") if origin.strip()]
