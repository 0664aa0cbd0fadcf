"""The int8 variant: per-token int8 whose scores do not depend on the batch.

Dynamic quantization (``onnxruntime.quantization.quantize_dynamic``) gives each MatMul's input
*one* scale for the whole batch, so an item's score moves with its neighbours and the server's
batching changes decisions. Here every row (token) of a MatMul's input gets its own scale,
from that row alone:

- weights: int8, symmetric, one scale per output column (per channel);
- activations: uint8, asymmetric, one (min, max) per token, computed in the graph at run time;
  the int8 product (``MatMulIntegerToFloat``) accumulates in int32, exact whatever the batch;
- outlier channels: the ``outlier_channels`` input channels of largest magnitude on the
  calibration texts stay in fp32 (a small fp32 MatMul beside the int8 one), so that they do
  not set every token's scale (LLM.int8()'s decomposition, with the channels fixed at export).
  BERT-style encoders carry, after some LayerNorms, a few channels an order of magnitude
  larger than the rest; quantized with them, every other channel would lose its resolution.

Nothing in a row's score depends on another row, so an item scores the same alone or in any
batch, bit for bit, as far as the fp32 operators around the MatMuls do (they do on ORT's CPU
kernels; tests/training/test_quantize.py checks both). Calibration only chooses *which*
channels stay in fp32; no scale is fitted, so a calibration set that misses some inputs costs
a little accuracy, never a clipped activation.

The price is speed: the per-token statistics and the fp32 side product make it slower than
dynamic int8, though still faster than fp32 on CPU. ``benchmarks/int8.py`` measures score
error, decision agreement with fp32 and speed against dynamic int8, static QDQ and per-token
int8 without outlier channels (results in benchmarks/results/cpu/int8.json, summed up in
docs/training.md, "The int8 variant"). Attention's activation-by-activation MatMuls, softmax,
LayerNorm, GELU, the embeddings and the pooler/classifier ``Gemm`` stay in fp32.

Only ``MatMul`` nodes whose second input is a 2-D float32 initializer are rewritten; each
input tensor is quantized once for all the MatMuls that read it (query, key and value share
theirs). The rewrite needs the fp32 graph in memory.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from rmserve.training.export.onnx_files import save_model
from rmserve.training.scoring import pad_batch

if TYPE_CHECKING:
    import numpy.typing as npt

__all__ = ["OUTLIER_CHANNELS", "Int8Summary", "QuantizationError", "quantize_int8"]

# Input channels kept in fp32 per quantized MatMul input (at most a quarter of them): enough
# to hold a BERT-style encoder's outlier channels, few enough that the fp32 side product
# stays small. benchmarks/int8.py compares 16 with none on the default recipe's model.
OUTLIER_CHANNELS = 16

# A row whose values are all equal still gets a nonzero scale.
_MIN_RANGE = 1e-12
# onnxruntime's own operators (MatMulIntegerToFloat): bundles run on onnxruntime only.
_ORT_DOMAIN = "com.microsoft"


class QuantizationError(ValueError):
    """The graph cannot be given an int8 variant; the message says why."""


@dataclass(frozen=True)
class Int8Summary:
    matmuls: int  # MatMul nodes rewritten to int8
    inputs: int  # distinct input tensors quantized (each once)
    outlier_channels: int  # input channels kept in fp32 per quantized input (at most)
    calibration_rows: int  # sequences the outlier channels were chosen on


def quantize_int8(
    src: Path,
    dst: Path,
    calibration: Sequence[Sequence[int]],
    pad_token_id: int,
    *,
    outlier_channels: int = OUTLIER_CHANNELS,
    batch_size: int = 8,
) -> Int8Summary:
    """Write the per-token int8 variant of the fp32 graph ``src`` to ``dst``.

    ``calibration``: token ids of real texts encoded as the bundle encodes them (a few dozen
    to a few hundred; 32 were enough on MiniLM), run through ``src`` in right-padded batches
    of ``batch_size`` to find each MatMul input's largest channels (only real tokens count,
    not padding). ``dst`` is written like every bundle model (:func:`save_model`: one
    ``.data`` file beside it past protobuf's limit). Raises :class:`QuantizationError` when
    there is no calibration text or no MatMul with constant weights to quantize.
    """
    import onnx

    rows = [list(r) for r in calibration if len(r) > 0]
    if not rows:
        raise QuantizationError(
            "int8 needs calibration texts to choose its fp32 outlier channels and none were "
            "given; pass the eval pairs' token ids"
        )
    model = onnx.load(str(src))
    groups = _quantizable_matmuls(model)
    if not groups:
        raise QuantizationError(
            f"{src} has no MatMul with a constant 2-D float32 weight, so int8 would change "
            "nothing; export without --int8"
        )
    channel_max = _calibrate(src, list(groups), rows, pad_token_id, batch_size)
    rewriter = _Rewriter(model, outlier_channels)
    for input_name, nodes in groups.items():
        rewriter.quantize(input_name, nodes, channel_max[input_name])
    rewriter.finish()
    save_model(model, dst)
    return Int8Summary(
        matmuls=sum(len(nodes) for nodes in groups.values()),
        inputs=len(groups),
        outlier_channels=outlier_channels,
        calibration_rows=len(rows),
    )


def _quantizable_matmuls(model: Any) -> dict[str, list[Any]]:
    """MatMul nodes with a constant 2-D float32 weight, grouped by their (activation) input."""
    from onnx import TensorProto

    weights = {
        t.name: t
        for t in model.graph.initializer
        if t.data_type == TensorProto.FLOAT and len(t.dims) == 2
    }
    groups: dict[str, list[Any]] = {}
    for node in model.graph.node:
        standard = node.domain in ("", "ai.onnx")
        if node.op_type == "MatMul" and standard and node.input[1] in weights:
            groups.setdefault(node.input[0], []).append(node)
    return groups


def _calibrate(
    src: Path,
    names: list[str],
    rows: list[list[int]],
    pad_token_id: int,
    batch_size: int,
) -> dict[str, npt.NDArray[np.float32]]:
    """max |x| of each channel of each named tensor over the real tokens of ``rows``."""
    import onnx
    import onnxruntime as ort

    # The probe is the fp32 graph with the MatMul inputs as extra outputs. It is saved beside
    # src, so that the external data of a model past 2 GB (a relative path) resolves.
    probe = onnx.load(str(src), load_external_data=False)
    for name in names:
        output = onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
        probe.graph.output.append(output)
    out: dict[str, npt.NDArray[np.float32]] = {}
    with tempfile.NamedTemporaryFile(dir=src.parent, prefix=".int8-probe-", suffix=".onnx") as f:
        onnx.save(probe, f.name)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(f.name, options, providers=["CPUExecutionProvider"])
        order = sorted(rows, key=len)  # little padding
        for start in range(0, len(order), batch_size):
            input_ids, mask = pad_batch(order[start : start + batch_size], pad_token_id)
            real = mask.reshape(-1) == 1  # (B*T,) tokens that are not padding
            values = session.run(names, {"input_ids": input_ids, "attention_mask": mask})
            for name, value in zip(names, values, strict=True):
                flat = np.abs(value.reshape(-1, value.shape[-1]))  # (B*T, K)
                if flat.shape[0] == real.shape[0]:  # per token, not after pooling
                    flat = flat[real]
                peak = flat.max(axis=0).astype(np.float32)  # (K,)
                out[name] = np.maximum(out[name], peak) if name in out else peak
    return out


class _Names:
    """Names of the nodes and values of one quantized input, all under ``prefix``."""

    def __init__(self, prefix: str):
        self.prefix = prefix

    def __call__(self, suffix: str) -> str:
        return f"{self.prefix}/{suffix}"

    def node(self, op: str, inputs: list[str], output: str, **attrs: Any) -> Any:
        from onnx import helper

        return helper.make_node(op, inputs, [self(output)], name=self(op + "_" + output), **attrs)


class _Rewriter:
    """Replaces MatMul nodes by their per-token int8 form, in place, keeping the node order
    topological (an input's quantization goes right before its first reader).

    For an input x (..., K) read by MatMuls of weights W (K, N), with k outlier channels:

        rows    = Reshape(x, (M, K))                       M = all the tokens of the batch
        side_x  = Gather(rows, outliers)                   (M, k)   stays fp32
        inliers = rows * mask                              (M, K)   outlier channels zeroed
        low, high = min(inliers, 0), max(inliers, 0)       (M, 1)   per token
        scale   = (high - low) / 255,  zero = round(-low / scale)   per token
        codes   = QuantizeLinear(inliers, scale, zero, axis=0)      (M, K) uint8
        side    = [side_x, -scale * zero, 1]               (M, k + 2)

    and for each W, with Wq = int8 codes of W's inlier rows and per-column scales c (N,):

        y = MatMulIntegerToFloat(codes, Wq, 1, c) * scale + side @ [W[outliers]; colsum; b]

    where colsum (N,) is the column sums of Wq * c, so that ``-scale * zero * colsum`` undoes
    the zero point, and b is the bias of the Add that read the MatMul (folded in; the column
    of ones and b's row are left out when no MatMul of x has one). Every factor of a row comes
    from that row: nothing mixes tokens.
    """

    def __init__(self, model: Any, outlier_channels: int):
        self.model = model
        self.outlier_channels = outlier_channels
        self.weights = {t.name: t for t in model.graph.initializer}
        self.opset = next(
            (o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17
        )
        # first output of a replaced MatMul -> the nodes that replace it
        self.replacements: dict[str, list[Any]] = {}
        self.folded: set[str] = set()  # outputs of bias Adds folded into the fp32 side product
        self.initializers: list[Any] = []
        self.consumers: dict[str, list[Any]] = {}
        for node in model.graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self.graph_outputs = {o.name for o in model.graph.output}

    def constant(self, name: str, value: npt.ArrayLike) -> str:
        from onnx import numpy_helper

        self.initializers.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def quantize(
        self, input_name: str, nodes: list[Any], channel_max: npt.NDArray[np.float32]
    ) -> None:
        from onnx import numpy_helper

        prefix = f"{nodes[0].name or input_name}/int8"
        channels = int(channel_max.shape[0])
        count = min(self.outlier_channels, channels // 4)
        outliers = np.sort(np.argsort(channel_max)[channels - count :]).astype(np.int64)  # (k,)
        biases = [self._bias_of(node) for node in nodes]
        with_bias = any(b is not None for b in biases)
        head = self._quantize_input(prefix, input_name, outliers, channels, with_bias)
        for j, (node, bias) in enumerate(zip(nodes, biases, strict=True)):
            weight = numpy_helper.to_array(self.weights[node.input[1]]).astype(np.float32)
            output = node.output[0]
            bias_row = None
            if bias is not None:  # the Add's output comes straight from the int8 nodes
                add, bias_row = bias
                output = add.output[0]
                self.folded.add(output)
            elif with_bias:
                bias_row = np.zeros(weight.shape[1], dtype=np.float32)
            tail = self._int8_matmul(prefix, f"{prefix}/{j}", output, weight, outliers, bias_row)
            self.replacements[node.output[0]] = (head if j == 0 else []) + tail

    def _bias_of(self, node: Any) -> tuple[Any, npt.NDArray[np.float32]] | None:
        """The Add of a constant bias (N,) that alone reads this MatMul's output, if any."""
        from onnx import TensorProto, numpy_helper

        output = node.output[0]
        readers = self.consumers.get(output, [])
        if output in self.graph_outputs or len(readers) != 1 or readers[0].op_type != "Add":
            return None
        add = readers[0]
        others = [name for name in add.input if name != output]
        if len(add.input) != 2 or len(others) != 1 or others[0] not in self.weights:
            return None
        bias = self.weights[others[0]]
        columns = self.weights[node.input[1]].dims[1]
        if bias.data_type != TensorProto.FLOAT or list(bias.dims) != [columns]:
            return None
        return add, numpy_helper.to_array(bias).astype(np.float32)

    def _quantize_input(
        self,
        prefix: str,
        x: str,
        outliers: npt.NDArray[np.int64],
        channels: int,
        with_bias: bool,
    ) -> list[Any]:
        """The per-input nodes: ``{prefix}/codes`` (M, K) uint8, ``{prefix}/scale`` (M, 1),
        ``{prefix}/side`` (M, k + 1, or k + 2 with a column of ones for the biases) and
        ``{prefix}/lead`` (x's shape but its last axis)."""
        at = _Names(prefix)
        nodes = self._as_rows(at, x, channels)
        inliers, side = at("rows"), []
        if len(outliers):
            nodes += self._split_outliers(at, outliers, channels)
            inliers = at("inliers")
            side.append(at("outliers"))
        nodes += self._quantize_rows(at, inliers)
        side.append(at("offset"))
        if with_bias:
            nodes += self._ones_column(at)
            side.append(at("ones"))
        nodes.append(
            at.node("Concat", side, "side", axis=1)
            if len(side) > 1
            else at.node("Identity", side, "side")
        )
        return nodes

    def _as_rows(self, at: _Names, x: str, channels: int) -> list[Any]:
        """``rows``: x as (M, K); ``lead``: x's shape without its last axis (the output gets
        it back)."""
        return [
            at.node("Shape", [x], "shape"),
            at.node(
                "Slice",
                [
                    at("shape"),
                    self.constant(at("zero_index"), np.array([0])),
                    self.constant(at("last_index"), np.array([-1])),
                ],
                "lead",
            ),
            at.node(
                "Reshape", [x, self.constant(at("rows_shape"), np.array([-1, channels]))], "rows"
            ),
        ]

    def _split_outliers(
        self, at: _Names, outliers: npt.NDArray[np.int64], channels: int
    ) -> list[Any]:
        """``outliers``: the outlier channels, kept in fp32; ``inliers``: rows with them zeroed."""
        keep = np.ones(channels, dtype=np.float32)
        keep[outliers] = 0.0
        return [
            at.node(
                "Gather",
                [at("rows"), self.constant(at("outlier_index"), outliers)],
                "outliers",
                axis=1,
            ),
            at.node("Mul", [at("rows"), self.constant(at("inlier_mask"), keep)], "inliers"),
        ]

    def _quantize_rows(self, at: _Names, inliers: str) -> list[Any]:
        """``codes`` uint8 with one (scale, zero point) per row, and ``offset`` so that
        x ~ scale * code + offset."""
        from onnx import TensorProto

        zero = self.constant(at("0"), np.float32(0.0))
        return [
            self._reduce("ReduceMax", inliers, at("max")),
            self._reduce("ReduceMin", inliers, at("min")),
            at.node("Max", [at("max"), zero], "high"),  # 0 stays exact: zero point in 0..255
            at.node("Min", [at("min"), zero], "low"),
            at.node("Sub", [at("high"), at("low")], "range"),
            at.node(
                "Max",
                [at("range"), self.constant(at("min_range"), np.float32(_MIN_RANGE))],
                "range_nonzero",
            ),
            at.node(
                "Mul",
                [at("range_nonzero"), self.constant(at("inv255"), np.float32(1 / 255))],
                "scale",
            ),  # (M, 1)
            at.node("Div", [at("low"), at("scale")], "low_steps"),
            at.node("Neg", [at("low_steps")], "zero_steps"),
            at.node("Round", [at("zero_steps")], "zero_float"),
            at.node("Cast", [at("zero_float")], "zero_point_2d", to=TensorProto.UINT8),
            at.node(
                "Reshape",
                [at("zero_point_2d"), self.constant(at("flat"), np.array([-1]))],
                "zero_point",
            ),  # (M,)
            at.node("Reshape", [at("scale"), at("flat")], "scale_1d"),  # (M,)
            # Rounds half to even, saturates to 0..255, one (scale, zero) per row.
            at.node("QuantizeLinear", [inliers, at("scale_1d"), at("zero_point")], "codes", axis=0),
            at.node("Mul", [at("scale"), at("zero_float")], "offset_neg"),
            at.node("Neg", [at("offset_neg")], "offset"),
        ]

    def _ones_column(self, at: _Names) -> list[Any]:
        """``ones``: a (M, 1) column of ones, which meets the biases in the side MatMul."""
        return [
            at.node("Shape", [at("offset")], "column_shape"),
            at.node(
                "Expand", [self.constant(at("1"), np.float32(1.0)), at("column_shape")], "ones"
            ),
        ]

    def _int8_matmul(
        self,
        base: str,
        prefix: str,
        output: str,
        weight: npt.NDArray[np.float32],
        outliers: npt.NDArray[np.int64],
        bias: npt.NDArray[np.float32] | None,
    ) -> list[Any]:
        """The nodes of one MatMul (and its bias), writing ``output`` with x's leading axes."""
        from onnx import helper

        inlier_weight = weight.copy()  # (K, N)
        inlier_weight[outliers, :] = 0.0
        column_scale = (np.maximum(np.abs(inlier_weight).max(axis=0), _MIN_RANGE) / 127).astype(
            np.float32
        )  # (N,)
        codes = np.clip(np.round(inlier_weight / column_scale), -127, 127).astype(np.int8)
        # The offset of every inlier channel meets the column sums of the weights it meets.
        column_sums = (codes.astype(np.float64) * column_scale).sum(axis=0)  # (N,)
        rows = [weight[outliers, :], column_sums[None, :]]
        if bias is not None:
            rows.append(bias[None, :])
        side_weight = np.concatenate(rows).astype(np.float32)  # (k + 1 or k + 2, N)
        columns = int(weight.shape[1])

        def node(op: str, inputs: list[str], out: str, **attrs: Any) -> Any:
            return helper.make_node(op, inputs, [out], name=f"{out}/{op}", **attrs)

        return [
            # int32 product (exact) times 1 * column_scale, in one ORT kernel: the fastest
            # spelling on ORT's CPU kernels; MatMulInteger followed by Cast and Mul (or by
            # DequantizeLinear of int32 per axis) makes extra passes over the whole product.
            helper.make_node(
                "MatMulIntegerToFloat",
                [
                    f"{base}/codes",
                    self.constant(f"{prefix}/weight_codes", codes),
                    self.constant(f"{prefix}/unit_scale", np.float32(1.0)),
                    self.constant(f"{prefix}/column_scale", column_scale),
                ],
                [f"{prefix}/per_column"],
                name=f"{prefix}/MatMulIntegerToFloat",
                domain=_ORT_DOMAIN,
            ),  # (M, N)
            node("Mul", [f"{prefix}/per_column", f"{base}/scale"], f"{prefix}/int8_part"),
            node(
                "MatMul",
                [f"{base}/side", self.constant(f"{prefix}/side_weight", side_weight)],
                f"{prefix}/fp32_part",
            ),  # outliers, zero point and bias
            node("Add", [f"{prefix}/int8_part", f"{prefix}/fp32_part"], f"{prefix}/rows"),
            node(
                "Concat",
                [f"{base}/lead", self.constant(f"{prefix}/columns", np.array([columns]))],
                f"{prefix}/shape",
                axis=0,
            ),
            node("Reshape", [f"{prefix}/rows", f"{prefix}/shape"], output),
        ]

    def _reduce(self, op: str, x: str, out: str) -> Any:
        from onnx import helper

        if self.opset >= 18:  # axes became an input in opset 18
            axes = self.constant(f"{out}/axes", np.array([1], dtype=np.int64))
            return helper.make_node(op, [x, axes], [out], name=f"{out}/{op}", keepdims=1)
        return helper.make_node(op, [x], [out], name=f"{out}/{op}", axes=[1], keepdims=1)

    def finish(self) -> None:
        from onnx import helper

        graph = self.model.graph
        nodes = []
        for node in graph.node:
            if node.output[0] not in self.folded:
                nodes += self.replacements.get(node.output[0], [node])
        del graph.node[:]
        graph.node.extend(nodes)
        used = {name for node in graph.node for name in node.input}
        kept = [t for t in graph.initializer if t.name in used]
        del graph.initializer[:]
        graph.initializer.extend([*kept, *self.initializers])
        if not any(o.domain == _ORT_DOMAIN for o in self.model.opset_import):
            self.model.opset_import.append(helper.make_opsetid(_ORT_DOMAIN, 1))
