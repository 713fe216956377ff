"""One weights file per engine, shared by every graph on disk and in memory (no torch).

The graphs of an engine (prefill, decode, think) use the same decoder weights. Export stores each
distinct tensor once in ``weights.bin`` (64-byte aligned) and every graph's initializers point into
it with ONNX external-data references (location, offset, length). At load the runtime maps the file
read-only and hands ONNX Runtime one ``OrtValue`` per distinct tensor, shared by all sessions
(``SessionOptions.add_initializer``), so an engine costs one copy of its weights however many graphs
it has. Small tensors (shapes, scalars) stay inside the graph files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pauserec.errors import EngineError

WEIGHTS_FILE = "weights.bin"
ALIGN = 64
NUMPY_FOREIGN = (16,)  # TensorProto.BFLOAT16: a 2-byte type numpy lacks; its values are handed over as uint16 bytes


@dataclass(frozen=True)
class ExternalTensor:
    name: str
    dtype: np.dtype
    dims: tuple[int, ...]
    offset: int
    length: int
    onnx_type: int = 1  # TensorProto data type (bf16 engines: BFLOAT16, which numpy has no type of its own for)


def external_tensors(model) -> list[ExternalTensor]:
    """The initializers of an ``onnx.ModelProto`` whose data lives in ``weights.bin``."""
    from onnx import TensorProto
    from onnx.helper import tensor_dtype_to_np_dtype

    out = []
    for t in model.graph.initializer:
        if t.data_location != TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in t.external_data}
        if info.get("location") != WEIGHTS_FILE:
            raise EngineError(f"initializer {t.name!r} points to {info.get('location')!r}, not {WEIGHTS_FILE}; "
                              "the engine was not written by this pauserec: re-export it")
        out.append(ExternalTensor(t.name, np.dtype(tensor_dtype_to_np_dtype(t.data_type)), tuple(t.dims),
                                  int(info.get("offset", 0)), int(info["length"]), t.data_type))
    return out


class WeightStore:
    """``weights.bin`` mapped read-only; one array (and OrtValue) per distinct (offset, dtype, dims)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise EngineError(f"{self.path} is missing; re-export the engine with pauserec-export")
        size = self.path.stat().st_size
        self.data = np.memmap(self.path, dtype=np.uint8, mode="r") if size else np.zeros(0, np.uint8)
        self._values: dict[tuple, object] = {}

    @property
    def nbytes(self) -> int:
        return int(self.data.size)

    def array(self, t: ExternalTensor) -> np.ndarray:
        end = t.offset + t.length
        if end > self.data.size or t.length != int(np.prod(t.dims, dtype=np.int64)) * t.dtype.itemsize:
            raise EngineError(f"{self.path}: tensor {t.name!r} does not fit the file (offset {t.offset}, "
                              f"length {t.length}); the engine is truncated or corrupt: re-export it")
        return self.data[t.offset : end].view(t.dtype).reshape(t.dims)

    def ortvalue(self, t: ExternalTensor, device: str = "cpu"):
        """One OrtValue per tensor and device, reused by every graph that names it: on the CPU over the mapped
        bytes (no copy); on "cuda" one device copy (ONNX Runtime uses a supplied initializer only where it
        planned it, and copies a CPU one into every CUDA session otherwise)."""
        import onnxruntime as ort

        key = (t.offset, t.onnx_type, t.dims, device)
        if key not in self._values:
            array = self.array(t)
            if t.onnx_type in NUMPY_FOREIGN:  # over the same bytes, typed as ONNX names them
                value = ort.OrtValue.ortvalue_from_numpy_with_onnx_type(array.view(np.uint16), t.onnx_type)
            elif device == "cpu":
                value = ort.OrtValue.ortvalue_from_numpy(array)
            else:
                value = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), device, 0)
            self._values[key] = value
        return self._values[key]

    def add_to(self, opts, graph_file: Path, device: str = "cpu") -> int:
        """Register every external initializer of ``graph_file`` on ``opts`` (as ``device`` values); returns how many."""
        import onnx

        try:
            model = onnx.load(str(graph_file), load_external_data=False)
        except Exception as e:  # protobuf / onnx raise several types
            raise EngineError(f"{graph_file} is not a readable ONNX file ({e}); re-export the engine") from e
        # (a bfloat16 tensor goes to a GPU session as ONNX Runtime reads it from the file: the Python API makes
        # such values on the CPU only)
        tensors = [t for t in external_tensors(model) if device == "cpu" or t.onnx_type not in NUMPY_FOREIGN]
        for t in tensors:
            opts.add_initializer(t.name, self.ortvalue(t, device))
        return len(tensors)
