"""Bundles built without torch or ``rmserve export``: a tiny ONNX graph and a word tokenizer.

The service treats the model as a black box (input_ids, attention_mask) -> reward, so a graph
of a few operators is enough to test what the service does with its output: one head
([batch]) or several ([batch, K]), each value a different function of the item's tokens.
The graph mean-pools token embeddings over the attention mask, so padding never changes an
item's values (as in a correct reward model) and cutting tokens does.

``with_heads`` turns a real exported one-head bundle (``tiny_decoder_bundle``) into a K-head
one by appending ``reward[:, None] * w + b`` to its graph.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rmserve.manifest import MANIFEST_NAME, TOKENIZER_NAME, sha256_file

_WORD_TEXT = (
    "the a an is it to of and or not yes no you I we they he she how what why where when "
    "do does can could would should will please thanks hello hi bread flour water yeast salt "
    "bake oven mix knead rise cookie dough raw eggs safe heat question answer explain word "
    "long short good bad help helpful correct coherent system user assistant tool Human "
    "Assistant System"
)
WORDS = tuple(_WORD_TEXT.split())
HIDDEN = 8
PAD_ID = 0
ARMO_LABELS = ("helpfulness", "correctness", "coherence")

# A ChatML-like template that refuses roles it does not know, with its own message, the way
# hub templates do (raise_exception); it renders list contents part by part and a name.
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] not in ['system', 'user', 'assistant', 'tool'] %}"
    "{{ raise_exception('Conversation roles must be system/user/assistant/tool, got ' "
    "+ m['role']) }}"
    "{% endif %}"
    "<|im_start|>{{ m['role'] }}{% if m.name is defined %} {{ m.name }}{% endif %}\n"
    "{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for part in m['content'] %}{{ part['text'] }}{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _tokenizer_json() -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[PAD]": PAD_ID, "[UNK]": 1}
    for word in WORDS:
        vocab.setdefault(word, len(vocab))
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return str(tokenizer.to_str())


def _graph(vocab_size: int, heads: int, seed: int) -> Any:
    """reward = tanh(mean of the embeddings of the real tokens) @ W + b: [batch, heads], or
    [batch] for one head."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    embeddings = rng.normal(size=(vocab_size, HIDDEN)).astype(np.float32)
    weight = rng.normal(size=(HIDDEN, heads)).astype(np.float32)
    bias = rng.normal(size=(heads,)).astype(np.float32)
    initializers = [
        numpy_helper.from_array(embeddings, "embeddings"),
        numpy_helper.from_array(weight, "weight"),
        numpy_helper.from_array(bias, "bias"),
        numpy_helper.from_array(np.asarray([1], dtype=np.int64), "axis1"),
        numpy_helper.from_array(np.asarray([2], dtype=np.int64), "axis2"),
    ]
    nodes = [
        helper.make_node("Gather", ["embeddings", "input_ids"], ["emb"]),  # (B, T, H)
        helper.make_node("Cast", ["attention_mask"], ["maskf"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["maskf", "axis2"], ["mask3"]),  # (B, T, 1)
        helper.make_node("Mul", ["emb", "mask3"], ["masked"]),
        helper.make_node("ReduceSum", ["masked", "axis1"], ["summed"], keepdims=0),  # (B, H)
        helper.make_node("ReduceSum", ["maskf", "axis1"], ["count"], keepdims=1),  # (B, 1)
        helper.make_node("Div", ["summed", "count"], ["pooled"]),
        helper.make_node("Tanh", ["pooled"], ["hidden"]),
        helper.make_node("MatMul", ["hidden", "weight"], ["projected"]),
    ]
    if heads == 1:
        nodes += [
            helper.make_node("Add", ["projected", "bias"], ["logits"]),
            helper.make_node("Squeeze", ["logits", "axis1"], ["reward"]),
        ]
        out_shape: list[Any] = ["batch"]
    else:
        nodes.append(helper.make_node("Add", ["projected", "bias"], ["reward"]))
        out_shape = ["batch", heads]
    graph = helper.make_graph(
        nodes,
        "synthetic-reward",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"]),
        ],
        [helper.make_tensor_value_info("reward", TensorProto.FLOAT, out_shape)],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _manifest(
    out: Path,
    *,
    name: str,
    max_length: int,
    labels: Sequence[str],
    reward_head: int,
    text_format: Mapping[str, Any],
) -> dict[str, Any]:
    return {
        "format_version": 2,
        "model_name": name,
        "base_model": "synthetic (numpy weights)",
        "architecture": {"kind": "encoder", "model_type": "synthetic", "pooling": "first"},
        "max_length": max_length,
        "pad_token_id": PAD_ID,
        "padding_side": "right",
        "truncation": "prompt_left",
        "text_format": dict(text_format),
        "normalization": {"mean": 0.25, "std": 2.0, "n": 10, "reference": "made up"},
        "evaluation": None,
        "variants": {
            "fp32": {
                "file": "model.onnx",
                "sha256": sha256_file(out / "model.onnx"),
                "precision": "fp32",
                "parity": {},
            }
        },
        "tokenizer_sha256": sha256_file(out / TOKENIZER_NAME),
        "created_at": "2026-01-01T00:00:00Z",
        "rmserve_version": "test",
        "labels": list(labels),
        "reward_head": reward_head,
        "files": {},
    }


def build_bundle(
    out: Path,
    *,
    labels: Sequence[str] = ("reward",),
    reward_head: int = 0,
    max_length: int = 64,
    text_format: Mapping[str, Any] | None = None,
    name: str = "synthetic",
    seed: int = 0,
) -> Path:
    """A bundle of ``len(labels)`` heads in ``out`` (created), passing ``load_bundle``."""
    import onnx

    out.mkdir(parents=True, exist_ok=True)
    (out / TOKENIZER_NAME).write_text(_tokenizer_json())
    vocab_size = len(json.loads((out / TOKENIZER_NAME).read_text())["model"]["vocab"])
    onnx.save(_graph(vocab_size, len(labels), seed), str(out / "model.onnx"))
    fmt = text_format if text_format is not None else {"kind": "transcript"}
    manifest = _manifest(
        out,
        name=name,
        max_length=max_length,
        labels=labels,
        reward_head=reward_head,
        text_format=fmt,
    )
    (out / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))
    return out


def chat_template_format() -> dict[str, Any]:
    return {
        "kind": "chat_template",
        "template": CHAT_TEMPLATE,
        "special_tokens": {"eos_token": "<|im_end|>"},
        "bos_text": None,
    }


def with_heads(
    bundle: Path, out: Path, labels: Sequence[str], reward_head: int, seed: int = 1
) -> tuple[Path, np.ndarray, np.ndarray]:
    """A copy of a one-head bundle whose model answers ``reward[:, None] * w + b`` ([batch,
    K]) for fixed random ``w``, ``b`` (returned), with its manifest re-hashed."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    shutil.copytree(bundle, out)
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    for precision, variant in list(manifest["variants"].items()):
        if precision != "fp32":  # only fp32 gets the heads; drop the other variants
            (out / variant["file"]).unlink(missing_ok=True)
            del manifest["variants"][precision]
    model = onnx.load(str(out / "model.onnx"))
    rng = np.random.default_rng(seed)
    k = len(labels)
    weight = rng.normal(size=(1, k)).astype(np.float32)
    bias = rng.normal(size=(k,)).astype(np.float32)
    graph = model.graph
    (output,) = graph.output
    old = output.name
    graph.initializer.extend(
        [
            numpy_helper.from_array(weight, "heads_weight"),
            numpy_helper.from_array(bias, "heads_bias"),
            numpy_helper.from_array(np.asarray([1], dtype=np.int64), "heads_axis"),
        ]
    )
    for node in graph.node:  # the old output becomes an inner value
        node.output[:] = [f"{old}_one" if name == old else name for name in node.output]
    graph.node.extend(
        [
            helper.make_node("Unsqueeze", [f"{old}_one", "heads_axis"], ["heads_column"]),
            helper.make_node("MatMul", ["heads_column", "heads_weight"], ["heads_scaled"]),
            helper.make_node("Add", ["heads_scaled", "heads_bias"], [old]),
        ]
    )
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info(old, TensorProto.FLOAT, ["batch", k]))
    for name in list(manifest.get("files", {})):
        (out / name).unlink(missing_ok=True)
    onnx.save(model, str(out / "model.onnx"))
    manifest["files"] = {}
    manifest["packed"] = None  # the packed graph (deleted with the files) keeps one head
    manifest["variants"]["fp32"]["sha256"] = sha256_file(out / "model.onnx")
    manifest["labels"] = list(labels)
    manifest["reward_head"] = reward_head
    (out / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))
    return out, weight, bias
