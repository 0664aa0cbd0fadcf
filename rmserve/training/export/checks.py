"""The checks an exported graph passes before the manifest is written: graph parity against
torch, the text path's certificate (:mod:`rmserve.training.text_path`), the pairwise
decisions of a reduced-precision variant against fp32, and the scorers they run.

Parity:
- fp32: max |torch - onnxruntime| <= ``fp32_tolerance`` (1e-4) on right-padded batches of
  mixed lengths, longer than the trace shape (dynamic axes really work), synthetic pairs up
  to the check length plus a slice of the eval pairs;
- int8 / fp16: pairwise decisions agree with fp32 on >= ``min_agreement`` (99%) of the eval
  pairs and accuracy drops by <= ``max_accuracy_drop`` (1 point).

Bounded by design: every row of a check is encoded at the plan's ``check_length``
(min(max_length, ``--check-length``), prompts cut from the left as served), and every check
scores its rows in length-sorted batches of at most ``--check-batch-tokens`` padded tokens
(rows x longest row). Torch's side of each check is computed first (:func:`torch_rewards`,
:func:`certificate_reference`), so that export can free the torch model before the ONNX
Runtime sessions load (:func:`graph_parity`, :func:`certify`).

Above the plan and the graph; below variants and bundle (which it never imports).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from rmserve.encoding import PairEncoder
from rmserve.formatting import (
    AnyTextFormat,
    FormattingError,
    messages_from_pair,
    render,
    render_text,
)
from rmserve.training.data import PreferenceExample
from rmserve.training.export.graph import certified_model
from rmserve.training.export.options import ExportError
from rmserve.training.export.plan import ExportPlan
from rmserve.training.pairs import EncodedExamples, PairScores, pair_metrics, score_pairs
from rmserve.training.scoring import BatchScorer, onnx_scorer, pad_batch, token_batches
from rmserve.training.text_path import (
    SYNTHETIC_CONVERSATIONS,
    TextPathReference,
    certificate_conversations,
    certify_scores,
    text_path_reference,
)
from rmserve.training.uncertainty import MemberScores, score_members

__all__ = [
    "FP16_TOLERANCE",
    "PACKED_CHECK_PAIRS",
    "Checks",
    "RowRewards",
    "certificate_reference",
    "certify",
    "check_rows",
    "check_session",
    "decision_parity",
    "graph_parity",
    "graph_scorer",
    "on_cuda",
    "pair_rows",
    "pair_scores",
    "providers_for",
    "torch_rewards",
]


@dataclass(frozen=True)
class Checks:
    """The bounds of export's checks, from ExportOptions (an fp16 graph's tolerance is at
    least FP16_TOLERANCE)."""

    tolerance: float  # max |torch - onnxruntime| of the exported graph
    min_agreement: float  # int8/fp16 variants: decisions equal to fp32's
    max_accuracy_drop: float  # int8/fp16 variants: accuracy lost against fp32


# torch's fp16 on CPU and onnxruntime's fp16 kernels round differently: a graph exported in
# half precision is checked against torch in half precision to this bound.
FP16_TOLERANCE = 2e-2


def _parity_texts(
    encoder: PairEncoder, text_format: AnyTextFormat, count: int = 6
) -> list[list[int]]:
    """Ids of synthetic pairs from a few tokens to max_length, for the fp32 check."""
    sentence = "The quick brown fox jumps over the lazy dog, and then it rests. "
    rows: list[list[int]] = []
    for i in range(count):
        prompt = sentence * (1 + 6 * i)  # long prompts get cut from the left to max_length
        response = sentence * (1 + i)
        try:
            rendered = render(messages_from_pair(prompt, response), text_format)
        except FormattingError:  # a template that refuses this shape of conversation
            continue
        rows.append(encoder.encode(rendered, truncate_response=True).ids)
    rows.append(encoder.encode(render_text("ok", text_format)).ids)
    return rows


def check_rows(
    encoder: PairEncoder, text_format: AnyTextFormat, encoded: EncodedExamples | None
) -> list[list[int]]:
    """The rows of the parity check: synthetic texts of mixed lengths, and a slice of real
    eval texts (real lengths, real vocabulary) when there are eval pairs."""
    rows = _parity_texts(encoder, text_format)
    if encoded is not None:
        rows += encoded.ids[:: max(1, len(encoded.ids) // 16)]
    return rows


@dataclass(frozen=True)
class RowRewards:
    """The rows of a check, the batches they are scored in (indices into ``rows``, each
    under the token budget) and torch's reward of each row: the reference the exported
    graphs are checked against, kept after the torch model is freed."""

    rows: list[list[int]]
    batches: list[list[int]]
    rewards: npt.NDArray[Any]  # (N,) or (N, K)

    def __add__(self, other: RowRewards) -> RowRewards:
        """Both references' rows and rewards (the batches of each, renumbered)."""
        shift = len(self.rows)
        return RowRewards(
            [*self.rows, *other.rows],
            [*self.batches, *([i + shift for i in b] for b in other.batches)],
            np.concatenate([self.rewards, other.rewards]),
        )


def torch_rewards(
    wrapper: torch.nn.Module,
    rows: Sequence[Sequence[int]],
    pad_token_id: int,
    max_tokens: int | None = None,
) -> RowRewards:
    """The wrapper's rewards for ``rows`` in torch, in right-padded length-sorted batches of
    at most ``max_tokens`` padded tokens (None: one batch of all)."""
    batches = token_batches([len(r) for r in rows], None, max_tokens)
    out: npt.NDArray[Any] | None = None
    for chunk in batches:
        input_ids, mask = pad_batch([rows[i] for i in chunk], pad_token_id)
        with torch.no_grad():
            rewards = wrapper(torch.from_numpy(input_ids), torch.from_numpy(mask)).numpy()
        if out is None:
            out = np.zeros((len(rows), *rewards.shape[1:]), dtype=rewards.dtype)
        out[chunk] = rewards
    assert out is not None, "a check needs at least one row"
    return RowRewards([list(r) for r in rows], batches, out)


def graph_parity(
    reference: RowRewards,
    scorer: BatchScorer,
    pad_token_id: int,
    tolerance: float,
    precision: str,
) -> list[float]:
    """Max |torch - ORT| of each output (one per head or member) over the reference's rows,
    scored in the same right-padded batches of mixed lengths as torch's."""
    per_batch = []
    for chunk in reference.batches:
        input_ids, mask = pad_batch([reference.rows[i] for i in chunk], pad_token_id)
        actual = np.asarray(scorer(input_ids, mask), dtype=np.float64)
        expected = reference.rewards[chunk].astype(np.float64)
        gaps = np.abs(expected - actual)  # (B,) or (B, K)
        per_batch.append(gaps.reshape(len(chunk), -1).max(axis=0))  # (K,)
    per_output = [float(x) for x in np.max(np.stack(per_batch), axis=0)]  # NaN stays NaN
    diff = max(per_output) if not np.isnan(per_output).any() else float("nan")
    if not diff <= tolerance:
        lengths = sorted(len(r) for r in reference.rows)
        raise ExportError(
            f"{precision} parity failed: max |torch - onnxruntime| = {diff:.3g} > "
            f"{tolerance:.1g} on {len(lengths)} sequences of lengths {lengths} in "
            f"{len(reference.batches)} padded batch(es); the ONNX graph does not compute what "
            "the checkpoint does"
        )
    return per_output


def certificate_reference(encoder: PairEncoder, plan: ExportPlan) -> TextPathReference:
    """The torch half of the text-path certificate: conversations rendered and tokenized by
    the bundle (``encoder``, at the check length) against transformers' chat template, and
    transformers' logits for those that fit. The synthetic conversations must fit the check
    length (they are short); eval conversations longer than it are skipped."""
    conversations = certificate_conversations(
        [_conversation(e) for e in plan.eval_pairs] if plan.eval_pairs else []
    )
    try:
        reference = text_path_reference(
            conversations,
            text_format=plan.text_format,
            encoder=encoder,
            tokenizer=plan.tokenizer,
            model=certified_model(plan),
        )
    except ValueError as e:
        raise ExportError(str(e)) from e
    synthetic_cut = [i for i in reference.too_long if i < SYNTHETIC_CONVERSATIONS]
    if synthetic_cut and plan.check_length < plan.max_length:
        raise ExportError(
            f"--check-length {plan.check_length} is shorter than {len(synthetic_cut)} of the "
            "text-path certificate's own conversations, which every export checks; raise it"
        )
    return reference


def certify(
    reference: TextPathReference, scorer: BatchScorer, plan: ExportPlan, tolerance: float
) -> dict[str, float]:
    """The text-path certificate's parity fields: the bundle's scores of the reference's
    conversations (in batches under the token budget) against transformers'."""
    try:
        certificate = certify_scores(
            reference, scorer, plan.pad_token_id, tolerance, plan.options.check_batch_tokens
        )
    except ValueError as e:
        raise ExportError(str(e)) from e
    return certificate.as_parity()


def _conversation(example: PreferenceExample) -> list[dict[str, str]]:
    """An eval pair's prompt and preferred response, as chat messages."""
    turns = [{"role": m.role, "content": m.content} for m in example.prompt]
    return [*turns, {"role": "assistant", "content": example.responses[0]}]


def decision_parity(
    precision: str,
    reference: PairScores,
    variant: PairScores,
    min_agreement: float,
    max_accuracy_drop: float,
) -> dict[str, float]:
    """Pairwise decisions of a reduced-precision variant against fp32 on the eval pairs."""
    variant_margin = variant.chosen - variant.rejected  # (P,)
    reference_margin = reference.chosen - reference.rejected  # (P,)
    agreement = float(np.mean(np.sign(variant_margin) == np.sign(reference_margin)))
    drop = float(pair_metrics(reference)["accuracy"]) - float(pair_metrics(variant)["accuracy"])
    if agreement < min_agreement or drop > max_accuracy_drop:
        raise ExportError(
            f"{precision} parity failed on {len(variant_margin)} eval pairs: decisions agree "
            f"with fp32 on {agreement:.2%} (need >= {min_agreement:.0%}) and accuracy drops by "
            f"{drop * 100:.2f} points (allowed <= {max_accuracy_drop * 100:.1f}); "
            f"export without --{precision}"
        )
    return {
        "pairwise_agreement": agreement,
        "accuracy_drop": drop,
        "max_abs_diff_vs_fp32": float(np.max(np.abs(variant.chosen - reference.chosen))),
    }


def pair_scores(
    encoded: EncodedExamples,
    scorer: BatchScorer,
    plan: ExportPlan,
    members: MemberScores | None = None,
) -> PairScores:
    """The scores export checks and evaluates: the reward head's, or for an ensemble the
    members' mean (``members`` when already scored)."""
    options = plan.options
    if plan.ensemble is None:
        return score_pairs(
            encoded,
            scorer,
            plan.pad_token_id,
            options.batch_size,
            plan.reward_head,
            max_tokens=options.check_batch_tokens,
        )
    if members is None:
        members = score_members(
            encoded,
            scorer,
            plan.pad_token_id,
            options.batch_size,
            max_tokens=options.check_batch_tokens,
        )
    return members.mean()


def graph_scorer(path: Path, precision: str) -> BatchScorer:
    """A check session's scorer over the graph at ``path``; drop it (and gc) to close it.

    ONNX Runtime's weight prepacking stays on: measured on a 126M-parameter decoder (505 MB
    of fp32 weights), turning it off ("session.disable_prepacking") left the peak resident
    memory of a session scoring 8 x 512 tokens unchanged (1,216 MiB either way: the prepacked
    weights replace the originals) and made the batch 3-8% slower."""
    if precision == "fp32":
        return onnx_scorer(str(path))
    return onnx_scorer(str(path), providers_for(precision))


def check_session(path: Path, precision: str) -> Any:
    """An ONNX Runtime session over ``path`` as the checks open them (for the packed graph,
    whose inputs are not a scorer's); drop it (and gc) to close it."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=providers_for(precision))


def on_cuda(precision: str) -> bool:
    return "CUDAExecutionProvider" in providers_for(precision)


def providers_for(precision: str) -> list[str]:
    """fp16 is checked on CUDA, the provider that will serve it, when this machine has it."""
    import onnxruntime as ort

    if precision == "fp16" and "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


# Eval pairs whose two responses (one prompt) join the packed graph's check.
PACKED_CHECK_PAIRS = 16


def pair_rows(encoded: EncodedExamples) -> list[list[int]]:
    """Both responses of the first eval pairs: rows that really share their prompt."""
    first = slice(PACKED_CHECK_PAIRS)
    pairs = zip(encoded.winners[first], encoded.losers[first], strict=True)
    return [encoded.ids[i] for pair in pairs for i in pair]
