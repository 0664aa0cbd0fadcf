"""Shared-prompt packing: items that begin with the same tokens computed as one row.

A decoder's reward for an item is read at its last real token, and a causal model's hidden
state at a position depends only on the tokens before it. So when several items share their
first P tokens (GRPO's group of responses to one prompt, best-of-n, ``/v1/rank``), one row
can hold the P shared tokens once, followed by each item's own tokens, provided that

- each item's tokens attend to the shared tokens and to their own earlier tokens only
  (never to another item's), and
- each token keeps the position it has in its item (P + i for the i-th own token),

and the reward of each item is read at its own last token. The result is the whole-item
score up to the order of floating-point sums (1e-6 in fp32, measured in the tests).

The packed graph (exported beside the plain one, :mod:`rmserve.training.export.packed`) takes
four inputs, all (R, T) int64 but the last:

- ``input_ids``: the row's tokens, right-padded with the pad id;
- ``position_ids``: each token's position in its own item;
- ``segment_ids``: 0 for the shared tokens, k >= 1 for the tokens of the row's k-th item,
  -1 for padding. The graph builds the attention mask from these: a query attends to the
  keys before it whose segment is 0 or its own (and to itself, so that no row of the mask is
  empty and padding never produces NaN);
- ``reward_positions`` (R, M): where each item of the row reads its reward (M = the most
  items in a row; unused slots read position 0 and are dropped).

Its output ``reward`` is (R, M) for one head, (R, M, K) for K.

Which items share a row (:func:`pack`): items are sorted by their token bytes, so that items
with a common prefix are neighbours, and a neighbour joins the current row while the row costs
no more than its items scored whole. A row of T tokens costs ``token_cost * T + T^2``: the
per-token work (projections and MLP, about 12 d^2 multiply-adds per layer for hidden size d)
and the attention work (about 2 d per pair of tokens, and an unfused graph computes all T^2
pairs), so ``token_cost`` is about 6 d (the manifest records it at export). Sharing a prompt
of P tokens among n items saves (n - 1) P tokens of per-token work but makes one long row,
whose squared length grows faster than the items'; long responses to a short prompt therefore
stay whole, and a long prompt with short responses shares one row.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

__all__ = [
    "PACKED_INPUTS",
    "PackedBatch",
    "ShareMode",
    "common_prefix",
    "pack",
    "pad_batch",
    "prefix_groups",
    "reward_position",
    "row_length",
]

IdArray = npt.NDArray[np.int64]
PACKED_INPUTS = ("input_ids", "position_ids", "segment_ids", "reward_positions")
# "auto": share when it saves work (the rule above); "always": any common prefix of one token
# or more (export's check uses it, to exercise the mask); "never": one item per row.
ShareMode = Literal["auto", "always", "never"]


@dataclass(frozen=True)
class PackedBatch:
    """The packed graph's inputs for a batch of items, and where each item's reward is."""

    input_ids: IdArray  # (R, T)
    position_ids: IdArray  # (R, T)
    segment_ids: IdArray  # (R, T): 0 shared, k >= 1 item k of the row, -1 padding
    reward_positions: IdArray  # (R, M)
    slots: IdArray  # (n, 2): item i's reward is output[row, column] = slots[i]
    real_tokens: int  # tokens computed: each shared prefix once
    item_tokens: int  # the items' own lengths summed: what whole-item scoring computes

    @property
    def padded_tokens(self) -> int:
        return int(self.input_ids.size)

    @property
    def shared_tokens(self) -> int:
        """Tokens not computed thanks to sharing."""
        return self.item_tokens - self.real_tokens

    def feeds(self) -> dict[str, IdArray]:
        return {
            "input_ids": self.input_ids,
            "position_ids": self.position_ids,
            "segment_ids": self.segment_ids,
            "reward_positions": self.reward_positions,
        }

    def item_rows(self, output: npt.ArrayLike, num_heads: int) -> npt.NDArray[np.float32]:
        """The packed graph's output, (R, M) or (R, M, K), as (n, K) in item order; raises
        ValueError when its shape is not the batch's."""
        out = np.asarray(output, dtype=np.float32)
        rows, columns = self.reward_positions.shape
        if out.ndim == 2 and num_heads == 1:
            out = out[:, :, None]
        if out.shape != (rows, columns, num_heads):
            raise ValueError(
                f"the packed model returned an output of shape {tuple(out.shape)} for "
                f"{rows} rows of up to {columns} items; ({rows}, {columns}, {num_heads}) was "
                "expected"
            )
        picked: npt.NDArray[np.float32] = out[self.slots[:, 0], self.slots[:, 1]]
        return picked


def pad_batch(
    rows: Sequence[Sequence[int] | IdArray], pad_token_id: int
) -> tuple[IdArray, IdArray]:
    """The plain graph's inputs: (input_ids, attention_mask), both (B, T) int64, every row
    right-padded with ``pad_token_id`` to the longest (used by the batcher and by export)."""
    lengths = np.fromiter((len(row) for row in rows), dtype=np.int64, count=len(rows))
    width = int(lengths.max())
    input_ids = np.full((len(rows), width), pad_token_id, dtype=np.int64)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = row
    attention_mask = (np.arange(width)[None, :] < lengths[:, None]).astype(np.int64)
    return input_ids, attention_mask


def reward_position(ids: IdArray, skip_token_id: int | None) -> int:
    """Where a decoder reads an item's reward: its last token that is not ``skip_token_id``
    (the model config's pad token: transformers' ``...ForSequenceClassification`` reads "the
    rightmost token that is not pad_token_id"; 0 when every token is that one), or its last
    token when the config has no pad token."""
    if skip_token_id is None:
        return int(ids.shape[0]) - 1
    real = np.flatnonzero(ids != skip_token_id)
    return int(real[-1]) if real.size else 0


def common_prefix(a: IdArray, b: IdArray) -> int:
    """How many first tokens ``a`` and ``b`` have in common."""
    n = min(a.shape[0], b.shape[0])
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if differ.size else n


def prefix_groups(
    sequences: Sequence[IdArray], joins: Callable[[int, list[int]], bool]
) -> list[tuple[int, list[int]]]:
    """(shared prefix length, indices) per group: the sequences in byte order, so that those
    with a common prefix are neighbours, and a neighbour joins the current group while
    ``joins(prefix, candidate indices)`` accepts it (``prefix`` > 0: the tokens the whole
    candidate group shares). A lone sequence's shared length is 0. Used for the rows of
    :func:`pack` and for the batcher's units, with their own rules."""
    order = sorted(range(len(sequences)), key=lambda i: sequences[i].tobytes())
    groups: list[tuple[int, list[int]]] = []
    shared, members = 0, [order[0]]
    for previous, index in itertools.pairwise(order):
        prefix = common_prefix(sequences[previous], sequences[index])
        if len(members) > 1:
            prefix = min(prefix, shared)
        candidate = [*members, index]
        if prefix > 0 and joins(prefix, candidate):
            shared, members = prefix, candidate
        else:
            groups.append((shared if len(members) > 1 else 0, members))
            shared, members = 0, [index]
    groups.append((shared if len(members) > 1 else 0, members))
    return groups


def row_length(lengths: Iterable[int], shared: int) -> int:
    """Tokens of a row holding items of ``lengths`` after their ``shared`` first tokens."""
    return shared + sum(n - shared for n in lengths)


def _rows(
    sequences: list[IdArray], share: ShareMode, token_cost: float, max_row_length: int | None
) -> list[tuple[int, list[int]]]:
    """(shared length, item indices) per row, by the rule of the module docstring; a row
    of several items is at most ``max_row_length`` tokens."""
    if share == "never" or len(sequences) < 2:
        return [(0, [i]) for i in range(len(sequences))]

    def cost(tokens: int) -> float:
        return token_cost * tokens + tokens * tokens

    def joins(prefix: int, members: list[int]) -> bool:
        lengths = [int(sequences[i].shape[0]) for i in members]
        if max_row_length is not None and row_length(lengths, prefix) > max_row_length:
            return False
        return share == "always" or cost(row_length(lengths, prefix)) <= sum(
            cost(n) for n in lengths
        )

    return prefix_groups(sequences, joins)


def pack(
    sequences: list[IdArray],
    pad_token_id: int,
    *,
    skip_token_id: int | None,
    share: ShareMode = "auto",
    token_cost: float = 0.0,
    max_row_length: int | None = None,
) -> PackedBatch:
    """Lay ``sequences`` (each (T_i,) int64) out as rows of the packed graph, padded with
    ``pad_token_id``; items that share a prefix share a row when ``share`` says so, by the
    cost rule of the module docstring with ``token_cost``, in rows of at most
    ``max_row_length`` tokens (a longer item alone); rewards are read as
    :func:`reward_position` says."""
    if not sequences:
        raise ValueError("pack needs at least one sequence")
    plan = _rows(sequences, share, token_cost, max_row_length)
    width = max(
        row_length((int(sequences[i].shape[0]) for i in items), shared) for shared, items in plan
    )
    columns = max(len(items) for _, items in plan)
    shape = (len(plan), int(width))
    input_ids = np.full(shape, pad_token_id, dtype=np.int64)
    position_ids = np.zeros(shape, dtype=np.int64)
    segment_ids = np.full(shape, -1, dtype=np.int64)
    reward_positions = np.zeros((len(plan), columns), dtype=np.int64)
    slots = np.zeros((len(sequences), 2), dtype=np.int64)
    real = 0
    for r, (shared, items) in enumerate(plan):
        first = sequences[items[0]]
        input_ids[r, :shared] = first[:shared]
        position_ids[r, :shared] = np.arange(shared)
        segment_ids[r, :shared] = 0
        start = shared
        for k, i in enumerate(items):
            ids = sequences[i]
            own = ids.shape[0] - shared
            input_ids[r, start : start + own] = ids[shared:]
            position_ids[r, start : start + own] = np.arange(shared, ids.shape[0])
            segment_ids[r, start : start + own] = k + 1
            at = reward_position(ids, skip_token_id)
            reward_positions[r, k] = at if at < shared else start + at - shared
            slots[i] = (r, k)
            start += own
        real += start
    return PackedBatch(
        input_ids=input_ids,
        position_ids=position_ids,
        segment_ids=segment_ids,
        reward_positions=reward_positions,
        slots=slots,
        real_tokens=real,
        item_tokens=int(sum(s.shape[0] for s in sequences)),
    )
