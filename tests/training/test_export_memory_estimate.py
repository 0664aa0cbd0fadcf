"""What an export will need (issue 25, part 2): the memory available to it from fake cgroup v2,
v1 and /proc/meminfo trees, --memory-limit's sizes, the peak estimate from a config alone,
and the refusal naming the options that lower it."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from rmserve.training.export.memory import (
    BASELINE_BYTES,
    Estimate,
    approximate_parameters,
    available_memory_bytes,
    check_memory,
    count_parameters,
    estimate_peak_bytes,
    memory_available,
    parse_size,
    weight_copies,
)
from rmserve.training.export.options import ExportError, ExportOptions

GIB = 2**30
MIB = 2**20


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _meminfo(root: Path, available_kib: int) -> None:
    _write(
        root / "proc/meminfo",
        f"MemTotal:       32000000 kB\nMemFree:         1000000 kB\n"
        f"MemAvailable:   {available_kib} kB\nBuffers:          100000 kB\n",
    )


def _cgroup_v2(root: Path, path: str, limit: str, current: int, inactive_file: int = 0) -> Path:
    _write(root / "proc/self/cgroup", f"0::{path}\n")
    mount = root / "sys/fs/cgroup"
    _write(mount / "cgroup.controllers", "cpu memory pids\n")
    own = mount / path.lstrip("/")
    _write(own / "memory.max", f"{limit}\n")
    _write(own / "memory.current", f"{current}\n")
    _write(own / "memory.stat", f"anon 1000\ninactive_file {inactive_file}\nactive_file 5\n")
    return own


def _cgroup_v1(root: Path, path: str, limit: int, usage: int) -> None:
    _write(
        root / "proc/self/cgroup",
        f"12:pids:{path}\n4:memory:{path}\n3:cpu,cpuacct:{path}\n",
    )
    mount = root / "sys/fs/cgroup/memory"
    _write(mount / "memory.limit_in_bytes", "9223372036854771712\n")  # the root: no limit
    own = mount / path.lstrip("/")
    _write(own / "memory.limit_in_bytes", f"{limit}\n")
    _write(own / "memory.usage_in_bytes", f"{usage}\n")


# --------------------------------------------------------------------------- available memory


def test_meminfo_alone(tmp_path: Path) -> None:
    _meminfo(tmp_path, 20 * 2**20)  # 20 GiB in kB
    assert available_memory_bytes(tmp_path) == (
        20 * GIB,
        "the machine's MemAvailable (/proc/meminfo)",
    )


def test_cgroup_v2_without_a_limit_is_the_machine(tmp_path: Path) -> None:
    _meminfo(tmp_path, 20 * 2**20)
    _cgroup_v2(tmp_path, "/user.slice/session-1.scope", "max", 3 * GIB)
    available, source = available_memory_bytes(tmp_path)
    assert (available, source) == (20 * GIB, "the machine's MemAvailable (/proc/meminfo)")


def test_cgroup_v2_limit_less_its_usage(tmp_path: Path) -> None:
    _meminfo(tmp_path, 20 * 2**20)
    _cgroup_v2(tmp_path, "/kubepods/pod1/ctr", str(12 * GIB), 3 * GIB, inactive_file=GIB)
    available, source = available_memory_bytes(tmp_path)
    # 12 GiB - (3 GiB - 1 GiB of reclaimable file cache)
    assert available == 10 * GIB
    assert "cgroup v2 limit 12.0 GiB" in source
    assert "/sys/fs/cgroup/kubepods/pod1/ctr/memory.max" in source


def test_cgroup_v2_an_ancestors_limit_counts(tmp_path: Path) -> None:
    _meminfo(tmp_path, 20 * 2**20)
    _cgroup_v2(tmp_path, "/kubepods/pod1/ctr", "max", GIB)
    _write(tmp_path / "sys/fs/cgroup/kubepods/pod1/memory.max", f"{4 * GIB}\n")
    _write(tmp_path / "sys/fs/cgroup/kubepods/pod1/memory.current", f"{2 * GIB}\n")
    available, source = available_memory_bytes(tmp_path)
    assert available == 2 * GIB
    assert "/sys/fs/cgroup/kubepods/pod1/memory.max" in source


def test_cgroup_v2_namespaced_container_reads_the_mount(tmp_path: Path) -> None:
    """With its own cgroup namespace a container sees itself at "/"; without one, its path is
    the host's and the mount is its own folder: both read the mount's files."""
    _meminfo(tmp_path, 20 * 2**20)
    _cgroup_v2(tmp_path, "/", str(8 * GIB), GIB)
    assert available_memory_bytes(tmp_path)[0] == 7 * GIB
    _write(tmp_path / "proc/self/cgroup", "0::/system.slice/docker-abc.scope\n")
    assert available_memory_bytes(tmp_path)[0] == 7 * GIB


def test_the_smaller_of_the_limit_and_the_machine(tmp_path: Path) -> None:
    _meminfo(tmp_path, 5 * 2**20)  # the machine has less than the container may use
    _cgroup_v2(tmp_path, "/ctr", str(12 * GIB), GIB)
    assert available_memory_bytes(tmp_path) == (
        5 * GIB,
        "the machine's MemAvailable (/proc/meminfo)",
    )


def test_cgroup_v1_limit_and_no_limit(tmp_path: Path) -> None:
    _meminfo(tmp_path, 20 * 2**20)
    _cgroup_v1(tmp_path, "/docker/abc", 6 * GIB, 2 * GIB)
    available, source = available_memory_bytes(tmp_path)
    assert available == 4 * GIB
    assert "cgroup v1 limit 6.0 GiB" in source
    assert "/sys/fs/cgroup/memory/docker/abc/memory.limit_in_bytes" in source
    # The huge number of v1's "no limit" is no limit: the machine's figure.
    _write(
        tmp_path / "sys/fs/cgroup/memory/docker/abc/memory.limit_in_bytes",
        "9223372036854771712\n",
    )
    assert available_memory_bytes(tmp_path)[0] == 20 * GIB


def test_nothing_to_read_is_unchecked(tmp_path: Path) -> None:
    available, source = available_memory_bytes(tmp_path)
    assert available > 2**62
    assert "not checked" in source


def test_the_real_machine_has_a_figure() -> None:
    available, source = available_memory_bytes()
    assert available > 0
    assert source


def test_memory_limit_overrides_the_detection(tmp_path: Path) -> None:
    _meminfo(tmp_path, 20 * 2**20)
    assert memory_available(ExportOptions(), tmp_path)[0] == 20 * GIB
    faked = ExportOptions(memory_limit="500MB")
    assert memory_available(faked, tmp_path) == (500_000_000, "--memory-limit 500MB")


# --------------------------------------------------------------------------- sizes


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("12GiB", 12 * GIB),
        ("12gib", 12 * GIB),
        ("1.5 GiB", 3 * GIB // 2),
        ("500MB", 500_000_000),
        ("500MiB", 500 * MIB),
        ("8Gi", 8 * GIB),
        ("2KB", 2000),
        ("1TB", 10**12),
        ("2000000000", 2_000_000_000),
        ("123B", 123),
    ],
)
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GiB", "12 G", "12 gigs", "-1GiB", "1e9", "twelve"])
def test_parse_size_refuses_naming_the_forms(text: str) -> None:
    with pytest.raises(ValueError, match=r"KiB, MiB, GiB, TiB.*e\.g\. 12GiB or 500MB"):
        parse_size(text)


def test_the_flag_is_in_the_checks_section() -> None:
    import argparse

    from rmserve.training.commands import _add_export_flags, export_options

    parser = argparse.ArgumentParser()
    _add_export_flags(parser)
    args = parser.parse_args(["--out", "b", "--memory-limit", "12GiB"])
    assert export_options(args).memory_limit == "12GiB"
    field = {f.name: f for f in dataclasses.fields(ExportOptions)}["memory_limit"]
    assert field.metadata["group"] == "checks"


# --------------------------------------------------------------------------- the estimate


def _qwen2(**sizes: int) -> Any:
    from transformers import AutoConfig

    dims = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 500,
        "max_position_embeddings": 256,
        "num_labels": 1,
        "pad_token_id": 0,
    } | sizes
    return AutoConfig.for_model("qwen2", **dims)


def _estimate(config: Any, **asked: Any) -> Estimate:
    kwargs: dict[str, Any] = {
        "dtype": "fp32",
        "check_length": 128,
        "check_batch_tokens": 1024,
        "extra_variants": (),
    } | asked
    return estimate_peak_bytes(config, **kwargs)


def test_parameters_counted_exactly_without_weights() -> None:
    from tests.model_zoo import reward_classifier

    config = _qwen2()
    real = reward_classifier(_qwen2())
    expected = sum(p.numel() for p in real.parameters())
    assert count_parameters(config) == expected
    # The sizes-only count (for configs transformers cannot build) is close.
    assert abs(approximate_parameters(config) - expected) / expected < 0.01


def test_the_estimate_grows_with_the_parameters() -> None:
    small, large = _estimate(_qwen2()), _estimate(_qwen2(num_hidden_layers=8))
    assert large.parameters > small.parameters
    assert large.weights > small.weights
    assert large.total > small.total
    assert small.baseline == BASELINE_BYTES
    assert small.weights == int(weight_copies(small.parameters * 4) * small.parameters * 4)
    # The trace and the checks run one after the other: the larger of the two counts.
    checks = small.weight_bytes + small.activations + small.attention
    assert small.checks == checks
    assert small.total == small.baseline + max(small.weights, checks) + small.variants


def test_fp16_halves_the_weights_and_the_options_lower_it() -> None:
    config = _qwen2()
    fp32, fp16 = _estimate(config), _estimate(config, dtype="fp16")
    assert fp16.parameters == fp32.parameters
    assert abs(fp16.weights - fp32.weights / 2) <= 1
    assert fp16.total < fp32.total
    shorter = _estimate(config, check_length=32, check_batch_tokens=256)
    assert shorter.attention < fp32.attention
    assert shorter.activations < fp32.activations
    int8 = _estimate(config, extra_variants=("int8",))
    assert int8.variants > 0
    assert int8.total > fp32.total


def test_describe_is_one_line_with_each_term() -> None:
    line = _estimate(_qwen2(), extra_variants=("int8",)).describe()
    assert "\n" not in line
    for term in ("estimated peak memory", "baseline", "weights", "fp32", "activations"):
        assert term in line
    assert "variants" in line


def test_an_8b_config_is_estimated_on_paper() -> None:
    from transformers import AutoConfig

    llama = AutoConfig.for_model(
        "llama",
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=14336,
        vocab_size=128256,
        max_position_embeddings=8192,
        num_labels=1,
    )
    estimate = _estimate(llama, check_length=2048, check_batch_tokens=8192)
    assert 7.4e9 < estimate.parameters < 7.6e9  # 8.0B less the 0.5B language-model head
    assert estimate.weight_bytes == 4 * estimate.parameters


# --------------------------------------------------------------------------- the refusal


def test_refused_with_the_options_that_lower_it() -> None:
    estimate = _estimate(_qwen2())
    with pytest.raises(ExportError) as refused:
        check_memory(estimate, estimate.total - 1, "--memory-limit 1MB", ExportOptions())
    message = str(refused.value)
    for named in (
        "estimated peak memory",
        "--memory-limit 1MB",
        "--max-length",
        "--check-length",
        "--dtype fp16",
        "--memory-limit SIZE",
    ):
        assert named in message
    assert "--no-packed" not in message  # measured: the packed graph does not raise the peak


def test_the_refusal_names_only_the_options_that_apply() -> None:
    options = ExportOptions(dtype="fp16", packed=False)
    estimate = _estimate(_qwen2(), dtype="fp16")
    with pytest.raises(ExportError) as refused:
        check_memory(estimate, 0, "test", options)
    assert "--dtype fp16" not in str(refused.value)


def test_enough_memory_passes() -> None:
    estimate = _estimate(_qwen2())
    check_memory(estimate, estimate.total, "test", ExportOptions())
    check_memory(estimate, 64 * GIB, "test", ExportOptions())


def test_a_faked_limit_refuses(tmp_path: Path) -> None:
    """--memory-limit fakes the available memory (rmserve export's ExportError handling turns
    the refusal into exit 2), as export_bundle will call it."""
    options = ExportOptions(memory_limit="1MB")
    available, source = memory_available(options, tmp_path)
    with pytest.raises(ExportError, match=r"available: 1 MiB \(--memory-limit 1MB\)"):
        check_memory(_estimate(_qwen2()), available, source, options)


def test_rmserve_export_says_its_estimate_and_refuses_past_the_limit(
    tiny_decoder_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from rmserve.cli import main

    out = tmp_path / "bundle"
    argv = ["export", str(tiny_decoder_checkpoint), "--out", str(out), "--memory-limit", "1MB"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "estimated peak memory" in err
    assert "available: 1 MiB (--memory-limit 1MB)" in err, err
    for option in ("--max-length", "--check-length", "--dtype fp16", "--memory-limit SIZE"):
        assert option in err, (option, err)
    assert not out.exists()  # refused before anything was written
    assert not list(tmp_path.glob(".bundle.*"))

    assert main(["export", str(tiny_decoder_checkpoint), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    line = next(x for x in err.splitlines() if "estimated peak memory" in x)
    assert "; available " in line
    assert (out / "rmserve.json").is_file()


@pytest.mark.parametrize("tokenizer", ["16k", "400"])
def test_the_estimate_is_within_ten_percent_of_the_measured_peak(tokenizer: str) -> None:
    """The constants are calibrated on benchmarks/export_memory.py's runs of the 547M model
    (stored in benchmarks/results/cpu/export_memory.json, label "after"): the estimate of the
    same shapes, from their configs, lands within 10% of the peak GNU time measured."""
    import json

    from transformers import Qwen2Config

    results = Path(__file__).resolve().parents[2] / "benchmarks/results/cpu/export_memory.json"
    run = json.loads(results.read_text())["results"][tokenizer]["after"]
    measured = run["repeats"][0]
    config = Qwen2Config(  # type: ignore[call-arg]  # num_labels and pad_token_id: kwargs
        vocab_size={"16k": 16_000, "400": 400}[tokenizer],
        hidden_size=1024,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        intermediate_size=5152,
        max_position_embeddings=4096,
        num_labels=1,
        pad_token_id=0,
    )
    estimate = estimate_peak_bytes(
        config, dtype="fp32", check_length=512, check_batch_tokens=4096, extra_variants=()
    )
    assert estimate.parameters == measured["parameters"]
    peak = measured["peak_rss_kib"] * 1024
    assert abs(estimate.total - peak) <= 0.10 * peak, (estimate.describe(), peak / GIB)
