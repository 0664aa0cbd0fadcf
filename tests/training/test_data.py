"""Every data shape, every file type, and the malformed cases with file and line."""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from rmserve.formatting import Message
from rmserve.training.data import DataError, read_examples

HH_ROW = {
    "chosen": "\n\nHuman: How do I bake bread?\n\nAssistant: Mix flour and water.",
    "rejected": "\n\nHuman: How do I bake bread?\n\nAssistant: No.",
}


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
    text = "\n".join(lines) + "\n"
    if path.name.endswith(".gz"):
        with gzip.open(path, "wt") as f:
            f.write(text)
    else:
        path.write_text(text)
    return path


def test_hh_transcripts_split_into_prompt_and_responses(tmp_path: Path) -> None:
    multi = {
        "chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: bread?\n\nAssistant: Knead it.",
        "rejected": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: bread?\n\nAssistant: Buy it.",
    }
    result = read_examples(write_jsonl(tmp_path / "d.jsonl", [HH_ROW, multi]))
    assert result.shape == "hh"
    assert result.skipped == 0
    first, second = result.examples
    assert first.prompt == (Message("user", "How do I bake bread?"),)
    assert first.responses == ("Mix flour and water.", "No.")
    assert [m.role for m in second.prompt] == ["user", "assistant", "user"]
    assert second.responses == ("Knead it.", "Buy it.")
    assert first.source.endswith("d.jsonl:1")


def test_hh_rows_with_different_prompts_are_malformed(tmp_path: Path) -> None:
    bad = dict(HH_ROW, rejected="\n\nHuman: Something else\n\nAssistant: No.")
    path = write_jsonl(tmp_path / "d.jsonl", [HH_ROW, bad, HH_ROW])
    with pytest.raises(DataError, match=r"d\.jsonl:2: chosen and rejected differ from their first"):
        read_examples(path)
    with pytest.raises(DataError, match="--skip-malformed"):
        read_examples(path)
    result = read_examples(path, skip_malformed=True)
    assert len(result.examples) == 2
    assert result.skipped == 1
    assert "d.jsonl:2" in result.problems[0]


@pytest.mark.parametrize(
    ("chosen", "rejected", "prompt_roles", "responses"),
    [
        # They part at an earlier assistant turn: that turn on is each response.
        (
            "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: bread?\n\nAssistant: Knead it.",
            "\n\nHuman: hi\n\nAssistant: hey\n\nHuman: bread?\n\nAssistant: Buy it.",
            ["user"],
            (
                "hello\n\nHuman: bread?\n\nAssistant: Knead it.",
                "hey\n\nHuman: bread?\n\nAssistant: Buy it.",
            ),
        ),
        # They part at a human turn: the cut goes back to the last shared assistant turn.
        (
            "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: bread?\n\nAssistant: Knead it.",
            "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: cake?\n\nAssistant: Bake it.",
            ["user"],
            (
                "hello\n\nHuman: bread?\n\nAssistant: Knead it.",
                "hello\n\nHuman: cake?\n\nAssistant: Bake it.",
            ),
        ),
        # The shape of the real data's rows: one side has an extra assistant turn.
        (
            "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: key?\n\nAssistant: Here:"
            "\n\nAssistant: 1234",
            "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: key?\n\nAssistant: No.",
            ["user", "assistant", "user"],
            ("Here:\n\nAssistant: 1234", "No."),
        ),
    ],
)
def test_hh_rows_that_part_early_keep_their_shared_turns_as_prompt(
    tmp_path: Path, chosen: str, rejected: str, prompt_roles: list[str], responses: tuple[str]
) -> None:
    """TRL's extract_prompt (longest common prefix), cut at a turn boundary; each response
    rendered after the prompt is its transcript byte for byte."""
    row = {"chosen": chosen, "rejected": rejected}
    result = read_examples(write_jsonl(tmp_path / "d.jsonl", [HH_ROW, row]))
    assert (len(result.examples), result.parted, result.skipped) == (2, 1, 0)
    example = result.examples[1]
    assert example.parted
    assert not result.examples[0].parted
    assert [m.role for m in example.prompt] == prompt_roles
    assert example.responses == responses
    assert [r.text for r in example.rendered()] == [chosen, rejected]


def test_real_data_reads_every_row(hh_data_dir: Path) -> None:
    """The shipped HH files have 5 pairs whose transcripts part before their last turn: they
    are read (and counted), not skipped."""
    train = read_examples(hh_data_dir / "train.jsonl.gz")
    dev = read_examples(hh_data_dir / "dev.jsonl.gz")
    assert (len(train.examples), train.parted, train.skipped) == (1835, 4, 0)
    assert (len(dev.examples), dev.parted, dev.skipped) == (240, 1, 0)
    lines = [e.source.rsplit(":", 1)[1] for e in train.examples if e.parted]
    assert lines == ["992", "1341", "1558", "1626"]
    with gzip.open(hh_data_dir / "train.jsonl.gz", "rt") as f:
        rows = [json.loads(line) for line in f]
    for example, row in zip(train.examples, rows, strict=True):
        assert [r.text for r in example.rendered()] == [row["chosen"], row["rejected"]]


def test_explicit_prompt_chosen_rejected_with_margin(tmp_path: Path) -> None:
    rows = [
        {"prompt": "2+2?", "chosen": "4", "rejected": "5", "margin": 1.5},
        {"prompt": "Capital of France?", "chosen": "Paris", "rejected": "Rome"},
    ]
    result = read_examples(write_jsonl(tmp_path / "d.jsonl.gz", rows))
    assert result.shape == "explicit"
    assert result.examples[0].prompt == (Message("user", "2+2?"),)
    assert result.examples[0].responses == ("4", "5")
    assert result.examples[0].margin == 1.5
    assert result.examples[1].margin == 0.0


def test_conversational_rows(tmp_path: Path) -> None:
    system = {"role": "system", "content": "Be brief."}
    user = {"role": "user", "content": "Hi"}
    rows = [
        {
            "prompt": [system, user],
            "chosen": [{"role": "assistant", "content": "Hello!"}],
            "rejected": [{"role": "assistant", "content": "Go away."}],
        },
        # TRL's implicit-prompt form: whole conversations that share their prefix.
        {
            "chosen": [user, {"role": "assistant", "content": "Hello!"}],
            "rejected": [user, {"role": "assistant", "content": "Hm."}],
        },
    ]
    result = read_examples(write_jsonl(tmp_path / "d.jsonl", rows))
    assert result.shape == "conversational"
    first, second = result.examples
    assert first.prompt == (Message("system", "Be brief."), Message("user", "Hi"))
    assert first.responses == ("Hello!", "Go away.")
    assert second.prompt == (Message("user", "Hi"),)


@pytest.mark.parametrize(
    ("row", "problem"),
    [
        ({"prompt": [{"role": "user", "content": "x"}], "chosen": [], "rejected": "a"}, "chosen"),
        (
            {
                "prompt": [{"role": "wizard", "content": "x"}],
                "chosen": [{"role": "assistant", "content": "a"}],
                "rejected": [{"role": "assistant", "content": "b"}],
            },
            "role",
        ),
        (
            {
                "prompt": [{"role": "user", "content": "x"}],
                "chosen": [{"role": "user", "content": "a"}],
                "rejected": [{"role": "assistant", "content": "b"}],
            },
            "must have role 'assistant'",
        ),
        (
            {
                "chosen": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "a"}],
                "rejected": [
                    {"role": "user", "content": "y"},
                    {"role": "assistant", "content": "b"},
                ],
            },
            "differ",
        ),
    ],
)
def test_conversational_malformed(tmp_path: Path, row: dict[str, Any], problem: str) -> None:
    good = {
        "prompt": [{"role": "user", "content": "Hi"}],
        "chosen": [{"role": "assistant", "content": "a"}],
        "rejected": [{"role": "assistant", "content": "b"}],
    }
    path = write_jsonl(tmp_path / "c.jsonl", [good, row])
    with pytest.raises(DataError, match=r"c\.jsonl:2: ") as info:
        read_examples(path)
    assert problem in str(info.value)
    assert read_examples(path, skip_malformed=True).skipped == 1


def test_ranked_rows_give_all_pairs_in_one_example(tmp_path: Path) -> None:
    rows = [
        {"prompt": "Pick", "responses": ["best", "good", "ok", "bad"]},
        {"prompt": "Pick", "responses": ["c", "a", "b"], "ranks": [3, 1, 2]},
    ]
    result = read_examples(write_jsonl(tmp_path / "r.jsonl", rows))
    assert result.shape == "ranked"
    first, second = result.examples
    assert list(first.pairs()) == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    assert second.responses == ("a", "b", "c")  # sorted by rank, best first
    assert result.num_pairs == 6 + 3


@pytest.mark.parametrize(
    ("row", "problem"),
    [
        ({"prompt": "p", "responses": ["only one"]}, "at least two"),
        ({"prompt": "p", "responses": ["a", "b"], "ranks": [1]}, "one number per response"),
        ({"prompt": "p", "responses": ["a", "b"], "ranks": [1, 1]}, "distinct"),
        ({"responses": ["a", "b"]}, "needs a 'prompt'"),
        ({"prompt": "p", "responses": ["a", 3]}, "responses[1]"),
        ({"prompt": "p", "responses": ["a", "b"], "margin": "big"}, "margin"),
    ],
)
def test_ranked_malformed(tmp_path: Path, row: dict[str, Any], problem: str) -> None:
    path = write_jsonl(tmp_path / "r.jsonl", [{"prompt": "p", "responses": ["a", "b"]}, row])
    with pytest.raises(DataError, match=r"r\.jsonl:2: ") as info:
        read_examples(path)
    assert problem in str(info.value)


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "must be a JSON object"),
        ('{"question": "x"}', "unrecognised row"),
        ('{"prompt": "p", "chosen": 1, "rejected": "b"}', "'chosen' must be a string or a list"),
        ('{"prompt": "p", "responses": ["a", "b"]}', "looks ranked"),
        ('{"chosen": "no prefix", "rejected": "x"}', "looks hh"),
    ],
)
def test_malformed_lines_name_file_and_line(tmp_path: Path, line: str, problem: str) -> None:
    good = json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"})
    path = write_jsonl(tmp_path / "x.jsonl", [good, "", good, line])
    with pytest.raises(DataError) as info:
        read_examples(path)
    message = str(info.value)
    assert f"{path}:4: " in message  # blank lines keep their numbers
    assert problem in message
    result = read_examples(path, skip_malformed=True)
    assert (len(result.examples), result.skipped) == (2, 1)


def test_hh_file_with_bad_transcript(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "h.jsonl", [HH_ROW, {"chosen": "no prefix", "rejected": "x"}])
    with pytest.raises(DataError, match=r"h\.jsonl:2: 'chosen' is not a transcript"):
        read_examples(path)


def test_json_and_parquet_files(tmp_path: Path) -> None:
    rows = [{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "q", "chosen": "c"}]
    json_path = tmp_path / "d.json"
    json_path.write_text(json.dumps({"data": rows}))
    with pytest.raises(DataError, match=r"d\.json\[row 1\]: "):
        read_examples(json_path)
    assert read_examples(json_path, skip_malformed=True).skipped == 1

    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    parquet_path = tmp_path / "d.parquet"
    table = pa.table(
        {"prompt": ["p", "q"], "chosen": ["a", "c"], "rejected": ["b", "d"], "margin": [0.5, None]}
    )
    pq.write_table(table, parquet_path)
    result = read_examples(parquet_path)
    assert result.shape == "explicit"
    assert [e.responses for e in result.examples] == [("a", "b"), ("c", "d")]
    assert [e.margin for e in result.examples] == [0.5, 0.0]


def test_limit_and_bad_sources(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [HH_ROW] * 5)
    assert len(read_examples(path, limit=3).examples) == 3
    with pytest.raises(DataError, match="no such data file"):
        read_examples(tmp_path / "missing.jsonl")
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported file type"):
        read_examples(tmp_path / "d.csv")
    with pytest.raises(DataError, match="not a file"):
        read_examples(tmp_path)


def test_hub_dataset_id(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Hugging Face path, with a stand-in for the hub (no network here)."""
    import types

    calls: list[tuple[str, str]] = []

    def load_dataset(name: str, split: str) -> list[dict[str, Any]]:
        calls.append((name, split))
        return [HH_ROW, dict(HH_ROW, rejected="\n\nHuman: other\n\nAssistant: x")]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    result = read_examples("Anthropic/hh-rlhf:test", skip_malformed=True)
    assert calls == [("Anthropic/hh-rlhf", "test")]
    assert (len(result.examples), result.skipped) == (1, 1)
    assert result.problems[0].startswith("Anthropic/hh-rlhf:test[row 1]: ")
    read_examples("Anthropic/hh-rlhf", skip_malformed=True)
    assert calls[-1] == ("Anthropic/hh-rlhf", "train")
