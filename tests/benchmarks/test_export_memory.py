"""The export-memory benchmark's parts at a tiny size: GNU time's report and the export's
progress lines parsed, the builder's checkpoint, and a run of a stand-in export (a fake
``rmserve`` package in another folder, as ``--cwd`` runs an old checkout). No real 547M
export and no timings asserted."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import pytest

from benchmarks.export_memory import (
    GNU_TIME,
    SHAPE_547M,
    build,
    parse_gnu_time,
    parse_steps,
    record,
    tokenizer_name,
    weight_count,
)
from tests.model_zoo import chat_text, missing_setup

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 2, "num_key_value_heads": 1}  # fmt: skip

TIME_OK = """\tCommand being timed: "python -m rmserve.cli export m --out b"
\tUser time (seconds): 301.52
\tSystem time (seconds): 20.11
\tElapsed (wall clock) time (h:mm:ss or m:ss): 2:52.13
\tMaximum resident set size (kbytes): 8650752
\tExit status: 0
"""
TIME_KILLED = """Command terminated by signal 9
\tCommand being timed: "python -m rmserve.cli export m --out b"
\tUser time (seconds): 350.0
\tSystem time (seconds): 30.5
\tMaximum resident set size (kbytes): 24117248
\tExit status: 0
"""
# HEAD's progress lines for the 547M model (issue 25), with a line from another logger.
STDERR = """rmserve export: [    0.0 s] loading /m (fp32)
rmserve export: [    9.5 s] decoder qwen2, 547,735,552 parameters, 1 head(s); text format: the \
tokenizer's own chat template; max_length 4096
rmserve export: [   10.1 s] tracing the model to ONNX (torchscript exporter, opset 17)
some warning from torch
rmserve export: [   40.0 s] fp32 parity: torch against onnxruntime on a padded batch of mixed \
lengths
rmserve export: [   96.0 s] text-path parity: conversations through the bundle against \
transformers
rmserve export: [   99.0 s] packed graph (items sharing a prompt in one row): tracing \
model.packed.onnx
rmserve export: [  120.0 s] packed graph reads 2190.9 MB of weights from the plain graph's data \
file
rmserve export: [  180.0 s] fp32 packed graph: max |whole item - packed| = 3e-06
rmserve export: [  180.5 s] hashing every file of the bundle
rmserve export: [  185.0 s] bundle written to /b
"""


def test_gnu_time_report_gives_peak_status_and_signal() -> None:
    ok = parse_gnu_time(TIME_OK)
    assert (ok.max_rss_kib, ok.exit_status, ok.signal) == (8650752, 0, None)
    assert (ok.user_s, ok.system_s) == (301.52, 20.11)
    killed = parse_gnu_time(TIME_KILLED)
    assert (killed.max_rss_kib, killed.exit_status, killed.signal) == (24117248, None, 9)
    with pytest.raises(ValueError, match="Maximum resident set size"):
        parse_gnu_time("\tExit status: 0\n")


def test_progress_lines_become_named_steps_with_their_durations() -> None:
    steps = parse_steps(STDERR)
    assert [s.name for s in steps] == [
        "load", "tokenizer and plan", "trace", "fp32 check", "text-path check", "packed trace",
        "packed check", "after fp32 packed check", "hash and manifest", "done",
    ]  # fmt: skip
    seconds = {s.name: s.seconds for s in steps}
    assert seconds["fp32 check"] == 56.0  # 40.0 s until the next line at 96.0 s
    assert seconds["packed check"] == 60.0
    assert seconds["done"] is None  # the last line has no next
    assert steps[1].message.startswith("decoder qwen2, 547,735,552 parameters")
    # A wording the table does not know keeps its head as the name.
    (other,) = parse_steps("rmserve export: [ 1.0 s] estimating memory: 5.1 GiB peak\n")
    assert other.name == "estimating memory"


@pytest.fixture(scope="module")
def tiny_400(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return build(tmp_path_factory.mktemp("export_memory") / "400", "400", shape=TINY)


def test_build_writes_a_chatml_qwen2_classifier_with_the_tokenizers_vocabulary(
    tiny_400: dict[str, Any],
) -> None:
    from transformers import AutoConfig, AutoTokenizer

    checkpoint = Path(tiny_400["checkpoint"])
    config = AutoConfig.from_pretrained(checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    assert config.model_type == "qwen2"
    assert config.architectures == ["Qwen2ForSequenceClassification"]
    assert config.num_labels == 1
    assert config.vocab_size == len(tokenizer) == tiny_400["vocab_size"] == 400
    assert config.max_position_embeddings == SHAPE_547M["max_position_embeddings"]
    assert config.num_hidden_layers == 2  # the override, not the 547M shape's 28
    assert tokenizer.pad_token == "<|endoftext|>"
    assert config.pad_token_id == tokenizer.pad_token_id
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
    assert chat_text(tokenizer, chat).endswith(
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nok<|im_end|>\n"
    )
    assert weight_count(checkpoint) == tiny_400["parameters"]
    assert tiny_400["fp32_bytes"] == 4 * tiny_400["parameters"]
    assert tokenizer_name(checkpoint) == "400"


def test_the_400_tokenizer_splits_text_much_finer_than_the_16k(
    tmp_path: Path, tiny_400: dict[str, Any]
) -> None:
    from transformers import AutoTokenizer

    big = build(tmp_path / "16k", "16k", shape=TINY)
    assert big["vocab_size"] == 16_000
    sentence = "The quick brown fox jumps over the lazy dog, and then it rests. "
    fine = len(AutoTokenizer.from_pretrained(tiny_400["checkpoint"])(sentence)["input_ids"])
    coarse = len(AutoTokenizer.from_pretrained(big["checkpoint"])(sentence)["input_ids"])
    assert coarse <= 20
    assert fine >= 2 * coarse


FAKE_CLI = """
import json, sys
from pathlib import Path

def main():
    args = sys.argv[1:]
    if "--fail" in args:
        print("rmserve export: [    0.0 s] loading model (fp32)", file=sys.stderr)
        print("rmserve export: error: the check failed", file=sys.stderr)
        return 2
    out = Path(args[args.index("--out") + 1])
    out.mkdir(parents=True)
    (out / "rmserve.json").write_text("{}")
    held = bytearray(64 * 2**20)  # 64 MiB resident
    for line in ("loading model (fp32)", "tracing the model to ONNX (x)",
                 "fp32 parity: torch against onnxruntime", "bundle written to b"):
        print(f"rmserve export: [{len(held) % 7:7.1f} s] {line}", file=sys.stderr)
    print(json.dumps({"bundle": str(out), "max_length": 4096, "peak_rss_mib": 99.0}))
    return 0

if __name__ == "__main__":
    sys.exit(main())
"""


def test_run_records_the_export_of_another_checkout(
    tmp_path: Path, tiny_400: dict[str, Any]
) -> None:
    if not Path(GNU_TIME).is_file():
        missing_setup(f"GNU time ({GNU_TIME})", "apt-get install -y time")
    code = tmp_path / "old_checkout"
    (code / "rmserve").mkdir(parents=True)
    (code / "rmserve" / "__init__.py").write_text("")
    (code / "rmserve" / "cli.py").write_text(textwrap.dedent(FAKE_CLI))
    results = tmp_path / "results"
    checkpoint = Path(tiny_400["checkpoint"])

    entry = record(results, checkpoint, "before", cwd=code, repeat=2)
    assert entry["code"]["rmserve_imported_from"] == str(code / "rmserve" / "__init__.py")
    assert (entry["runs"], entry["runs_ok"]) == (2, 2)
    run = entry["repeats"][0]
    assert run["exit_status"] == 0
    assert run["bundle_written"] is True
    assert run["parameters"] == tiny_400["parameters"]
    assert run["peak_rss_kib"] >= 64 * 1024  # the stand-in holds 64 MiB
    assert run["peak_rss_gib"] == round(run["peak_rss_kib"] / 2**20, 2)
    assert run["peak_rss_x_fp32_weights"] == round(
        run["peak_rss_kib"] * 1024 / tiny_400["fp32_bytes"], 2
    )
    assert run["peak_rss_mib_reported"] == 99.0
    assert [s["name"] for s in run["steps"]] == ["load", "trace", "fp32 check", "done"]
    assert len(run["load_average_at_start"]) == 3

    failed = record(results, checkpoint, "broken", cwd=code, export_args=["--fail"])
    assert failed["runs_ok"] == 0
    assert failed["repeats"][0]["exit_status"] == 2
    assert "the check failed" in failed["repeats"][0]["stderr_tail"]
    saved = json.loads((results / "export_memory.json").read_text())
    assert set(saved["results"]["400"]) == {"before", "broken"}  # merged, not overwritten
    # Every bundle went to a temporary folder beside the checkpoint, removed afterwards.
    assert sorted(p.name for p in checkpoint.parent.iterdir()) == ["400"]
