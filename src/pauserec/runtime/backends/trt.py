"""TensorRT backend: ``.plan`` files run through the ``tensorrt`` Python API and ``cuda-python``.

Feeds are copied host -> device per call and every output comes back to the host (the plans are
static, so device buffers are allocated once per tensor and reused).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pauserec.errors import BackendUnavailable, EngineError
from pauserec.runtime.session import check_declared
from pauserec.runtime.spec import GraphSpec

TRT_HELP = ("install TensorRT from NVIDIA's index (pip install --extra-index-url https://pypi.nvidia.com "
            "tensorrt-cu12) and cuda-python (pip install cuda-python) on a machine with a CUDA GPU")


def _cudart():
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        from cuda import cudart  # older cuda-python
    return cudart


def unavailable_reason() -> str | None:
    """None when TensorRT, cuda-python and a CUDA GPU are all usable; else what is missing."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return f"the tensorrt Python package is not installed: {TRT_HELP}"
    try:
        cudart = _cudart()
    except ImportError:
        return f"cuda-python is not installed: {TRT_HELP}"
    try:
        err, count = cudart.cudaGetDeviceCount()
    except Exception as e:  # no driver: cuda-python raises on the call
        return f"no CUDA driver ({e}): the TensorRT backend needs a CUDA GPU"
    if int(err) != 0 or count < 1:
        return "no CUDA GPU found: the TensorRT backend needs one (or use provider='cpu')"
    return None


def _check(ret, what: str):
    err = ret[0] if isinstance(ret, tuple) else ret
    if int(err) != 0:
        raise EngineError(f"CUDA call {what} failed with error {int(err)}")
    return ret[1] if isinstance(ret, tuple) and len(ret) == 2 else None


class TrtSession:
    """One graph's TensorRT plan."""

    def __init__(self, path: Path, io: GraphSpec) -> None:
        reason = unavailable_reason()
        if reason:
            raise BackendUnavailable(reason)
        import tensorrt as trt

        self.io, self.trt, self.cudart = io, trt, _cudart()
        self.logger = trt.Logger(trt.Logger.WARNING)
        engine = trt.Runtime(self.logger).deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise EngineError(f"TensorRT cannot deserialize {path.name} (built for another GPU or TensorRT version?); "
                              "rebuild it with pauserec-export --backend tensorrt on this machine")
        self.engine, self.context = engine, engine.create_execution_context()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        is_in = {n: engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.np_types = {n: np.dtype(trt.nptype(engine.get_tensor_dtype(n))) for n in names}
        check_declared(io, [(n, None, None) for n in names if is_in[n]], [(n, None, None) for n in names if not is_in[n]],
                       path.name)
        self.stream = _check(self.cudart.cudaStreamCreate(), "cudaStreamCreate")
        self.buffers: dict[str, tuple[int, int]] = {}  # name -> (device pointer, bytes)

    def _buffer(self, name: str, nbytes: int) -> int:
        ptr, size = self.buffers.get(name, (0, 0))
        if size < nbytes:
            if ptr:
                _check(self.cudart.cudaFree(ptr), "cudaFree")
            ptr = _check(self.cudart.cudaMalloc(max(nbytes, 1)), "cudaMalloc")
            self.buffers[name] = (ptr, nbytes)
        return ptr

    def run(self, feeds: dict[str, Any], keep: tuple[str, ...] = ()) -> dict[str, Any]:
        cudart, h2d, d2h = self.cudart, self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        for name in self.io.input_names:
            arr = np.asarray(feeds[name], dtype=self.np_types[name], order="C")  # 0-d stays 0-d
            self.context.set_input_shape(name, arr.shape)
            ptr = self._buffer(name, arr.nbytes)
            _check(cudart.cudaMemcpyAsync(ptr, arr.ctypes.data, arr.nbytes, h2d, self.stream), "cudaMemcpyAsync")
            self.context.set_tensor_address(name, ptr)
        outs = {}
        for name in self.io.output_names:
            shape = tuple(self.context.get_tensor_shape(name))
            outs[name] = np.empty(shape, dtype=self.np_types[name])
            self.context.set_tensor_address(name, self._buffer(name, outs[name].nbytes))
        if not self.context.execute_async_v3(self.stream):
            raise EngineError("TensorRT execution failed; see the TensorRT log above")
        for name, arr in outs.items():
            ptr = self.buffers[name][0]
            _check(cudart.cudaMemcpyAsync(arr.ctypes.data, ptr, arr.nbytes, d2h, self.stream), "cudaMemcpyAsync")
        _check(cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
        return outs

    def to_numpy(self, value: Any) -> np.ndarray:
        return np.asarray(value)

    def __del__(self) -> None:
        for ptr, _ in getattr(self, "buffers", {}).values():
            try:
                self.cudart.cudaFree(ptr)
            except Exception:
                pass
