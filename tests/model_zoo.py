"""Tiny reward-model checkpoints that look like the real model families, built in seconds.

Tests need checkpoints that behave like the ones users bring from the hub: a Qwen-style ChatML
model whose template slips in a default system prompt, a Llama 3 model whose tokenizer adds
``<|begin_of_text|>`` on top of the one its template writes (the double-BOS trap), Gemma and
Mistral templates that refuse conversations that do not alternate, checkpoints whose reward
head is saved under OpenRLHF's or TRL's names, a BERT-style pair encoder without any template,
and a decoder too big for a single ONNX protobuf. Nothing may be downloaded, so this module
builds them: random weights from a config (hidden 32, 2 layers), and a fast tokenizer trained
by the ``tokenizers`` library in well under a second on the shared HH-harmless transcripts.

The chat templates are written here, in the style of the real ones (read from the Qwen2.5,
Llama 3.1, Gemma 3 and Mistral v0.3 tokenizer configs and vLLM's examples/ templates): the
same control tokens, whitespace control (``{%-`` / ``-%}``), ``strftime_now`` for Llama's
"Today Date", ``tojson`` for tool signatures and tool results, and ``raise_exception`` for the
conversations a template refuses. Their wording is our own.

What each family mimics, and the trap it carries:

``chatml``   Qwen2.5-Instruct. Byte-level BPE, no BOS token at all (``tokenizer(text)`` adds
             nothing), eos ``<|im_end|>``, pad ``<|endoftext|>``. The template inserts
             ``CHATML_DEFAULT_SYSTEM`` when the conversation has no system message. As in the
             real config.json, ``bos_token_id`` is set (to ``<|endoftext|>``) although the
             tokenizer has no ``bos_token``: the tokenizer, not the config, decides.
``llama3``   Llama 3.1-Instruct. Byte-level BPE, special tokens after the trained vocabulary
             (as 128000+ are), bos ``<|begin_of_text|>``, eos ``<|eot_id|>``, pad
             ``<|finetune_right_pad_id|>``; config.eos_token_id is a *list* (end_of_text,
             eom, eot) as in the real config. The template writes ``{{- bos_token }}`` and the
             tokenizer's post-processor adds another, so
             ``tokenizer(apply_chat_template(c, tokenize=False))`` starts with two BOS while
             ``apply_chat_template(c, tokenize=True)`` has one. The system header carries
             "Cutting Knowledge Date" and "Today Date: {{ date_string }}" (``strftime_now``
             unless ``date_string=`` is passed), so renderings change at midnight.
``gemma``    Gemma 3-style template on a Gemma2 model. SentencePiece-style BPE with byte
             fallback (``▁`` for spaces, ``<0xNN>`` pieces). ``<bos>`` from the template and
             from the post-processor (double-BOS trap), assistant rendered as ``model``, a
             system message folded into the first user turn, ``raise_exception`` when roles do
             not alternate. Its template is saved as ``chat_template.jinja`` (the transformers
             5 layout); the other families keep it inside tokenizer_config.json (the layout of
             the real hub repositories), so both storage places are covered.
``mistral``  Mistral-7B-Instruct-v0.3. SentencePiece-style BPE with byte fallback and a prefix
             ``▁`` on the first piece, ``[INST]``/``[/INST]`` as special tokens, ``<s>`` from
             template and post-processor (double-BOS trap), ``raise_exception`` on roles that
             do not alternate. The system message is prepended to the *last user* message (the
             real v0.3 template prepends it only when that user message is the last message,
             so it silently drops the system prompt of a conversation that ends with the
             assistant; we do not copy that). No pad in the real tokenizer: pad = ``<unk>``.
``raising``  ChatML on Qwen2, without a default system prompt, whose template refuses any
             system message and any message with empty content (``expected_refusal`` predicts
             which).

Heads (``build_decoder(head=...)``): ``"score"`` is the normal ``...ForSequenceClassification``
save; ``"value_head"`` is OpenRLHF's layout (``model.*`` + ``value_head.weight``, no bias,
config.architectures ``["RewardModel"]``: the class OpenRLHF's ``_get_reward_model`` defines and
``save_pretrained`` names); ``"v_head"`` is TRL's ``AutoModelForCausalLMWithValueHead``
(``model.*`` + ``lm_head.weight`` + ``v_head.summary.{weight,bias}``, architectures
``[...ForCausalLM]``); ``"none"`` is a bare ``...ForCausalLM``. For the renamed layouts the
safetensors file is the truth: ``expected_head(path)`` returns its head tensors, and a given
seed gives the same backbone and head weights whatever the layout, so a ``"score"`` build with
the same family and seed is the reference model.

Every folder loads with ``AutoTokenizer.from_pretrained`` and the ``"score"`` folders with
``AutoModelForSequenceClassification.from_pretrained`` with no missing or unexpected weights.
tokenizer_config.json names ``PreTrainedTokenizerFast`` (as Llama 3's does; transformers 5
would write ``TokenizersBackend``, which 4.x lacks), so transformers 5 loads tokenizer.json as
it is rather than a model-specific class that rebuilds the pipeline around the vocabulary.
Except for model_type ``qwen2`` (chatml, raising): transformers 5 ignores the declared class
for it and builds ``Qwen2Tokenizer`` from the vocabulary and merges, with its own NFC + regex +
byte-level pipeline. That pipeline equals the one saved here (Qwen2's regex, NFC), and
tests/core/test_model_zoo.py pins that every family's AutoTokenizer encodes exactly as its
tokenizer.json does, which is what a server using the ``tokenizers`` library reads.

torch, transformers, tokenizers, safetensors and hypothesis are imported inside the functions,
so importing this module costs nothing.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    import torch
    from hypothesis.strategies import SearchStrategy

__all__ = [
    "ADVERSARIAL_SNIPPETS",
    "CHATML_DEFAULT_SYSTEM",
    "FAMILIES",
    "HEADS",
    "LARGE_VOCAB_SIZE",
    "MULTI_OBJECTIVE_LABELS",
    "REFUSED",
    "TOOLS",
    "UNICODE_SNIPPETS",
    "build_decoder",
    "build_large_decoder",
    "build_pair_encoder",
    "chat_ids",
    "chat_text",
    "chatml_config",
    "conversations",
    "expected_head",
    "expected_refusal",
    "hh_texts",
    "refused_conversations",
    "save_chatml_tokenizer",
]

Conversation = list[dict[str, str]]

FAMILIES: Final = ("chatml", "llama3", "gemma", "mistral", "raising")
HEADS: Final = ("score", "value_head", "v_head", "none")
MULTI_OBJECTIVE_LABELS: Final = ("helpfulness", "correctness", "coherence")

HH_TRAIN = Path(__file__).resolve().parents[2] / "shared/data/hh-harmless/train.jsonl.gz"

CHATML_DEFAULT_SYSTEM: Final = (
    "You are Tiny, a small assistant built for rmserve's tests. You are a helpful assistant."
)

# Refusal messages, word for word as the templates raise them.
GEMMA_ALTERNATION: Final = "Conversation roles must alternate user/assistant/user/assistant/..."
MISTRAL_ALTERNATION: Final = (
    "After the optional system message, conversation roles must alternate "
    "user/assistant/user/assistant/..."
)
MISTRAL_ROLES: Final = (
    "Only user and assistant roles are supported, "
    "with the exception of an initial optional system message!"
)
RAISING_SYSTEM: Final = "System role not supported"
RAISING_EMPTY: Final = "Message content must not be empty"

# A tool list for the templates' tools branches (llama3, chatml), which render it with tojson.
# The description holds HTML characters and non-ASCII text: transformers' tojson writes them as
# they are, where jinja2's own tojson would write \u003c... and json.dumps' default \u4e8b...
TOOLS: Final[list[dict[str, Any]]] = [
    {
        "type": "function",
        "function": {
            "name": "lookup_fact",
            "description": "Look up a <b>fact</b> & cite it — 事实, “quoted”",
            "parameters": {
                "type": "object",
                "properties": {"query": {"type": "string", "description": "what to look up"}},
                "required": ["query"],
            },
        },
    }
]

# --------------------------------------------------------------------------- chat templates
# Written as raw strings so that "\n" reaches Jinja, whose string literals turn it into a
# newline. transformers compiles with trim_blocks and lstrip_blocks, as the real ones assume.

_CHATML_TEMPLATE: Final = (
    r"""{%- if messages[0].role == "system" %}
    {%- set system_text = messages[0].content %}
    {%- set turns = messages[1:] %}
{%- else %}
    {%- set system_text = "__DEFAULT_SYSTEM__" %}
    {%- set turns = messages %}
{%- endif %}
{{- "<|im_start|>system\n" + system_text }}
{%- if tools %}
    {{- "\n\n# Tools\n\nYou can call these functions; their signatures are inside <tools>:" }}
    {{- "\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" + (tool | tojson) }}
    {%- endfor %}
    {{- "\n</tools>\n\nTo call one, reply with " }}
    {{- "<tool_call>{\"name\": ..., \"arguments\": ...}</tool_call>." }}
{%- endif %}
{{- "<|im_end|>\n" }}
{%- for message in turns %}
    {%- if message.role == "tool" %}
        {{- "<|im_start|>user\n<tool_response>\n" + message.content }}
        {{- "\n</tool_response><|im_end|>\n" }}
    {%- elif message.role == "assistant" and message.tool_calls is defined %}
        {{- "<|im_start|>assistant\n" }}
        {%- if message.content is defined and message.content %}
            {{- message.content }}
        {%- endif %}
        {%- for call in message.tool_calls %}
            {%- if call.function is defined %}
                {%- set call = call.function %}
            {%- endif %}
            {{- "\n<tool_call>\n{\"name\": " + (call.name | tojson) + ", \"arguments\": " }}
            {{- call.arguments if call.arguments is string else call.arguments | tojson }}
            {{- "}\n</tool_call>" }}
        {%- endfor %}
        {{- "<|im_end|>\n" }}
    {%- else %}
        {{- "<|im_start|>" + message.role + "\n" + message.content + "<|im_end|>\n" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- "<|im_start|>assistant\n" }}
{%- endif %}
"""
).replace("__DEFAULT_SYSTEM__", CHATML_DEFAULT_SYSTEM)

_LLAMA3_TEMPLATE: Final = r"""{{- bos_token }}
{#- The date line: a caller's date_string wins, then today's date, then a fixed one. #}
{%- if date_string is not defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "01 Jan 2025" %}
    {%- endif %}
{%- endif %}
{%- if tools is not defined %}
    {%- set tools = none %}
{%- endif %}
{#- A leading system message moves into the system header. #}
{%- if messages[0].role == "system" %}
    {%- set system_text = messages[0].content | trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_text = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{%- if tools is not none %}
    {{- "To call a function, answer with JSON: {\"name\": function name, \"parameters\": " }}
    {{- "an object of argument names and values}.\n\n" }}
    {%- for tool in tools %}
        {{- tool | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
{%- endif %}
{{- system_text + "<|eot_id|>" }}
{%- for message in messages %}
    {%- if message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {{- {"output": message.content} | tojson }}
    {%- else %}
        {{- "<|start_header_id|>" + message.role + "<|end_header_id|>\n\n" }}
        {{- message.content | trim }}
    {%- endif %}
    {{- "<|eot_id|>" }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- "<|start_header_id|>assistant<|end_header_id|>\n\n" }}
{%- endif %}
"""

_GEMMA_TEMPLATE: Final = (
    r"""{{ bos_token }}
{#- Gemma has no system turn: a system message becomes the start of the first user turn. -#}
{%- if messages[0].role == "system" -%}
    {%- set first_user_prefix = messages[0].content + "\n\n" -%}
    {%- set turns = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set turns = messages -%}
{%- endif -%}
{%- for message in turns -%}
    {%- if (message.role == "user") != (loop.index0 % 2 == 0) -%}
        {{- raise_exception("__ALTERNATION__") -}}
    {%- endif -%}
    {%- set role = "model" if message.role == "assistant" else message.role -%}
    {{- "<start_of_turn>" + role + "\n" -}}
    {%- if loop.first -%}
        {{- first_user_prefix -}}
    {%- endif -%}
    {{- message.content | trim -}}
    {{- "<end_of_turn>\n" -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- "<start_of_turn>model\n" -}}
{%- endif -%}
"""
).replace("__ALTERNATION__", GEMMA_ALTERNATION)

_MISTRAL_TEMPLATE: Final = (
    (
        r"""{%- if messages[0].role == "system" %}
    {%- set system_text = messages[0].content %}
    {%- set turns = messages[1:] %}
{%- else %}
    {%- set turns = messages %}
{%- endif %}
{#- Check the alternation first, and remember where the last user message is. #}
{%- set ns = namespace(last_user=-1) %}
{%- for message in turns %}
    {%- if (message.role == "user") != (loop.index0 % 2 == 0) %}
        {{- raise_exception("__ALTERNATION__") }}
    {%- endif %}
    {%- if message.role == "user" %}
        {%- set ns.last_user = loop.index0 %}
    {%- endif %}
{%- endfor %}
{{- bos_token }}
{%- for message in turns %}
    {%- if message.role == "user" %}
        {%- if system_text is defined and loop.index0 == ns.last_user %}
            {{- "[INST] " + system_text + "\n\n" + message.content + "[/INST]" }}
        {%- else %}
            {{- "[INST] " + message.content + "[/INST]" }}
        {%- endif %}
    {%- elif message.role == "assistant" %}
        {{- " " + message.content | trim + eos_token }}
    {%- else %}
        {{- raise_exception("__ROLES__") }}
    {%- endif %}
{%- endfor %}
"""
    )
    .replace("__ALTERNATION__", MISTRAL_ALTERNATION)
    .replace("__ROLES__", MISTRAL_ROLES)
)

_RAISING_TEMPLATE: Final = (
    (
        r"""{#- Refuse before writing anything, in message order. #}
{%- for message in messages %}
    {%- if message.role == "system" %}
        {{- raise_exception("__SYSTEM__") }}
    {%- elif message.content == "" %}
        {{- raise_exception("__EMPTY__") }}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {{- "<|im_start|>" + message.role + "\n" + message.content + "<|im_end|>\n" }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- "<|im_start|>assistant\n" }}
{%- endif %}
"""
    )
    .replace("__SYSTEM__", RAISING_SYSTEM)
    .replace("__EMPTY__", RAISING_EMPTY)
)

# --------------------------------------------------------------------------- tokenizer specs

# The pre-tokenizer regexes of Qwen2 (one digit at a time) and Llama 3 (up to three digits).
_QWEN2_SPLIT: Final = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_SPLIT: Final = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_CHATML_SPECIALS: Final = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# Qwen2.5 also has tool tags as added tokens that are *not* special (kept by skip_special_tokens).
_CHATML_PLAIN_ADDED: Final = ("<tool_call>", "</tool_call>")
# Llama 3.1's 128000-128010, in order.
_LLAMA3_SPECIALS: Final = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|reserved_special_token_2|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
)
# Gemma's first ids (pad 0, eos 1, bos 2, unk 3, mask 4) and its turn markers.
_GEMMA_SPECIALS: Final = (
    "<pad>",
    "<eos>",
    "<bos>",
    "<unk>",
    "<mask>",
    "<start_of_turn>",
    "<end_of_turn>",
)
# Mistral v0.3's first ids: unk 0, s 1, /s 2, then its control tokens.
_MISTRAL_SPECIALS: Final = (
    "<unk>",
    "<s>",
    "</s>",
    "[INST]",
    "[/INST]",
    "[TOOL_CALLS]",
    "[AVAILABLE_TOOLS]",
    "[/AVAILABLE_TOOLS]",
    "[TOOL_RESULTS]",
    "[/TOOL_RESULTS]",
)
_WORDPIECE_SPECIALS: Final = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")

# bos/eos/pad/unk of each tokenizer kind (None: the real tokenizer has none).
_ROLES: Final[dict[str, dict[str, str | None]]] = {
    "chatml": {"bos": None, "eos": "<|im_end|>", "pad": "<|endoftext|>", "unk": None},
    "llama3": {
        "bos": "<|begin_of_text|>",
        "eos": "<|eot_id|>",
        "pad": "<|finetune_right_pad_id|>",
        "unk": None,
    },
    "gemma": {"bos": "<bos>", "eos": "<eos>", "pad": "<pad>", "unk": "<unk>"},
    "mistral": {"bos": "<s>", "eos": "</s>", "pad": "<unk>", "unk": "<unk>"},
}
_TOKENIZER_KIND: Final = {
    "chatml": "chatml",
    "raising": "chatml",
    "llama3": "llama3",
    "gemma": "gemma",
    "mistral": "mistral",
}
_TEMPLATES: Final = {
    "chatml": _CHATML_TEMPLATE,
    "raising": _RAISING_TEMPLATE,
    "llama3": _LLAMA3_TEMPLATE,
    "gemma": _GEMMA_TEMPLATE,
    "mistral": _MISTRAL_TEMPLATE,
}
_CONFIG_CLASS: Final = {
    "chatml": "Qwen2Config",
    "raising": "Qwen2Config",
    "llama3": "LlamaConfig",
    "gemma": "Gemma2Config",
    "mistral": "MistralConfig",
}

# --------------------------------------------------------------------------- lazy imports


def _hf() -> Any:
    """transformers, imported on first use. Typed as Any: its classes are untyped calls for
    mypy --strict, and only tests and benchmarks use this module."""
    import transformers

    return transformers


def reward_classifier(config: Any) -> Any:
    """A randomly initialised ``AutoModelForSequenceClassification`` of ``config`` with one
    output (set here: the typed config classes of transformers do not list ``num_labels``)."""
    config.num_labels = 1
    return _hf().AutoModelForSequenceClassification.from_config(config)


# --------------------------------------------------------------------------- data


# Set to 1 to let tests skip (instead of fail) when the repository's own set-up is incomplete:
# the shared data beside the checkout, or the MiniLM package of the train extra. CI leaves it
# unset, so a broken set-up cannot turn half the suite into quiet skips.
ALLOW_MISSING_SETUP = "RMSERVE_TESTS_ALLOW_MISSING_SETUP"


def missing_setup(what: str, fix: str) -> None:
    """Fail the test (skip it when ALLOW_MISSING_SETUP is 1): ``what`` is missing, ``fix``
    says how to provide it."""
    import os

    import pytest

    message = f"{what} is missing; {fix} (or set {ALLOW_MISSING_SETUP}=1 to skip such tests)"
    if os.environ.get(ALLOW_MISSING_SETUP) == "1":
        pytest.skip(message)
    pytest.fail(message, pytrace=False)


def require_hh_data() -> Path:
    """The shared HH-harmless train file, or the test fails (see :func:`missing_setup`)."""
    if not HH_TRAIN.is_file():
        missing_setup(
            f"the shared HH data ({HH_TRAIN})",
            "check out the repository beside ../shared (the README's set-up)",
        )
    return HH_TRAIN


@lru_cache(maxsize=4)
def _hh_texts(limit: int) -> tuple[str, ...]:
    if not HH_TRAIN.is_file():
        raise FileNotFoundError(f"the shared HH data is missing: expected {HH_TRAIN}")
    texts: list[str] = []
    with gzip.open(HH_TRAIN, "rt", encoding="utf-8") as f:
        for _, line in zip(range(limit), f, strict=False):
            row = json.loads(line)
            texts += [row["chosen"], row["rejected"]]
    return tuple(texts)


def hh_texts(limit: int = 300) -> list[str]:
    """The chosen and rejected transcripts of the first ``limit`` rows of the shared HH-harmless
    train file (read in place, never copied): the corpus the tiny tokenizers are trained on, so
    that they split real dialogue ("\\n\\nHuman: ...") into realistic pieces."""
    return list(_hh_texts(limit))


# --------------------------------------------------------------------------- tokenizers


def _byte_level_bpe(
    split_pattern: str, vocab_size: int, nfc: bool, texts: Sequence[str] | None = None
) -> Any:
    """A GPT-2/Qwen/Llama-3 style tokenizer: regex split, byte-level BPE, no unknown tokens;
    trained on ``texts``, by default :func:`hh_texts`."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    if nfc:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split_pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(hh_texts() if texts is None else texts, trainer)
    return tok


def _sentencepiece_bpe(
    specials: tuple[str, ...], unk: str, prepend_scheme: str, pieces: int, strip_prefix: bool
) -> Any:
    """A SentencePiece-style tokenizer (Gemma, Llama 2, Mistral): ``▁`` for spaces, BPE pieces,
    and byte fallback to ``<0xNN>`` for any character the pieces do not cover (emoji, CJK), so
    nothing becomes ``<unk>``. Ids: the special tokens, then the 256 byte pieces, then the
    trained pieces, as in the real vocabularies."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    metaspace = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=prepend_scheme, split=True)
    trainee = Tokenizer(models.BPE(unk_token=unk))
    trainee.pre_tokenizer = metaspace
    trainer = trainers.BpeTrainer(
        vocab_size=pieces, special_tokens=list(specials), show_progress=False
    )
    trainee.train_from_iterator(hh_texts(), trainer)
    trained = json.loads(trainee.to_str())["model"]
    ordered = [*specials, *(f"<0x{b:02X}>" for b in range(256))]
    seen = set(ordered)
    ordered += [
        p for p, _ in sorted(trained["vocab"].items(), key=lambda kv: kv[1]) if p not in seen
    ]
    # tokenizers >= 0.20 serializes merges as pairs, older versions as "a b" strings.
    merges = [
        tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in trained["merges"]
    ]
    tok = Tokenizer(
        models.BPE(
            vocab={p: i for i, p in enumerate(ordered)},
            merges=merges,
            unk_token=unk,
            byte_fallback=True,
            fuse_unk=True,
        )
    )
    tok.pre_tokenizer = metaspace
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if strip_prefix:
        steps.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(steps)
    return tok


def _bos_processor(tok: Any, bos: str) -> Any:
    from tokenizers import processors

    return processors.TemplateProcessing(
        single=f"{bos}:0 $A:0",
        pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
        special_tokens=[(bos, tok.token_to_id(bos))],
    )


def _chatml_backend(vocab_size: int, texts: Sequence[str] | None = None) -> Any:
    """Qwen2.5's pipeline (Qwen2 regex, NFC, byte-level BPE) trained on ``texts`` so that,
    with its control tokens and tool tags added, it has at most ``vocab_size`` ids."""
    from tokenizers import AddedToken, processors

    added = len(_CHATML_SPECIALS) + len(_CHATML_PLAIN_ADDED)
    tok = _byte_level_bpe(_QWEN2_SPLIT, vocab_size=vocab_size - added, nfc=True, texts=texts)
    tok.add_special_tokens(list(_CHATML_SPECIALS))
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in _CHATML_PLAIN_ADDED])
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


@lru_cache(maxsize=8)
def _tokenizer_json(kind: str) -> str:
    """The serialized backend tokenizer of one kind, trained once per process."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    tok: Tokenizer
    if kind == "chatml":
        tok = _chatml_backend(800 + len(_CHATML_SPECIALS) + len(_CHATML_PLAIN_ADDED))
    elif kind == "llama3":
        tok = _byte_level_bpe(_LLAMA3_SPLIT, vocab_size=800, nfc=False)
        tok.add_special_tokens(list(_LLAMA3_SPECIALS))
        tok.post_processor = processors.Sequence(
            [
                processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True),
                _bos_processor(tok, "<|begin_of_text|>"),
            ]
        )
    elif kind == "gemma":
        tok = _sentencepiece_bpe(
            _GEMMA_SPECIALS, "<unk>", prepend_scheme="never", pieces=600, strip_prefix=False
        )
        tok.add_special_tokens(list(_GEMMA_SPECIALS))
        tok.post_processor = _bos_processor(tok, "<bos>")
    elif kind == "mistral":
        tok = _sentencepiece_bpe(
            _MISTRAL_SPECIALS, "<unk>", prepend_scheme="first", pieces=600, strip_prefix=True
        )
        tok.add_special_tokens(list(_MISTRAL_SPECIALS))
        tok.post_processor = _bos_processor(tok, "<s>")
    elif kind == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(
            vocab_size=800, special_tokens=list(_WORDPIECE_SPECIALS), show_progress=False
        )
        tok.train_from_iterator(hh_texts(), trainer)
        cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS]:0 $A:0 [SEP]:0",
            pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
            special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
        )
    else:
        raise ValueError(f"unknown tokenizer kind {kind!r}")
    return str(tok.to_str())


def _save_tokenizer(
    path: Path,
    kind: str,
    *,
    chat_template: str | None,
    model_max_length: int,
    template_in_config: bool = True,
    backend: Any = None,
) -> Any:
    """Wrap the trained backend (``backend``, else ``kind``'s own) in a transformers fast
    tokenizer, save it, and shape tokenizer_config.json as the real repositories have it.
    Returns the saved tokenizer."""
    from tokenizers import Tokenizer

    if backend is None:
        backend = Tokenizer.from_str(_tokenizer_json(kind))
    if kind == "wordpiece":
        specials: dict[str, str | None] = {
            "unk_token": "[UNK]",
            "sep_token": "[SEP]",
            "pad_token": "[PAD]",
            "cls_token": "[CLS]",
            "mask_token": "[MASK]",
        }
    else:
        roles = _ROLES[kind]
        specials = {
            "bos_token": roles["bos"],
            "eos_token": roles["eos"],
            "pad_token": roles["pad"],
            "unk_token": roles["unk"],
        }
    extra: dict[str, Any] = {k: v for k, v in specials.items() if v is not None}
    if kind == "wordpiece":
        # TokenizersBackend returns only input_ids and attention_mask unless told otherwise;
        # a BERT pair model needs the segment ids too.
        extra["model_input_names"] = ["input_ids", "token_type_ids", "attention_mask"]
    tokenizer = _hf().PreTrainedTokenizerFast(
        tokenizer_object=backend,
        model_max_length=model_max_length,
        chat_template=chat_template,
        **extra,
    )
    tokenizer.save_pretrained(path)

    config_file = path / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    # transformers 5 writes "TokenizersBackend", a class transformers 4 does not have; the real
    # Llama 3 / Qwen repositories name PreTrainedTokenizerFast, which 5 maps to the same class.
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    if kind in ("gemma", "mistral"):
        # As in the real configs. transformers 5 then rebuilds the post-processor from these
        # flags: "<bos>:0 $A:0" (and ":1" for pairs), the same one tokenizer.json carries.
        config["add_bos_token"] = True
        config["add_eos_token"] = False
    template_file = path / "chat_template.jinja"
    if chat_template is None:
        config.pop("chat_template", None)  # BERT's config has no such key, not even null
    elif template_in_config:
        config["chat_template"] = chat_template
        template_file.unlink(missing_ok=True)
    config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", "utf-8")
    return tokenizer


# --------------------------------------------------------------------------- models


def _decoder_config(
    family: str,
    tokenizer: Any,
    *,
    num_labels: int,
    max_position_embeddings: int,
    vocab_size: int | None = None,
    hidden_size: int = 32,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 2,
    num_key_value_heads: int = 1,
    intermediate_size: int = 64,
    config_class: str | None = None,
) -> Any:
    ids = {name: tokenizer.convert_tokens_to_ids(t) for name, t in _named_tokens(family).items()}
    common: dict[str, Any] = {
        "vocab_size": vocab_size if vocab_size is not None else len(tokenizer),
        "hidden_size": hidden_size,
        "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": num_attention_heads,
        "num_key_value_heads": num_key_value_heads,
        "intermediate_size": intermediate_size,
        "max_position_embeddings": max_position_embeddings,
        "pad_token_id": ids["pad"],
        "num_labels": num_labels,
    }
    if num_labels == len(MULTI_OBJECTIVE_LABELS):
        common["id2label"] = dict(enumerate(MULTI_OBJECTIVE_LABELS))
        common["label2id"] = {label: i for i, label in enumerate(MULTI_OBJECTIVE_LABELS)}
    kind = _TOKENIZER_KIND[family]
    if kind == "chatml":
        # Qwen2.5's config names <|endoftext|> as bos although its tokenizer has no bos_token.
        extra: dict[str, Any] = {"bos_token_id": ids["endoftext"], "eos_token_id": ids["eos"]}
    elif kind == "llama3":
        extra = {
            "bos_token_id": ids["bos"],
            "eos_token_id": [ids["end_of_text"], ids["eom"], ids["eos"]],
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                # Llama 3.1: 8192 of 131072 positions; the same ratio here.
                "original_max_position_embeddings": max(1, max_position_embeddings // 16),
            },
        }
    elif kind == "gemma":
        head_dim = hidden_size // num_attention_heads
        extra = {
            "bos_token_id": ids["bos"],
            "eos_token_id": ids["eos"],
            "head_dim": head_dim,
            "query_pre_attn_scalar": head_dim,
        }
    else:  # mistral
        extra = {"bos_token_id": ids["bos"], "eos_token_id": ids["eos"], "sliding_window": None}
    cls = getattr(_hf(), config_class or _CONFIG_CLASS[family])
    return cls(**common, **extra)


def _named_tokens(family: str) -> dict[str, str]:
    kind = _TOKENIZER_KIND[family]
    named = {k: v for k, v in _ROLES[kind].items() if v is not None}
    if kind == "chatml":
        named["endoftext"] = "<|endoftext|>"
    elif kind == "llama3":
        named["end_of_text"] = "<|end_of_text|>"
        named["eom"] = "<|eom_id|>"
    return named


def _save_safetensors(state: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().clone() for k, v in state.items()}
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


def build_decoder(
    path: Path,
    family: str,
    *,
    num_labels: int = 1,
    head: str = "score",
    seed: int = 0,
    max_position_embeddings: int = 2048,
    config_class: str | None = None,
) -> Path:
    """Build a tiny random-weight decoder reward model of ``family`` into ``path`` (created if
    needed; returned). Hidden 32, 2 layers, 2 heads (1 KV head), vocab ~800-1100, fp32.

    ``config_class`` swaps the architecture under the family's tokenizer and template, e.g.
    ``"Qwen3Config"`` with ``"chatml"`` for a Skywork-Reward-V2-Qwen3-shaped model.
    ``num_labels=3`` gives a multi-objective head like ArmoRM's, with id2label
    helpfulness/correctness/coherence. ``head`` picks the saved layout (see the module
    docstring): ``"score"``, ``"value_head"`` (OpenRLHF), ``"v_head"`` (TRL) or ``"none"``
    (bare causal LM). The same ``family`` and ``seed`` give the same backbone and head weights
    in every layout, so a ``"score"`` build is the reference for the renamed ones.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}; expected one of {HEADS}")
    import torch

    hf = _hf()
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = _save_tokenizer(
        path,
        _TOKENIZER_KIND[family],
        chat_template=_TEMPLATES[family],
        model_max_length=max_position_embeddings,
        template_in_config=family != "gemma",
    )
    config = _decoder_config(
        family,
        tokenizer,
        num_labels=num_labels,
        max_position_embeddings=max_position_embeddings,
        config_class=config_class,
    )
    torch.manual_seed(seed)
    if head == "none":
        hf.AutoModelForCausalLM.from_config(config).save_pretrained(path)
        return path
    model = hf.AutoModelForSequenceClassification.from_config(config)
    if head == "score":
        model.save_pretrained(path)
        return path

    state = dict(model.state_dict())
    score = state.pop("score.weight")
    if head == "value_head":
        # OpenRLHF: setattr(self, "value_head", nn.Linear(hidden, 1, bias=False)) next to
        # self.model; save_pretrained names the class it defines, and the strategy then writes
        # the config with normalize_reward and use_cache=False.
        state["value_head.weight"] = score
        config.architectures = ["RewardModel"]
        config.normalize_reward = False
        config.use_cache = False
    else:
        # TRL: the causal LM's own weights (lm_head included unless tied) plus
        # v_head.summary = nn.Linear(hidden, 1) with a bias.
        generator = torch.Generator().manual_seed(seed + 1)
        if not config.tie_word_embeddings:
            state["lm_head.weight"] = 0.02 * torch.randn(
                config.vocab_size, config.hidden_size, generator=generator
            )
        state["v_head.summary.weight"] = score
        state["v_head.summary.bias"] = 0.02 * torch.randn(num_labels, generator=generator)
        config.architectures = [
            type(model).__name__.replace("ForSequenceClassification", "ForCausalLM")
        ]
    _save_safetensors(state, path)
    config.save_pretrained(path)
    return path


def expected_head(path: Path) -> dict[str, torch.Tensor]:
    """The reward-head tensors saved in ``path``/model.safetensors, by their saved names
    (``score.weight``, ``value_head.weight``, or ``v_head.summary.weight`` and
    ``v_head.summary.bias``; empty for a bare causal LM). The file is the truth a loader that
    maps these names onto a ``score`` head must reproduce."""
    from safetensors.torch import load_file

    state = load_file(str(Path(path) / "model.safetensors"))
    prefixes = ("score.", "value_head.", "v_head.")
    return {k: v for k, v in state.items() if k.startswith(prefixes)}


def build_pair_encoder(path: Path, *, seed: int = 0) -> Path:
    """A tiny BERT reward model (``BertForSequenceClassification``, num_labels=1, hidden 32,
    2 layers) with a lower-casing WordPiece tokenizer (vocab 800) trained on HH text, scored as
    ``tokenizer(question, answer)`` like OpenAssistant's DeBERTa reward models: the
    post-processor writes ``[CLS] A [SEP] B [SEP]`` with token_type_ids 0 then 1. No chat
    template: a server must not try to render a conversation for it."""
    import torch

    hf = _hf()
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = _save_tokenizer(path, "wordpiece", chat_template=None, model_max_length=512)
    config = hf.BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
        type_vocab_size=2,
        num_labels=1,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    hf.BertForSequenceClassification(config).save_pretrained(path)
    return path


LARGE_VOCAB_SIZE: Final = 540_000


def build_large_decoder(path: Path) -> Path:
    """A Llama-3 reward model (llama3 tokenizer and template) whose fp32 weights exceed 2 GiB,
    ONNX's protobuf limit, so an exporter must write external data; its forward pass stays
    cheap. The trick: config.vocab_size is ``LARGE_VOCAB_SIZE`` (540,000; the tokenizer uses
    the first ~810 rows) at hidden 1024, one layer, 8 heads, intermediate 64: 557.4 M
    parameters, 2.23e9 bytes in fp32 (> 2**31 = 2.147e9), 2.21e9 of them the embedding.

    Saved in **bfloat16** (config dtype "bfloat16"): 1.11 GB on disk. An exporter that upcasts
    to fp32 gets the > 2 GiB graph. The model is initialised at the tokenizer's vocabulary size
    (random normal init of 553 M values alone takes ~13 s on 2 cores) and its embedding rows
    are then tiled up to 540,000. Measured on 2 CPU cores (torch and transformers already
    imported): 2.5-6 s to build and save when the cores are idle, ~16 s when other jobs share
    them; 1,114,757,486 bytes on disk; 1.5 GB peak resident memory.
    """
    import torch

    nn: Any = torch.nn
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = _save_tokenizer(
        path, "llama3", chat_template=_LLAMA3_TEMPLATE, model_max_length=2048
    )
    config = _decoder_config(
        "llama3",
        tokenizer,
        num_labels=1,
        max_position_embeddings=2048,
        hidden_size=1024,
        num_hidden_layers=1,
        num_attention_heads=8,
        num_key_value_heads=8,
        intermediate_size=64,
    )
    torch.manual_seed(0)
    model = _hf().LlamaForSequenceClassification(config).to(torch.bfloat16)
    rows = model.model.embed_tokens.weight.detach()
    repeats = -(-LARGE_VOCAB_SIZE // rows.shape[0])
    tiled = rows.repeat(repeats, 1)[:LARGE_VOCAB_SIZE].contiguous()
    model.model.embed_tokens = nn.Embedding.from_pretrained(
        tiled, freeze=False, padding_idx=config.pad_token_id
    )
    model.config.vocab_size = LARGE_VOCAB_SIZE
    model.save_pretrained(path)
    return path


def save_chatml_tokenizer(
    path: Path, *, vocab_size: int, texts: Sequence[str], model_max_length: int
) -> Any:
    """The ``chatml`` family's tokenizer (Qwen2.5's pipeline, control tokens and template)
    trained on ``texts`` to at most ``vocab_size`` ids instead of ~800, saved in ``path``
    (created if needed) and returned: for models whose vocabulary must have a real size."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    return _save_tokenizer(
        path,
        "chatml",
        chat_template=_CHATML_TEMPLATE,
        model_max_length=model_max_length,
        backend=_chatml_backend(vocab_size, texts),
    )


def chatml_config(
    tokenizer: Any,
    *,
    max_position_embeddings: int,
    hidden_size: int,
    num_hidden_layers: int,
    num_attention_heads: int,
    num_key_value_heads: int,
    intermediate_size: int,
) -> Any:
    """The ``chatml`` family's ``Qwen2Config`` (one label; pad, bos and eos ids as Qwen2.5's
    config has them; vocab_size = ``len(tokenizer)``) at the given shape."""
    return _decoder_config(
        "chatml",
        tokenizer,
        num_labels=1,
        max_position_embeddings=max_position_embeddings,
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        intermediate_size=intermediate_size,
    )


# --------------------------------------------------------------------------- conversations


def chat_text(tokenizer: Any, conversation: Conversation, **kwargs: Any) -> str:
    """``apply_chat_template(conversation, tokenize=False)``, checked to be one string."""
    text = tokenizer.apply_chat_template(conversation, tokenize=False, **kwargs)
    if not isinstance(text, str):
        raise TypeError(f"expected the rendered chat as a str, got {type(text).__name__}")
    return text


def chat_ids(tokenizer: Any, conversation: Conversation, **kwargs: Any) -> list[int]:
    """``apply_chat_template(conversation, tokenize=True)`` as a plain list of ids. transformers
    5 returns a BatchEncoding by default (``return_dict=True``), 4.x a list; this accepts both.
    Either way the rendered text is encoded with ``add_special_tokens=False``."""
    out = tokenizer.apply_chat_template(conversation, tokenize=True, **kwargs)
    if isinstance(out, list):
        return [int(i) for i in out]
    return [int(i) for i in out["input_ids"]]


# Strings that look like template syntax, control tokens of every family, or HH's own turn
# markers: a renderer or tokenizer must treat them as plain content.
ADVERSARIAL_SNIPPETS: Final = (
    "{{ x }}",
    "{% if %}",
    "{%- endif -%}",
    "{# note #}",
    "{{ raise_exception('boom') }}",
    "<|im_start|>",
    "<|im_end|>",
    "<|endoftext|>",
    "<|begin_of_text|>",
    "<|start_header_id|>user<|end_header_id|>",
    "<|eot_id|>",
    "[INST]",
    "[/INST]",
    "<s>",
    "</s>",
    "<bos>",
    "<start_of_turn>model\n",
    "<end_of_turn>",
    "<pad>",
    "<0x41>",
    "<tool_call>",
    "[CLS]",
    "\n\nHuman:",
    "\n\nAssistant:",
)
UNICODE_SNIPPETS: Final = (
    "",
    " ",
    "  leading",
    "trailing \t",
    "\n",
    "\r\n",
    "line one\nline two",
    "😀",
    "👩‍👩‍👧",
    "中文内容",
    "日本語のテキスト",
    "e\u0301",
    "\u200b",
    "Ünïcödé",
)


def conversations() -> SearchStrategy[Conversation]:
    """Conversations for templating tests: an optional system message, then 1-3 user/assistant
    exchanges, so the last message is the assistant response being scored and the roles always
    alternate (the strict gemma and mistral templates accept every one; the ``raising``
    template refuses those with a system message or an empty content, see
    ``expected_refusal``). Contents mix unicode text (no lone surrogates), empty strings,
    newlines, leading/trailing whitespace, emoji, CJK, and ``ADVERSARIAL_SNIPPETS``."""
    from hypothesis import strategies as st

    piece = st.one_of(
        st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=12),
        st.sampled_from(ADVERSARIAL_SNIPPETS),
        st.sampled_from(UNICODE_SNIPPETS),
    )
    content = st.lists(piece, max_size=4).map("".join)

    def assemble(system: str | None, exchanges: list[tuple[str, str]]) -> Conversation:
        conversation = [] if system is None else [{"role": "system", "content": system}]
        for user, assistant in exchanges:
            conversation.append({"role": "user", "content": user})
            conversation.append({"role": "assistant", "content": assistant})
        return conversation

    return st.builds(
        assemble,
        st.one_of(st.none(), content),
        st.lists(st.tuples(content, content), min_size=1, max_size=3),
    )


def _msg(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


# Conversations each strict template refuses, with the exact message it raises (jinja2's
# TemplateError; transformers passes it through). chatml and llama3 refuse nothing.
REFUSED: Final[dict[str, list[tuple[Conversation, str]]]] = {
    "chatml": [],
    "llama3": [],
    "gemma": [
        ([_msg("user", "hi"), _msg("user", "again"), _msg("assistant", "ok")], GEMMA_ALTERNATION),
        ([_msg("assistant", "I start"), _msg("user", "hi")], GEMMA_ALTERNATION),
        (
            [_msg("system", "be brief"), _msg("assistant", "no user turn")],
            GEMMA_ALTERNATION,
        ),
    ],
    "mistral": [
        ([_msg("user", "hi"), _msg("user", "again"), _msg("assistant", "ok")], MISTRAL_ALTERNATION),
        ([_msg("assistant", "I start"), _msg("user", "hi")], MISTRAL_ALTERNATION),
        ([_msg("user", "hi"), _msg("tool", "42")], MISTRAL_ROLES),
    ],
    "raising": [
        ([_msg("system", "be brief"), _msg("user", "hi"), _msg("assistant", "ok")], RAISING_SYSTEM),
        ([_msg("user", "hi"), _msg("assistant", "")], RAISING_EMPTY),
        ([_msg("user", ""), _msg("assistant", "ok")], RAISING_EMPTY),
    ],
}


def refused_conversations(family: str) -> list[tuple[Conversation, str]]:
    """``REFUSED[family]`` as fresh copies (callers may mutate them)."""
    return [([dict(m) for m in conv], message) for conv, message in REFUSED[family]]


def expected_refusal(family: str, conversation: Conversation) -> str | None:
    """The message ``family``'s template raises for ``conversation``, or None when it renders
    it: the templates' checks, restated in Python so property tests know what to expect."""
    turns = (
        conversation[1:] if conversation and conversation[0]["role"] == "system" else conversation
    )
    if family in ("gemma", "mistral"):
        for i, message in enumerate(turns):
            if (message["role"] == "user") != (i % 2 == 0):
                return GEMMA_ALTERNATION if family == "gemma" else MISTRAL_ALTERNATION
        if family == "mistral" and any(m["role"] not in ("user", "assistant") for m in turns):
            return MISTRAL_ROLES
        return None
    if family == "raising":
        for message in conversation:
            if message["role"] == "system":
                return RAISING_SYSTEM
            if message["content"] == "":
                return RAISING_EMPTY
        return None
    if family in ("chatml", "llama3"):
        return None
    raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
