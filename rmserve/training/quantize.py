"""The int8 variant: per-token int8 whose scores do not depend on the batch (issue 16).

``onnxruntime.quantization.quantize_dynamic`` (the int8 variant before this module) quantizes
each MatMul's input with *one* scale for the whole batch, so an item's score moved with its
neighbours: over 96 real dev texts of the default MiniLM recipe, by up to 0.29 between scoring
alone and in batches of 8, and its decisions agreed with fp32 on 92.9% of the 240 dev pairs.

Here every row (token) of a MatMul's input gets its own scale, from that row alone:

- weights: int8, symmetric, one scale per output column (per channel);
- activations: uint8, asymmetric, one (min, max) per token, computed in the graph at run time;
  ``MatMulInteger`` then accumulates in int32, which is exact whatever the batch shape;
- outlier channels: the ``outlier_channels`` input channels of largest magnitude on the
  calibration texts stay in fp32 (a small fp32 MatMul beside the int8 one), so that they do
  not set every token's scale (LLM.int8()'s decomposition, with the channels fixed at export).
  BERT-style encoders carry a few channels 10-15x larger than the rest (MiniLM: up to 30 against
  a median of 2 after some LayerNorms).

Nothing in a row's score depends on another row, so an item scores the same alone or in any
batch, bit for bit, as far as the fp32 operators around the MatMuls do (they do on ORT's CPU
kernels: tests/training/test_quantize.py pins both). Calibration only chooses *which* channels
stay in fp32; the scales are not calibrated, so a calibration set that misses some inputs
costs a little accuracy, never a clipped activation.

Measured on the default recipe (minilm-hh, 240 dev pairs, benchmarks/int8.py, results in
benchmarks/results/cpu/int8.json): decisions agree with fp32 on 99.2-100% of the pairs over
seven calibration samples of 32-128 training texts (dynamic int8: 92.9%; per-token without
outlier channels: 97.1%; static QDQ with calibrated scales: 85%), RMS score error 0.009-0.011
(dynamic: 0.054). Attention's activation-by-activation MatMuls, softmax, LayerNorm, GELU, the
embeddings and the pooler/classifier ``Gemm`` stay in fp32.

Only ``MatMul`` nodes whose second input is a 2-D float32 initializer are rewritten; each
input tensor is quantized once for all the MatMuls that read it (query, key and value share
theirs). The rewrite needs the fp32 graph in memory (as ``quantize_dynamic`` did).
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from rmserve.training.onnx_files import save_model
from rmserve.training.scoring import pad_batch

if TYPE_CHECKING:
    import numpy.typing as npt

__all__ = ["OUTLIER_CHANNELS", "Int8Summary", "QuantizationError", "quantize_int8"]

# Input channels kept in fp32 per quantized MatMul input. Measured on the default MiniLM
# (benchmarks/int8.py): 0 -> 97.1% agreement with fp32, 8 -> 99.2-99.6%, 16 -> 99.6-100%,
# at a speed cost of a few percent.
OUTLIER_CHANNELS = 16

# A row whose values are all equal still gets a nonzero scale.
_MIN_RANGE = 1e-12


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

    # The probe is the fp32 graph with the MatMul inputs as extra outputs, saved beside src
    # so that an external .data file (a model past 2 GB) resolves as it does for src.
    probe = onnx.load(str(src), load_external_data=False)
    for name in names:
        probe.graph.output.append(
            onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
        )
    out: dict[str, npt.NDArray[np.float32]] = {}
    with tempfile.TemporaryDirectory(dir=src.parent, prefix=".int8-probe-") as tmp:
        path = Path(tmp) / src.name
        onnx.save(probe, str(path))
        _relink_external_data(path, src)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        order = sorted(rows, key=len)  # little padding
        for start in range(0, len(order), batch_size):
            input_ids, mask = pad_batch(order[start : start + batch_size], pad_token_id)
            real = mask.reshape(-1) == 1  # (B*T,) tokens that are not padding
            values = session.run(names, {"input_ids": input_ids, "attention_mask": mask})
            for name, value in zip(names, values, strict=True):
                flat = np.abs(value.reshape(-1, value.shape[-1]))  # (B*T, K)
                if flat.shape[0] == real.shape[0]:
                    flat = flat[real]
                peak = flat.max(axis=0).astype(np.float32)  # (K,)
                out[name] = np.maximum(out[name], peak) if name in out else peak
    return out


def _relink_external_data(probe: Path, src: Path) -> None:
    """Point the probe's external tensors at src's folder (the probe lives one level down)."""
    import onnx
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    model = onnx.load(str(probe), load_external_data=False)
    changed = False
    for tensor in _get_all_tensors(model):
        if uses_external_data(tensor):
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = str(src.parent.resolve() / entry.value)
                    changed = True
    if changed:
        onnx.save(model, str(probe))


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
        side    = [side_x, -scale * zero]                  (M, k + 1)

    and for each W, with Wq = int8 codes of W's inlier rows and per-column scales c (N,):

        y = float(MatMulInteger(codes, Wq)) * c * scale + side @ [W[outliers]; colsum]

    where colsum (N,) is the column sums of Wq * c, so that ``-scale * zero * colsum`` undoes
    the zero point. Every factor of a row comes from that row: nothing mixes tokens.
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
        self.initializers: list[Any] = []

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
        head = self._quantize_input(prefix, input_name, outliers, channels)
        for j, node in enumerate(nodes):
            weight = numpy_helper.to_array(self.weights[node.input[1]]).astype(np.float32)
            tail = self._int8_matmul(prefix, f"{prefix}/{j}", node.output[0], weight, outliers)
            self.replacements[node.output[0]] = (head if j == 0 else []) + tail

    def _quantize_input(
        self, prefix: str, x: str, outliers: npt.NDArray[np.int64], channels: int
    ) -> list[Any]:
        """The per-input nodes: ``{prefix}/codes`` (M, K) uint8, ``{prefix}/scale`` (M, 1),
        ``{prefix}/side`` (M, k + 1) and ``{prefix}/lead`` (x's shape but its last axis)."""
        from onnx import TensorProto, helper

        def name(suffix: str) -> str:
            return f"{prefix}/{suffix}"

        def node(op: str, inputs: list[str], output: str, **attrs: Any) -> Any:
            return helper.make_node(
                op, inputs, [name(output)], name=name(op + "_" + output), **attrs
            )

        nodes = [
            node("Shape", [x], "shape"),
            node(
                "Slice",
                [
                    name("shape"),
                    self.constant(name("zero_index"), np.array([0])),
                    self.constant(name("last_index"), np.array([-1])),
                ],
                "lead",
            ),  # x's shape without its last axis: the output gets it back
            node(
                "Reshape", [x, self.constant(name("rows_shape"), np.array([-1, channels]))], "rows"
            ),
        ]
        inliers = name("rows")
        side = []
        if len(outliers):
            keep = np.ones(channels, dtype=np.float32)
            keep[outliers] = 0.0
            nodes += [
                node(
                    "Gather",
                    [name("rows"), self.constant(name("outlier_index"), outliers)],
                    "outliers",
                    axis=1,
                ),
                node("Mul", [name("rows"), self.constant(name("inlier_mask"), keep)], "inliers"),
            ]
            inliers = name("inliers")
            side.append(name("outliers"))
        zero = self.constant(name("0"), np.float32(0.0))
        nodes += [
            self._reduce("ReduceMax", inliers, name("max")),
            self._reduce("ReduceMin", inliers, name("min")),
            node("Max", [name("max"), zero], "high"),  # 0 stays exact: zero point in 0..255
            node("Min", [name("min"), zero], "low"),
            node("Sub", [name("high"), name("low")], "range"),
            node(
                "Max",
                [name("range"), self.constant(name("min_range"), np.float32(_MIN_RANGE))],
                "range_nonzero",
            ),
            node(
                "Mul",
                [name("range_nonzero"), self.constant(name("inv255"), np.float32(1 / 255))],
                "scale",
            ),  # (M, 1)
            node("Div", [name("low"), name("scale")], "low_steps"),
            node("Neg", [name("low_steps")], "zero_steps"),
            node("Round", [name("zero_steps")], "zero_float"),
            node("Cast", [name("zero_float")], "zero_point_2d", to=TensorProto.UINT8),
            node(
                "Reshape",
                [name("zero_point_2d"), self.constant(name("flat"), np.array([-1]))],
                "zero_point",
            ),  # (M,)
            node("Reshape", [name("scale"), name("flat")], "scale_1d"),  # (M,)
            # Rounds half to even, saturates to 0..255, one (scale, zero) per row.
            node(
                "QuantizeLinear", [inliers, name("scale_1d"), name("zero_point")], "codes", axis=0
            ),
            node("Mul", [name("scale"), name("zero_float")], "offset_neg"),
            node("Neg", [name("offset_neg")], "offset"),  # x ~ scale * code + offset
        ]
        side.append(name("offset"))
        nodes.append(
            node("Concat", side, "side", axis=1)
            if len(side) > 1
            else node("Identity", side, "side")
        )
        return nodes

    def _int8_matmul(
        self,
        base: str,
        prefix: str,
        output: str,
        weight: npt.NDArray[np.float32],
        outliers: npt.NDArray[np.int64],
    ) -> list[Any]:
        """The nodes of one MatMul, writing ``output`` with x's leading axes."""
        from onnx import TensorProto, helper

        inlier_weight = weight.copy()  # (K, N)
        inlier_weight[outliers, :] = 0.0
        column_scale = (np.maximum(np.abs(inlier_weight).max(axis=0), _MIN_RANGE) / 127).astype(
            np.float32
        )  # (N,)
        codes = np.clip(np.round(inlier_weight / column_scale), -127, 127).astype(np.int8)
        # The offset of every inlier channel meets the column sums of the weights it meets.
        column_sums = (codes.astype(np.float64) * column_scale).sum(axis=0)  # (N,)
        side_weight = np.concatenate([weight[outliers, :], column_sums[None, :]])  # (k + 1, N)
        columns = int(weight.shape[1])

        def node(op: str, inputs: list[str], out: str, **attrs: Any) -> Any:
            return helper.make_node(op, inputs, [out], name=f"{out}/{op}", **attrs)

        return [
            node(
                "MatMulInteger",
                [f"{base}/codes", self.constant(f"{prefix}/weight_codes", codes)],
                f"{prefix}/int32",
            ),  # (M, N), exact
            # Cast and two Muls: ORT's DequantizeLinear of int32 per axis measured 4x slower.
            node("Cast", [f"{prefix}/int32"], f"{prefix}/float", to=TensorProto.FLOAT),
            node(
                "Mul",
                [f"{prefix}/float", self.constant(f"{prefix}/column_scale", column_scale)],
                f"{prefix}/per_column",
            ),
            node("Mul", [f"{prefix}/per_column", f"{base}/scale"], f"{prefix}/int8_part"),
            node(
                "MatMul",
                [
                    f"{base}/side",
                    self.constant(f"{prefix}/side_weight", side_weight.astype(np.float32)),
                ],
                f"{prefix}/fp32_part",
            ),
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
        graph = self.model.graph
        nodes = []
        for node in graph.node:
            nodes += self.replacements.get(node.output[0], [node])
        del graph.node[:]
        graph.node.extend(nodes)
        used = {name for node in graph.node for name in node.input}
        kept = [t for t in graph.initializer if t.name in used]
        del graph.initializer[:]
        graph.initializer.extend([*kept, *self.initializers])
