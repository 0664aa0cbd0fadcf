"""Loading a reward model someone else trained, and refusing one whose head did not load.

``AutoModelForSequenceClassification.from_pretrained`` never fails on a checkpoint that lacks
a classification head: it initialises a random one and logs a warning. A random head exported
and served gives random rewards, and a parity check cannot see it (it compares the random head
with itself). So export loads with ``output_loading_info`` and refuses, naming the weights,
any checkpoint whose head (or any other weight, such as the pooler an encoder's classifier
reads) is missing, newly initialised or only partly loaded.

Heads under other names are mapped onto the architecture's head (``score`` for decoders,
``classifier`` for encoders) with transformers' ``key_mapping``:

- ``value_head``: OpenRLHF's reward models (its ``--value_head_prefix``; the config may say
  which in ``value_head_prefix``);
- ``v_head.summary``: TRL's ``AutoModelForCausalLMWithValueHead`` (a head with a bias, which
  decoders' ``score`` lacks: the head is given one, read from the checkpoint);
- anything else with ``--head-name NAME``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rmserve.training.modeling import architecture_of

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

__all__ = ["KNOWN_HEAD_NAMES", "HeadError", "LoadedCheckpoint", "load_checkpoint"]

# Checkpoint prefixes of reward heads that are not transformers' own names, most specific first.
KNOWN_HEAD_NAMES = ("v_head.summary", "value_head")


class HeadError(ValueError):
    """The checkpoint's reward head did not load; the message names the weights."""


@dataclass(frozen=True)
class LoadedCheckpoint:
    model: PreTrainedModel
    head: str  # the attribute holding the head: "score" or "classifier"
    mapped_from: str | None  # the checkpoint's own head name when it was mapped


def _head_attribute(model: PreTrainedModel) -> str:
    kind, _ = architecture_of(model)
    return "score" if kind == "decoder" else "classifier"


def _load(source: str, dtype: torch.dtype, trust_remote_code: bool, **kwargs: Any) -> Any:
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(
        source,
        dtype=dtype,
        trust_remote_code=trust_remote_code,
        output_loading_info=True,
        **kwargs,
    )


def _mapping(name: str | None, head: str) -> dict[str, Any]:
    """from_pretrained's ``key_mapping`` that loads the weights under ``name`` as ``head``."""
    if name is None or name == head:
        return {}
    return {"key_mapping": {f"^{re.escape(name)}\\.": f"{head}."}}


def _loading_problems(head: str, info: dict[str, Any]) -> list[str]:
    """Weights the checkpoint did not provide (newly initialised: the head, or a pooler the
    classifier reads), weights of another shape, and checkpoint weights meant for the head
    that the architecture has no place for (a bias the head lacks)."""

    def name(item: Any) -> str:
        return str(item[0] if isinstance(item, (tuple, list)) else item)

    missing = sorted(info.get("missing_keys", []))
    unexpected = [k for k in info.get("unexpected_keys", []) if k.startswith(f"{head}.")]
    mismatched = [name(item) for item in info.get("mismatched_keys", [])]
    problems = [f"{k} (missing from the checkpoint: newly initialised)" for k in missing]
    problems += [f"{k} (in the checkpoint, no place for it in the head)" for k in unexpected]
    problems += [f"{k} (shape differs from the checkpoint)" for k in mismatched]
    return problems


def _guess_head_name(model: PreTrainedModel, info: dict[str, Any]) -> str | None:
    configured = getattr(model.config, "value_head_prefix", None)
    unexpected = list(info.get("unexpected_keys", []))
    names = ([configured] if isinstance(configured, str) else []) + list(KNOWN_HEAD_NAMES)
    for name in names:
        if any(k.startswith(f"{name}.") for k in unexpected):
            return name
    return None


def load_checkpoint(
    source: str,
    *,
    head_name: str | None = None,
    trust_remote_code: bool = False,
    dtype: torch.dtype | None = None,
) -> LoadedCheckpoint:
    """A sequence-classification model whose reward head really came from ``source``.

    ``head_name`` maps the checkpoint's weights under that prefix onto the model's head;
    without it the known names are tried when the head is missing. Raises :class:`HeadError`
    naming the weights when the head did not load.
    """
    import torch

    dtype = dtype or torch.float32
    # A head named by the caller is mapped at the first load onto decoders' `score` (the
    # renamed heads of OpenRLHF and TRL sit on decoders); the checkpoint is loaded a second
    # time only for an encoder's `classifier` or a guessed name.
    model, info = _load(source, dtype, trust_remote_code, **_mapping(head_name, "score"))
    head = _head_attribute(model)
    mapped_from = head_name
    if mapped_from is None and _loading_problems(head, info):
        mapped_from = _guess_head_name(model, info)
    guessed = head_name is None and mapped_from is not None and mapped_from != head
    if guessed or (head_name is not None and head != "score"):
        del model  # released first: two copies of an 8B model would not fit in memory
        model, info = _load(source, dtype, trust_remote_code, **_mapping(mapped_from, head))
    if mapped_from is not None and f"{head}.bias" in info.get("unexpected_keys", []):
        _add_bias(model, head, _checkpoint_tensor(source, f"{mapped_from}.bias"))
        info["unexpected_keys"] = [k for k in info["unexpected_keys"] if k != f"{head}.bias"]
    problems = _loading_problems(head, info)
    if problems:
        raise HeadError(_refusal(source, model, head, mapped_from, problems, info))
    return LoadedCheckpoint(model=model, head=head, mapped_from=mapped_from)


def _checkpoint_tensor(source: str, name: str) -> torch.Tensor:
    """One tensor of a safetensors checkpoint (a folder or a hub id already in the cache)."""
    import json

    from safetensors import safe_open
    from transformers.utils.hub import cached_file

    index = cached_file(
        source, "model.safetensors.index.json", _raise_exceptions_for_missing_entries=False
    )
    shard = "model.safetensors"
    if index:
        shard = json.loads(Path(index).read_text())["weight_map"][name]
    path = cached_file(source, shard)
    if path is None:
        raise HeadError(f"{source}: cannot find {shard} to read {name} from")
    with safe_open(path, framework="pt") as f:
        tensor: torch.Tensor = f.get_tensor(name)
    return tensor


def _add_bias(model: PreTrainedModel, head: str, bias: torch.Tensor) -> None:
    """Give ``model.<head>`` (a Linear without bias) the checkpoint's bias."""
    import torch

    old = getattr(model, head)
    if not isinstance(old, torch.nn.Linear) or bias.shape != (old.out_features,):
        raise HeadError(
            f"the checkpoint's head bias has shape {tuple(bias.shape)}, which does not fit "
            f"{type(old).__name__} {head}"
        )
    new = torch.nn.Linear(old.in_features, old.out_features, bias=True, dtype=old.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(old.weight)
        new.bias.copy_(bias.to(old.weight.dtype))
    setattr(model, head, new)


def _refusal(
    source: str,
    model: PreTrainedModel,
    head: str,
    mapped_from: str | None,
    problems: list[str],
    info: dict[str, Any],
) -> str:
    lines = [
        f"{source}: weights of {type(model).__name__} did not load (the reward head or what "
        "it reads), so export would serve random rewards:",
        *(f"  - {p}" for p in problems),
    ]
    if mapped_from:
        lines.append(f"(the checkpoint's {mapped_from}.* weights were mapped onto {head}.*)")
    unexpected = list(info.get("unexpected_keys", []))
    if any(k.startswith("lm_head.") for k in unexpected):
        lines.append(
            "The checkpoint holds a language-model head (lm_head): it is a causal LM, not a "
            "reward model. Train a reward head first (rmserve train --base ...)."
        )
    candidates = sorted({k.rsplit(".", 1)[0] for k in unexpected if not k.startswith("lm_head.")})
    if candidates:
        shown = ", ".join(candidates[:5])
        lines.append(
            f"Weights the model did not use: {shown}; if one is the head, pass --head-name PREFIX."
        )
    else:
        lines.append("If the head is stored under another name, pass --head-name PREFIX.")
    return "\n".join(lines)
