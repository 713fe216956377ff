"""How much work one recommend call is, and how fast this machine multiplies matrices.

``recommend_flops`` counts the matmul FLOPs (2·m·n·k per product) of one engine recommend call from
the model's shapes alone; ``gemm_rate`` measures this machine's float32 GEMM rate (numpy and ONNX
Runtime). FLOPs / rate gives a lower bound on the compute time of a call.

What one call runs (``pauserec.runtime.beam`` over the ``pauserec.export.graphs`` graphs), per user:

* prefill: ``hist_tokens + suffix_len`` tokens through every layer. Each query attends to the constant
  instruction prefix (its KV is precomputed at export, so the prefix tokens themselves are not
  counted) and to all ``hist_tokens + suffix_len`` context slots: the engine multiplies the dense,
  masked score matrix, so attention is counted dense (not halved for causality). The LM head runs on
  the last position only.
* decode: ``levels - 1`` steps of ``beams`` tokens (one SID token per beam). At step ``s`` (0-based) a
  beam's token attends to ctx = prefix + hist + suffix + the ``s + 1`` SID tokens chosen so far (the
  fed one included). The graph multiplies all ``levels - 1`` beam slots, masked; the difference is at
  most ``levels - 2`` keys per query.

Per layer and token, the projections are q (hidden x q_heads·head_dim), k and v (hidden x
kv_heads·head_dim each), o (q_heads·head_dim x hidden) and a gated MLP (gate, up: hidden x
intermediate; down: intermediate x hidden), as in Qwen2/Qwen3/Llama. Attention per query and key is
2·q_heads·head_dim FLOPs for the scores plus as many for probs @ values. Norms, RoPE, softmax, the
embedding lookup and the top-k are not matmuls and are not counted. cot's rationale steps are not
included.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Sequence

import numpy as np

from pauserec.errors import PauserecError

MODEL_KEYS = ("layers", "q_heads", "kv_heads", "head_dim", "hidden", "vocab")
SCORING = ("full", "sid")
DEFAULT_SIZES = ((1024, 1024, 1024), (160, 1024, 3072), (8 * 130, 1024, 3072))


def _positive(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise PauserecError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _model_sizes(model: dict, intermediate: int | None) -> dict[str, int]:
    if not isinstance(model, dict):
        raise PauserecError(f"model must be the dict an engine manifest holds under 'model', got {type(model).__name__}")
    missing = [k for k in MODEL_KEYS if k not in model]
    if missing:
        raise PauserecError(f"model dict lacks {', '.join(missing)}; pass the 'model' entry of an engine's manifest.json "
                            f"(keys {', '.join(MODEL_KEYS)}, plus 'intermediate')")
    inter = intermediate if intermediate is not None else model.get("intermediate")
    if inter is None:
        raise PauserecError("the MLP width is unknown: pass intermediate=N (the config's intermediate_size) or add "
                            "'intermediate' to the model dict")
    sizes = {k: _positive(f"model[{k!r}]", model[k]) for k in MODEL_KEYS}
    sizes["intermediate"] = _positive("intermediate", inter)
    return sizes


def layer_flops_per_token(m: dict[str, int]) -> int:
    """Projection + MLP matmul FLOPs of one token through one decoder layer."""
    q, kv, h = m["q_heads"] * m["head_dim"], m["kv_heads"] * m["head_dim"], m["hidden"]
    return 2 * (h * q + 2 * h * kv + q * h + 3 * h * m["intermediate"])


def recommend_flops(
    model: dict,
    *,
    batch: int,
    beams: int,
    hist_tokens: int,
    prefix_len: int,
    suffix_len: int,
    levels: int,
    codebook_sizes: Sequence[int],
    scoring: str = "full",
    intermediate: int | None = None,
) -> dict:
    """Matmul FLOPs of one recommend call of ``batch`` users (see the module docstring for what counts).

    ``model``: the "model" dict of an engine manifest ({"arch", "layers", "q_heads", "kv_heads",
    "head_dim", "hidden", "vocab"}); the MLP width comes from ``intermediate`` or, when that is None,
    from ``model["intermediate"]``. ``hist_tokens``: history tokens per user as the prefill sees them
    (the batch's padded width, (L + 1) per history item). ``prefix_len`` / ``suffix_len``: the
    manifest's ``shapes.prefix_len`` / ``shapes.suffix_len``. ``codebook_sizes``: one per SID level.
    ``scoring="full"``: every LM-head row is the full vocabulary (what the graphs compute before picking
    the SID columns); ``"sid"``: only the rows of the level being scored.

    Returns ``{"prefill": {"layers", "attention", "head"}, "decode": {"layers", "attention", "head"},
    "total"}`` in FLOPs (Python ints).
    """
    m = _model_sizes(model, intermediate)
    batch, beams, levels = _positive("batch", batch), _positive("beams", beams), _positive("levels", levels)
    hist, prefix, suffix = (_positive(n, v, 0) for n, v in
                            (("hist_tokens", hist_tokens), ("prefix_len", prefix_len), ("suffix_len", suffix_len)))
    sizes = [_positive("codebook_sizes[]", v) for v in codebook_sizes]
    if len(sizes) != levels:
        raise PauserecError(f"codebook_sizes has {len(sizes)} entries for {levels} levels; give one size per SID level")
    if scoring not in SCORING:
        raise PauserecError(f"unknown scoring {scoring!r}; choose one of {', '.join(SCORING)}")
    if hist + suffix < 1:
        raise PauserecError("the prefill has no tokens (hist_tokens + suffix_len = 0); pass the history width")

    per_token = layer_flops_per_token(m)
    attn_per_key = 4 * m["q_heads"] * m["head_dim"]  # scores + probs @ values, per query and key
    L, H = m["layers"], m["hidden"]

    def head_rows(level: int) -> int:
        return m["vocab"] if scoring == "full" else sizes[level]

    n = hist + suffix  # prefill tokens per user
    prefill = {
        "layers": batch * n * L * per_token,
        "attention": batch * L * n * (prefix + n) * attn_per_key,
        "head": batch * 2 * H * head_rows(0),
    }
    decode = {"layers": 0, "attention": 0, "head": 0}
    rows = batch * beams
    for s in range(levels - 1):
        keys = prefix + n + s + 1
        decode["layers"] += rows * L * per_token
        decode["attention"] += rows * L * keys * attn_per_key
        decode["head"] += rows * 2 * H * head_rows(s + 1)
    return {"prefill": prefill, "decode": decode, "total": sum(prefill.values()) + sum(decode.values())}


# -- measured GEMM rate ---------------------------------------------------------------------------
def _blas_limit(threads: int | None):
    """A context limiting numpy's BLAS to ``threads`` threads (threadpoolctl; a no-op without it or for None)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=threads, user_api="blas") if threads else contextlib.nullcontext()


def _blas_threads() -> int | None:
    """Threads numpy's BLAS uses now (threadpoolctl), None when threadpoolctl is not installed."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return None
    blas = [p for p in threadpool_info() if p.get("user_api") == "blas"]
    return int(blas[0]["num_threads"]) if blas else None


def _ort_matmul(b: np.ndarray, threads: int | None):
    """A one-node ONNX MatMul session: input A (m, k) times the constant B (k, n), CPU EP."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    k, n = b.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["A", "B"], ["C"])], "gemm",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["m", k])],
        [helper.make_tensor_value_info("C", TensorProto.FLOAT, ["m", n])],
        initializer=[numpy_helper.from_array(b, "B")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = min(proto.ir_version, 9)  # readable by older onnxruntime builds too
    onnx.checker.check_model(proto)
    opts = ort.SessionOptions()
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.inter_op_num_threads = 1
    if threads:
        opts.intra_op_num_threads = int(threads)
    return ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _timed(fn, flops: int, repeats: int, min_sample_s: float) -> dict:
    """GFLOP/s of ``fn`` over ``repeats`` samples, each looping calls for at least ``min_sample_s``."""
    fn()  # warm-up
    t0 = time.perf_counter()
    fn()
    calls = max(1, int(np.ceil(min_sample_s / max(time.perf_counter() - t0, 1e-7))))
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        rates.append(flops * calls / (time.perf_counter() - t0) / 1e9)
    r = np.array(rates)
    return {"gflops_median": float(np.median(r)), "gflops_min": float(r.min()), "gflops_max": float(r.max()),
            "gflops_p10": float(np.percentile(r, 10)), "gflops_p90": float(np.percentile(r, 90)),
            "calls_per_sample": calls, "samples": repeats}


def gemm_rate(
    threads: int | None = None,
    sizes: Sequence[tuple[int, int, int]] = DEFAULT_SIZES,
    repeats: int = 7,
    min_sample_s: float = 0.05,
    seed: int = 0,
) -> dict:
    """This machine's float32 GEMM rate, C (m, n) = A (m, k) @ B (k, n), in GFLOP/s (2·m·n·k per product).

    numpy: ``a @ b`` (BLAS threads limited to ``threads`` when threadpoolctl is installed); ONNX
    Runtime: a one-node MatMul model (B a constant, as weights are), CPU EP, no spinning,
    ``threads`` intra-op threads (None: its default). Default sizes: a square 1024 GEMM, and the MLP
    up-projection of a 1024-hidden model for 160 rows (8 users x 20 beams, a decode step) and 8 x 130
    rows (8 users' prefill). Per size and library: median, min/max and p10/p90 over ``repeats``
    samples. ``numpy_threads`` is None when threadpoolctl is not installed (then it is not limited).
    """
    repeats = _positive("repeats", repeats)
    if threads is not None:
        threads = _positive("threads", threads)
    checked = []
    for size in sizes:
        if len(tuple(size)) != 3:
            raise PauserecError(f"each GEMM size is (m, n, k), got {size!r}")
        checked.append(tuple(_positive("GEMM size", int(v)) for v in size))
    rng = np.random.default_rng(seed)
    numpy_threads = None
    results = []
    for m, n, k in checked:
        a = rng.standard_normal((m, k), dtype=np.float32)
        b = rng.standard_normal((k, n), dtype=np.float32)
        flops = 2 * m * n * k
        with _blas_limit(threads):
            numpy_threads = _blas_threads()
            np_rate = _timed(lambda a=a, b=b: a @ b, flops, repeats, min_sample_s)
        sess = _ort_matmul(b, threads)
        feed = {"A": a}
        ort_rate = _timed(lambda s=sess, f=feed: s.run(None, f), flops, repeats, min_sample_s)
        results.append({"m": m, "n": n, "k": k, "flops": flops, "numpy": np_rate, "onnxruntime": ort_rate})
    import onnxruntime as ort

    return {
        "threads": threads,
        "numpy_threads": numpy_threads,
        "openblas_coretype": os.environ.get("OPENBLAS_CORETYPE"),
        "numpy_version": np.__version__,
        "onnxruntime_version": ort.__version__,
        "cores": os.cpu_count(),
        "sizes": results,
    }
