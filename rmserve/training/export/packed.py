"""The packed graph of a decoder reward model: items that share a prompt, scored in one row.

:mod:`rmserve.packing` lays the rows out; this module is the torch side: the module that the
exporter traces (the transformers backbone under a mask built from segment ids, with the
positions each token has in its own item, then the score head at each item's last token),
whether a model can be packed exactly, and the check that the exported graph gives each item
its whole-item reward.

Exactness needs every layer to see, for each item, what it sees when the item runs alone. A
model whose layers limit attention to a sliding window shorter than the items would see more
in a packed row (the window would be counted in row positions), so such a model gets no packed
graph (:func:`unpackable`); so does an encoder (its reward is at the first token, which sees
the whole item).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from rmserve.packing import PACKED_INPUTS, PackedBatch, pack
from rmserve.training.scoring import cut_batches

__all__ = [
    "PACKED_INPUTS",
    "PackedRewardModel",
    "PackedStack",
    "packed_chunks",
    "packed_parity",
    "token_cost",
    "trace_inputs",
    "unpackable",
]


def unpackable(model: Any, pooling: str, max_length: int) -> str | None:
    """Why ``model`` cannot have an exact packed graph at ``max_length``, or None if it can."""
    if pooling != "last":
        return "an encoder reads its reward at the first token, which sees the whole item"
    config = model.config
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None) or []
    sliding = any(t != "full_attention" for t in layer_types)
    if not layer_types:
        sliding = getattr(config, "use_sliding_window", True) is not False
    if sliding and isinstance(window, int) and window < max_length:
        return (
            f"its layers attend within a sliding window of {window} tokens, shorter than "
            f"max_length {max_length}; a packed row would widen it"
        )
    if not hasattr(model, "score"):
        return f"{type(model).__name__} has no per-token score head (`score`)"
    return None


def token_cost(model: Any) -> float:
    """The per-token work of ``model`` in units of one attention pair (rmserve.packing): about
    12 d^2 multiply-adds per token and layer against 2 d per pair of tokens, so 6 d."""
    return 6.0 * float(getattr(model.config, "hidden_size", 0) or 0)


def _segment_mask(segment_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(R, T) segments -> (R, 1, T, T) additive mask: a query sees earlier keys of segment 0
    or of its own segment, and itself; 0 where it sees, the dtype's minimum elsewhere."""
    length = segment_ids.size(1)
    index = torch.arange(length, device=segment_ids.device)
    query, key = index.view(1, length, 1), index.view(1, 1, length)
    seg_q, seg_k = segment_ids.unsqueeze(2), segment_ids.unsqueeze(1)  # (R, T, 1), (R, 1, T)
    sees = (key <= query) & (seg_k >= 0) & ((seg_k == 0) | (seg_k == seg_q))
    sees = sees | (key == query)  # never an empty row: padding stays finite
    mask = torch.zeros(sees.shape, dtype=dtype, device=segment_ids.device)
    return mask.masked_fill(~sees, torch.finfo(dtype).min).unsqueeze(1)


class PackedRewardModel(torch.nn.Module):
    """(input_ids, position_ids, segment_ids, reward_positions) -> reward (R, M) for one
    head, (R, M, K) for K: :mod:`rmserve.packing`'s contract over a transformers decoder."""

    def __init__(self, model: Any):
        super().__init__()
        self.model = model

    def forward(
        self,
        input_ids: torch.Tensor,  # (R, T)
        position_ids: torch.Tensor,  # (R, T)
        segment_ids: torch.Tensor,  # (R, T)
        reward_positions: torch.Tensor,  # (R, M)
    ) -> torch.Tensor:
        dtype = self.model.get_input_embeddings().weight.dtype
        hidden = self.model.base_model(
            input_ids=input_ids,
            attention_mask=_segment_mask(segment_ids, dtype),
            position_ids=position_ids,
        ).last_hidden_state  # (R, T, H)
        index = reward_positions.unsqueeze(-1).expand(-1, -1, hidden.size(-1))  # (R, M, H)
        scores: torch.Tensor = self.model.score(torch.gather(hidden, 1, index))  # (R, M, K)
        scores = scores.float()  # `reward` is float32 whatever the weights' dtype
        return scores[..., 0] if scores.size(-1) == 1 else scores


class PackedStack(torch.nn.Module):
    """K packed models side by side (an ensemble of independent members): (R, M, K)."""

    def __init__(self, models: Sequence[Any]):
        super().__init__()
        self.members = torch.nn.ModuleList(PackedRewardModel(m) for m in models)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        segment_ids: torch.Tensor,
        reward_positions: torch.Tensor,
    ) -> torch.Tensor:
        inputs = (input_ids, position_ids, segment_ids, reward_positions)
        return torch.stack([m(*inputs) for m in self.members], dim=-1)


def trace_inputs(pad_token_id: int) -> tuple[torch.Tensor, ...]:
    """Placeholder inputs for tracing: two rows, one holding two items after a shared
    prefix of three tokens, one holding a lone item (no axis is 1, so none is fixed)."""
    items = [[1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 9, 10], [20, 21, 22]]
    sequences = [np.asarray(ids, dtype=np.int64) for ids in items]
    batch = pack(sequences, pad_token_id, skip_token_id=None, share="always")
    return tuple(torch.from_numpy(v) for v in batch.feeds().values())


def packed_chunks(
    rows: Sequence[Sequence[int]],
    pad_token_id: int,
    skip_token_id: int | None,
    max_tokens: int,
    max_row_length: int,
) -> list[list[int]]:
    """Indices of ``rows`` in byte order (items with a common prefix are neighbours), cut
    into chunks whose packed batch (``share="always"``, rows of at most ``max_row_length``
    tokens) has at most ``max_tokens`` padded tokens (a chunk of one item may have more)."""
    sequences = [np.asarray(r, dtype=np.int64) for r in rows]
    order = sorted(range(len(rows)), key=lambda i: sequences[i].tobytes())

    def size(chunk: list[int]) -> int:
        batch = pack(
            [sequences[i] for i in chunk],
            pad_token_id,
            skip_token_id=skip_token_id,
            share="always",
            max_row_length=max_row_length,
        )
        return int(batch.input_ids.size)

    return cut_batches(order, lambda chunk: size(chunk) > max_tokens)


def packed_parity(
    reference: npt.NDArray[Any],
    run: Any,
    rows: Sequence[Sequence[int]],
    pad_token_id: int,
    skip_token_id: int | None,
    num_heads: int,
    *,
    max_tokens: int | None = None,
    max_row_length: int | None = None,
) -> float:
    """Max |whole-item reward - packed reward| over ``rows``, packed so that every common
    prefix is shared (``share="always"``: the check exercises the mask on every row it can),
    in rows of at most ``max_row_length`` tokens and batches of at most ``max_tokens`` padded
    tokens (:func:`packed_chunks`; None: one batch of all). ``reference``: the whole-item
    rewards, (N,) or (N, K); ``run``: the packed graph, called with :meth:`PackedBatch.feeds`."""
    expected = np.asarray(reference, dtype=np.float64).reshape(len(rows), num_heads)
    if max_tokens is None:
        chunks = [list(range(len(rows)))]
    else:
        width = max_row_length or max(len(r) for r in rows)
        chunks = packed_chunks(rows, pad_token_id, skip_token_id, max_tokens, width)
    gaps: list[float] = []
    for chunk in chunks:
        sequences = [np.asarray(rows[i], dtype=np.int64) for i in chunk]
        batch: PackedBatch = pack(
            sequences,
            pad_token_id,
            skip_token_id=skip_token_id,
            share="always",
            max_row_length=max_row_length,
        )
        packed = batch.item_rows(run(batch.feeds()), num_heads)  # (n, K)
        gaps.append(float(np.max(np.abs(packed.astype(np.float64) - expected[chunk]))))
    return float(np.max(gaps))  # NaN stays NaN
