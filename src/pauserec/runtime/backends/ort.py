"""ONNX Runtime backend: CPU, or CUDA with IO binding.

CPU sessions run plain ``session.run`` on host arrays. CUDA sessions always use IO binding: feeds
that are device values (OrtValues on "cuda", ``DeviceArray``, any ``__cuda_array_interface__``) are
bound in place, host arrays are copied in, and the outputs named in ``keep`` stay on the GPU as
OrtValues (the context KV always; with device steps (``CudaOps``) also log-probs and the new KV slots).
A CUDA session whose ``get_providers()`` does not start with CUDAExecutionProvider is refused:
onnxruntime-gpu falls back to the CPU silently otherwise.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pauserec.errors import BackendUnavailable, EngineError
from pauserec.runtime.session import check_declared
from pauserec.runtime.spec import GraphSpec

ORT_DTYPES = {"tensor(int64)": "int64", "tensor(float)": "float32", "tensor(float16)": "float16"}
CUDA_HELP = ("install the GPU build of ONNX Runtime (pip uninstall onnxruntime && pip install onnxruntime-gpu) "
             "on a machine with an NVIDIA GPU and driver, or use provider='cpu'")


def session_options(threads: int | None, prepack: bool = False):
    """Options for small machines: no busy-waiting intra-op threads, a fixed thread count when given.

    ``prepack=False`` keeps ONNX Runtime from re-laying each MatMul weight into a private buffer per
    session: the sessions then compute straight from the one shared, mapped copy of the weights.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if not prepack:
        opts.add_session_config_entry("session.disable_prepacking", "1")
    opts.inter_op_num_threads = 1
    if threads:
        opts.intra_op_num_threads = int(threads)
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return opts


def cuda_unavailable_reason() -> str | None:
    """None when ONNX Runtime offers the CUDA provider, else what to install."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return f"onnxruntime {ort.__version__} has no CUDAExecutionProvider: {CUDA_HELP}"
    return None


class OrtSession:
    """One graph on ONNX Runtime; ``device`` is "cpu" or "cuda"."""

    def __init__(self, path: Path, io: GraphSpec, device: str, threads: int | None, weights=None,
                 prepack: bool = False) -> None:
        """``weights``: the engine's ``WeightStore``; its tensors are shared with the other graphs' sessions."""
        import onnxruntime as ort

        self.io, self.device, self.weights = io, device, weights  # the mapped weights outlive the session
        providers = ["CUDAExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
        if device == "cuda":
            reason = cuda_unavailable_reason()
            if reason:
                raise BackendUnavailable(reason)
        opts = session_options(threads, prepack)
        if weights is not None:
            weights.add_to(opts, path)
        try:
            self.sess = ort.InferenceSession(str(path), opts, providers=providers)
        except Exception as e:  # onnxruntime raises its own exception types
            raise EngineError(f"ONNX Runtime cannot load {path.name} ({e}); re-export the engine") from e
        if device == "cuda" and self.sess.get_providers()[0] != "CUDAExecutionProvider":
            raise BackendUnavailable(f"ONNX Runtime could not create a CUDA session for {path.name} "
                                     f"(got {self.sess.get_providers()}): no usable GPU or driver; {CUDA_HELP}")

        def described(args) -> list[tuple[str, str | None, tuple]]:
            return [(a.name, ORT_DTYPES.get(a.type), tuple(d if isinstance(d, int) else str(d) for d in a.shape))
                    for a in args]

        check_declared(io, described(self.sess.get_inputs()), described(self.sess.get_outputs()), f"{path.name}")
        self.providers = self.sess.get_providers()
        # IO binding with kept outputs on this device ("cuda"), or None: plain run (tests set "cpu")
        self.bound: str | None = "cuda" if device == "cuda" else None

    def run(self, feeds: dict[str, Any], keep: tuple[str, ...] = ()) -> dict[str, Any]:
        if self.bound:
            return self._run_bound(feeds, keep)
        arrays = {k: np.asarray(v, order="C") for k, v in feeds.items()}  # (keeps 0-d arrays 0-d)
        return dict(zip(self.io.output_names, self.sess.run(self.io.output_names, arrays)))

    def _run_bound(self, feeds: dict[str, Any], keep: tuple[str, ...]) -> dict[str, Any]:
        """IO binding: device values are bound as they are; outputs in ``keep`` stay on the device."""
        import onnxruntime as ort

        from pauserec.runtime.device import device_view

        binding = self.sess.io_binding()
        for name, value in feeds.items():
            view = None if isinstance(value, (np.ndarray, ort.OrtValue)) else device_view(value)
            if isinstance(value, ort.OrtValue):
                binding.bind_ortvalue_input(name, value)
            elif view is not None:  # DeviceArray, TensorRT tensor, CUDA array: bound by address, no copy
                binding.bind_input(name, "cuda", 0, view.dtype.type, list(view.shape), view.ptr)
            else:
                binding.bind_cpu_input(name, np.asarray(value, order="C"))
        for name in self.io.output_names:
            binding.bind_output(name, self.bound if name in keep else "cpu")
        try:
            binding.synchronize_inputs()  # device inputs written on other streams are complete
            self.sess.run_with_iobinding(binding)
            binding.synchronize_outputs()  # kept outputs are complete before other kernels read them
        except Exception as e:  # onnxruntime raises its own types (a GPU out of memory, a failing kernel)
            raise EngineError(f"ONNX Runtime failed to run {self.io.name} on {self.bound} ({e}); free GPU memory "
                              "or use a smaller batch, or provider='cpu'") from e
        outs = binding.get_outputs()
        return {n: (v if n in keep else v.numpy()) for n, v in zip(self.io.output_names, outs)}

    def to_numpy(self, value: Any) -> np.ndarray:
        from pauserec.runtime.device import download

        return download(value)
