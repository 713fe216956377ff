"""TensorRT ``.plan`` files from the static ONNX graphs of the engine's precision, one profile per graph.

Prefill and decode are different shape regimes, so each graph gets its own engine and profile
(min/opt/max per input). ``build_plans`` takes every shape from :func:`plan_profile`, the profile of
a frozen (static) graph spec; :func:`graph_profile` computes the same from the model shape (and the
ranges a dynamic engine would need). Both are pure and tested without TensorRT, and so is
``build_plans`` itself against a stand-in of the TensorRT API. After building, every plan is run on
the export validation's cases next to the ONNX graphs it came from (:func:`validate_plans`): every
output that differs is listed at once. Building needs ``tensorrt`` (NVIDIA's index), ``cuda-python``
and a CUDA GPU.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pauserec.errors import BackendUnavailable, ExportError
from pauserec.runtime.spec import GraphSpec, ModelShape, resolve_dims

Shape = tuple[int, ...]
Profile = dict[str, tuple[Shape, Shape, Shape]]  # input -> (min, opt, max)
# Largest |TensorRT - ONNX Runtime| per output: fp32 plans are built without TF32 and must match;
# fp16 plans are reported, and judged by top-10 agreement with the ONNX engine (pipeline).
PLAN_ATOL = {"fp32": 2e-3, "fp16": float("inf")}


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


def plan_profile(spec: GraphSpec) -> Profile:
    """The profile ``build_plans`` gives a frozen (static) graph spec: min = opt = max = its dims."""
    symbolic = [t.name for t in spec.inputs if any(not isinstance(d, int) for d in t.dims)]
    if symbolic:
        raise ExportError(f"TensorRT plans are built from static graphs; {spec.name} has symbolic inputs "
                          f"{symbolic}: export with --static --batch B --beams K")
    return profile(spec, {}, {}, {})


def graph_profile(spec: GraphSpec, shape: ModelShape, batch: int, beams: int, hist: int,
                  static: bool = True) -> Profile:
    """The profile of one graph: fixed for static engines; else 1..batch users, 1..hist history slots."""
    top = resolve_dims(spec.name, shape, batch, beams, hist)
    if static:
        return profile(spec, top, top, top)
    low = resolve_dims(spec.name, shape, 1, 1, 1)
    if spec.name != "prefill":  # decode/think contexts start at one history slot + the suffix
        low["ctx"] = 1 + shape.suffix_len
    return profile(spec, low, top, top)


def require_tensorrt() -> None:
    """BackendUnavailable (saying what to install) unless tensorrt, cuda-python and a GPU are usable."""
    from pauserec.runtime.backends.trt import unavailable_reason

    reason = unavailable_reason()
    if reason:
        raise BackendUnavailable(f"--backend tensorrt: {reason}")


def build_plans(onnx_files: dict[str, Path], specs: dict[str, GraphSpec], out: Path, fp16: bool) -> dict[str, str]:
    """One ``.plan`` per graph, built from the static ONNX graph of the engine's precision (its weights in
    ``weights.bin``, resolved by ``parse_from_file``); FP16 kernels allowed when ``fp16``, TF32 off otherwise."""
    require_tensorrt()
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    return {name: _build_one(trt, logger, path, plan_profile(specs[name]), out / f"{name}.plan", fp16).name
            for name, path in onnx_files.items()}


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
    elif hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)  # fp32 means fp32: TF32 matmuls would miss the tolerance
    prof = builder.create_optimization_profile()
    for name, (mn, op, mx) in shapes.items():
        prof.set_shape(name, mn, op, mx)
    config.add_optimization_profile(prof)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"TensorRT could not build {plan.name}; see the TensorRT log above")
    plan.write_bytes(bytes(serialized))
    return plan


class TrtGraphs:
    """The plans on TensorRT, called like ``validate.OrtGraphs`` (host arrays in, output lists out)."""

    def __init__(self, plans: dict[str, Path], specs: dict[str, GraphSpec]) -> None:
        from pauserec.runtime.backends.trt import TrtSession

        self.sessions = {name: TrtSession(path, specs[name]) for name, path in plans.items()}

    def run(self, graph: str, **feeds) -> list[np.ndarray]:
        session = self.sessions[graph]
        out = session.run(feeds)
        return [out[name] for name in session.io.output_names]


def validate_plans(plans: dict[str, Path], onnx_files: dict[str, Path], specs: dict[str, GraphSpec], precision: str,
                   validate_args: dict, runner=None) -> list:
    """Every plan next to its ONNX graph on the export validation's cases: a ``Check`` per (graph, case,
    output), ``against="onnx"``; ExportError listing every mismatch when one exceeds ``PLAN_ATOL``.

    ``runner``: the plans' runner (default ``TrtGraphs``; tests pass a stand-in)."""
    from pauserec.export import validate

    kv = np.float16 if precision == "fp16" else np.float32
    declared = {n: GraphSpec.from_manifest(n, s.to_dict(np.dtype(kv).name)) for n, s in specs.items()}  # real KV dtype
    paired = validate.PairedGraphs(validate.OrtGraphs(onnx_files, validate_args.get("threads")),
                                   runner if runner is not None else TrtGraphs(plans, declared),
                                   {n: s.output_names for n, s in specs.items()}, "tensorrt")
    checks = validate.validate_graphs(files=paired, atol=float("inf"), kv_dtype=kv, precision=precision,
                                      paired_atol=PLAN_ATOL.get(precision, float("inf")), **validate_args)
    checks = [c for c in checks if c.against == "onnx"]
    bad = [c for c in checks if not c.ok]
    if bad:
        lines = "\n".join(f"  {c.graph} [{c.case}] {c.output}: max abs err {c.max_abs_err:.3g} > atol {c.atol:g}"
                          for c in bad)
        raise ExportError(f"{len(bad)} TensorRT plan output(s) differ from the ONNX graphs they were built from:\n"
                          f"{lines}\nno engine was written; report this with the TensorRT version and GPU, or export "
                          "without --backend tensorrt")
    return checks
