"""Fuse a decoder's ONNX graph into ONNX Runtime's transformer operators.

A graph exported op by op computes attention as a dozen MatMul, Softmax, Transpose and
Reshape nodes and RMS norms (with their residual adds) as Pow/ReduceMean/Sqrt/Div chains: many
small kernels, each reading and writing its whole activation. ONNX Runtime has fused contrib
operators for them (``MultiHeadAttention``, ``SkipSimplifiedLayerNormalization``) on CPU and
CUDA. On the Qwen2 and Llama graphs of transformers 5 the rewriter also reports rotary
embeddings fused, but the written graph still computes them as Slice/Neg/Concat (measured:
no ``RotaryEmbedding`` node survives), so the counts below are read from the graph.

The fusing is onnxscript's ``rewriter.ort_fusions.optimize_for_ort``, a maintained pattern
rewriter that targets graphs from ``torch.onnx.export(..., dynamo=True)`` (the TorchScript
exporter's graphs have other shapes of the same computation and are not matched), so a fused
bundle is exported with the dynamo exporter. Nothing here is hand-written graph surgery: if
a pattern does not match, the node stays as it was and the graph still computes the same.
Export's parity and batch-invariance checks run on the fused graph like on any other.
"""

from __future__ import annotations

from pathlib import Path

from rmserve.training.export.onnx_files import PROTOBUF_LIMIT

__all__ = ["fuse_for_ort"]


def fuse_for_ort(src: Path, dst: Path) -> dict[str, int]:
    """Write ``src`` (a dynamo-exported graph) with ORT's fused operators to ``dst``; return
    how many of each fused operator the written graph holds (counted in the graph, not taken
    from the rewriter's report: a rotary fusion it reports may not survive its later passes).
    Weights past protobuf's limit go to ``<dst>.data`` beside it (export then gathers them
    into the bundle)."""
    import onnx_ir as ir
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    model = ir.load(str(src))
    fused, _ = optimize_for_ort(model)
    weights = sum(
        value.const_value.nbytes
        for value in fused.graph.initializers.values()
        if value.const_value is not None
    )
    if weights > PROTOBUF_LIMIT:
        ir.save(fused, str(dst), external_data=dst.name + ".data")
    else:
        # The exporter left the weights in a file beside src; a small model keeps them inline.
        ir.save(ir.external_data.load_to_model(fused), str(dst))
    counts: dict[str, int] = {}
    for node in fused.graph.all_nodes():
        if node.domain == "com.microsoft":
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts
