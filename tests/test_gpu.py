"""GPU paths: the device-resident beam search and the CUDA execution provider.

On a CPU-only machine the device search runs with ``HostOps`` on IO-bound CPU sessions: the same
control flow as on the GPU (what is kept where, shapes, dtypes, KV slot writes and beam reorders),
checked against the host search, and checked to send no KV or log-probs to the host. On a machine
with onnxruntime-gpu and a GPU the same engines also run on the CUDA EP (and the CUDA top-k), and
must give the CPU engine's top-10; those tests skip by the runtime's own availability checks.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from test_export import exported  # noqa: E402

from pauserec.runtime import Engine, Recommender  # noqa: E402
from pauserec.runtime.backends import unavailable_reason  # noqa: E402
from pauserec.runtime.device import HostOps, HostValue  # noqa: E402
from pauserec.runtime.trie_topk import available_impls  # noqa: E402

ARCH_OF = {"direct": "qwen2", "pause": "qwen3", "cot": "llama"}
HISTORIES = [["item1", "item5"], ["item7"], ["item2", "item9", "item3", "item12", "item20", "item0", "item8"]]
CUDA_EP = unavailable_reason("cuda")
CUDA_TOPK = "cuda" in available_impls()

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="session")
def engine_dirs(tmp_path_factory):
    dirs = {kind: exported(tmp_path_factory, arch, kind) for kind, arch in ARCH_OF.items()}
    dirs["cot-static"] = exported(tmp_path_factory, "llama", "cot", "-static", static=True, batch=3, beams=6,
                                  max_history=7)
    dirs["pause-fp16"] = exported(tmp_path_factory, "qwen3", "pause", "-fp16-gpu", precision="fp16", min_agreement=0.0)
    return dirs


class CountingOps(HostOps):
    """HostOps that counts host copies of device values."""

    def __init__(self) -> None:
        self.downloads: list[tuple] = []

    def download(self, value):
        out = super().download(value)
        self.downloads.append(out.shape)
        return out


def _on_host_device(path, record: list | None = None) -> tuple[Engine, CountingOps]:
    """An engine whose sessions run the IO-bound path on the CPU, searched with HostOps."""
    engine = Engine.load(path, provider="cpu", threads=1, prepack=False)  # per-graph sessions, as on a GPU
    for name, session in engine.sessions.items():
        session.bound = "cpu"
        if record is not None:
            run = session.run

            def spy(feeds, keep=(), _run=run, _name=name):
                record.append((_name, {k: type(v).__name__ for k, v in feeds.items()}, keep))
                return _run(feeds, keep)

            session.run = spy
    engine.ops = CountingOps()
    return engine, engine.ops


@pytest.mark.parametrize("kind", ["direct", "pause", "cot", "cot-static", "pause-fp16"])
def test_device_search_on_host_matches_host_search(engine_dirs, kind):
    beams = 6
    host = Recommender(Engine.load(engine_dirs[kind], provider="cpu", threads=1, prepack=False)).recommend(
        HISTORIES, k=beams, beams=beams)
    calls: list = []
    engine, ops = _on_host_device(engine_dirs[kind], calls)
    dev = Recommender(engine).recommend(HISTORIES, k=beams, beams=beams)
    assert dev.items.tolist() == host.items.tolist()
    np.testing.assert_allclose(dev.scores, host.scores, rtol=1e-5, atol=1e-5)
    # what crossed to the host: the leaves, and for cot the rationale log-probs (decided on the host)
    batches = -(-len(HISTORIES) // (engine.static_batch or len(HISTORIES)))
    assert len(ops.downloads) == 2 * batches and all(shape[-1] == beams for shape in ops.downloads)
    for graph, feeds, keep in calls:
        if graph == "decode":  # context KV, beam KV and codes are device values; only the step scalar is host data
            assert {feeds[n] for n in ("ctx_key", "ctx_value", "beam_key", "beam_value", "codes", "ctx_mask")} <= {
                "OrtValue", "HostValue"}, feeds
            assert set(keep) == {"logprobs", "new_key", "new_value"}
        if graph == "think":
            assert feeds["ctx_key"] in ("OrtValue", "HostValue") and set(keep) == {"new_key", "new_value"}
        if graph == "prefill":
            assert "ctx_key" in keep and ("logprobs" in keep) == (not kind.startswith("cot"))


def test_device_search_on_host_with_filters(engine_dirs):
    host = Recommender(Engine.load(engine_dirs["pause"], provider="cpu", threads=1))
    engine, _ = _on_host_device(engine_dirs["pause"])
    dev = Recommender(engine)
    kw = dict(k=6, beams=6, exclude=[["item3", "item4"], None, ["item1"]], exclude_history=True)
    want, got = host.recommend(HISTORIES, **kw), dev.recommend(HISTORIES, **kw)
    assert got.items.tolist() == want.items.tolist()
    allow = host.recommend(HISTORIES, k=5, beams=6, allow=["item1", "item2", "item3", "item7", "item9"])
    assert dev.recommend(HISTORIES, k=5, beams=6, allow=["item1", "item2", "item3", "item7", "item9"]).items.tolist() == \
        allow.items.tolist()


def test_host_engines_keep_the_host_loop(engine_dirs):
    from pauserec.runtime.beam import ArrayOps, beam_search

    engine = Engine.load(engine_dirs["pause"], provider="cpu", threads=1)
    assert engine.device_ops() is None
    ids = np.ones((1, 4), np.int64)
    assert type(beam_search(engine, ids, ids, beams=2).ops) is ArrayOps
    engine.ops = HostOps()
    assert beam_search(engine, ids, ids, beams=2).ops is engine.ops  # the device steps
    assert type(beam_search(engine, ids, ids, beams=2, impl="cpu").ops) is ArrayOps  # an explicit host kernel


def test_host_value_feeds_like_an_array():
    v = HostValue(np.arange(6, dtype=np.int64).reshape(2, 3))
    np.testing.assert_array_equal(np.asarray(v), v.array)
    assert np.asarray(v, order="C").flags.c_contiguous


# -- on a GPU ----------------------------------------------------------------------------------------
needs_cuda_ep = pytest.mark.skipif(CUDA_EP is not None, reason=f"CUDA EP unusable here: {CUDA_EP}")


@pytest.mark.gpu
@needs_cuda_ep
@pytest.mark.parametrize("kind", ["direct", "pause", "cot", "cot-static", "pause-fp16"])
def test_cuda_ep_top10_matches_cpu(engine_dirs, kind):
    cpu = Recommender(Engine.load(engine_dirs[kind], provider="cpu")).recommend(HISTORIES, k=10, beams=20)
    engine = Engine.load(engine_dirs[kind], provider="cuda")
    assert engine.provider == "cuda"
    assert all(s.sess.get_providers()[0] == "CUDAExecutionProvider" for s in engine.sessions.values())
    assert (engine.device_ops() is not None) == CUDA_TOPK
    tol = 2e-3 if kind.endswith("fp16") else 1e-4
    gpu = Recommender(engine).recommend(HISTORIES, k=10, beams=20)  # device search where the CUDA top-k runs
    assert same_top10(gpu, cpu, tol)
    host_loop = Recommender(engine, impl="cpu").recommend(HISTORIES, k=10, beams=20)  # CUDA EP, host top-k
    assert same_top10(host_loop, cpu, tol)


@needs_cuda_ep
def test_cuda_sessions_share_one_device_copy_of_the_weights(engine_dirs, capfd):
    """Each weight goes to the GPU once, for every graph's session: ONNX Runtime warns ("Cannot use user supplied
    initializer") and copies per session when it is handed CPU values instead."""
    engine = Engine.load(engine_dirs["cot"], provider="cuda")
    store = next(iter(engine.sessions.values())).weights
    assert all(s.weights is store for s in engine.sessions.values())
    assert {key[-1] for key in store._values} == {"cuda"}
    Recommender(engine).recommend(HISTORIES, k=10, beams=20)
    assert "Cannot use user supplied initializer" not in capfd.readouterr().err


def same_top10(got, want, tol: float) -> bool:
    """Equal top-10 lists with scores within ``tol``; a list may differ only after two scores tie within ``tol``."""
    for a, sa, b, sb in zip(got.items, got.scores, want.items, want.scores):
        diff = np.flatnonzero(a != b)
        upto = diff[0] if diff.size else len(a)
        if not np.allclose(sa[:upto], sb[:upto], atol=tol):
            return False
        if diff.size and not (abs(sa[upto] - sb[upto]) <= tol and (upto + 1 >= len(a) or
                                                                   abs(sb[upto] - sb[upto + 1]) <= 2 * tol)):
            return False
    return True


@pytest.mark.gpu
@needs_cuda_ep
def test_cuda_ep_device_search_keeps_kv_on_the_device(engine_dirs):
    if not CUDA_TOPK:
        pytest.skip("the CUDA top-k is not usable here (see trie_topk.available_impls)")
    calls: list = []
    engine = Engine.load(engine_dirs["pause"], provider="cuda")
    run = engine.sessions["decode"].run
    engine.sessions["decode"].run = lambda feeds, keep=(): calls.append(feeds) or run(feeds, keep)
    Recommender(engine).recommend(HISTORIES, k=8, beams=8)
    assert calls and all(not isinstance(f[n], np.ndarray) for f in calls for n in ("ctx_key", "beam_key", "codes"))
