"""What ``rmserve export`` can be asked: :class:`ExportOptions`, whose fields generate the
command's flags (as :class:`~rmserve.training.config.RewardConfig`'s generate ``rmserve
train``'s), and :class:`ExportError`.

The bottom of the export package, beside :mod:`~rmserve.training.export.plan`: it imports only
the standard library and the core (``rmserve --help`` builds the export flags from it without
loading torch, transformers, onnxruntime or numpy).

A field's metadata says how it appears on the command line:

- ``group``: the ``rmserve export --help`` section (:data:`GROUPS`); a field without one is an
  option of :func:`~rmserve.training.export.export_bundle` only, with no flag;
- ``help``: the flag's help (argparse shows the default after it unless the help says it);
- ``flag``: the flag's name when it is not ``--field-name`` (``--no-packed`` for ``packed``,
  whose default is on); ``metavar``: the value's name in the help.

The type gives the rest: ``bool`` a switch, a ``Literal`` its choices, ``int`` / ``float``
their conversion, ``X | None`` reads as X.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from rmserve.formatting import AnyTextFormat

__all__ = ["GROUPS", "ExportError", "ExportOptions", "Exporter", "TextFormatChoice"]

# "fused": torch.export (dynamo), then ONNX Runtime's fused transformer operators
# (rmserve.training.export.fusion): attention and RMS norms in one kernel each.
Exporter = Literal["torchscript", "dynamo", "fused"]
TextFormatChoice = Literal["auto", "chat_template", "text_pair", "transcript"]

# The sections of `rmserve export --help`, in order; each field names its own.
GROUPS = ("the bundle", "the graph", "the model's text path and heads", "checks")


class ExportError(RuntimeError):
    """The export failed a check; the message carries the measured numbers."""


def _flag(group: str, help: str, **cli: str) -> dict[str, Any]:
    """A field's metadata: its ``--help`` section and text, and ``flag`` / ``metavar``."""
    return {"group": group, "help": help, **cli}


@dataclass(frozen=True)
class ExportOptions:
    """Everything an export can be asked, but the model and the bundle folder. The defaults
    are ``rmserve export``'s."""

    # -- the bundle: what it holds --
    model_name: str | None = field(
        default=None,
        metadata=_flag(
            "the bundle",
            "model name in the manifest, served as the responses' model (default: the model's "
            "own: its hub id; for a checkpoint rmserve trained with a preset, the preset, e.g. "
            "minilm-hh; else the MODEL folder's name)",
        ),
    )
    int8: bool = field(
        default=False, metadata=_flag("the bundle", "add model.int8.onnx (CPU serving)")
    )
    fp16: bool = field(
        default=False, metadata=_flag("the bundle", "add model.fp16.onnx (GPU serving)")
    )
    dtype: Literal["fp32", "fp16"] = field(
        default="fp32",
        metadata=_flag(
            "the bundle",
            "precision of the exported graph: fp32 (CPU and GPU), or fp16, loaded in half "
            "precision without a full fp32 copy (half the memory; a bundle for CUDA, checked "
            "against torch in fp16 to 2e-2)",
        ),
    )
    packed: bool = field(
        default=True,
        metadata=_flag(
            "the bundle",
            "decoders: leave out model.packed.onnx, the graph that scores responses sharing a "
            "prompt with the prompt computed once (the service then scores every item whole)",
            flag="--no-packed",
        ),
    )

    # -- the graph: how the model becomes ONNX --
    exporter: Exporter = field(
        default="torchscript",
        metadata=_flag(
            "the graph",
            "torch.onnx exporter: TorchScript (fast, default), torch.export (dynamo), or "
            "dynamo with ONNX Runtime's fused attention and RMS-norm operators (fused: "
            "faster decoders)",
        ),
    )
    opset: int = field(default=17, metadata=_flag("the graph", "ONNX opset version"))
    max_length: int | None = field(
        default=None,
        metadata=_flag("the graph", "serving max length (default: the training value)"),
    )

    # -- the model's text path and heads: how conversations become tokens, which output
    # is the reward --
    text_format_choice: TextFormatChoice = field(
        default="auto",
        metadata=_flag(
            "the model's text path and heads",
            "how conversations become text: auto = what rmserve training used, else the "
            "tokenizer's chat template, else tokenizer(question, answer) for an encoder that "
            "encodes pairs, else the HH transcript",
            flag="--text-format",
        ),
    )
    head_name: str | None = field(
        default=None,
        metadata=_flag(
            "the model's text path and heads",
            "checkpoint weights holding the reward head, mapped onto the model's head "
            "(value_head and TRL's v_head.summary are recognised without it)",
            metavar="PREFIX",
        ),
    )
    # An index, or one of the labels (argparse gives the flag's value as text).
    reward_head: int | str = field(
        default="0",
        metadata=_flag(
            "the model's text path and heads",
            "for a model with several outputs, the one /v1/score returns as scores: an index "
            "or a label of config.id2label",
        ),
    )
    trust_remote_code: bool = field(
        default=False,
        metadata=_flag(
            "the model's text path and heads",
            "run the model's own Python code from the hub (its "
            "AutoModelForSequenceClassification class); only for models you trust",
        ),
    )
    # The text format itself, when the caller has one (no flag): overrides text_format_choice.
    text_format: AnyTextFormat | None = None

    # -- checks: the eval pairs of the int8/fp16 checks and the bounds --
    eval_data: str | None = field(
        default=None,
        metadata=_flag(
            "checks",
            "pairs for the evaluation section and the int8/fp16 checks (default: the eval set "
            "recorded at training)",
        ),
    )
    skip_malformed: bool = field(
        default=False,
        metadata=_flag("checks", "skip malformed eval rows and count them"),
    )
    min_agreement: float = field(
        default=0.99,
        metadata=_flag(
            "checks",
            "int8/fp16 checks: least fraction of eval pairs whose decision (which response "
            "wins) must equal fp32's; lower it only knowingly: the measured value is recorded "
            "in rmserve.json either way",
        ),
    )
    max_accuracy_drop: float = field(
        default=0.01,
        metadata=_flag(
            "checks",
            "int8/fp16 checks: most eval accuracy (a fraction: 0.01 = 1 point) a variant may "
            "lose against fp32",
        ),
    )
    check_length: int = field(
        default=512,
        metadata=_flag(
            "checks",
            "the longest row, in tokens, of the parity and decision checks (eval pairs and "
            "synthetic rows are encoded at min(max_length, this), prompts cut from the left as "
            "served); inputs longer than it are served by the same graph but were not checked "
            "at that length",
            metavar="TOKENS",
        ),
    )
    check_batch_tokens: int = field(
        default=4096,
        metadata=_flag(
            "checks",
            "padded tokens per check batch (rows x longest row): every check scores its rows "
            "in batches under it, which bounds its memory",
            metavar="TOKENS",
        ),
    )
    # No flag: the fp32 graph's bound on max |torch - onnxruntime|, and the batch of the
    # eval scoring.
    fp32_tolerance: float = 1e-4
    batch_size: int = 32

    # Room for the options other issues add, each in its own --help section (add it to
    # GROUPS): the process-reward model's (step separator, step aggregation) and the
    # adapters' (a PEFT/LoRA adapter merged into its base before tracing).
    memory_limit: str | None = field(
        default=None,
        metadata=_flag(
            "checks",
            "memory this export may use, e.g. 12GiB or 500MB (default: the container's limit, "
            "else the machine's available memory); export refuses to start when its estimate "
            "is above it",
            metavar="SIZE",
        ),
    )
