"""The machine's rate for each MatMul kernel the engines lower to, at the engines' own shapes.

    python benchmarks/quant_kernels.py --threads 2 --out results/cpu-runtimes/quant-kernels.json

One-node ONNX Runtime sessions (CPU EP, no spinning, ``--threads`` intra-op threads), the weight a constant
as in the engines, for a 1024-hidden model's MLP up-projection (K 1024, N 3072) and down-projection
(K 3072, N 1024) at M rows: 1 and 20 (one user's decode step: 20 beams), 160 (8 users' decode step), 123
and 984 (one and 8 users' prefill of a 20-item history). Kernels:

- ``fp32``: ``MatMul`` (the exact engine);
- ``int8``: the int8 engine's lowering, per-row activation quantisation (``pauserec.export.quantize``)
  + ``MatMulInteger`` (u8 x s8) + the two rescales, i.e. what one int8 MatMul costs in an engine;
- ``int8-gemm``: ``MatMulInteger`` alone on already-quantised input (the integer GEMM's own rate);
- ``int4``: ``MatMulNBits`` (4 bits, blocks of 32) at ``accuracy_level`` 4 (int8 compute: the int4 default)
  and 0 (``--int4-compute fp32``);
- ``fp16`` / ``bf16``: ``MatMul`` on float16 / bfloat16 input and weight: whether this ONNX Runtime computes in
  half precision on this CPU any faster than in float32 (AVX512-FP16, AVX512-BF16 and AMX-BF16 are there on
  recent Xeons). A kernel ONNX Runtime does not have is listed under ``unavailable`` with its error.

Rates are GOP/s (2·M·N·K per product) over 7 samples: median, min and max.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

SHAPES = ((1024, 3072), (3072, 1024))
ROWS = (1, 20, 123, 160, 984)


def _session(nodes, inits, k: int, n: int, threads: int, x_type=None, y_type=None, opsets=(("", 18),),
             extra_inits=()):
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    x_type, y_type = x_type or TensorProto.FLOAT, y_type or TensorProto.FLOAT
    graph = helper.make_graph(nodes, "kernel", [helper.make_tensor_value_info("x", x_type, ["m", k])],
                              [helper.make_tensor_value_info("y", y_type, ["m", n])],
                              [numpy_helper.from_array(v, name) for name, v in inits.items()] + list(extra_inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets])
    model.ir_version = min(model.ir_version, 9)
    opts = ort.SessionOptions()
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.inter_op_num_threads, opts.intra_op_num_threads = 1, threads
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def half_kernels(k: int, n: int, threads: int, rng) -> tuple[dict, dict]:
    """({name: session}, {name: why not}) for MatMul in float16 and bfloat16."""
    from onnx import TensorProto, helper, numpy_helper

    w = rng.standard_normal((k, n), dtype=np.float32) * 0.05
    out, why = {}, {}
    for name, dtype in (("fp16", TensorProto.FLOAT16), ("bf16", TensorProto.BFLOAT16)):
        if dtype == TensorProto.FLOAT16:
            init = numpy_helper.from_array(w.astype(np.float16), "w")
        else:  # bfloat16: the top 16 bits of each float32
            init = helper.make_tensor("w", dtype, [k, n], (w.view(np.uint32) >> 16).astype(np.uint16).tobytes(), raw=True)
        try:
            out[name] = _session([helper.make_node("MatMul", ["x", "w"], ["y"])], {}, k, n, threads, dtype, dtype,
                                 extra_inits=[init])
        except Exception as e:  # onnxruntime raises its own types: NOT_IMPLEMENTED where it has no kernel
            why[name] = str(e).splitlines()[0][:300]
    return out, why


def kernels(k: int, n: int, threads: int, rng) -> dict:
    from onnx import TensorProto, helper

    from pauserec.export.quantize import INT8_CONSTS, _int8_activation

    w8 = rng.integers(-127, 128, size=(k, n), dtype=np.int8)
    s8 = (rng.random(n, dtype=np.float32) * 0.01).astype(np.float32)
    act, aq, sa = _int8_activation("x")
    int8 = act + [helper.make_node("MatMulInteger", [aq, "w", "q8/zp"], ["acc"]),
                  helper.make_node("Cast", ["acc"], ["accf"], to=TensorProto.FLOAT),
                  helper.make_node("Mul", ["accf", sa], ["rows"]), helper.make_node("Mul", ["rows", "s"], ["y"])]
    out = {
        "fp32": _session([helper.make_node("MatMul", ["x", "w"], ["y"])],
                         {"w": rng.standard_normal((k, n), dtype=np.float32)}, k, n, threads),
        "int8": _session(int8, {"w": w8, "s": s8, **INT8_CONSTS}, k, n, threads),
        "int8-gemm": _session([helper.make_node("MatMulInteger", ["x", "w", "zp"], ["y"])],
                              {"w": w8, "zp": np.array(128, np.uint8)}, k, n, threads, TensorProto.UINT8,
                              TensorProto.INT32),
    }
    blocks = k // 32
    q4 = rng.integers(0, 256, size=(n, blocks, 16), dtype=np.uint8)
    s4 = (rng.random(n * blocks, dtype=np.float32) * 0.01).astype(np.float32)
    for level in (4, 0):
        node = helper.make_node("MatMulNBits", ["x", "w", "s"], ["y"], domain="com.microsoft", K=k, N=n, bits=4,
                                block_size=32, **({"accuracy_level": level} if level else {}))
        out[f"int4-acc{level}"] = _session([node], {"w": q4, "s": s4}, k, n, threads,
                                           opsets=(("", 18), ("com.microsoft", 1)))
    return out


def main() -> None:
    from pauserec.bench.env import environment
    from pauserec.bench.flops import _timed

    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    rows, unavailable = [], {}
    for k, n in SHAPES:
        sessions = kernels(k, n, args.threads, rng)
        half, why = half_kernels(k, n, args.threads, rng)
        sessions.update(half)
        unavailable.update(why)
        for m in ROWS:
            x = rng.standard_normal((m, k), dtype=np.float32)
            feeds = {"int8-gemm": rng.integers(0, 256, size=(m, k), dtype=np.uint8), "fp16": x.astype(np.float16)}
            for name, sess in sessions.items():
                feed = {"x": feeds.get(name, x)}
                r = _timed(lambda s=sess, f=feed: s.run(None, f), 2 * m * n * k, 7, 0.05)
                rows.append({"kernel": name, "m": m, "k": k, "n": n, **r})
                print(f"K {k:5d} N {n:5d} M {m:4d} {name:10s} {r['gflops_median']:8.0f} GOP/s "
                      f"[{r['gflops_min']:.0f}, {r['gflops_max']:.0f}]", flush=True)
    for name, why in unavailable.items():
        print(f"{name}: not available in this onnxruntime ({why})")
    result = {"rows": rows, "unavailable": unavailable, "env": environment(threads=args.threads)}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
