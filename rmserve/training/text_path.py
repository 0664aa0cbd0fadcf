"""The text path of a bundle: which text format a checkpoint needs, and its certificate.

A model someone else trained is scored, on its model card, as
``tokenizer.apply_chat_template(conversation, tokenize=True)`` and a forward pass (or, for
encoders without a template, ``tokenizer(question, answer)``). Export picks the bundle's text
format from what the checkpoint carries (:func:`choose_text_format`) and then certifies the
whole path that the service will take, not only the ONNX graph, in two halves: the first
while the torch model is loaded (:func:`text_path_reference`), the second with the ONNX
session alone (:func:`certify_scores`). For each conversation, the text rendered by
:mod:`rmserve.formatting`, the ids encoded by :class:`rmserve.encoding.PairEncoder` over the
bundle's ``tokenizer.json``, and the ONNX score, against transformers' own text, ids and
``model(**inputs).logits``. Any difference in text or
ids fails the export; the score difference is recorded in the manifest.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from rmserve.encoding import PairEncoder
from rmserve.formatting import (
    AnyTextFormat,
    ChatTemplateFormat,
    FormattingError,
    Message,
    TextFormat,
    TextPairFormat,
    render,
)
from rmserve.training.export.options import TextFormatChoice
from rmserve.training.scoring import BatchScorer, score_ids

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "SYNTHETIC_CONVERSATIONS",
    "TextFormatChoice",
    "TextPathCertificate",
    "TextPathReference",
    "certificate_conversations",
    "certify_scores",
    "choose_text_format",
    "text_path_reference",
]

# Conversations every certificate checks, beside those drawn from the eval pairs: one turn,
# a system prompt, several turns, unicode, whitespace at the edges, template-like text.
_SYNTHETIC: list[list[dict[str, str]]] = [
    [
        {"role": "user", "content": "How do I bake bread?"},
        {"role": "assistant", "content": "Mix flour, water, salt and yeast; knead; let it rise."},
    ],
    [
        {"role": "system", "content": "You are a careful assistant."},
        {"role": "user", "content": "Is it safe to eat raw dough?"},
        {"role": "assistant", "content": "No: raw flour and eggs can carry bacteria."},
    ],
    [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me a joke about cats."},
        {
            "role": "assistant",
            "content": "  Cats don't play poker in the jungle: too many cheetahs.\n",
        },
    ],
    [
        {"role": "user", "content": "Übersetze: 猫はかわいい 🐱"},
        {"role": "assistant", "content": "Katzen sind süß. {{ not a variable }} <|im_end|> [INST]"},
    ],
]


def choose_text_format(
    requested: TextFormatChoice,
    tokenizer: PreTrainedTokenizerBase,
    kind: str,
    trained_format: TextFormat | None,
) -> tuple[AnyTextFormat, str]:
    """The bundle's text format and a sentence saying why.

    ``auto``: the format rmserve training recorded; else the tokenizer's chat template; else,
    for an encoder whose tokenizer encodes sequence pairs, the text pair; else the HH
    transcript format (said loudly: the model card may format text otherwise).
    """
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates: the default one scores chats
        template = template.get("default")
    if requested == "auto":
        if trained_format is not None:
            return trained_format, "the transcript format rmserve training used"
        if isinstance(template, str) and template:
            requested = "chat_template"
        elif kind == "encoder" and _encodes_pairs(tokenizer):
            requested = "text_pair"
        else:
            return TextFormat(), (
                "the HH transcript format: the checkpoint has no chat template and no training "
                "record; if its model card formats text otherwise, pass --text-format"
            )
    if requested == "chat_template":
        if not isinstance(template, str) or not template:
            raise ValueError(
                "--text-format chat_template: the tokenizer has no chat_template; pick "
                "transcript or text_pair"
            )
        return _chat_format(tokenizer, template), "the tokenizer's own chat template"
    if requested == "text_pair":
        return TextPairFormat(), "tokenizer(question, answer), the tokenizer's sequence pair"
    return trained_format or TextFormat(), "the HH transcript format (asked for)"


def _encodes_pairs(tokenizer: PreTrainedTokenizerBase) -> bool:
    processor = tokenizer.backend_tokenizer.post_processor
    return processor is not None and bool(processor.num_special_tokens_to_add(True))


def _chat_format(tokenizer: PreTrainedTokenizerBase, template: str) -> ChatTemplateFormat:
    from rmserve.chat_template import render_chat_template

    special = {k: str(v) for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)}
    bos = special.get("bos_token")
    probe = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    try:
        text = render_chat_template(template, probe, special)
    except ValueError:
        text = ""
    # Only a BOS the template itself writes first is restored on caller-rendered text.
    return ChatTemplateFormat(
        template=template,
        special_tokens=special,
        bos_text=bos if bos and text.startswith(bos) else None,
    )


def certificate_conversations(
    eval_conversations: Sequence[Sequence[Mapping[str, Any]]] = (), count: int = 12
) -> list[list[dict[str, Any]]]:
    """The synthetic conversations plus up to ``count`` drawn evenly from the eval pairs."""
    step = max(1, len(eval_conversations) // max(1, count))
    drawn = [
        [{"role": m["role"], "content": m["content"]} for m in conv]
        for conv in list(eval_conversations)[::step][:count]
    ]
    return [list(c) for c in _SYNTHETIC] + drawn


# How many of certificate_conversations' first conversations are the synthetic ones.
SYNTHETIC_CONVERSATIONS = len(_SYNTHETIC)


@dataclass(frozen=True)
class TextPathCertificate:
    conversations: int  # conversations rendered, encoded and scored on both paths
    refused: int  # conversations the template refused (skipped; the service answers 422)
    too_long: int  # conversations past max_length (skipped: transformers would not truncate)
    max_abs_diff: float  # max |transformers logits - bundle score| over all heads

    def as_parity(self) -> dict[str, float]:
        return {
            "text_path_conversations": float(self.conversations),
            "text_path_max_abs_diff": self.max_abs_diff,
        }


def transformers_inputs(
    tokenizer: PreTrainedTokenizerBase,
    conversation: Sequence[Mapping[str, Any]],
    text_format: AnyTextFormat,
) -> tuple[str | None, dict[str, list[int]]]:
    """(text, model inputs) as the model card computes them with transformers."""
    if isinstance(text_format, ChatTemplateFormat):
        chat: Any = [dict(m) for m in conversation]
        text = tokenizer.apply_chat_template(chat, tokenize=False)
        ids: Any = tokenizer.apply_chat_template(chat, tokenize=True, return_dict=False)
        return str(text), {"input_ids": [int(i) for i in ids]}
    if isinstance(text_format, TextPairFormat):
        question = text_format.separator.join(m["content"] for m in conversation[:-1])
        encoded = tokenizer(question, conversation[-1]["content"])
        return None, {k: list(v) for k, v in encoded.items() if k != "attention_mask"}
    rendered = render([Message(m["role"], m["content"]) for m in conversation], text_format)
    return rendered.text, {"input_ids": [int(i) for i in tokenizer(rendered.text)["input_ids"]]}


@dataclass(frozen=True)
class TextPathReference:
    """The torch half of the certificate: the conversations whose text and ids matched
    transformers', their ids as the bundle encodes them, and transformers' logits for them."""

    ids: list[list[int]]  # (N,) rows as the bundle encodes them
    expected: Any  # (N, K) float: transformers' model(**inputs).logits
    refused: int
    too_long: list[int]  # the index of each conversation past the encoder's max length


def text_path_reference(
    conversations: Sequence[Sequence[Mapping[str, Any]]],
    *,
    text_format: AnyTextFormat,
    encoder: PairEncoder,
    tokenizer: PreTrainedTokenizerBase,
    model: PreTrainedModel,
) -> TextPathReference:
    """Render and encode each conversation on both paths and run transformers' model on
    those that fit ``encoder``'s max length (the others are skipped: transformers would not
    truncate); raise ValueError on any text or id difference, or when none fits."""
    import torch

    ours: list[list[int]] = []
    theirs: list[dict[str, list[int]]] = []
    too_long: list[int] = []
    refused = 0
    for index, conversation in enumerate(conversations):
        try:
            rendered = render(conversation, text_format)
        except FormattingError:
            refused += 1
            continue
        encoded = encoder.encode(rendered, truncate_response=True)
        if encoded.truncated:
            too_long.append(index)
            continue
        text, inputs = transformers_inputs(tokenizer, conversation, text_format)
        ids = inputs["input_ids"]
        if text is not None and text != rendered.text:
            raise ValueError(
                "the bundle renders a conversation differently from transformers:\n"
                f"  transformers: {text!r}\n  rmserve:      {rendered.text!r}"
            )
        if ids != encoded.ids:
            raise ValueError(
                "the bundle's token ids differ from transformers' for the same conversation:\n"
                f"  transformers: {ids}\n  rmserve:      {encoded.ids}"
            )
        ours.append(encoded.ids)
        theirs.append(inputs)
    if not ours:
        raise ValueError(
            f"no conversation could certify the text path ({refused} refused by the template, "
            f"{len(too_long)} longer than max_length)"
        )
    model.train(False)
    with torch.no_grad():
        expected = np.stack(
            [
                model(**{k: torch.tensor([v]) for k, v in inputs.items()}).logits[0].float().numpy()
                for inputs in theirs
            ]
        )  # (N, K)
    return TextPathReference(ours, expected, refused, too_long)


def certify_scores(
    reference: TextPathReference,
    scorer: BatchScorer,
    pad_token_id: int,
    tolerance: float,
    max_tokens: int | None = None,
) -> TextPathCertificate:
    """The bundle's scores of the reference's rows (batches of at most ``max_tokens`` padded
    tokens) against transformers' logits; ValueError past ``tolerance``."""
    ours = reference.ids
    scores = score_ids(scorer, ours, pad_token_id, max_tokens=max_tokens)
    actual = np.asarray(scores).reshape(len(ours), -1)  # (N, K)
    expected = np.asarray(reference.expected, dtype=np.float64)
    diff = float(np.max(np.abs(expected - actual)))
    if not diff <= tolerance:
        raise ValueError(
            f"text-path parity failed: max |transformers - bundle| = {diff:.3g} > "
            f"{tolerance:.1g} over {len(ours)} conversations scored from their text"
        )
    return TextPathCertificate(len(ours), reference.refused, len(reference.too_long), diff)
