"""What an export will need, said before it starts (issue 25): an estimate of its peak memory
from the model's config alone, the memory available to the process, and the refusal when the
first is above the second.

Why: an export of a 0.5-8B model that runs out of memory is killed by the kernel after
minutes of work, with no message and a partial folder left behind. From the config (no
weights loaded) the export can say beforehand what it will need and, when the memory available
to it is clearly less, refuse at once with the options that lower the need.

- :func:`available_memory_bytes`: the container's limit less its usage (cgroup v2 or v1),
  else the machine's ``MemAvailable``, the smaller when both apply; :func:`memory_available`
  puts ``--memory-limit`` (:func:`parse_size`) above it.
- :func:`estimate_peak_bytes`: the parameters counted on the meta device, then a sum of named
  terms (:class:`Estimate`) whose coefficients are the module constants below, calibrated from
  ``benchmarks/export_memory.py``'s measurements.
- :func:`check_memory`: :class:`~rmserve.training.export.options.ExportError` naming the
  estimate, the available memory, where that came from, and the options that lower it.

The bottom layer of the export package with options and plan: it imports the standard
library and options; transformers and torch only inside
:func:`count_parameters`.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rmserve.training.export.options import ExportError, ExportOptions

__all__ = [
    "ACTIVATION_COPIES",
    "ATTENTION_COPIES",
    "ATTENTION_SCORE_BYTES",
    "BASELINE_BYTES",
    "EXTERNAL_WEIGHT_COPIES",
    "IN_MEMORY_WEIGHT_COPIES",
    "VARIANT_WEIGHT_COPIES",
    "Estimate",
    "approximate_parameters",
    "available_memory_bytes",
    "check_memory",
    "count_parameters",
    "estimate_peak_bytes",
    "format_size",
    "memory_available",
    "parse_size",
    "preflight",
    "weight_copies",
]

GIB = 2**30

# -- The model of an export's peak: module constants, calibrated from the peak resident memory
# that benchmarks/export_memory.py measures (GNU time's maximum RSS; docs/training.md, "What
# an export needs"). --

# The process before any weights: torch, transformers, onnxruntime and onnx imported, a model
# class run, the tracer and a session's arena started.
BASELINE_BYTES = int(0.6 * GIB)
# Copies of the weights alive at the peak, in the exported precision, which is the trace: the
# torch model, the weights as the exporter folds and serialises them, and its buffers. The
# checks that follow run with the torch model freed and stay below it, and so does the packed
# graph's trace, made when the plain graph's weights are on disk (measured: 8.1 against 8.8
# GiB at 531.8M parameters), so --no-packed does not lower the peak. How many copies
# depends on protobuf's 2 GiB limit: past it, the TorchScript exporter writes the weights to
# files as it goes (547.7M parameters, 2.04 GiB: 4.42 GiB peak, 1.9 copies over the
# baseline); under it, it serialises the whole graph in memory, once in C++ and once as
# Python bytes (531.8M parameters, 1.98 GiB: 8.70 GiB, 4.1 copies).
PROTOBUF_LIMIT = 2**31
EXTERNAL_WEIGHT_COPIES = 1.9
IN_MEMORY_WEIGHT_COPIES = 4.1
# --int8 / --fp16: the converter reads the fp32 graph and writes the variant beside it (the
# quantizer's extra copy), in copies of the exported weights.
VARIANT_WEIGHT_COPIES: dict[str, float] = {"int8": 1.25, "fp16": 1.5}
# Activations of one check batch: values of hidden size kept per token and layer (ONNX
# Runtime's arena keeps a layer's outputs; torch under no_grad frees them, so this errs high).
ACTIVATION_COPIES = 1.0
# Eager attention's scores, in fp32: one (length x length) matrix per row and head, for one
# layer at a time; the softmax holds a second beside them.
ATTENTION_SCORE_BYTES = 4
ATTENTION_COPIES = 2

_DTYPE_BYTES = {"fp32": 4, "fp16": 2}
# A cgroup v1 "no limit" is the largest page-aligned signed 64-bit number; anything this large
# is no limit.
_NO_LIMIT = 2**60


# --------------------------------------------------------------------------- available memory


def available_memory_bytes(root: Path = Path("/")) -> tuple[int, str]:
    """The memory available to this process, in bytes, and where the number came from.

    Inside a cgroup with a memory limit (the container's), the limit less the cgroup's current
    usage (less its inactive file cache, which the kernel reclaims first), the tightest over
    the process's cgroup and its ancestors (v2: ``memory.max`` and ``memory.current``; v1:
    ``memory.limit_in_bytes`` and ``memory.usage_in_bytes``; "max" or a huge value is no
    limit); the machine's ``MemAvailable`` (``/proc/meminfo``); the smaller when both apply.
    ``root`` is the file system's root (tests build fake trees).
    Where neither can be read (not Linux): ``sys.maxsize``, and a source saying so.
    """
    machine = _meminfo_available(root)
    limited = _cgroup_v2_available(root) or _cgroup_v1_available(root)
    if limited is not None and (machine is None or limited[0] <= machine[0]):
        return limited
    if machine is not None:
        return machine
    return sys.maxsize, "unknown (no cgroup limit or /proc/meminfo to read): not checked"


def memory_available(options: ExportOptions, root: Path = Path("/")) -> tuple[int, str]:
    """``--memory-limit`` when given (which overrides the detection), else
    :func:`available_memory_bytes`."""
    if options.memory_limit is not None:
        return parse_size(options.memory_limit), f"--memory-limit {options.memory_limit}"
    return available_memory_bytes(root)


def _meminfo_available(root: Path) -> tuple[int, str] | None:
    path = root / "proc" / "meminfo"
    try:
        text = path.read_text()
    except OSError:
        return None
    match = re.search(r"^MemAvailable:\s*(\d+)\s*kB", text, re.MULTILINE)
    if match is None:
        return None
    return int(match.group(1)) * 1024, "the machine's MemAvailable (/proc/meminfo)"


def _own_cgroups(root: Path) -> list[tuple[str, str]]:
    """``(controllers, path)`` of each line of ``/proc/self/cgroup``."""
    try:
        lines = (root / "proc" / "self" / "cgroup").read_text().splitlines()
    except OSError:
        return []
    entries = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) == 3:
            entries.append((parts[1], parts[2]))
    return entries


def _levels(mount: Path, path: str) -> list[Path]:
    """The folders of the cgroup at ``path`` under ``mount`` and of its ancestors up to the
    mount, those that exist. Inside a container without its own cgroup namespace the path
    names the host's hierarchy and the mount is the container's own cgroup: then the mount."""
    parts = [p for p in path.split("/") if p and p != ".."]
    levels = [mount.joinpath(*parts[:n]) for n in range(len(parts), -1, -1)]
    found = [level for level in levels if level.is_dir()]
    return found or [mount]


def _read_number(path: Path) -> int | None:
    """The number in a cgroup file; None when missing, unreadable or "max"."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if not text.isdigit():
        return None  # "max": no limit
    return int(text)


def _stat(path: Path, key: str) -> int:
    """One counter of a cgroup's ``memory.stat``; 0 when missing."""
    try:
        text = path.read_text()
    except OSError:
        return 0
    match = re.search(rf"^{key} (\d+)$", text, re.MULTILINE)
    return int(match.group(1)) if match else 0


def _tightest(
    levels: list[Path], limit_name: str, usage_name: str, cache_key: str, version: str, root: Path
) -> tuple[int, str] | None:
    """The least ``limit - usage`` over the levels that have a limit. The usage leaves out the
    inactive file cache (``memory.stat``), which the kernel reclaims before it kills: what
    Kubernetes counts as the working set."""
    best: tuple[int, str] | None = None
    for level in levels:
        limit = _read_number(level / limit_name)
        if limit is None or limit >= _NO_LIMIT:
            continue
        usage = _read_number(level / usage_name) or 0
        usage = max(usage - _stat(level / "memory.stat", cache_key), 0)
        free = max(limit - usage, 0)
        if best is None or free < best[0]:
            where = "/" + (level / limit_name).relative_to(root).as_posix()
            best = (
                free,
                (
                    f"the cgroup {version} limit {format_size(limit)} less "
                    f"{format_size(usage)} in use, {where}"
                ),
            )
    return best


def _cgroup_v2_available(root: Path) -> tuple[int, str] | None:
    mount = root / "sys" / "fs" / "cgroup"
    if not (mount / "cgroup.controllers").is_file():
        return None  # not a cgroup v2 mount
    paths = [p for c, p in _own_cgroups(root) if c == ""] or ["/"]
    return _tightest(
        _levels(mount, paths[0]), "memory.max", "memory.current", "inactive_file", "v2", root
    )


def _cgroup_v1_available(root: Path) -> tuple[int, str] | None:
    mount = root / "sys" / "fs" / "cgroup" / "memory"
    if not (mount / "memory.limit_in_bytes").is_file():
        return None  # no cgroup v1 memory controller
    paths = [p for c, p in _own_cgroups(root) if "memory" in c.split(",")] or ["/"]
    return _tightest(
        _levels(mount, paths[0]),
        "memory.limit_in_bytes",
        "memory.usage_in_bytes",
        "total_inactive_file",
        "v1",
        root,
    )


# --------------------------------------------------------------------------- sizes


_UNITS = {
    "": 1,
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
    "ki": 1024,
    "mi": 1024**2,
    "gi": 1024**3,
    "ti": 1024**4,
}
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes of a size such as ``12GiB``, ``500MB``, ``1.5 GiB`` or ``2000000000``: a number,
    then B, KB/MB/GB/TB (powers of 1000) or KiB/MiB/GiB/TiB (powers of 1024; Ki/Mi/Gi/Ti as
    Kubernetes writes them), in any case. Raises ValueError naming the accepted forms."""
    match = _SIZE.fullmatch(text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ValueError(
            f"memory size {text!r} not understood: give a number of bytes, or a number with "
            "a unit: B, KB, MB, GB, TB (powers of 1000) or KiB, MiB, GiB, TiB (powers of "
            "1024), e.g. 12GiB or 500MB"
        )
    return int(float(match.group(1)) * _UNITS[unit])


def format_size(count: float) -> str:
    """``count`` bytes in GiB with one decimal (MiB below 1 GiB)."""
    if abs(count) < GIB:
        return f"{count / 2**20:.0f} MiB"
    return f"{count / GIB:.1f} GiB"


# --------------------------------------------------------------------------- the estimate


@dataclass(frozen=True)
class Estimate:
    """An export's estimated peak memory in bytes, term by term. The trace and the checks
    run one after the other (the torch model is freed before the checks' sessions load), so
    :attr:`total` is the baseline, the larger of the two, and the variants' converters."""

    parameters: int
    dtype: str
    weight_bytes: int  # one copy of the weights in the exported precision
    baseline: int  # the process before weights (BASELINE_BYTES)
    weights: int  # the trace: the copies of the weights at its peak (x an ensemble's members)
    activations: int  # the checks: one check batch's hidden states across the layers
    attention: int  # the checks: one check batch's eager attention scores, one layer
    variants: int  # --int8 / --fp16: the converters' copies

    @property
    def checks(self) -> int:
        """The checks' peak: one session's weights and one check batch."""
        return self.weight_bytes + self.activations + self.attention

    @property
    def total(self) -> int:
        return self.baseline + max(self.weights, self.checks) + self.variants

    def describe(self) -> str:
        """One line: the total, then each term."""
        trace = (
            f"trace {format_size(self.weights)} ({weight_copies(self.weight_bytes):g} x "
            f"{format_size(self.weight_bytes)} {self.dtype}, {self.parameters / 1e6:,.1f}M "
            "parameters)"
        )
        checks = (
            f"checks {format_size(self.checks)} (the weights once + check activations "
            f"{format_size(self.activations)} + attention scores {format_size(self.attention)})"
        )
        parts = [f"baseline {format_size(self.baseline)}", f"the larger of {trace} and {checks}"]
        if self.variants:
            parts.append(f"int8/fp16 variants {format_size(self.variants)}")
        return f"estimated peak memory {format_size(self.total)}: " + " + ".join(parts)


def count_parameters(config: Any, *, trust_remote_code: bool = False) -> int:
    """The parameters of ``AutoModelForSequenceClassification.from_config(config)``, counted on
    the meta device: no weight is allocated, and shared (tied) weights count once. A config
    that transformers cannot build a model of (remote code not trusted, an unknown type) is
    counted from its sizes instead (:func:`approximate_parameters`)."""
    import torch
    import transformers

    auto: Any = transformers.AutoModelForSequenceClassification  # from_config is untyped
    try:
        with torch.device("meta"):
            model = auto.from_config(config, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError, ImportError, OSError, TypeError):
        return approximate_parameters(config)
    return sum(p.numel() for p in model.parameters())


def approximate_parameters(config: Any) -> int:
    """A transformer's parameters from its sizes: the embeddings, then per layer the attention
    projections (grouped key/value heads counted) and a gated MLP of three matrices."""
    hidden = int(_first(config, "hidden_size", "d_model", "n_embd", "dim"))
    layers = int(_first(config, "num_hidden_layers", "n_layer", "num_layers", "n_layers"))
    heads = int(_first(config, "num_attention_heads", "n_head", "num_heads", "n_heads"))
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    inner = int(getattr(config, "intermediate_size", None) or 4 * hidden)
    vocab = int(getattr(config, "vocab_size", 0) or 0)
    attention = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2
    per_layer = attention + 3 * hidden * inner + 2 * hidden
    return vocab * hidden + layers * per_layer + hidden


def weight_copies(weight_bytes: int) -> float:
    """Copies of the weights at the export's peak: fewer for a graph past protobuf's 2 GiB,
    whose weights the exporter streams to files (see :data:`PROTOBUF_LIMIT`)."""
    return EXTERNAL_WEIGHT_COPIES if weight_bytes > PROTOBUF_LIMIT else IN_MEMORY_WEIGHT_COPIES


def estimate_peak_bytes(
    config: Any,
    *,
    dtype: str,
    check_length: int,
    check_batch_tokens: int,
    extra_variants: Sequence[str],
    members: int = 1,
    trust_remote_code: bool = False,
) -> Estimate:
    """The export's estimated peak memory from the model's ``config`` (a transformers
    ``PretrainedConfig``; no weight is loaded) and what the export is asked: ``dtype`` of the
    graph (fp32 or fp16), check rows of at most ``check_length`` tokens in
    batches of ``check_batch_tokens``, the ``extra_variants`` (int8, fp16) converted from the
    fp32 graph, and the ``members`` of an ensemble of independent models (each member's config
    alike); ``trust_remote_code`` as the export's.

    The terms, each in :class:`Estimate`: the process baseline, :func:`weight_copies` copies
    of the weights, one check batch's activations (tokens x hidden size x layers x
    :data:`ACTIVATION_COPIES` x the precision's bytes) and eager attention scores (tokens x
    the row length x heads x 4 bytes x 2), and the variants' :data:`VARIANT_WEIGHT_COPIES`.
    """
    if dtype not in _DTYPE_BYTES:
        raise ValueError(f"dtype {dtype!r}: expected one of {sorted(_DTYPE_BYTES)}")
    element = _DTYPE_BYTES[dtype]
    parameters = count_parameters(config, trust_remote_code=trust_remote_code) * members
    weight_bytes = parameters * element
    hidden = int(_first(config, "hidden_size", "d_model", "n_embd", "dim"))
    layers = int(_first(config, "num_hidden_layers", "n_layer", "num_layers", "n_layers"))
    heads = int(_first(config, "num_attention_heads", "n_head", "num_heads", "n_heads"))
    positions = getattr(config, "max_position_embeddings", None) or check_length
    length = max(1, min(check_length, int(positions), check_batch_tokens))
    tokens = check_batch_tokens * members
    return Estimate(
        parameters=parameters,
        dtype=dtype,
        weight_bytes=weight_bytes,
        baseline=BASELINE_BYTES,
        weights=int(weight_copies(weight_bytes) * weight_bytes),
        activations=int(tokens * hidden * layers * ACTIVATION_COPIES * element),
        attention=tokens * length * heads * ATTENTION_SCORE_BYTES * ATTENTION_COPIES,
        variants=int(sum(VARIANT_WEIGHT_COPIES[v] for v in extra_variants) * weight_bytes),
    )


def _first(config: Any, *names: str) -> Any:
    """The first of ``names`` that ``config`` has (architectures name their sizes apart)."""
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    raise ValueError(f"{type(config).__name__} has none of {list(names)}: cannot estimate")


# --------------------------------------------------------------------------- the refusal


def check_memory(estimate: Estimate, available: int, source: str, options: ExportOptions) -> None:
    """Refuse (:class:`ExportError`; ``rmserve export`` exits 2) when the estimated peak is
    above the available memory, naming both, where the available figure came from, and the
    options that lower the estimate or override the detection."""
    if estimate.total <= available:
        return
    lower = [
        "--max-length / --check-length (shorter check rows: less activation and attention memory)"
    ]
    if options.dtype == "fp32" and not (options.int8 or options.fp16):
        lower.append("--dtype fp16 (half the weights; a bundle for CUDA)")
    if options.int8 or options.fp16:
        lower.append("fewer of --int8 / --fp16 (each converts a copy of the graph)")
    raise ExportError(
        f"this export needs more memory than it has: {estimate.describe()}; available: "
        f"{format_size(available)} ({source}). Lower the need with "
        + ", ".join(lower)
        + "; or, when the available memory is detected wrongly, set it with "
        "--memory-limit SIZE (e.g. 12GiB)"
    )


def preflight(source: str, options: ExportOptions, step: Callable[[str], None]) -> Estimate:
    """Before any weight is loaded: the estimate of ``source``'s export (from its config, or
    member 0's for an ensemble of independent models) said in a step, and the export refused
    (:func:`check_memory`) when it is above the memory available (``--memory-limit``, else
    the container's limit or the machine's available memory)."""
    from transformers import AutoConfig

    from rmserve.training.metadata import TrainingInfo

    info = TrainingInfo.read(source) if Path(source).is_dir() else None
    member_dirs = info.ensemble.member_dirs if info and info.ensemble else ()
    where = str(Path(source) / member_dirs[0]) if member_dirs else source
    config = AutoConfig.from_pretrained(where, trust_remote_code=options.trust_remote_code)
    max_length = options.max_length or (info.max_length if info else None)
    variants = [name for name, on in (("int8", options.int8), ("fp16", options.fp16)) if on]
    estimate = estimate_peak_bytes(
        config,
        dtype=options.dtype,
        check_length=min(options.check_length, max_length or options.check_length),
        check_batch_tokens=options.check_batch_tokens,
        extra_variants=variants,
        members=max(1, len(member_dirs)),
        trust_remote_code=options.trust_remote_code,
    )
    available, where_from = memory_available(options)
    step(f"{estimate.describe()}; available {format_size(available)} ({where_from})")
    check_memory(estimate, available, where_from, options)
    return estimate
