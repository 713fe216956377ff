"""The CUDA kernels' source (cpp_ext/trie_topk_kernels.cuh) run on the CPU by tests/cuda_emulator.cpp.

No GPU is needed: the kernel file is compiled as C++ with one std::thread per CUDA thread and a
barrier for __syncthreads. Two builds: the real launch shape (256 threads, 4,096 keys in shared
memory) and a small one (64 threads, 64 shared keys) whose limits small inputs already exceed, so
the radix select and the keys-in-global-memory path run too. Indices must equal the NumPy
reference exactly; the GPU itself is checked by the CUDA parity tests in test_trie_topk.py.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pauserec.runtime.trie_topk import TopK, trie_topk_numpy
from test_trie_topk import SMALL, Trie, assert_same, brute_force, random_inputs, random_mask, random_trie

REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO / "tests" / "cuda_emulator.cpp"
STATUS = {1: "node", 2: "offsets", 3: "token", 4: "sorted", 5: "child", 6: "mask_row", 7: "too many"}


class Emulator:
    def __init__(self, lib: ctypes.CDLL) -> None:
        self.lib = lib
        lib.emu_trie_topk.restype = ctypes.c_int
        self.threads, self.shared_keys = lib.emu_threads(), lib.emu_shared_keys()

    def topk(self, scores, logprobs, nodes, offsets, tokens, children, k, node_mask=None, mask_row=None) -> TopK:
        B, K, V = logprobs.shape
        arrays = [np.ascontiguousarray(a) for a in (scores, logprobs, nodes, offsets, tokens, children)]
        out = TopK(np.zeros((B, k), np.int32), np.zeros((B, k), np.int32), np.zeros((B, k), np.int32),
                   np.zeros((B, k), np.float32))
        mask = np.ascontiguousarray(node_mask) if node_mask is not None else None
        rows = np.ascontiguousarray(mask_row) if mask_row is not None else None
        ptr = lambda a: None if a is None else a.ctypes.data_as(ctypes.c_void_p)  # noqa: E731
        i64 = ctypes.c_int64
        status = self.lib.emu_trie_topk(*map(ptr, arrays), i64(offsets.shape[0] - 1), i64(tokens.shape[0]), i64(B),
                                        i64(K), i64(V), i64(k), ptr(mask), ptr(rows),
                                        i64(0 if mask is None else mask.shape[0]), *map(ptr, out))
        if status:
            raise ValueError(f"device status {status} ({STATUS.get(status)})")
        return out


def _build(tmp: Path, threads: int, shared_keys: int) -> Emulator:
    cxx = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no C++ compiler to build the kernel emulator")
    lib = tmp / f"emu_{threads}_{shared_keys}.so"
    cmd = [cxx, "-std=c++20", "-O2", "-shared", "-fPIC", "-pthread", f"-I{REPO / 'cpp_ext' / 'include'}",
           f"-DPAUSEREC_TOPK_THREADS={threads}", f"-DPAUSEREC_TOPK_SHARED_KEYS={shared_keys}", str(SOURCE), "-o", str(lib)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        if "barrier" in res.stderr or "atomic_ref" in res.stderr:
            pytest.skip(f"the C++ compiler lacks C++20 std::barrier/atomic_ref: {res.stderr[:300]}")
        raise AssertionError(f"the kernel emulator does not compile:\n{res.stderr}")
    return Emulator(ctypes.CDLL(str(lib)))


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Emulator:
    return _build(tmp_path_factory.mktemp("emu"), 64, 64)


@pytest.fixture(scope="module")
def real(tmp_path_factory) -> Emulator:
    return _build(tmp_path_factory.mktemp("emu"), 256, 4096)


def check(emu: Emulator, scores, logprobs, nodes, trie, k, node_mask=None, mask_row=None) -> TopK:
    csr = trie.csr if isinstance(trie, Trie) else trie
    got = emu.topk(scores, logprobs, nodes, *csr, k, node_mask, mask_row)
    assert_same(got, trie_topk_numpy(scores, logprobs, nodes, *csr, k, node_mask, mask_row))
    return got


# ---------------------------------------------------------------------------------------------
# the small build: every path on small inputs


@pytest.mark.parametrize("seed", range(4))
def test_small_build_random_parity(small, seed):
    rng = np.random.default_rng(seed)
    V = int(rng.integers(8, 40))
    trie = random_trie(rng, items=int(rng.integers(50, 400)), levels=3, vocab=V)
    B, K = 3, int(rng.integers(4, 24))
    for k in (1, 5, 63, 64, 65, 130, 4 * K * V):  # around the shared-key limit, and above every candidate count
        inputs = random_inputs(rng, trie, B, K, V, ties=seed % 2 == 1, holes=0.05 * (seed % 3))
        check(small, *inputs, trie, k)
    inputs = random_inputs(rng, trie, B, K, V, ties=True)
    check(small, *inputs, trie, 20, *random_mask(rng, trie, B, "per_row", density=0.7))


def test_small_build_ties_need_the_ordinal_half_of_the_key(small):
    """Thousands of equal scores: the k-th key is decided by (parent, token) alone, past the score bits."""
    rng = np.random.default_rng(5)
    V, K = 32, 40
    trie = Trie(np.stack(np.meshgrid(np.arange(V), np.arange(V), indexing="ij"), -1).reshape(-1, 2))
    nodes = rng.integers(1, V + 1, size=(2, K)).astype(np.int32)  # depth-1 nodes, 32 children each
    scores = np.zeros((2, K), np.float32)
    logprobs = np.full((2, K, V), -1.0, np.float32)
    logprobs[0, :, ::3] = -0.0  # a second tie class, -0.0 equal to 0.0
    for k in (1, 63, 64, 65, 200, 1000):
        check(small, scores, logprobs, nodes, trie, k)


def test_small_build_masks_and_dead_rows(small):
    scores = np.array([[0.0, -1.0], [-np.inf, np.nan], [0.0, 0.0]], np.float32)
    logprobs = np.log(np.full((3, 2, 4), 0.25, np.float32))
    nodes = np.array([[1, 2], [0, 1], [-1, -1]], np.int32)
    for k in (1, 3, 6):
        check(small, scores, logprobs, nodes, SMALL, k)
    node_mask = np.array([[1, 1, 1, 1, 0, 1]], np.uint8)
    check(small, scores, logprobs, nodes, SMALL, 4, node_mask, np.array([0, -1, 0], np.int32))


def test_small_build_bad_input_sets_a_status(small):
    scores, logprobs = np.zeros((1, 1), np.float32), np.zeros((1, 1, 4), np.float32)
    offsets, tokens, children = (a.copy() for a in SMALL)
    with pytest.raises(ValueError, match="node"):
        small.topk(scores, logprobs, np.array([[6]], np.int32), offsets, tokens, children, 2)
    tokens[3] = 9  # node 1's last code: still sorted, but outside V = 4
    with pytest.raises(ValueError, match="token"):
        small.topk(scores, logprobs, np.array([[1]], np.int32), offsets, tokens, children, 2)
    with pytest.raises(ValueError, match="mask_row"):
        small.topk(scores, logprobs, np.array([[2]], np.int32), *SMALL, 2, np.ones((1, 6), np.uint8),
                   np.array([3], np.int32))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), items=st.integers(1, 300), levels=st.integers(1, 3),
       vocab=st.integers(1, 24), B=st.integers(0, 3), K=st.integers(1, 12), k=st.integers(1, 200),
       ties=st.booleans(), holes=st.sampled_from([0.0, 0.1, 0.4]),
       mask=st.sampled_from(["none", "shared", "per_row"]), density=st.sampled_from([0.0, 0.5, 1.0]))
def test_fuzz_small_build_matches_brute_force(small, seed, items, levels, vocab, B, K, k, ties, holes, mask, density):
    rng = np.random.default_rng(seed)
    trie = random_trie(rng, items, levels, vocab)
    inputs = random_inputs(rng, trie, B, K, vocab, ties=ties, holes=holes)
    node_mask, mask_row = random_mask(rng, trie, B, mask, density)
    assert_same(small.topk(*inputs, *trie.csr, k, node_mask, mask_row),
                brute_force(*inputs, *trie.csr, k, node_mask, mask_row))


# ---------------------------------------------------------------------------------------------
# the real build: the launch shape the GPU runs


def test_real_build_wide_levels(real):
    """K up to 256 beams, V = 256 and a 1,024-wide level: beyond 4,096 candidates, so the radix select runs."""
    rng = np.random.default_rng(9)
    for V, K, B in ((256, 256, 2), (1024, 64, 2)):
        trie = Trie(rng.integers(0, V, size=(20000, 2)))
        lo, hi = trie.level_starts[1], trie.level_starts[2]
        nodes = np.concatenate([np.zeros((B, 1), np.int32),  # the root: up to V children
                                rng.integers(lo, hi, size=(B, K - 1)).astype(np.int32)], axis=1)
        scores = rng.normal(-3, 1, (B, K)).astype(np.float32)
        logprobs = rng.normal(-5, 2, (B, K, V)).astype(np.float32)
        for k in (1, 20, K):
            check(real, scores, logprobs, nodes, trie, k)
        node_mask, mask_row = random_mask(rng, trie, B, "shared", density=0.5)
        check(real, scores, logprobs, nodes, trie, K, node_mask, mask_row)


def test_real_build_typical_level(real):
    rng = np.random.default_rng(2)
    trie = random_trie(rng, 3000, 4, 256)
    lo, hi = trie.level_starts[1], trie.level_starts[2]
    nodes = np.stack([rng.choice(np.arange(lo, hi), 20, replace=False) for _ in range(4)]).astype(np.int32)
    scores = rng.normal(-4, 1, (4, 20)).astype(np.float32)
    logprobs = np.log(rng.dirichlet(np.ones(256), size=(4, 20))).astype(np.float32)
    for k in (1, 20, 50):
        check(real, scores, logprobs, nodes, trie, k)


# ---------------------------------------------------------------------------------------------
# beam-state kernels


def test_beam_state_kernels(small):
    rng = np.random.default_rng(0)
    lib, vp, i64 = small.lib, ctypes.c_void_p, ctypes.c_int64
    L, B, H, K, S, D = 2, 3, 2, 4, 3, 5
    beam = rng.normal(size=(L, B, H, K, S, D)).astype(np.float16)
    new = rng.normal(size=(L, B, H, K, 1, D)).astype(np.float16)
    want = beam.copy()
    want[:, :, :, :, 1] = new[:, :, :, :, 0]
    rows, width = L * B * H * K, D * 2
    lib.emu_copy_slots(beam.ctypes.data_as(vp), new.ctypes.data_as(vp), i64(rows), i64(S), i64(1), i64(1), i64(0),
                       i64(1), i64(width))
    np.testing.assert_array_equal(beam, want)

    parent = rng.integers(-1, K, size=(B, K)).astype(np.int32)
    out = np.empty_like(beam)
    lib.emu_gather_beams(out.ctypes.data_as(vp), beam.ctypes.data_as(vp), parent.ctypes.data_as(vp), i64(L), i64(B),
                         i64(H), i64(K), i64(S * D * 2))
    np.testing.assert_array_equal(out, np.take_along_axis(beam, np.maximum(parent, 0)[None, :, None, :, None, None], 3))

    ctx = rng.normal(size=(L, B, H, 7, D)).astype(np.float32)
    buf = np.zeros((L, B, H, 10, D), np.float32)
    lib.emu_copy_slots(buf.ctypes.data_as(vp), ctx.ctypes.data_as(vp), i64(L * B * H), i64(10), i64(0), i64(7), i64(0),
                       i64(7), i64(D * 4))
    np.testing.assert_array_equal(buf[:, :, :, :7], ctx)
    assert not buf[:, :, :, 7:].any()

    tokens = np.array([[3, -1, 0], [7, 2, -1]], np.int32)
    codes = np.zeros(tokens.shape, np.int64)
    lib.emu_tokens_to_codes(codes.ctypes.data_as(vp), tokens.ctypes.data_as(vp), i64(tokens.size))
    np.testing.assert_array_equal(codes, np.maximum(tokens, 0))
