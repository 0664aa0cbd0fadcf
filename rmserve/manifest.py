"""The bundle manifest, ``rmserve.json``: the contract between training and the service.

A bundle is a directory::

    model.onnx          fp32 model: input_ids, attention_mask (int64, [batch, seq]) -> reward
                        ([batch], or [batch, K] for a model with K > 1 heads or an
                        ensemble of K members)
    model.onnx.data     the weights as ONNX external data, for models past protobuf's 2 GB
    model.int8.onnx     optional int8 variant for CPU (per-token, batch-invariant)
    model.fp16.onnx     optional fp16 variant for GPU (``model.fp16.onnx.data`` when large)
    model.packed.onnx   decoders: the packed graph (items sharing a prompt in one row,
                        rmserve.packing), reading its weights from ``model.onnx.data``;
                        ``model.fp16.packed.onnx`` likewise for fp16
    tokenizer.json      fast tokenizer for the ``tokenizers`` library
    rmserve.json        this manifest

Every file of the bundle is listed with its sha256 (``files``), and :func:`load_bundle` checks
them all before the service opens its port. Format version 2 added the text formats of
:mod:`rmserve.formatting` (chat templates, text pairs), the heads (``labels``,
``reward_head``) and ``files``; version 1 bundles are still read. The optional ``ensemble``
section (issue 13) needs no new version: a bundle without it is not an ensemble, and a reader
that predates it would serve the K columns as K heads, which they are. Nor does the optional
``packed`` section (issue 16): a decoder bundle may carry, per variant, a second graph that
scores items sharing a prompt in one row (:mod:`rmserve.packing`), ``model.packed.onnx``; a
reader that predates it serves the plain graph, which gives the same scores.

An ensemble bundle is one graph whose ``reward`` is [batch, K], column k = member k, labels
``member_0`` .. ``member_{K-1}``. Its ``normalization`` is measured on the members' mean reward
and its ``evaluation`` is the accuracy of that mean; ``ensemble`` adds each member's accuracy
and parity and how much the members disagree.

Training writes it (``rmserve export``); the service reads it with :func:`load_bundle`, which
refuses a bundle whose manifest is missing, malformed, of an unknown format version, or whose
files do not match their recorded sha256, with a message that names the problem.
This module uses the standard library only.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

from rmserve.formatting import AnyTextFormat, FormattingError, text_format_from_dict

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "PACKED_FILES",
    "TOKENIZER_NAME",
    "VARIANT_FILES",
    "Architecture",
    "BundleError",
    "Ensemble",
    "Evaluation",
    "Manifest",
    "Normalization",
    "Packed",
    "Variant",
    "ensemble_labels",
    "load_bundle",
    "sha256_file",
]

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
MANIFEST_NAME = "rmserve.json"
TOKENIZER_NAME = "tokenizer.json"
# The packed graphs of decoder bundles (shared-prompt reuse), per precision; int8 has none.
PACKED_FILES: dict[str, str] = {"fp32": "model.packed.onnx", "fp16": "model.fp16.packed.onnx"}
VARIANT_FILES: dict[str, str] = {
    "fp32": "model.onnx",
    "int8": "model.int8.onnx",
    "fp16": "model.fp16.onnx",
}

ArchitectureKind = Literal["encoder", "decoder"]
Pooling = Literal["first", "last"]
Precision = Literal["fp32", "int8", "fp16"]


class BundleError(Exception):
    """A bundle that cannot be served; the message names the file and the problem."""


@dataclass(frozen=True)
class Architecture:
    kind: ArchitectureKind  # encoder: reward at the first token; decoder: at the last real one
    model_type: str  # transformers' config.model_type, e.g. "bert", "gpt2", "qwen2"
    pooling: Pooling  # "first" (encoders) or "last" (decoders)


@dataclass(frozen=True)
class Normalization:
    mean: float  # reward mean on the reference set
    std: float  # reward std on the reference set (> 0)
    n: int  # number of rewards it was measured on
    reference: str  # what the reference set was, e.g. "train pairs (3662 responses)"


@dataclass(frozen=True)
class Evaluation:
    accuracy: float  # fraction of eval pairs where r(chosen) > r(rejected)
    n: int  # number of eval pairs
    data: str  # where the eval pairs came from
    mean_margin: float | None = None  # mean of r(chosen) - r(rejected)
    shorter_wins_accuracy: float | None = None  # the length baseline on the same pairs


@dataclass(frozen=True)
class Variant:
    file: str  # file name inside the bundle
    sha256: str  # hex digest of the file
    precision: Precision
    # Measured parity against the torch model, e.g. {"max_abs_diff": 3e-6} for fp32 or
    # {"pairwise_agreement": 0.996, "accuracy_drop": 0.004} for int8/fp16.
    parity: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Ensemble:
    """K reward models served as one graph: output [batch, K], column k = member k."""

    members: int  # K >= 2; len(Manifest.labels) == K, labels "member_0" .. "member_{K-1}"
    # How members differ, in words, e.g. "shared backbone, one linear head per member, each on
    # its own bootstrap resample and seed".
    diversity: str
    member_accuracy: tuple[float, ...]  # each member's accuracy on the eval set; () without one
    member_parity: tuple[float, ...]  # each member's fp32 max |torch - onnxruntime| (len K)
    # Measured on the eval set, e.g. {"mean_std": ..., "split_pairs": fraction of pairs the
    # members do not all decide alike}.
    disagreement: dict[str, float]


@dataclass(frozen=True)
class Packed:
    """The packed graphs of a decoder bundle (:mod:`rmserve.packing`): items that share a
    prompt scored in one row, the prompt computed once."""

    files: dict[str, str]  # precision -> file name, e.g. {"fp32": "model.packed.onnx"}
    # The reward is read at an item's last token that is not this one (the model config's
    # pad_token_id, transformers' rule); None: at its last token.
    skip_token_id: int | None
    # Measured max |torch whole-item - onnxruntime packed| per precision, on rows where
    # items really share prompts.
    max_abs_diff: dict[str, float]
    # The per-token work of the model in units of one attention pair (about 6 x hidden
    # size): rmserve.packing shares a prompt only where that costs less than scoring whole.
    token_cost: float = 0.0


def ensemble_labels(members: int) -> tuple[str, ...]:
    """The labels of an ensemble's K outputs: ``member_0`` .. ``member_{K-1}``."""
    return tuple(f"member_{k}" for k in range(members))


@dataclass(frozen=True)
class Manifest:
    format_version: int
    model_name: str
    base_model: str
    architecture: Architecture
    max_length: int
    pad_token_id: int
    padding_side: Literal["right"]  # right padding keeps the first/last positions exact
    truncation: str  # "prompt_left": drop prompt tokens from the left
    text_format: AnyTextFormat  # transcript, chat_template or text_pair (rmserve.formatting)
    normalization: Normalization
    evaluation: Evaluation | None
    variants: dict[str, Variant]  # keyed by precision
    tokenizer_sha256: str
    created_at: str  # ISO 8601, UTC
    rmserve_version: str
    # One name per output of the model (config.id2label); ``reward`` is [batch] for one head,
    # [batch, K] for K. ``reward_head`` is the index /v1/score returns as ``scores``.
    labels: tuple[str, ...] = ("reward",)
    reward_head: int = 0
    # Every other file of the bundle (ONNX external data) with its sha256.
    files: dict[str, str] = field(default_factory=dict)
    # Set when the K outputs are the members of one ensemble rather than K objectives.
    ensemble: Ensemble | None = None
    # Set for a decoder bundle exported with packed graphs (shared-prompt reuse).
    packed: Packed | None = None

    @property
    def num_heads(self) -> int:
        return len(self.labels)

    @property
    def has_several_heads(self) -> bool:
        """The model answers K > 1 values per item (several objectives, or an ensemble's
        members): the doors add every head's value beside the reward."""
        return self.num_heads > 1

    @property
    def is_ensemble(self) -> bool:
        return self.ensemble is not None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["text_format"] = self.text_format.to_dict()
        data["labels"] = list(self.labels)
        if self.ensemble is not None:
            data["ensemble"]["member_accuracy"] = list(self.ensemble.member_accuracy)
            data["ensemble"]["member_parity"] = list(self.ensemble.member_parity)
        return data

    def public(self) -> dict[str, Any]:
        """What ``GET /v1/models`` shows: everything but file hashes."""
        data = self.to_dict()
        data.pop("tokenizer_sha256")
        data["files"] = sorted(data["files"])
        for variant in data["variants"].values():
            variant.pop("sha256")
        return data

    def write(self, bundle_dir: Path) -> Path:
        path = Path(bundle_dir) / MANIFEST_NAME
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def from_dict(cls, data: Any, source: str = MANIFEST_NAME) -> Manifest:
        return _parse_manifest(data, source)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_bundle(bundle_dir: str | Path, *, verify_hashes: bool = True) -> Manifest:
    """Read and check a bundle's manifest; raise BundleError naming the problem."""
    root = Path(bundle_dir)
    if not root.is_dir():
        raise BundleError(f"bundle at {root} is not a directory; run `rmserve export` to make one")
    manifest_path = root / MANIFEST_NAME
    if not manifest_path.is_file():
        raise BundleError(
            f"bundle at {root} has no {MANIFEST_NAME}; run `rmserve export CHECKPOINT --out {root}`"
        )
    try:
        data = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{manifest_path} is not valid JSON: {e}") from e
    manifest = _parse_manifest(data, str(manifest_path))
    checks = [(TOKENIZER_NAME, manifest.tokenizer_sha256)]
    checks += [(v.file, v.sha256) for v in manifest.variants.values()]
    checks += list(manifest.files.items())
    for name, expected in checks:
        path = root / name
        if not path.is_file():
            raise BundleError(f"bundle at {root} is missing {name}, which {MANIFEST_NAME} lists")
        if verify_hashes:
            actual = sha256_file(path)
            if actual != expected:
                raise BundleError(
                    f"{path} does not match its sha256 in {MANIFEST_NAME} "
                    f"(expected {expected[:12]}..., found {actual[:12]}...); the file was changed "
                    "or corrupted after export; export the bundle again"
                )
    return manifest


# --- parsing -------------------------------------------------------------------------------


class _Reader:
    """Field access with the errors of :func:`load_bundle`: each names the manifest and the
    field (``variants.fp32.sha256``) and says what was wrong."""

    def __init__(self, source: str):
        self.source = source

    def fail(self, msg: str) -> BundleError:
        return BundleError(f"{self.source}: {msg}")

    def get(
        self, obj: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str = ""
    ) -> Any:
        if key not in obj:
            raise self.fail(f"missing field {where}{key}")
        value = obj[key]
        # No field of the manifest is a bool, and bool is an int to isinstance.
        if isinstance(value, bool):
            raise self.fail(f"field {where}{key} has the wrong type (bool)")
        if not isinstance(value, kind):
            raise self.fail(f"field {where}{key} has the wrong type ({type(value).__name__})")
        return value

    def section(self, data: Mapping[str, Any], key: str) -> Mapping[str, Any]:
        return cast("Mapping[str, Any]", self.get(data, key, dict))


def _parse_manifest(data: Any, source: str) -> Manifest:
    """Every section checked, in the order of the manifest; the first problem raises."""
    r = _Reader(source)
    if not isinstance(data, Mapping):
        raise r.fail("the manifest must be a JSON object")
    version = data.get("format_version")
    if version not in READABLE_VERSIONS or isinstance(version, bool):
        raise r.fail(
            f"unknown format_version {version!r}; this rmserve reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}. Export the bundle again with this "
            "rmserve, or upgrade rmserve"
        )
    architecture = _parse_architecture(r, data)
    max_length, truncation, text_format = _parse_text_path(r, data)
    labels, reward_head = _parse_heads(r, data)
    files = _parse_files(r, data)
    normalization = _parse_normalization(r, data)
    evaluation = _parse_evaluation(r, data)
    ensemble = None
    if data.get("ensemble") is not None:
        ensemble = _parse_ensemble(r.section(data, "ensemble"), labels, r.fail)
    packed = None
    if data.get("packed") is not None:
        packed = _parse_packed(r.section(data, "packed"), files, architecture.kind, r.fail)
    variants = _parse_variants(r, data)
    return Manifest(
        format_version=FORMAT_VERSION,
        model_name=r.get(data, "model_name", str),
        base_model=r.get(data, "base_model", str),
        architecture=architecture,
        max_length=max_length,
        pad_token_id=r.get(data, "pad_token_id", int),
        padding_side="right",
        truncation=truncation,
        text_format=text_format,
        normalization=normalization,
        evaluation=evaluation,
        variants=variants,
        tokenizer_sha256=r.get(data, "tokenizer_sha256", str),
        created_at=r.get(data, "created_at", str),
        rmserve_version=r.get(data, "rmserve_version", str),
        labels=tuple(labels),
        reward_head=reward_head,
        files=dict(files),
        packed=packed,
        ensemble=ensemble,
    )


def _parse_architecture(r: _Reader, data: Mapping[str, Any]) -> Architecture:
    arch = r.section(data, "architecture")
    kind = r.get(arch, "kind", str, "architecture.")
    pooling = r.get(arch, "pooling", str, "architecture.")
    if kind not in ("encoder", "decoder"):
        raise r.fail(f"architecture.kind must be 'encoder' or 'decoder', got {kind!r}")
    if pooling not in ("first", "last"):
        raise r.fail(f"architecture.pooling must be 'first' or 'last', got {pooling!r}")
    return Architecture(
        kind=kind, model_type=r.get(arch, "model_type", str, "architecture."), pooling=pooling
    )


def _parse_text_path(r: _Reader, data: Mapping[str, Any]) -> tuple[int, str, AnyTextFormat]:
    """(max_length, truncation, text format); the padding side must be right."""
    max_length = r.get(data, "max_length", int)
    if max_length < 2:
        raise r.fail(f"max_length must be at least 2, got {max_length}")
    padding_side = r.get(data, "padding_side", str)
    if padding_side != "right":
        raise r.fail(f"padding_side must be 'right', got {padding_side!r}")
    truncation = r.get(data, "truncation", str)
    if truncation != "prompt_left":
        raise r.fail(f"unknown truncation policy {truncation!r}; expected 'prompt_left'")
    try:
        text_format = text_format_from_dict(r.section(data, "text_format"))
    except FormattingError as e:
        raise r.fail(str(e)) from e
    return max_length, truncation, text_format


def _parse_heads(r: _Reader, data: Mapping[str, Any]) -> tuple[list[str], int]:
    """(labels, reward_head): one name per model output, and the output that is the reward."""
    labels = data.get("labels", ["reward"])
    if not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels):
        raise r.fail("labels must be a non-empty list of strings (one per model output)")
    reward_head = data.get("reward_head", 0)
    if isinstance(reward_head, bool) or not isinstance(reward_head, int):
        raise r.fail(f"reward_head must be an integer, got {reward_head!r}")
    if not 0 <= reward_head < len(labels):
        raise r.fail(f"reward_head {reward_head} is not one of the {len(labels)} outputs {labels}")
    return labels, reward_head


def _parse_files(r: _Reader, data: Mapping[str, Any]) -> Mapping[str, str]:
    files = data.get("files", {})
    if not isinstance(files, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) and "/" not in k and k not in ("", ".", "..")
        for k, v in files.items()
    ):
        raise r.fail("files must map file names inside the bundle to sha256 hex digests")
    return files


def _parse_normalization(r: _Reader, data: Mapping[str, Any]) -> Normalization:
    norm = r.section(data, "normalization")
    normalization = Normalization(
        mean=float(r.get(norm, "mean", (int, float), "normalization.")),
        std=float(r.get(norm, "std", (int, float), "normalization.")),
        n=r.get(norm, "n", int, "normalization."),
        reference=r.get(norm, "reference", str, "normalization."),
    )
    if not normalization.std > 0:
        raise r.fail(f"normalization.std must be positive, got {normalization.std}")
    return normalization


def _parse_evaluation(r: _Reader, data: Mapping[str, Any]) -> Evaluation | None:
    if data.get("evaluation") is None:
        return None
    ev = r.section(data, "evaluation")
    return Evaluation(
        accuracy=float(r.get(ev, "accuracy", (int, float), "evaluation.")),
        n=r.get(ev, "n", int, "evaluation."),
        data=r.get(ev, "data", str, "evaluation."),
        mean_margin=ev.get("mean_margin"),
        shorter_wins_accuracy=ev.get("shorter_wins_accuracy"),
    )


def _parse_variants(r: _Reader, data: Mapping[str, Any]) -> dict[str, Variant]:
    raw_variants = r.section(data, "variants")
    if not raw_variants:
        raise r.fail("variants must list at least one model file (fp32: model.onnx)")
    variants: dict[str, Variant] = {}
    for precision, raw in raw_variants.items():
        if precision not in VARIANT_FILES:
            raise r.fail(f"unknown variant {precision!r}; expected one of {sorted(VARIANT_FILES)}")
        if not isinstance(raw, Mapping):
            raise r.fail(f"variants.{precision} must be an object")
        where = f"variants.{precision}."
        parity = raw.get("parity", {})
        if not isinstance(parity, Mapping) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in parity.values()
        ):
            raise r.fail(f"{where}parity must map names to numbers")
        variants[precision] = Variant(
            file=r.get(raw, "file", str, where),
            sha256=r.get(raw, "sha256", str, where),
            precision=cast(Precision, precision),  # checked against VARIANT_FILES above
            parity={k: float(v) for k, v in parity.items()},
        )
    return variants


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _parse_packed(
    raw: Mapping[str, Any],
    files: Mapping[str, str],
    kind: str,
    fail: Callable[[str], BundleError],
) -> Packed:
    """The ``packed`` section: decoders only, each file hashed in ``files``."""
    if kind != "decoder":
        raise fail("packed graphs are for decoders (the reward at the last token) only")
    graphs = raw.get("files")
    if not isinstance(graphs, Mapping) or not graphs:
        raise fail("packed.files must map precisions to file names")
    for precision, name in graphs.items():
        if precision not in VARIANT_FILES or not isinstance(name, str):
            raise fail(f"packed.files.{precision} must name a file of a known precision")
        if name not in files:
            raise fail(f"packed.files.{precision} ({name}) is not listed in files with its sha256")
    skip = raw.get("skip_token_id")
    if skip is not None and (isinstance(skip, bool) or not isinstance(skip, int)):
        raise fail(f"packed.skip_token_id must be a token id or null, got {skip!r}")
    diffs = raw.get("max_abs_diff", {})
    if not isinstance(diffs, Mapping) or not all(_is_number(v) for v in diffs.values()):
        raise fail("packed.max_abs_diff must map precisions to numbers")
    token_cost = raw.get("token_cost", 0.0)
    if not _is_number(token_cost) or token_cost < 0:
        raise fail(f"packed.token_cost must be a number >= 0, got {token_cost!r}")
    return Packed(
        files=dict(graphs),
        skip_token_id=skip,
        max_abs_diff={k: float(v) for k, v in diffs.items()},
        token_cost=float(token_cost),
    )


def _parse_ensemble(
    raw: Mapping[str, Any], labels: list[str], fail: Callable[[str], BundleError]
) -> Ensemble:
    """The ``ensemble`` section, checked against the labels: a service that averages K
    columns must know that there are K, and which is which."""
    members = raw.get("members")
    if isinstance(members, bool) or not isinstance(members, int) or members < 2:
        raise fail(f"ensemble.members must be an integer of at least 2, got {members!r}")
    expected = list(ensemble_labels(members))
    if labels != expected:
        raise fail(
            f"an ensemble of {members} members must have the labels {expected} (one output "
            f"column per member), got {labels}; export the ensemble again"
        )
    diversity = raw.get("diversity")
    if not isinstance(diversity, str) or not diversity.strip():
        raise fail("ensemble.diversity must say in words how the members differ")

    def numbers(key: str, lengths: tuple[int, ...]) -> tuple[float, ...]:
        value = raw.get(key)
        if not isinstance(value, list) or not all(_is_number(v) for v in value):
            raise fail(f"ensemble.{key} must be a list of numbers, one per member")
        if len(value) not in lengths:
            wanted = " or ".join(str(n) for n in lengths)
            raise fail(f"ensemble.{key} has {len(value)} values; expected {wanted}")
        return tuple(float(v) for v in value)

    disagreement = raw.get("disagreement")
    if not isinstance(disagreement, Mapping) or not all(
        isinstance(k, str) and _is_number(v) for k, v in disagreement.items()
    ):
        raise fail("ensemble.disagreement must map names to numbers")
    return Ensemble(
        members=members,
        diversity=diversity,
        # Empty when the bundle was exported without an eval set.
        member_accuracy=numbers("member_accuracy", (0, members)),
        member_parity=numbers("member_parity", (members,)),
        disagreement={k: float(v) for k, v in disagreement.items()},
    )
