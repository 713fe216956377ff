"""TensorRT ``.plan`` files from the static ONNX graphs, one optimisation profile per graph.

Prefill and decode are different shape regimes, so each graph gets its own engine and profile
(min/opt/max per input), computed from ``spec.py`` by the pure functions below; they are tested
without TensorRT. Building needs ``tensorrt`` (NVIDIA's index), ``cuda-python`` and a CUDA GPU.
"""

from __future__ import annotations

from pathlib import Path

from pauserec.errors import BackendUnavailable, ExportError
from pauserec.runtime.spec import GraphSpec, ModelShape, hist_len, resolve_dims

Shape = tuple[int, ...]
Profile = dict[str, tuple[Shape, Shape, Shape]]  # input -> (min, opt, max)


def profile(spec: GraphSpec, lo: dict[str, int], opt: dict[str, int], hi: dict[str, int]) -> Profile:
    """min/opt/max shape of every non-scalar input of ``spec`` under three symbol bindings."""
    out: Profile = {}
    for t in spec.inputs:
        if not t.dims:
            continue
        mn, op, mx = t.shape(lo), t.shape(opt), t.shape(hi)
        if not all(a <= b <= c for a, b, c in zip(mn, op, mx)):
            raise ExportError(f"profile of {spec.name}.{t.name} is not ordered: min {mn}, opt {op}, max {mx}")
        out[t.name] = (mn, op, mx)
    return out


def graph_profile(spec: GraphSpec, shape: ModelShape, batch: int, beams: int, max_history: int,
                  static: bool = True) -> Profile:
    """The profile of one graph: fixed for static engines; else 1..batch users, 1..max_history items."""
    top = resolve_dims(spec.name, shape, batch, beams, max_history)
    if static:
        return profile(spec, top, top, top)
    low = resolve_dims(spec.name, shape, 1, 1, 1)
    if spec.name != "prefill":  # decode/think contexts start at one item + the suffix
        low["ctx"] = hist_len(1, shape.levels) + shape.suffix_len
    return profile(spec, low, top, top)


def require_tensorrt() -> None:
    """BackendUnavailable (saying what to install) unless tensorrt, cuda-python and a GPU are usable."""
    from pauserec.runtime.backends.trt import unavailable_reason

    reason = unavailable_reason()
    if reason:
        raise BackendUnavailable(f"--backend tensorrt: {reason}")


def build_plans(onnx_files: dict[str, Path], specs: dict[str, GraphSpec], out: Path, fp16: bool) -> dict[str, str]:
    """One ``.plan`` per graph, built from the static ONNX graph of the engine's precision (its weights in
    ``weights.bin``, resolved by ``parse_from_file``); FP16 kernels allowed when ``fp16``."""
    require_tensorrt()
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    plans = {}
    for name, path in onnx_files.items():
        spec = specs[name]
        env = {t.name: t.dims for t in spec.inputs}
        shapes = {n: (tuple(d), tuple(d), tuple(d)) for n, d in env.items() if d}  # static: min = opt = max
        plans[name] = _build_one(trt, logger, path, shapes, out / f"{name}.plan", fp16).name
    return plans


def _build_one(trt, logger, onnx_path: Path, shapes: Profile, plan: Path, fp16: bool) -> Path:
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH") and int(trt.__version__.split(".")[0]) < 10:
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT cannot parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    prof = builder.create_optimization_profile()
    for name, (mn, op, mx) in shapes.items():
        prof.set_shape(name, mn, op, mx)
    config.add_optimization_profile(prof)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"TensorRT could not build {plan.name}; see the TensorRT log above")
    plan.write_bytes(bytes(serialized))
    return plan
