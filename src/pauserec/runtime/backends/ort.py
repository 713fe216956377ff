"""ONNX Runtime backend: CPU, or CUDA with IO binding.

CPU sessions run plain ``session.run`` on host arrays. An engine's merged model (``merged.onnx``, see
``pauserec.export.merge``) opens as one ``MergedSession`` whose per-graph views run one graph at a
time (its flag set, the others' idle): every weight is packed once for all graphs. CUDA sessions always use IO binding: feeds
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
from pauserec.runtime.memory import release_memory
from pauserec.runtime.session import check_declared
from pauserec.runtime.spec import GraphSpec, merged_name, run_flag

ORT_DTYPES = {"tensor(int64)": "int64", "tensor(float)": "float32", "tensor(float16)": "float16"}
CUDA_HELP = ("install the GPU build of ONNX Runtime (pip uninstall onnxruntime && pip install onnxruntime-gpu) "
             "on a machine with an NVIDIA GPU and driver, or use provider='cpu'")


def session_options(threads: int | None, prepack: bool = False, spin: bool = False, cast_weights: bool = False):
    """Options for small machines: no busy-waiting intra-op threads, a fixed thread count when given.

    ``prepack=False`` keeps ONNX Runtime from re-laying each MatMul weight into a private buffer per
    session: the sessions then compute straight from the one shared, mapped copy of the weights.
    No memory patterns: every batch brings other history lengths, and ORT would plan and keep one
    buffer layout per input shape (peak RSS grew with each new shape).
    ``spin=True``: intra-op threads busy-wait between operators (ONNX Runtime's own default): faster on a
    machine the engine has to itself (the graphs are thousands of small operators), CPU burnt while waiting.
    ``cast_weights``: operators run in priority order (the graph's own order among equals), not ONNX Runtime's
    default order, which runs every operator without a computed input first: the float32 copies the CPU provider
    casts an fp16 engine's weights to (it has no float16 MatMul; a bf16 engine's graphs cast theirs) were then all
    alive at once (a Qwen3-0.6B-shape fp16 engine's first call: 2.54 GB, 1.37 GB in priority order). Other engines
    keep the default order: in priority order the exporter's KV stacking runs at the end of the prefill, and an int8
    KV engine's batch of 8 held 0.9 GB more at the Llama-2-7B shape.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    if not prepack:
        opts.add_session_config_entry("session.disable_prepacking", "1")
    opts.enable_mem_pattern = False
    opts.inter_op_num_threads = 1
    if threads:
        opts.intra_op_num_threads = int(threads)
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if cast_weights:
        opts.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    return opts


def inference_session(path: Path, opts, providers: list, disabled_optimizers: list[str] | None = None):
    """An ONNX Runtime session on the model at ``path``; EngineError if it cannot load. The heap garbage its
    graph optimisation leaves (constant folding: 170 MB at the Llama-2-7B shape) goes back to the system."""
    import onnxruntime as ort

    try:
        sess = ort.InferenceSession(str(path), opts, providers=providers, disabled_optimizers=disabled_optimizers or [])
    except Exception as e:  # onnxruntime raises its own exception types
        raise EngineError(f"ONNX Runtime cannot load {path.name} ({e}); re-export the engine") from e
    release_memory(collect=False)  # C++ heap: no Python objects to collect
    return sess


def cuda_unavailable_reason() -> str | None:
    """None when ONNX Runtime offers the CUDA provider, else what to install."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return f"onnxruntime {ort.__version__} has no CUDAExecutionProvider: {CUDA_HELP}"
    return None


class OrtSession:
    """One graph on ONNX Runtime; ``device`` is "cpu" or "cuda"."""

    def __init__(self, path: Path, io: GraphSpec, device: str, threads: int | None, weights=None,
                 prepack: bool = False, tf32: bool = False, spin: bool = False, cast_weights: bool = False) -> None:
        """``weights``: the engine's ``WeightStore``; its tensors are shared with the other graphs' sessions (on
        "cuda": one device copy for all of them). ``tf32``: CUDA may multiply float32 in TF32 (faster on Ampere
        and later, scores differ by ~1e-3); off, float32 engines give the CPU's results."""
        self.io, self.device, self.weights = io, device, weights  # the mapped weights outlive the session
        providers = ([("CUDAExecutionProvider", {"use_tf32": "1" if tf32 else "0"})] if device == "cuda"
                     else ["CPUExecutionProvider"])
        if device == "cuda":
            reason = cuda_unavailable_reason()
            if reason:
                raise BackendUnavailable(reason)
        opts = session_options(threads, prepack, spin, cast_weights)
        if weights is not None:
            weights.add_to(opts, path, device)
        self.sess = inference_session(path, opts, providers, disabled_optimizers(cast_weights))
        if device == "cuda" and self.sess.get_providers()[0] != "CUDAExecutionProvider":
            raise BackendUnavailable(f"ONNX Runtime could not create a CUDA session for {path.name} "
                                     f"(got {self.sess.get_providers()}): no usable GPU or driver; {CUDA_HELP}")

        check_declared(io, _described(self.sess.get_inputs()), _described(self.sess.get_outputs()), f"{path.name}")
        self.providers = self.sess.get_providers()
        self.run_options = run_options(io.name) if device == "cpu" else None
        # IO binding with kept outputs on this device ("cuda"), or None: plain run (tests set "cpu")
        self.bound: str | None = "cuda" if device == "cuda" else None

    def run(self, feeds: dict[str, Any], keep: tuple[str, ...] = ()) -> dict[str, Any]:
        if self.bound:
            return self._run_bound(feeds, keep)
        arrays = {k: np.asarray(v, order="C") for k, v in feeds.items()}  # (keeps 0-d arrays 0-d)
        return dict(zip(self.io.output_names, self.sess.run(self.io.output_names, arrays, self.run_options)))

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


# GatherSliceToSplitFusion turns the per-layer reads of the KV inputs (a Gather of layer i) into one Split
# that copies every layer's KV at the start of a step (+300 MB at batch 8 x beam 20 at the 0.6B shape);
# each layer's Gather copies only its own slice, when it needs it.
DISABLED_OPTIMIZERS = ["GatherSliceToSplitFusion"]
# A bf16 engine's graphs cast each bfloat16 weight to float32 where they read it; constant folding would make
# every such copy as the session loads (a 16-layer test model: 321 MB more at load than its 134 MB of weights).
CAST_WEIGHTS_DISABLED = [*DISABLED_OPTIMIZERS, "ConstantFolding"]


def disabled_optimizers(cast_weights: bool) -> list[str]:
    return CAST_WEIGHTS_DISABLED if cast_weights else DISABLED_OPTIMIZERS
# The prefill's intermediates (every layer's KV before they are stacked) are a run's largest: its arena
# memory goes back to the system after each prefill, since the decode steps that follow need a fraction.
SHRINK_AFTER = ("prefill",)


def run_options(graph: str):
    """RunOptions for one run of ``graph`` (None: the defaults)."""
    import onnxruntime as ort

    if graph not in SHRINK_AFTER:
        return None
    ro = ort.RunOptions()
    ro.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    return ro


def idle_feeds(io: GraphSpec, graph: str) -> dict[str, np.ndarray]:
    """Inputs of graph ``io`` while it is idle (every input must be fed; none is read): zero users ("batch" = 0),
    every other symbol 1."""
    feeds = {}
    for t in io.inputs:
        shape = tuple(0 if d == "batch" else (1 if isinstance(d, str) else d) for d in t.dims)
        feeds[merged_name(graph, t.name)] = np.zeros(shape, t.np_dtype)
    return feeds


class MergedSession:
    """One CPU session on an engine's merged model; ``views[name]`` is graph ``name``'s Session.

    ONNX Runtime maps the weights itself here (no shared OrtValues: there is one session) and prepacks
    them, once for every branch that multiplies by them; a weight's original pages are released once packed.
    A run sets its graph's ``<graph>/run`` flag alone: only that graph's branch computes.
    """

    def __init__(self, path: Path, graphs: dict[str, GraphSpec], threads: int | None, spin: bool = False,
                 cast_weights: bool = False) -> None:
        opts = session_options(threads, prepack=True, spin=spin, cast_weights=cast_weights)
        self.sess = inference_session(path, opts, ["CPUExecutionProvider"], disabled_optimizers(cast_weights))
        self.providers = self.sess.get_providers()
        declared_in = {a.name: a for a in self.sess.get_inputs()}
        declared_out = {a.name: a for a in self.sess.get_outputs()}
        self.idle = {name: {**idle_feeds(io, name), run_flag(name): np.array(False)} for name, io in graphs.items()}
        self.run_options = {name: run_options(name) for name in graphs}
        self.views = {}
        for name, io in graphs.items():
            if run_flag(name) not in declared_in:
                raise EngineError(f"{path.name} has no {run_flag(name)} input (an engine of an older pauserec); "
                                  "re-export the engine")
            ins = [declared_in.get(merged_name(name, t.name)) for t in io.inputs]
            outs = [declared_out.get(merged_name(name, t.name)) for t in io.outputs]
            if None in ins or None in outs:
                raise EngineError(f"{path.name} lacks inputs or outputs of the {name} graph; re-export the engine")
            check_declared(io, _described(ins, len(name) + 1), _described(outs, len(name) + 1), f"{path.name} ({name})")
            self.views[name] = MergedView(self, name, io)

    def run(self, name: str, io: GraphSpec, feeds: dict[str, Any]) -> dict[str, Any]:
        full = {k: v for other, idle in self.idle.items() if other != name for k, v in idle.items()}
        full.update({merged_name(name, k): np.asarray(v, order="C") for k, v in feeds.items()})
        full[run_flag(name)] = np.array(True)
        outs = self.sess.run([merged_name(name, n) for n in io.output_names], full, self.run_options[name])
        return dict(zip(io.output_names, outs))


class MergedView:
    """Graph ``name`` of a ``MergedSession`` (the ``Session`` protocol, host arrays)."""

    def __init__(self, merged: MergedSession, name: str, io: GraphSpec) -> None:
        self.merged, self.name, self.io = merged, name, io
        self.sess, self.providers = merged.sess, merged.providers

    def run(self, feeds: dict[str, Any], keep: tuple[str, ...] = ()) -> dict[str, Any]:
        return self.merged.run(self.name, self.io, feeds)

    def to_numpy(self, value: Any) -> np.ndarray:
        return np.asarray(value)


def _described(args, strip: int = 0) -> list[tuple[str, str | None, tuple]]:
    """(name without its first ``strip`` characters, dtype, dims) of ONNX Runtime NodeArgs."""
    return [(a.name[strip:], ORT_DTYPES.get(a.type), tuple(d if isinstance(d, int) else str(d) for d in a.shape))
            for a in args]
