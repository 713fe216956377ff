"""Exported graphs -> one ``weights.bin`` that every graph of the engine references.

``consolidate`` reads each graph as the exporter (or a quantizer) wrote it: initializers inline or in
external-data files of any layout (above 2 GB torch writes one file per tensor). Every tensor of at
least ``INLINE_BYTES`` goes into ``weights.bin``, stored once per distinct content (sha256), so the
decoder weights shared by prefill/decode/think and a tied embedding (the head's ``W^T``) are written
once. The graph files are rewritten to point into it. One tensor is in memory at a time.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from pauserec.errors import ExportError
from pauserec.runtime.weights import ALIGN, WEIGHTS_FILE

INLINE_BYTES = 1024  # smaller tensors (shapes, scalars) stay in the graph file
# A streamed int8 / int4 export's fp32 graphs name their weights' values without holding them: the initializer is
# external in this (empty) file, its "offset" the index of a recipe of ``pauserec.export.stream.StreamedWeights``
# (a checkpoint tensor, rows, transposed). Only the quantizer (``TensorSource``) reads them, from the checkpoint.
LAZY_FILE = "checkpoint.stream"


def point_to(t, location: str, offset: int, length: int) -> None:
    """Make initializer ``t`` an external one whose bytes are ``location[offset : offset + length]``."""
    from onnx import TensorProto

    for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"):
        t.ClearField(field)
    del t.external_data[:]
    t.data_location = TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = t.external_data.add()
        entry.key, entry.value = k, v


def header(array: np.ndarray, name: str):
    """An initializer ``name`` with ``array``'s type and shape and no values (point it at them with ``point_to``).
    Never a TensorProto made with the values and then cleared: protobuf's upb backend keeps a message's bytes
    in its arena until the message itself is freed, so every cleared weight would stay resident."""
    from onnx import TensorProto, helper

    return TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype), dims=array.shape)


def is_lazy(t) -> bool:
    """``t``'s values are read from the checkpoint when quantised (see ``LAZY_FILE``)."""
    return any(e.key == "location" and e.value == LAZY_FILE for e in t.external_data)


def _tensor_bytes(t, base: Path) -> bytes:
    from onnx import TensorProto, numpy_helper

    if t.data_location == TensorProto.EXTERNAL:
        info = {e.key: e.value for e in t.external_data}
        if info["location"] == LAZY_FILE:
            raise ExportError(f"{t.name} is read from the checkpoint by the quantizer only (a streamed int8/int4 "
                              "export); report this as a pauserec bug")
        f = base / info["location"]
        offset = int(info.get("offset", 0))
        length = int(info["length"]) if "length" in info else f.stat().st_size - offset
        with open(f, "rb") as fh:
            fh.seek(offset)
            data = fh.read(length)
        if len(data) != length:
            raise ExportError(f"external data of {t.name!r} in {f} is truncated; export again")
        return data
    if t.HasField("raw_data"):
        return t.raw_data
    return numpy_helper.to_array(t).tobytes()


def _inline_attribute_tensors(graph, base: Path) -> None:
    """Constant-node tensors that a saver put in external data (the quantizers do) go back inline."""
    from onnx import AttributeProto, TensorProto

    for node in graph.node:
        for attr in node.attribute:
            tensors = [attr.t] if attr.type == AttributeProto.TENSOR else list(attr.tensors)
            for t in tensors:
                if t.data_location == TensorProto.EXTERNAL:
                    data = _tensor_bytes(t, base)
                    del t.external_data[:]
                    t.data_location = TensorProto.DEFAULT
                    t.raw_data = data
            if attr.type == AttributeProto.GRAPH:
                _inline_attribute_tensors(attr.g, base)


def consolidate(graphs: dict[str, Path], out_dir: Path) -> dict[str, Path]:
    """Write ``out_dir/weights.bin`` and each graph (same file name) pointing into it; returns the graph files.
    Tensors read from the checkpoint later (``LAZY_FILE``) keep their references."""
    import onnx
    from onnx import TensorProto

    out_dir.mkdir(parents=True, exist_ok=True)
    seen: dict[str, tuple[int, int]] = {}  # sha256 -> (offset, length)
    written: dict[str, Path] = {}
    with open(out_dir / WEIGHTS_FILE, "wb") as w:
        for name, src in graphs.items():
            model = onnx.load(str(src), load_external_data=False)
            for t in model.graph.initializer:
                if is_lazy(t):
                    (out_dir / LAZY_FILE).touch()
                    continue
                data = _tensor_bytes(t, src.parent)
                if len(data) < INLINE_BYTES:
                    if t.data_location == TensorProto.EXTERNAL:  # bring a small external tensor inline
                        del t.external_data[:]
                        t.data_location = TensorProto.DEFAULT
                        t.raw_data = data
                    continue
                key = hashlib.sha256(data).hexdigest()
                if key not in seen:
                    pad = -w.tell() % ALIGN
                    w.write(b"\0" * pad)
                    seen[key] = (w.tell(), len(data))
                    w.write(data)
                point_to(t, WEIGHTS_FILE, *seen[key])
                del data
            _inline_attribute_tensors(model.graph, src.parent)
            dst = out_dir / src.name
            onnx.save(model, str(dst))
            written[name] = dst
        w.flush()
        os.fsync(w.fileno())
    return written
