"""Export's checks are bounded by design (issue 25): every check row is at most the check
length (min(max_length, --check-length), encoded with the serving truncation), every check
batch at most --check-batch-tokens padded tokens, and the manifest records the bound.

The model: a tiny decoder (hidden 32) with 4,096 positions, so that max_length defaults to
4,096, and the ``chatml`` family's fine-grained tokenizer (~800 ids: the export's longest
synthetic parity row is ~930 tokens before the bound).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from rmserve.formatting import Message
from rmserve.manifest import MANIFEST_NAME, load_bundle
from rmserve.training.data import PreferenceExample
from rmserve.training.export import ExportOptions, export_bundle
from rmserve.training.scoring import token_batches
from tests.model_zoo import build_decoder

POSITIONS = 4096
CHECK_LENGTH = ExportOptions().check_length  # 512
BATCH_TOKENS = ExportOptions().check_batch_tokens  # 4096
# Peak resident memory of the child `rmserve export` with defaults, measured on a 2-core
# machine: 1,538 MiB when every check scored all its rows in one batch up to max_length,
# 564 MiB with the bounds (most of it torch, transformers and onnxruntime themselves).
PEAK_BOUND_MIB = 1000


# Runs its arguments as a child and prints the child's peak resident memory (ru_maxrss,
# KiB) and exit status. The export is a grandchild of pytest: on Linux a process started
# from pytest inherits pytest's own peak in its ru_maxrss (exec keeps the old peak), and
# RUSAGE_CHILDREN would count every earlier child; this small launcher has neither.
_LAUNCHER = """
import os, subprocess, sys
child = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL)
_, status, usage = os.wait4(child.pid, 0)
print(usage.ru_maxrss, os.waitstatus_to_exitcode(status))
"""


@pytest.fixture(scope="module")
def long_context_decoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("long_context") / "model"
    return build_decoder(path, "chatml", max_position_embeddings=POSITIONS)


def _long_pairs(count: int = 6) -> list[PreferenceExample]:
    """Eval pairs far past the check length (a long prompt, long responses): their rows must
    be cut to it, prompts from the left, not skipped."""
    sentence = "The bakery opens at dawn and the bread is still warm at noon. "
    return [
        PreferenceExample(
            prompt=(Message("user", sentence * (20 + 10 * i)),),
            responses=("Yes, it is. " * (3 + i), "No. " * (40 + 20 * i)),
        )
        for i in range(count)
    ]


def test_token_batches_sort_by_length_and_stay_under_the_budget() -> None:
    lengths = [300, 10, 512, 40, 512, 200, 5000]
    batches = token_batches(lengths, batch_size=3, max_tokens=1024)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    flat = [lengths[i] for b in batches for i in b]
    assert flat == sorted(lengths)  # little padding
    for batch in batches:
        assert len(batch) <= 3
        padded = len(batch) * max(lengths[i] for i in batch)
        assert padded <= 1024 or len(batch) == 1  # a row past the budget goes alone
    assert token_batches(lengths) == [sorted(range(len(lengths)), key=lambda i: lengths[i])]


def test_default_export_of_a_long_context_decoder_stays_under_a_memory_bound(
    long_context_decoder: Path, tmp_path: Path
) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(long_context_decoder)
    sentence = "The quick brown fox jumps over the lazy dog, and then it rests. "
    assert len(tokenizer(sentence * 31)["input_ids"]) > CHECK_LENGTH  # fine-grained enough
    out = tmp_path / "bundle"
    export = ["-m", "rmserve.cli", "export", str(long_context_decoder), "--out", str(out)]
    child = subprocess.run(
        [sys.executable, "-c", _LAUNCHER, sys.executable, *export],
        capture_output=True,
        text=True,
        check=False,
    )
    stderr = child.stderr
    peak_kib, returncode = (int(x) for x in child.stdout.split()[-2:])
    assert returncode == 0, stderr[-3000:]
    peak_mib = peak_kib / 1024  # ru_maxrss is in KiB on Linux
    assert peak_mib < PEAK_BOUND_MIB, f"peak {peak_mib:.0f} MiB\n{stderr[-3000:]}"
    manifest = load_bundle(out)
    assert manifest.max_length == POSITIONS  # served up to the model's limit ...
    fp32 = manifest.variants["fp32"].parity
    assert fp32["checked_up_to_tokens"] == CHECK_LENGTH  # ... checked up to the bound
    assert fp32["max_abs_diff"] <= 1e-4
    assert fp32["text_path_conversations"] >= 4  # the synthetic conversations at least
    assert manifest.packed is not None
    assert f"up to {CHECK_LENGTH} tokens" in stderr


def test_no_check_builds_a_row_longer_than_the_bound(
    long_context_decoder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every input of every check (torch and transformers, ONNX Runtime's plain, packed and
    int8 sessions) is at most the check length, in batches under the token budget."""
    import onnxruntime as ort

    from rmserve.training import modeling, text_path

    torch_shapes: list[tuple[int, int]] = []
    transformers_lengths: list[int] = []
    ort_feeds: list[dict[str, Any]] = []

    real_forward = modeling.RewardModel.forward

    def forward(self: Any, input_ids: Any, attention_mask: Any) -> Any:
        torch_shapes.append(tuple(input_ids.shape))
        return real_forward(self, input_ids, attention_mask)

    real_inputs = text_path.transformers_inputs

    def inputs(*args: Any) -> Any:
        text, encoded = real_inputs(*args)
        transformers_lengths.append(len(encoded["input_ids"]))
        return text, encoded

    real_run = ort.InferenceSession.run

    def run(self: Any, names: Any, feeds: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        ort_feeds.append({k: np.asarray(v) for k, v in feeds.items()})
        return real_run(self, names, feeds, *args, **kwargs)

    monkeypatch.setattr(modeling.RewardModel, "forward", forward)
    monkeypatch.setattr(text_path, "transformers_inputs", inputs)
    monkeypatch.setattr(ort.InferenceSession, "run", run)
    options = ExportOptions(int8=True, min_agreement=0.0, max_accuracy_drop=1.0)
    manifest = export_bundle(
        long_context_decoder, tmp_path / "bundle", options, eval_pairs=_long_pairs()
    )

    traced = [s for s in torch_shapes if s[1] > 8]  # the trace runs at its own 2 x 8 shape
    assert traced
    assert max(s[1] for s in traced) == CHECK_LENGTH  # long rows cut, not skipped
    assert all(rows * width <= BATCH_TOKENS or rows == 1 for rows, width in traced)
    assert len(traced) > 1  # more than one batch
    assert transformers_lengths
    assert max(transformers_lengths) <= CHECK_LENGTH
    plain = [f for f in ort_feeds if "attention_mask" in f]
    packed = [f for f in ort_feeds if "position_ids" in f]
    assert plain
    assert packed
    for feeds in plain:
        rows, width = feeds["input_ids"].shape
        assert width <= CHECK_LENGTH
        assert rows * width <= BATCH_TOKENS or rows == 1
    assert max(f["input_ids"].shape[1] for f in plain) == CHECK_LENGTH
    for feeds in packed:
        rows, width = feeds["input_ids"].shape
        assert width <= CHECK_LENGTH  # a packed row holds items sharing a prompt up to it
        assert int(feeds["position_ids"].max()) < CHECK_LENGTH
        assert rows * width <= BATCH_TOKENS or rows == 1
    shared = [f for f in packed if (f["segment_ids"] > 1).any()]
    assert shared  # the packed check still lays several items in one row
    recorded = json.loads((tmp_path / "bundle" / MANIFEST_NAME).read_text())
    for precision in ("fp32", "int8"):
        assert recorded["variants"][precision]["parity"]["checked_up_to_tokens"] == CHECK_LENGTH
    assert manifest.evaluation is not None
    assert manifest.evaluation.n == len(_long_pairs())


def test_check_length_is_capped_by_max_length_and_can_be_raised(
    long_context_decoder: Path, tmp_path: Path
) -> None:
    short = export_bundle(
        long_context_decoder, tmp_path / "short", ExportOptions(max_length=256, packed=False)
    )
    assert short.variants["fp32"].parity["checked_up_to_tokens"] == 256
    longer = export_bundle(
        long_context_decoder, tmp_path / "long", ExportOptions(check_length=1024, packed=False)
    )
    assert longer.variants["fp32"].parity["checked_up_to_tokens"] == 1024
