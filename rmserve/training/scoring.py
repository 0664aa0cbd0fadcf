"""Batched rewards for encoded ids, in torch (a checkpoint) or onnxruntime (a bundle).

Both pad on the right with the pad token id and an attention mask, in length-sorted batches,
so an item's reward does not depend on its neighbours.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from rmserve.manifest import Normalization, Pooling
from rmserve.packing import pad_batch

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt
    from transformers import PreTrainedModel

__all__ = [
    "BatchScorer",
    "cut_batches",
    "onnx_scorer",
    "pad_batch",
    "reward_normalization",
    "sampled_normalization",
    "score_ids",
    "stacked_scorer",
    "token_batches",
    "torch_scorer",
]

# (input_ids (B, T) int64, attention_mask (B, T) int64) -> rewards (B,) or (B, K) float32
BatchScorer = Callable[["npt.NDArray[np.int64]", "npt.NDArray[np.int64]"], "npt.NDArray[Any]"]


def token_batches(
    lengths: Sequence[int], batch_size: int | None = None, max_tokens: int | None = None
) -> list[list[int]]:
    """Indices of ``lengths``' rows sorted by length (little padding), cut into batches of at
    most ``batch_size`` rows and, padded to their longest row, at most ``max_tokens`` tokens
    (rows x longest; a row longer than that alone). None: no bound of that kind."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])

    def too_big(batch: list[int]) -> bool:  # ascending: the row that joined last is longest
        full = batch_size is not None and len(batch) > batch_size
        return full or (max_tokens is not None and len(batch) * lengths[batch[-1]] > max_tokens)

    return cut_batches(order, too_big)


def cut_batches(order: Sequence[int], too_big: Callable[[list[int]], bool]) -> list[list[int]]:
    """``order`` cut greedily into consecutive batches: an index joins the current batch
    unless the batch with it would be ``too_big``; an index alone always makes a batch."""
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        if current and too_big([*current, i]):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def score_ids(
    scorer: BatchScorer,
    ids: Sequence[Sequence[int]],
    pad_token_id: int,
    batch_size: int = 32,
    max_tokens: int | None = None,
) -> npt.NDArray[np.float64]:
    """Rewards for many sequences, in the input order ((N,), or (N, K) for K heads);
    batches are sorted by length, of at most ``batch_size`` rows and ``max_tokens`` padded
    tokens (:func:`token_batches`)."""
    import numpy as np

    out: npt.NDArray[np.float64] | None = None
    for chunk in token_batches([len(r) for r in ids], batch_size, max_tokens):
        input_ids, mask = pad_batch([ids[i] for i in chunk], pad_token_id)
        rewards = np.asarray(scorer(input_ids, mask), dtype=np.float64)  # (B,) or (B, K)
        if out is None:
            out = np.zeros((len(ids), *rewards.shape[1:]), dtype=np.float64)
        out[chunk] = rewards
    return out if out is not None else np.zeros(0, dtype=np.float64)


def reward_normalization(rewards: npt.NDArray[np.float64], reference: str) -> Normalization:
    """The mean and std (floored at 1e-6) of ``rewards`` (n,); of the members' mean reward
    (what an ensemble bundle serves) for (n, K)."""
    values = rewards.mean(axis=1) if rewards.ndim == 2 else rewards
    return Normalization(
        mean=float(values.mean()),
        std=float(max(values.std(), 1e-6)),
        n=int(values.shape[0]),
        reference=reference,
    )


def sampled_normalization(
    scorer: BatchScorer,
    rows: Sequence[Sequence[int]],
    pad_token_id: int,
    batch_size: int,
    *,
    samples: int,
    seed: int,
    what: str,
) -> Normalization:
    """:func:`reward_normalization` of at most ``samples`` of ``rows`` (drawn with ``seed``);
    its reference reads "``what`` (k of n)"."""
    total = len(rows)
    if total > samples:
        rows = random.Random(seed).sample(list(rows), samples)
    rewards = score_ids(scorer, rows, pad_token_id, batch_size)
    return reward_normalization(rewards, f"{what} ({len(rows)} of {total})")


def torch_scorer(model: PreTrainedModel, pooling: Pooling) -> BatchScorer:
    """A scorer that runs a transformers model in eval mode without gradients."""
    import torch

    from rmserve.training.modeling import reward_forward

    model.train(False)  # eval mode: dropout off
    device = next(model.parameters()).device

    def run(input_ids: npt.NDArray[np.int64], mask: npt.NDArray[np.int64]) -> npt.NDArray[Any]:
        with torch.no_grad():
            rewards = reward_forward(
                model,
                torch.from_numpy(input_ids).to(device),
                torch.from_numpy(mask).to(device),
                pooling,
            )
        return rewards.float().cpu().numpy()

    return run


def onnx_scorer(model_path: str, providers: Sequence[str] | None = None) -> BatchScorer:
    """A scorer over an ONNX Runtime session of a bundle's model file."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # quantized models warn about every un-fused node
    session = ort.InferenceSession(
        model_path, options, providers=list(providers or ["CPUExecutionProvider"])
    )

    def run(input_ids: npt.NDArray[np.int64], mask: npt.NDArray[np.int64]) -> npt.NDArray[Any]:
        (rewards,) = session.run(["reward"], {"input_ids": input_ids, "attention_mask": mask})
        return rewards  # type: ignore[no-any-return]

    return run


def stacked_scorer(scorers: Sequence[BatchScorer]) -> BatchScorer:
    """K one-output scorers side by side: rewards (B, K), column k from scorer k (the members
    of an independent ensemble, scored in torch)."""
    import numpy as np

    def run(input_ids: npt.NDArray[np.int64], mask: npt.NDArray[np.int64]) -> npt.NDArray[Any]:
        return np.stack([np.asarray(s(input_ids, mask)) for s in scorers], axis=1)

    return run
