"""ONNX files past protobuf's 2 GB limit: the weights as one external data file in the bundle.

A 7-8B reward model is 14-32 GB of weights; one protobuf message cannot hold more than 2 GB,
so ONNX stores such tensors as *external data*: the ``.onnx`` file keeps the graph and, for
each large tensor, a file name, an offset and a length. torch's TorchScript exporter writes
one file per tensor, named after the tensor, next to the model. A bundle instead keeps exactly
one data file per model, ``<model file>.data`` (``model.onnx.data``), which
:func:`gather_external_data` writes by streaming the exporter's files one after the other
(no second copy of the weights in memory), and which the manifest hashes like every file.

Two graphs of one model in a bundle (the plain and the packed graph of a decoder) hold the
same weights: :func:`share_weights` moves the first one's weights to its data file, whatever
its size, and points the second one's identical tensors (same type, shape and bytes; the
exporters name them differently) at the same bytes, so the bundle stores them once.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

__all__ = ["PROTOBUF_LIMIT", "data_file", "gather_external_data", "save_model", "share_weights"]

# Protobuf refuses messages of 2 GiB; stay clear of it (the graph itself takes some room).
PROTOBUF_LIMIT = 2**31 - 2**26
_ALIGNMENT = 4096  # offsets aligned to pages, so onnxruntime can map the file


def data_file(model_path: Path) -> Path:
    """Where the external data of ``model_path`` lives in a bundle."""
    return model_path.with_name(model_path.name + ".data")


def _external_tensors(model: Any) -> list[Any]:
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    return [t for t in _get_all_tensors(model) if uses_external_data(t)]


def gather_external_data(src: Path, dst: Path) -> None:
    """Move the ONNX model ``src`` (with whatever external files its exporter wrote beside
    it) to ``dst``, its external tensors gathered into the single file :func:`data_file`."""
    import onnx

    model = onnx.load(str(src), load_external_data=False)
    tensors = _external_tensors(model)
    if not tensors:
        shutil.move(str(src), str(dst))
        return
    offset = 0
    with open(data_file(dst), "wb") as out:
        for tensor in tensors:
            info = {entry.key: entry.value for entry in tensor.external_data}
            length = _copy_segment(src.parent / info["location"], info, out)
            _point_to(tensor, data_file(dst).name, offset, length)
            offset += length
            padding = -offset % _ALIGNMENT
            out.write(b"\0" * padding)
            offset += padding
    onnx.save(model, str(dst))


def _point_to(tensor: Any, location: str, offset: int, length: int) -> None:
    """Rewrite a tensor's external-data entry (its bytes are not in memory)."""
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", offset), ("length", length)):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, str(value)


def _copy_segment(path: Path, info: dict[str, str], out: Any) -> int:
    """Append the tensor's bytes (all of ``path``, or its offset/length) to ``out``."""
    start = int(info.get("offset", 0))
    length = int(info["length"]) if "length" in info else path.stat().st_size - start
    with open(path, "rb") as src:
        src.seek(start)
        remaining = length
        while remaining:
            chunk = src.read(min(remaining, 1 << 24))
            if not chunk:
                raise OSError(f"{path} ends before the {length} bytes the ONNX graph says")
            out.write(chunk)
            remaining -= len(chunk)
    return length


def save_model(model: Any, dst: Path) -> None:
    """Save an in-memory ONNX model; past the protobuf limit its weights go to one data file."""
    import onnx

    if model.ByteSize() < PROTOBUF_LIMIT:
        onnx.save(model, str(dst))
        return
    onnx.save_model(
        model,
        str(dst),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=data_file(dst).name,
        size_threshold=1024,
    )


def _tensor_key(data_type: int, dims: Any, payload: bytes) -> tuple[int, tuple[int, ...], str]:
    import hashlib

    return data_type, tuple(int(d) for d in dims), hashlib.sha256(payload).hexdigest()


def _externalize(path: Path, min_bytes: int) -> Any:
    """``path`` with every tensor of ``min_bytes`` or more in :func:`data_file`; the graph
    (without its weights' bytes) is returned."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    if not _external_tensors(model):
        onnx.save_model(
            onnx.load(str(path)),
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=data_file(path).name,
            size_threshold=min_bytes,
        )
        model = onnx.load(str(path), load_external_data=False)
    return model


def share_weights(primary: Path, secondary: Path, min_bytes: int = 1024) -> int:
    """Store ``primary``'s weights in its data file and make ``secondary``'s identical
    initializers read them from there (both files in one folder); bytes no longer stored
    twice. ``secondary``'s own data file, if it had one, is removed when nothing is left in
    it; tensors without a twin stay in ``secondary``."""
    import onnx

    index: dict[tuple[int, tuple[int, ...], str], tuple[str, int, int]] = {}
    for tensor in _external_tensors(_externalize(primary, min_bytes)):
        info = {entry.key: entry.value for entry in tensor.external_data}
        offset, length = int(info.get("offset", 0)), int(info["length"])
        with open(primary.parent / info["location"], "rb") as f:
            f.seek(offset)
            payload = f.read(length)
        index[_tensor_key(tensor.data_type, tensor.dims, payload)] = (
            info["location"],
            offset,
            length,
        )
    model = onnx.load(str(secondary))  # its weights in memory
    shared = 0
    for tensor in model.graph.initializer:
        if not tensor.HasField("raw_data") or len(tensor.raw_data) < min_bytes:
            continue
        twin = index.get(_tensor_key(tensor.data_type, tensor.dims, tensor.raw_data))
        if twin is None:
            continue
        tensor.ClearField("raw_data")
        tensor.data_location = onnx.TensorProto.EXTERNAL
        _point_to(tensor, *twin)
        shared += twin[2]
    data_file(secondary).unlink(missing_ok=True)
    save_model(model, secondary)
    return shared
