"""Token ids for a rendered pair, with the truncation policy of docs/architecture.md
(Truncation).

Training and serving both encode through :class:`PairEncoder`, over the same
``tokenizers.Tokenizer`` (at training time, the fast tokenizer's backend; in the bundle,
``tokenizer.json``), so that the ids fed to the model are identical at both ends.

Truncation: the reward is read at one position (first token for encoders, last real token for
decoders), so the response must never be cut silently. When a pair is too long:

1. drop prompt tokens from the left until it fits (``truncated=True``);
2. if the response alone does not fit, raise :class:`ResponseTooLongError` with the lengths, unless
   the caller allowed response truncation, which keeps the start of the response.

Text rendered by the caller has no known prompt/response boundary; it is cut from the left,
keeping its end (where decoders read the reward) and marked truncated.

How special tokens are added follows the bundle's text format (:mod:`rmserve.formatting`):
the transcript format lets the tokenizer's post-processor add them (``[CLS] ... [SEP]``); a
chat template writes its own, so nothing is added, exactly as ``apply_chat_template(...,
tokenize=True)`` encodes with ``add_special_tokens=False`` (a Llama 3 tokenizer would otherwise
add a second BOS), and a leading BOS survives prompt truncation; a text-pair format encodes
(prompt, response) as the tokenizer's sequence pair.

``tokenizers`` is imported lazily so that ``import rmserve`` stays free of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from rmserve.formatting import AnyTextFormat, ChatTemplateFormat, RenderedText

if TYPE_CHECKING:
    from tokenizers import Encoding, Tokenizer

__all__ = ["EncodedPair", "PairEncoder", "ResponseTooLongError"]


class ResponseTooLongError(ValueError):
    """The response alone does not fit in max_length and response truncation was not allowed."""

    def __init__(self, response_tokens: int, prompt_tokens: int, budget: int, max_length: int):
        self.response_tokens = response_tokens
        self.prompt_tokens = prompt_tokens
        self.budget = budget
        self.max_length = max_length
        super().__init__(
            f"the response is {response_tokens} tokens but at most {budget} fit "
            f"(max_length {max_length} minus special tokens; the prompt had {prompt_tokens} "
            "tokens and was dropped first); shorten the response or ask for "
            "truncate_response=true"
        )


@dataclass(frozen=True)
class EncodedPair:
    ids: list[int]  # token ids including special tokens, len <= max_length
    truncated: bool  # True when any token of the input was dropped


class PairEncoder:
    """Encodes rendered pairs to at most ``max_length`` ids, never cutting a response silently."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        max_length: int,
        text_format: AnyTextFormat | None = None,
    ):
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2, got {max_length}")
        # A copy with padding and truncation switched off: the policy here decides, not the
        # settings that happened to be saved in tokenizer.json.
        from tokenizers import Tokenizer as _Tokenizer

        self.tokenizer: Tokenizer = _Tokenizer.from_str(tokenizer.to_str())
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        self.max_length = max_length
        # A chat template writes its own special tokens: add none (apply_chat_template's way).
        self.add_special_tokens = not isinstance(text_format, ChatTemplateFormat)
        self.bos_id: int | None = None
        if isinstance(text_format, ChatTemplateFormat) and text_format.bos_text:
            self.bos_id = self.tokenizer.token_to_id(text_format.bos_text)
        processor = self.tokenizer.post_processor
        special = processor.num_special_tokens_to_add(False) if processor else 0
        self.num_special_tokens = special if self.add_special_tokens else 0
        self.budget = max_length - self.num_special_tokens
        pair_special = processor.num_special_tokens_to_add(True) if processor else 0
        self.pair_budget = max_length - pair_special

    @classmethod
    def from_file(
        cls, path: str, max_length: int, text_format: AnyTextFormat | None = None
    ) -> PairEncoder:
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_file(path), max_length, text_format)

    def encode(self, rendered: RenderedText, *, truncate_response: bool = False) -> EncodedPair:
        return self.encode_batch([rendered], truncate_response=truncate_response)[0]

    def encode_batch(
        self, items: list[RenderedText], *, truncate_response: bool = False
    ) -> list[EncodedPair]:
        """Encode many pairs in one call to the tokenizer (Rust, parallel across items)."""
        raw = self.tokenizer.encode_batch([item.text for item in items], add_special_tokens=False)
        pairs = [item.pair for item in items if item.pair is not None]
        second = iter(self.tokenizer.encode_batch(pairs, add_special_tokens=False) if pairs else [])
        return [
            self._fit_pair(encoding, next(second), truncate_response)
            if item.pair is not None
            else self._fit(encoding, item, truncate_response)
            for encoding, item in zip(raw, items, strict=True)
        ]

    def _fit_pair(self, first: Encoding, second: Encoding, truncate_response: bool) -> EncodedPair:
        """(prompt, response) as a sequence pair: the prompt loses tokens from the left."""
        prompt_tokens, response_tokens = len(first.ids), len(second.ids)
        truncated = prompt_tokens + response_tokens > self.pair_budget
        if truncated:
            if response_tokens > self.pair_budget:
                if not truncate_response:
                    raise ResponseTooLongError(
                        response_tokens, prompt_tokens, self.pair_budget, self.max_length
                    )
                second.truncate(self.pair_budget, direction="right")
            first.truncate(max(0, self.pair_budget - len(second.ids)), direction="left")
        processed = self.tokenizer.post_process(first, second)
        return EncodedPair(ids=list(processed.ids), truncated=truncated)

    def _fit(self, encoding: Encoding, item: RenderedText, truncate_response: bool) -> EncodedPair:
        total = len(encoding.ids)
        truncated = total > self.budget
        if truncated and self.bos_id is not None and encoding.ids[:1] == [self.bos_id]:
            # A leading BOS that the chat template wrote stays when the prompt is cut.
            return self._fit_after_bos(encoding, item, truncate_response)
        if truncated:
            if item.response_start is None:
                encoding.truncate(self.budget, direction="left")
            else:
                # Tokens that end at or before the boundary are prompt; a token straddling it
                # (BPE's " word") belongs to the response.
                prompt_tokens = sum(1 for _, end in encoding.offsets if end <= item.response_start)
                response_tokens = total - prompt_tokens
                if response_tokens > self.budget:
                    if not truncate_response:
                        raise ResponseTooLongError(
                            response_tokens, prompt_tokens, self.budget, self.max_length
                        )
                    encoding.truncate(prompt_tokens + self.budget, direction="right")
                encoding.truncate(self.budget, direction="left")
        if not self.add_special_tokens:
            return EncodedPair(ids=list(encoding.ids), truncated=truncated)
        processed = self.tokenizer.post_process(encoding)
        return EncodedPair(ids=list(processed.ids), truncated=truncated)

    def _fit_after_bos(
        self, encoding: Encoding, item: RenderedText, truncate_response: bool
    ) -> EncodedPair:
        """Truncation of a text that starts with the template's BOS: the rest is fitted to one
        token less than the budget by the usual policy, then the BOS goes back in front."""
        bos, ids, offsets = encoding.ids[0], encoding.ids[1:], encoding.offsets[1:]
        budget = self.budget - 1
        if item.response_start is None:
            return EncodedPair(ids=[bos, *ids[len(ids) - budget :]], truncated=True)
        prompt_tokens = sum(1 for _, end in offsets if end <= item.response_start)
        response_tokens = len(ids) - prompt_tokens
        if response_tokens > budget:
            if not truncate_response:
                raise ResponseTooLongError(response_tokens, prompt_tokens, budget, self.max_length)
            ids = ids[: prompt_tokens + budget]
        return EncodedPair(ids=[bos, *ids[len(ids) - budget :]], truncated=True)
