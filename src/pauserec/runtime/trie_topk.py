"""Trie-masked top-k: one beam-search step over one SID level, restricted to valid trie children.

One public entry point, :func:`trie_topk`, over three implementations with identical results:

- ``numpy``: the reference, :func:`trie_topk_numpy` (its docstring pins the semantics);
- ``cpu``: the native C++ kernel ``pauserec._trie_topk_cpu`` (built at install time);
- ``cuda``: the CUDA kernel ``pauserec._trie_topk_cuda`` (built when nvcc was found at install time,
  usable when a GPU whose compute capability the build covers and a driver are present). It keeps
  the trie resident on the device (``CudaOps.cached_trie`` in :mod:`pauserec.runtime.device`) and runs
  on device memory.

``impl="auto"`` follows the data: log-probs that already live on a CUDA device (an ONNX Runtime
``OrtValue`` on "cuda", or any object with ``__cuda_array_interface__``) go to the CUDA kernel;
host arrays go to the C++ kernel (the NumPy reference where it was not built). Copying host arrays
to the GPU for one top-k costs more than the C++ kernel's whole call, so ``auto`` never does it;
``impl="cuda"`` with host arrays still works (the one-shot path: upload, compute, download). An
explicitly requested implementation that is missing raises
:class:`pauserec.errors.BackendUnavailable`, and so does a CUDA device failing during a call.

Every implementation takes the same optional node filter (``node_mask`` (M, N) uint8 + ``mask_row``
(B,) int32): serve-time item filters, under which the search never enters a node whose mask is 0.
"""

from __future__ import annotations

import functools
import importlib
import operator
from types import ModuleType
from typing import NamedTuple

import numpy as np

from pauserec.errors import BackendUnavailable

IMPLS = ("cuda", "cpu", "numpy")
HOST_AUTO = ("cpu", "numpy")  # impl="auto" on host arrays, in this order
MAX_K = 1 << 20  # beam widths above this are rejected (same limit as the native kernels)


class TopK(NamedTuple):
    """Best k candidates per row, best first; padded slots hold -1 and -inf."""

    parent: np.ndarray  # (B, k) int32 beam index in [0, K_in), -1 = padding
    token: np.ndarray  # (B, k) int32 level-local code, -1 = padding
    node: np.ndarray  # (B, k) int32 child trie node, -1 = padding
    score: np.ndarray  # (B, k) float32 parent score + log-prob, -inf = padding


# ---------------------------------------------------------------------------------------------
# input checks (shared wording with the native modules; every failure is a ValueError)


def _array(x, name: str, dtype: type, ndim: int) -> np.ndarray:
    if not isinstance(x, np.ndarray):
        raise ValueError(f"{name} must be a numpy array of {np.dtype(dtype).name}, got {type(x).__name__}")
    if x.dtype != dtype:
        raise ValueError(f"{name} must have dtype {np.dtype(dtype).name}, got {x.dtype}: "
                         f"convert it with .astype(np.{np.dtype(dtype).name})")
    if x.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {x.shape}")
    return x


def _check_shapes(scores, logprobs, nodes, offsets, tokens, children, k) -> int:
    """Checks dtypes, shapes and k; returns k as an int."""
    _array(scores, "scores", np.float32, 2)
    _array(logprobs, "logprobs", np.float32, 3)
    _array(nodes, "nodes", np.int32, 2)
    _array(offsets, "offsets", np.int32, 1)
    _array(tokens, "tokens", np.int32, 1)
    _array(children, "children", np.int32, 1)
    B, K = scores.shape
    if K < 1:
        raise ValueError(f"scores must have shape (B, K_in) with K_in >= 1, got {scores.shape}")
    if logprobs.shape[:2] != (B, K) or logprobs.shape[2] < 1:
        raise ValueError(f"logprobs must have shape (B, K_in, V) = ({B}, {K}, V >= 1) to match scores, "
                         f"got {logprobs.shape}")
    if nodes.shape != scores.shape:
        raise ValueError(f"nodes must have the shape of scores {scores.shape}, got {nodes.shape}")
    if offsets.shape[0] < 1:
        raise ValueError(f"offsets must have shape (N + 1,) with N >= 0 trie nodes, got {offsets.shape}")
    if tokens.shape != children.shape:
        raise ValueError(f"tokens and children must have the same shape (E,), got {tokens.shape} and {children.shape}")
    k = operator.index(k)
    if not 1 <= k <= MAX_K:
        raise ValueError(f"k must be in [1, {MAX_K}] (the number of beams to keep), got {k}")
    return k


def _first_bad(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def _check_trie_refs(nodes, offsets, tokens, children, V: int):
    """Validates the referenced part of the trie; returns (owner, edge) of every referenced edge.

    owner is the flat beam index b * K_in + j of each edge, in (b, j, edge) order.
    """
    N, E = offsets.shape[0] - 1, tokens.shape[0]
    flat = nodes.ravel()  # (B*K_in,)
    bad = (flat < -1) | (flat >= N)
    if bad.any():
        i = _first_bad(bad)
        raise ValueError(f"nodes[{np.unravel_index(i, nodes.shape)}] = {flat[i]} is outside [-1, {N}): "
                         "pass trie node ids of this trie (-1 for a dead beam)")
    live = flat >= 0
    safe = np.where(live, flat, 0).astype(np.int64)
    if N == 0:  # every node is -1
        lo = hi = np.zeros(flat.shape, np.int64)
    else:
        lo = np.where(live, offsets[safe], 0).astype(np.int64)
        hi = np.where(live, offsets[safe + 1], 0).astype(np.int64)
    bad = (lo < 0) | (hi < lo) | (hi > E)
    if bad.any():
        i = _first_bad(bad)
        raise ValueError(f"offsets of node {flat[i]} give an edge range outside [0, {E}]: offsets must be "
                         "non-decreasing CSR offsets into tokens/children")
    count = hi - lo  # (B*K_in,)
    owner = np.repeat(np.arange(flat.shape[0]), count)  # (C,)
    first = np.cumsum(count) - count
    edge = np.arange(owner.shape[0]) + np.repeat(lo - first, count)  # (C,)
    tok = tokens[edge]
    bad = (tok < 0) | (tok >= V)
    if bad.any():
        i = _first_bad(bad)
        raise ValueError(f"trie token {tok[i]} at edge {edge[i]} (child of node {flat[owner[i]]}) is outside "
                         f"[0, V={V}): logprobs must cover this level's codebook")
    same = owner[1:] == owner[:-1]
    bad = same & (tok[1:] <= tok[:-1])
    if bad.any():
        i = _first_bad(bad) + 1
        raise ValueError(f"trie tokens of node {flat[owner[i]]} are not strictly increasing at edge {edge[i]}: "
                         "a node's children must be sorted by code, without repeats")
    chd = children[edge]
    bad = (chd < 0) | (chd >= N)
    if bad.any():
        i = _first_bad(bad)
        raise ValueError(f"trie child {chd[i]} at edge {edge[i]} is outside [0, {N}): "
                         "children must be node ids of this trie")
    return owner, edge, tok, chd


def _check_mask(node_mask, mask_row, B: int, N: int) -> bool:
    """Validates the optional node filter; returns whether one was given."""
    if node_mask is None and mask_row is None:
        return False
    if node_mask is None or mask_row is None:
        given, missing = ("node_mask", "mask_row") if mask_row is None else ("mask_row", "node_mask")
        raise ValueError(f"{given} was given without {missing}: pass both (mask_row (B,) int32 picks a row of "
                         "node_mask (M, N) uint8 for each batch row, -1 = unfiltered), or neither")
    _array(node_mask, "node_mask", np.uint8, 2)
    _array(mask_row, "mask_row", np.int32, 1)
    if node_mask.shape[1] != N:
        raise ValueError(f"node_mask must have shape (M, N) with N = {N} trie nodes, got {node_mask.shape}")
    if mask_row.shape != (B,):
        raise ValueError(f"mask_row must have shape (B,) = ({B},) to match scores, got {mask_row.shape}")
    bad = (mask_row < -1) | (mask_row >= node_mask.shape[0])
    if bad.any():
        i = _first_bad(bad)
        raise ValueError(f"mask_row[{i}] = {mask_row[i]} is outside [-1, {node_mask.shape[0]}): pass a row of "
                         "node_mask (-1 = unfiltered)")
    return True


# ---------------------------------------------------------------------------------------------
# the reference


def _descending(score: np.ndarray) -> np.ndarray:
    """uint32 keys whose ascending order is descending score order (no NaN; 0.0 and -0.0 equal)."""
    bits = (score + np.float32(0.0)).view(np.uint32)  # -0.0 + 0.0 = +0.0
    ascending = np.where(bits >> np.uint32(31) == 1, ~bits, bits | np.uint32(0x80000000))
    return ~ascending


def trie_topk_numpy(scores, logprobs, nodes, offsets, tokens, children, k: int, node_mask=None,
                    mask_row=None) -> TopK:
    """Trie-masked top-k, the NumPy reference: these are the semantics every implementation follows.

    Inputs (all C-order or not, exact dtypes required):

    - ``scores`` (B, K_in) float32: cumulative log-prob of each parent beam.
    - ``logprobs`` (B, K_in, V) float32: log-probs of this level's V codes for each parent beam.
    - ``nodes`` (B, K_in) int32: trie node of each parent beam; -1 = dead beam.
    - ``offsets`` (N + 1,) int32, ``tokens`` (E,) int32, ``children`` (E,) int32: the trie in CSR form;
      node n's edges are ``e in [offsets[n], offsets[n + 1])``, edge e has code ``tokens[e]`` and leads
      to node ``children[e]``. A node's tokens are strictly increasing (children sorted by code).
    - ``k``: how many candidates to keep per row, 1 <= k <= 2**20.
    - optional node filter, both or neither: ``node_mask`` (M, N) uint8, row m says which nodes a
      filter lets the search enter (nonzero = the node still has an allowed item below it), and
      ``mask_row`` (B,) int32, the row of ``node_mask`` that batch row b uses (-1 = unfiltered).
      One filter shared by the whole batch is stored once (M = 1, every ``mask_row`` 0).

    Rule, per row b:

    1. Candidates are the pairs (parent j, edge e of node ``nodes[b, j]``) for every j with
       ``nodes[b, j] != -1``; with a filter and ``m = mask_row[b] != -1``, only the edges with
       ``node_mask[m, children[e]] != 0`` (a masked edge is treated as if it did not exist).
    2. A candidate's score is ``scores[b, j] + logprobs[b, j, tokens[e]]``, a float32 addition. A NaN
       score counts as -inf (NaN in either term).
    3. A candidate whose score is -inf is never selected. Hence a parent with score -inf (or NaN)
       expands nothing, and neither does a node without edges (a leaf).
    4. Order: higher score first; equal scores -> lower parent j first, then lower token. (0.0 and
       -0.0 are equal scores.)
    5. The first ``min(k, #candidates)`` candidates fill slots 0, 1, ...; the remaining slots are
       padding: parent -1, token -1, node -1, score -inf. Callers clip parent to >= 0 when gathering
       beam state; a padded beam is dead at the next level because its node is -1.

    Output: :class:`TopK` of (B, k) arrays: parent (int32, j), token (int32, ``tokens[e]``), node
    (int32, ``children[e]``), score (float32).

    Errors (ValueError, nothing is computed): wrong dtypes or ranks, mismatched shapes, K_in < 1,
    V < 1, k outside [1, 2**20], a node id outside [-1, N), and for every *referenced* node (any
    ``nodes[b, j] != -1``, whatever its score): an edge range outside [0, E], a token outside
    [0, V), tokens not strictly increasing, or a child outside [0, N). Nodes that no beam references
    are not inspected, so a trie whose levels have different codebook sizes is fine as long as the
    current level's V covers the nodes in play. With a filter: only one of node_mask / mask_row,
    wrong dtypes or ranks, node_mask not (M, N), mask_row not (B,), or a mask_row value outside
    [-1, M). node_mask values are not inspected (any nonzero byte allows the node).
    """
    k = _check_shapes(scores, logprobs, nodes, offsets, tokens, children, k)
    B, K_in, V = logprobs.shape
    masked = _check_mask(node_mask, mask_row, B, offsets.shape[0] - 1)
    owner, edge, tok, chd = _check_trie_refs(nodes, offsets, tokens, children, V)  # (C,) each, (b, j, e) order
    score = scores.reshape(-1)[owner] + logprobs.reshape(B * K_in, V)[owner, tok]  # (C,) float32
    keep = score > -np.inf  # drops -inf and NaN
    if masked:
        m = mask_row[owner // K_in]  # (C,) mask row of each candidate's batch row, -1 = unfiltered
        filtered = m >= 0
        keep[filtered] &= node_mask[m[filtered], chd[filtered]] != 0
    owner, tok, chd, score = owner[keep], tok[keep], chd[keep], score[keep]
    row, parent = np.divmod(owner, K_in)
    # Candidates are already in (row, parent, token) order, so a stable sort by (row, -score) leaves
    # equal scores in (parent, token) order. One uint64 key: row in the high half, score below.
    key = (row.astype(np.uint64) << np.uint64(32)) | _descending(score).astype(np.uint64)
    order = np.argsort(key, kind="stable")
    row, parent, tok, chd, score = row[order], parent[order], tok[order], chd[order], score[order]
    rank = np.arange(row.shape[0]) - np.searchsorted(row, row, side="left")  # position inside its row
    sel = rank < k
    out = TopK(np.full((B, k), -1, np.int32), np.full((B, k), -1, np.int32), np.full((B, k), -1, np.int32),
               np.full((B, k), -np.inf, np.float32))
    at = (row[sel], rank[sel])
    out.parent[at] = parent[sel]
    out.token[at] = tok[sel]
    out.node[at] = chd[sel]
    out.score[at] = score[sel]
    return out


# ---------------------------------------------------------------------------------------------
# native modules and the shim


@functools.cache
def _load(impl: str) -> tuple[ModuleType | None, str]:
    """(module, "") when ``impl`` is usable, else (None, why not)."""
    if impl == "numpy":
        return None, ""
    name = f"pauserec._trie_topk_{impl}"
    try:
        mod = importlib.import_module(name)
    except ImportError as e:
        return None, f"{name} cannot be imported ({e})"
    if impl == "cuda" and not mod.cuda_available():
        return None, mod.unavailable_reason() or "no CUDA device"
    return mod, ""


def _cpu_built_with_cuda() -> bool:
    mod, _ = _load("cpu")
    return bool(mod is not None and mod.built_with_cuda)


def _unavailable(impl: str, why: str) -> BackendUnavailable:
    if impl == "cpu":
        hint = ("the native CPU kernel was not built: reinstall pauserec from source with a C++17 compiler "
                "and CMake >= 3.18 available (pip install --force-reinstall --no-deps <pauserec source>), "
                "or use impl='numpy'")
    elif "PAUSEREC_CUDA_ARCHS" in why:
        hint = "or use impl='cpu' or 'auto'"
    elif _cpu_built_with_cuda() or "cannot be imported" not in why:
        hint = "the CUDA kernel is built but needs an NVIDIA GPU and driver here; use impl='cpu' or 'auto'"
    else:
        hint = ("pauserec was built without CUDA: reinstall from source with nvcc (CUDA toolkit >= 12) on "
                "PATH and PAUSEREC_CUDA not set to OFF, or use impl='cpu' or 'auto'")
    return BackendUnavailable(f"trie_topk impl={impl!r} is not available: {why}. {hint}")


def available_impls() -> tuple[str, ...]:
    """Implementations usable in this process (cuda, cpu, numpy order); ``auto`` picks by where the data is."""
    return tuple(i for i in IMPLS if i == "numpy" or _load(i)[0] is not None)


def cuda_module() -> ModuleType:
    """The usable CUDA module, else BackendUnavailable saying why (no GPU, or a GPU this build has no code for)."""
    mod, why = _load("cuda")
    if mod is None:
        raise _unavailable("cuda", why)
    return mod


def built_cuda_archs() -> dict[str, list[int]] | None:
    """{"sass": [...], "ptx": [...]}: compute capabilities x 10 compiled into the CUDA module (None without one)."""
    try:
        return importlib.import_module("pauserec._trie_topk_cuda").built_archs()
    except ImportError:
        return None


def on_device(x) -> bool:
    """Whether ``x`` lives on a CUDA device (OrtValue on "cuda", or ``__cuda_array_interface__``)."""
    if isinstance(x, np.ndarray):
        return False
    from pauserec.runtime.device import device_view

    return device_view(x) is not None


def auto_impl(logprobs) -> str:
    """The implementation ``impl="auto"`` uses for these log-probs (see the module docstring)."""
    if on_device(logprobs):
        return "cuda"
    return next(i for i in HOST_AUTO if i == "numpy" or _load(i)[0] is not None)


@functools.cache
def _cuda_ops():
    """One CudaOps per process: its resident tries are reused by every device call of the shim."""
    from pauserec.runtime.device import CudaOps

    return CudaOps(cuda_module())


def device_failure(e: Exception) -> BackendUnavailable:
    """A CUDA error during a call, as the project's error (what failed and what to do)."""
    return BackendUnavailable(f"the CUDA trie-masked top-k failed on this GPU: {e}")


def trie_topk(scores, logprobs, nodes, offsets, tokens, children, k: int, impl: str = "auto",
              node_mask=None, mask_row=None) -> TopK:
    """Best k (parent, token, child node, score) per row over valid trie children only.

    Shapes: scores (B, K_in) float32, logprobs (B, K_in, V) float32, nodes (B, K_in) int32, trie CSR
    offsets (N + 1,) / tokens (E,) / children (E,) int32 -> :class:`TopK` of (B, k) arrays. Optional
    filter: node_mask (M, N) uint8 + mask_row (B,) int32 (children whose mask is 0 are never entered).
    Semantics and errors: see :func:`trie_topk_numpy`. ``impl``: "auto" | "numpy" | "cpu" | "cuda".
    Device inputs (log-probs on a CUDA device, with scores/nodes on the device or host): the result
    is a :class:`TopK` of device arrays (``DeviceArray``, with ``__cuda_array_interface__``).
    """
    if impl == "auto":
        impl = auto_impl(logprobs)
    elif impl not in IMPLS:
        raise ValueError(f"impl must be one of 'auto', {', '.join(map(repr, IMPLS))}; got {impl!r}")
    if impl == "cuda" and on_device(logprobs):
        ops = _cuda_ops()
        return ops.topk(ops.cached_trie(offsets, tokens, children), scores, logprobs, nodes, k, node_mask, mask_row)
    if impl == "numpy":
        return trie_topk_numpy(scores, logprobs, nodes, offsets, tokens, children, k, node_mask, mask_row)
    mod, why = _load(impl)
    if mod is None:
        raise _unavailable(impl, why)
    k = operator.index(k)
    if not 1 <= k <= MAX_K:  # before the native call, which only takes 64-bit integers
        raise ValueError(f"k must be in [1, {MAX_K}] (the number of beams to keep), got {k}")
    extra = () if node_mask is None and mask_row is None else (node_mask, mask_row)  # unfiltered: the plain call
    try:
        return TopK(*mod.trie_topk(scores, logprobs, nodes, offsets, tokens, children, k, *extra))
    except ValueError:
        raise
    except RuntimeError as e:  # only the CUDA module raises these (CudaError)
        raise device_failure(e) from e
