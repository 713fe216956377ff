"""TensorRT backend: ``.plan`` files run through the ``tensorrt`` Python API and ``cuda-python``.

Host feeds are copied to per-tensor device buffers (allocated once per tensor and reused); feeds
that are already on the device (``TrtTensor``, ``DeviceArray``, ORT CUDA OrtValues, any
``__cuda_array_interface__``) are bound by address. Outputs named in ``keep`` stay on the device as
a :class:`TrtTensor` that owns its buffer (the context KV, and with device steps (``CudaOps``) log-probs
and new KV slots); every other output comes back to the host. Loading checks each plan's tensor
names, dtypes and fixed dims against the manifest.
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


def plan_io(engine, trt) -> tuple[list[tuple[str, str, tuple]], list[tuple[str, str, tuple]]]:
    """(inputs, outputs) of a deserialized plan as (name, numpy dtype name, dims) in tensor order."""
    ins, outs = [], []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(name))).name
        dims = tuple(int(d) for d in engine.get_tensor_shape(name))
        (ins if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else outs).append((name, dtype, dims))
    return ins, outs


def check_plan(engine, trt, io: GraphSpec, where: str) -> None:
    """EngineError unless the plan's tensor names, dtypes and fixed dims are the manifest's."""
    ins, outs = plan_io(engine, trt)
    check_declared(io, ins, outs, where)


class TrtTensor:
    """A device buffer a TensorRT output was written to, kept on the GPU; freed with the object."""

    def __init__(self, cudart, ptr: int, shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.cudart, self.ptr, self.shape, self.dtype = cudart, int(ptr), tuple(shape), np.dtype(dtype)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    @property
    def __cuda_array_interface__(self) -> dict:
        return {"shape": self.shape, "typestr": self.dtype.str, "data": (self.ptr, False), "strides": None,
                "version": 3}

    def to_numpy(self) -> np.ndarray:
        out = np.empty(self.shape, self.dtype)
        d2h = self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        _check(self.cudart.cudaMemcpy(out.ctypes.data, self.ptr, out.nbytes, d2h), "cudaMemcpy")
        return out

    def __del__(self) -> None:
        try:
            self.cudart.cudaFree(self.ptr)
        except Exception:
            pass


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
        self.np_types = {n: np.dtype(trt.nptype(engine.get_tensor_dtype(n))) for n in names}
        check_plan(engine, trt, io, path.name)
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

    def _bind_input(self, name: str, value) -> None:
        from pauserec.runtime.device import device_view

        view = None if isinstance(value, np.ndarray) else device_view(value)
        if view is not None:  # already on the device: bound by address, no copy
            if view.dtype != self.np_types[name]:
                raise EngineError(f"{self.io.name}.{name} takes {self.np_types[name].name}, got a device "
                                  f"{view.dtype.name} tensor; the engine's graphs disagree with each other: re-export it")
            self.context.set_input_shape(name, view.shape)
            self.context.set_tensor_address(name, view.ptr)
            return
        arr = np.asarray(value, dtype=self.np_types[name], order="C")  # 0-d stays 0-d
        self.context.set_input_shape(name, arr.shape)
        ptr = self._buffer(name, arr.nbytes)
        h2d = self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        _check(self.cudart.cudaMemcpyAsync(ptr, arr.ctypes.data, arr.nbytes, h2d, self.stream), "cudaMemcpyAsync")
        self.context.set_tensor_address(name, ptr)

    def run(self, feeds: dict[str, Any], keep: tuple[str, ...] = ()) -> dict[str, Any]:
        cudart = self.cudart
        for name in self.io.input_names:
            self._bind_input(name, feeds[name])
        outs: dict[str, Any] = {}
        for name in self.io.output_names:
            shape, dtype = tuple(self.context.get_tensor_shape(name)), self.np_types[name]
            if name in keep:  # a buffer of its own, owned by the returned tensor
                nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
                outs[name] = TrtTensor(cudart, _check(cudart.cudaMalloc(max(nbytes, 1)), "cudaMalloc"), shape, dtype)
                self.context.set_tensor_address(name, outs[name].ptr)
            else:
                outs[name] = np.empty(shape, dtype=dtype)
                self.context.set_tensor_address(name, self._buffer(name, outs[name].nbytes))
        if not self.context.execute_async_v3(self.stream):
            raise EngineError("TensorRT execution failed; see the TensorRT log above")
        d2h = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        for name, arr in outs.items():
            if isinstance(arr, np.ndarray):
                ptr = self.buffers[name][0]
                _check(cudart.cudaMemcpyAsync(arr.ctypes.data, ptr, arr.nbytes, d2h, self.stream), "cudaMemcpyAsync")
        _check(cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
        return outs

    def to_numpy(self, value: Any) -> np.ndarray:
        from pauserec.runtime.device import download

        return download(value)

    def __del__(self) -> None:
        for ptr, _ in getattr(self, "buffers", {}).values():
            try:
                self.cudart.cudaFree(ptr)
            except Exception:
                pass
