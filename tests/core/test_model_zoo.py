"""Pins what tests/model_zoo.py promises: each tiny checkpoint loads back with transformers as
the real family's would, and carries the real family's traps (double BOS, default system
prompt, refusals, renamed heads, a > 2 GiB decoder).

Each checkpoint is built once per module. On 2 idle CPU cores the file takes ~15 s without
the large decoder (``-m "not slow"``) and ~25 s with it (building and saving its 1.1 GB takes
~3-10 s, more when other jobs share the cores).
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import pytest
import torch
from hypothesis import given, settings
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedTokenizerBase,
)

from tests import model_zoo

CONVERSATION: list[dict[str, str]] = [
    {"role": "user", "content": "How do I boil an egg?"},
    {"role": "assistant", "content": " Put it in boiling water for 9 minutes. "},
]
WITH_SYSTEM = [{"role": "system", "content": "Answer briefly."}, *CONVERSATION]
BOS_FAMILIES = ("llama3", "gemma", "mistral")

Build = Callable[..., Path]


@pytest.fixture(scope="module")
def build(tmp_path_factory: pytest.TempPathFactory) -> Build:
    """``build(family, head=..., num_labels=...)`` or ``build("pair")``: the checkpoint folder,
    built on first use and reused by the rest of the module."""
    model_zoo.require_hh_data()
    built: dict[tuple[Any, ...], Path] = {}

    def _build(family: str, *, head: str = "score", num_labels: int = 1) -> Path:
        key = (family, head, num_labels)
        if key not in built:
            folder = tmp_path_factory.mktemp(f"{family}-{head}-{num_labels}")
            if family == "pair":
                built[key] = model_zoo.build_pair_encoder(folder)
            else:
                built[key] = model_zoo.build_decoder(
                    folder, family, head=head, num_labels=num_labels
                )
        return built[key]

    return _build


@pytest.fixture(scope="module")
def tokenizers(build: Build) -> dict[str, PreTrainedTokenizerBase]:
    return {family: AutoTokenizer.from_pretrained(build(family)) for family in model_zoo.FAMILIES}


def _load(path: Path) -> tuple[Any, dict[str, Any]]:
    model, info = AutoModelForSequenceClassification.from_pretrained(path, output_loading_info=True)
    return model.eval(), info


def _score(model: Any, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits: torch.Tensor = model(input_ids=torch.tensor([ids])).logits
    return logits


def test_hh_texts_are_real_transcripts() -> None:
    model_zoo.require_hh_data()
    texts = model_zoo.hh_texts(5)
    assert len(texts) == 10
    assert all(t.startswith("\n\nHuman:") and "\n\nAssistant:" in t for t in texts)


@pytest.mark.parametrize("family", model_zoo.FAMILIES)
def test_family_loads_back_without_missing_weights(
    family: str, build: Build, tokenizers: dict[str, PreTrainedTokenizerBase]
) -> None:
    path = build(family)
    tokenizer = tokenizers[family]
    assert tokenizer.is_fast
    assert tokenizer.chat_template
    assert tokenizer.eos_token is not None
    assert tokenizer.pad_token is not None
    assert tokenizer.pad_token_id != tokenizer.eos_token_id  # no pad == eos pooling trap
    if family in BOS_FAMILIES:
        assert tokenizer.bos_token is not None
    else:
        assert tokenizer.bos_token is None  # Qwen: no BOS at all
    model, info = _load(path)
    assert not info["missing_keys"]
    assert not info["unexpected_keys"]
    assert not info["mismatched_keys"]
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert model.config.num_labels == 1
    conversation = CONVERSATION if family == "raising" else WITH_SYSTEM
    assert _score(model, model_zoo.chat_ids(tokenizer, conversation)).shape == (1, 1)


@pytest.mark.parametrize("family", model_zoo.FAMILIES)
def test_auto_tokenizer_encodes_as_tokenizer_json(
    family: str, build: Build, tokenizers: dict[str, PreTrainedTokenizerBase]
) -> None:
    """A server reads tokenizer.json with the tokenizers library; transformers may rebuild the
    pipeline (Qwen2Tokenizer for qwen2). Both must give the same ids, pairs included."""
    from tokenizers import Tokenizer

    saved = Tokenizer.from_file(str(build(family) / "tokenizer.json"))
    tokenizer = tokenizers[family]
    texts = [
        *model_zoo.hh_texts(3),
        *model_zoo.ADVERSARIAL_SNIPPETS,
        *model_zoo.UNICODE_SNIPPETS,
        "".join(model_zoo.ADVERSARIAL_SNIPPETS + model_zoo.UNICODE_SNIPPETS),
    ]
    for text in texts:
        assert tokenizer(text)["input_ids"] == saved.encode(text).ids, text
        pair = tokenizer(text, "a reply")["input_ids"]
        assert pair == saved.encode(text, "a reply").ids, text


@pytest.mark.parametrize("family", BOS_FAMILIES)
def test_double_bos_trap(family: str, tokenizers: dict[str, PreTrainedTokenizerBase]) -> None:
    """The template writes the BOS and the tokenizer's post-processor adds one too: tokenizing
    the rendered text the ordinary way gives two, apply_chat_template(tokenize=True) one."""
    tokenizer = tokenizers[family]
    bos = tokenizer.bos_token_id
    raw: Any = tokenizer.apply_chat_template(WITH_SYSTEM, tokenize=True)
    ids = model_zoo.chat_ids(tokenizer, WITH_SYSTEM)
    assert list(raw["input_ids"]) == ids  # transformers 5: a BatchEncoding by default
    text = model_zoo.chat_text(tokenizer, WITH_SYSTEM)
    assert isinstance(text, str)
    assert text.startswith(tokenizer.bos_token)
    assert ids[0] == bos
    assert ids[1] != bos
    doubled = tokenizer(text)["input_ids"]
    assert doubled[:2] == [bos, bos]
    assert doubled[1:] == ids
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == ids


def test_chatml_inserts_its_default_system_prompt(
    tokenizers: dict[str, PreTrainedTokenizerBase],
) -> None:
    tokenizer = tokenizers["chatml"]
    text = model_zoo.chat_text(tokenizer, CONVERSATION)
    assert text.startswith(f"<|im_start|>system\n{model_zoo.CHATML_DEFAULT_SYSTEM}<|im_end|>\n")
    assert text.endswith(
        "<|im_start|>assistant\n Put it in boiling water for 9 minutes. <|im_end|>\n"
    )
    own = model_zoo.chat_text(tokenizer, WITH_SYSTEM)
    assert model_zoo.CHATML_DEFAULT_SYSTEM not in own
    assert own.startswith("<|im_start|>system\nAnswer briefly.<|im_end|>\n")
    # No BOS anywhere: plain tokenization adds nothing around the text.
    assert tokenizer(text)["input_ids"] == model_zoo.chat_ids(tokenizer, CONVERSATION)


def test_llama3_header_dates_and_trims(tokenizers: dict[str, PreTrainedTokenizerBase]) -> None:
    tokenizer = tokenizers["llama3"]
    before = datetime.now().strftime("%d %b %Y")
    text = model_zoo.chat_text(tokenizer, WITH_SYSTEM)
    after = datetime.now().strftime("%d %b %Y")
    assert f"Today Date: {before}\n\n" in text or f"Today Date: {after}\n\n" in text
    assert "Cutting Knowledge Date: December 2023\n" in text
    assert text.endswith("Put it in boiling water for 9 minutes.<|eot_id|>")  # content | trim
    fixed = model_zoo.chat_text(tokenizer, WITH_SYSTEM, date_string="26 Jul 2024")
    assert "Today Date: 26 Jul 2024\n\nAnswer briefly.<|eot_id|>" in fixed


def test_gemma_and_mistral_layouts(tokenizers: dict[str, PreTrainedTokenizerBase]) -> None:
    gemma = model_zoo.chat_text(tokenizers["gemma"], WITH_SYSTEM)
    assert gemma == (
        "<bos><start_of_turn>user\nAnswer briefly.\n\nHow do I boil an egg?<end_of_turn>\n"
        "<start_of_turn>model\nPut it in boiling water for 9 minutes.<end_of_turn>\n"
    )
    mistral = model_zoo.chat_text(tokenizers["mistral"], WITH_SYSTEM)
    assert mistral == (
        "<s>[INST] Answer briefly.\n\nHow do I boil an egg?[/INST]"
        " Put it in boiling water for 9 minutes.</s>"
    )


@pytest.mark.parametrize("family", ["llama3", "chatml"])
def test_tools_render_with_plain_tojson(
    family: str, tokenizers: dict[str, PreTrainedTokenizerBase]
) -> None:
    """transformers' tojson keeps <, & and non-ASCII as they are (jinja2's own would escape
    them); llama3 also exercises tojson's indent, and its tool results go through tojson."""
    tokenizer = tokenizers[family]
    text = model_zoo.chat_text(tokenizer, CONVERSATION, tools=model_zoo.TOOLS)
    assert "Look up a <b>fact</b> & cite it — 事实, “quoted”" in text
    indent = 4 if family == "llama3" else None
    assert json.dumps(model_zoo.TOOLS[0], indent=indent, ensure_ascii=False) in text
    with_result = [*CONVERSATION[:1], {"role": "tool", "content": "<42> 度"}]
    rendered = model_zoo.chat_text(tokenizer, with_result)
    if family == "llama3":
        assert '<|start_header_id|>ipython<|end_header_id|>\n\n{"output": "<42> 度"}' in rendered
    else:
        assert "<|im_start|>user\n<tool_response>\n<42> 度\n</tool_response><|im_end|>" in rendered


@pytest.mark.parametrize("family", ["gemma", "mistral", "raising"])
def test_strict_templates_refuse_with_their_message(
    family: str, tokenizers: dict[str, PreTrainedTokenizerBase]
) -> None:
    refused = model_zoo.refused_conversations(family)
    assert refused
    for conversation, message in refused:
        assert model_zoo.expected_refusal(family, conversation) == message
        with pytest.raises(jinja2.TemplateError) as caught:
            model_zoo.chat_text(tokenizers[family], conversation)
        assert str(caught.value) == message


@settings(max_examples=200, deadline=None)
@given(conversation=model_zoo.conversations())
def test_generated_conversations_render_as_expected(
    conversation: list[dict[str, str]], tokenizers: dict[str, PreTrainedTokenizerBase]
) -> None:
    """Every generated conversation alternates and ends with the assistant; every family
    renders it unless expected_refusal says otherwise (only ``raising`` ever refuses), and the
    tokenized chat decodes back to the rendered text (NFC-normalised for the Qwen tokenizer;
    not checked for SentencePiece-style tokenizers when the text holds a literal "▁", which
    they decode as a space)."""
    turns = conversation[1:] if conversation[0]["role"] == "system" else conversation
    assert [m["role"] for m in turns] == ["user", "assistant"] * (len(turns) // 2)
    assert not any("\ud800" <= ch <= "\udfff" for m in conversation for ch in m["content"])
    for family in model_zoo.FAMILIES:
        tokenizer = tokenizers[family]
        expected = model_zoo.expected_refusal(family, conversation)
        if family != "raising":
            assert expected is None
        if expected is not None:
            with pytest.raises(jinja2.TemplateError, match=re.escape(expected)):
                model_zoo.chat_text(tokenizer, conversation)
            continue
        text = model_zoo.chat_text(tokenizer, conversation)
        decoded = tokenizer.decode(model_zoo.chat_ids(tokenizer, conversation))
        if family in ("chatml", "raising"):
            text = unicodedata.normalize("NFC", text)
        if family in ("gemma", "mistral") and "\u2581" in text:
            continue
        assert decoded == text, family


def test_multi_objective_head(build: Build) -> None:
    path = build("llama3", num_labels=3)
    model, info = _load(path)
    assert not info["missing_keys"]
    assert model.config.id2label == {0: "helpfulness", 1: "correctness", 2: "coherence"}
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert _score(model, model_zoo.chat_ids(tokenizer, CONVERSATION)).shape == (1, 3)


@pytest.mark.parametrize(
    ("head", "keys", "architecture"),
    [
        ("value_head", {"value_head.weight"}, "RewardModel"),
        ("v_head", {"v_head.summary.weight", "v_head.summary.bias"}, "Qwen2ForCausalLM"),
        ("none", set(), "Qwen2ForCausalLM"),
    ],
)
def test_renamed_heads_are_not_a_score_head(
    head: str, keys: set[str], architecture: str, build: Build
) -> None:
    """Loaded as a sequence classifier, these folders leave ``score`` newly initialised:
    transformers reports it missing. The saved head is the seed's ``score`` head."""
    from safetensors import safe_open

    path = build("chatml", head=head)
    reference = build("chatml")
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == [architecture]
    heads = model_zoo.expected_head(path)
    assert set(heads) == keys
    with safe_open(str(path / "model.safetensors"), "pt") as saved:
        names = set(saved.keys())
    assert "model.embed_tokens.weight" in names
    assert ("lm_head.weight" in names) == (head in ("v_head", "none"))
    _, info = _load(path)
    assert "score.weight" in info["missing_keys"]
    assert set(info["unexpected_keys"]) >= keys
    if head != "none":
        weight = heads[f"{'value_head' if head == 'value_head' else 'v_head.summary'}.weight"]
        assert torch.equal(weight, model_zoo.expected_head(reference)["score.weight"])
        layer = "model.layers.1.mlp.down_proj.weight"
        with (
            safe_open(str(reference / "model.safetensors"), "pt") as ref,
            safe_open(str(path / "model.safetensors"), "pt") as saved,
        ):
            assert torch.equal(ref.get_tensor(layer), saved.get_tensor(layer))


def test_pair_encoder_scores_question_answer_pairs(build: Build) -> None:
    path = build("pair")
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert tokenizer.chat_template is None
    assert "chat_template" not in json.loads((path / "tokenizer_config.json").read_text())
    encoded = tokenizer("How do I boil an egg?", "Boil it for 9 minutes.")
    tokens = tokenizer.convert_ids_to_tokens(encoded["input_ids"])
    assert tokens[0] == "[CLS]"
    assert tokens[-1] == "[SEP]"
    assert tokens.count("[SEP]") == 2
    boundary = tokens.index("[SEP]") + 1
    assert encoded["token_type_ids"] == [0] * boundary + [1] * (len(tokens) - boundary)
    model, info = _load(path)
    assert not info["missing_keys"]
    assert not info["unexpected_keys"]
    with torch.no_grad():
        logits = model(**tokenizer("q", "a", return_tensors="pt")).logits
    assert logits.shape == (1, 1)


@pytest.mark.slow
def test_large_decoder_exceeds_the_protobuf_limit(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """The fp32 parameters pass 2 GiB; counted from the safetensors header, without loading."""
    from safetensors import safe_open

    model_zoo.require_hh_data()
    path = model_zoo.build_large_decoder(tmp_path_factory.mktemp("large"))
    with safe_open(str(path / "model.safetensors"), "pt") as saved:
        names = list(saved.keys())  # a safe_open handle is not iterable
        numel = sum(math.prod(saved.get_slice(k).get_shape()) for k in names)
        dtypes = {saved.get_slice(k).get_dtype() for k in names}
    assert numel * 4 > 2**31
    assert dtypes == {"BF16"}
    config = json.loads((path / "config.json").read_text())
    assert config["vocab_size"] == model_zoo.LARGE_VOCAB_SIZE
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert model_zoo.chat_ids(tokenizer, CONVERSATION)[0] == tokenizer.bos_token_id


def test_a_missing_setup_fails_unless_skipping_is_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    # The shared data and the MiniLM package are this repository's own set-up: without them
    # the suite fails (116 tests used to skip quietly), unless the caller opts out.
    monkeypatch.delenv(model_zoo.ALLOW_MISSING_SETUP, raising=False)
    with pytest.raises(pytest.fail.Exception, match=r"the shared HH data.*is missing"):
        model_zoo.missing_setup("the shared HH data (x)", "check out ../shared")
    monkeypatch.setenv(model_zoo.ALLOW_MISSING_SETUP, "1")
    with pytest.raises(pytest.skip.Exception, match="RMSERVE_TESTS_ALLOW_MISSING_SETUP=1"):
        model_zoo.missing_setup("the shared HH data (x)", "check out ../shared")
