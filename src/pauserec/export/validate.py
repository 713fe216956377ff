"""Every exported graph against the HF model's own forward pass; all mismatches reported at once.

For each case (``random`` token histories and ``real`` catalog histories) a batch of right-padded
histories goes through the ONNX graphs on ONNX Runtime (prefill, think steps for cot, one decode per
SID level with arbitrary beam choices) and every log-prob is compared with
``log_softmax(HF logits over the full vocabulary)`` gathered at the same codes, the HF model running
the full unpadded sequence. Reduced precisions (fp16, int8, int4) are not held to a log-prob
tolerance: ``compare_quantized`` measures what ranking depends on (top-10 agreement with the fp32
engine, Hit@10 change) on a sample, the same way for all of them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from pauserec.prompt.spec import PromptEncoder, PromptSpec
from pauserec.errors import ExportError
from pauserec.runtime.spec import ModelShape

# fp32 must match the HF model; reduced precisions are reported and judged by ranking agreement instead
ATOL = {"fp32": 1e-4, "bf16": float("inf"), "fp16": float("inf"), "int8": float("inf"), "int4": float("inf")}
# A row's common offset (its log-normaliser) carries the float32 rounding of the row's largest logits, which grows
# with their size (~1.2e-4 on a trained 128-wide model whose differences within the row were 3e-6): it moves every
# code of a level alike, so it is held to NORMALISER_FACTOR x the tolerance, the rest of the row to the tolerance.
NORMALISER_FACTOR = 10
NORMALISER = " normaliser"  # suffix of the output name of a row's common-offset check
MAX_REF_ROWS, MAX_REF_BEAMS = 3, 3  # HF reference runs per case: rows x beams sequences


@dataclass
class Check:
    graph: str
    case: str
    output: str
    max_abs_err: float
    atol: float
    precision: str = "fp32"
    against: str = "hf"  # "hf": the HF model's forward pass; "onnx": a plan against its ONNX graph

    @property
    def ok(self) -> bool:
        return bool(self.max_abs_err <= self.atol)

    def to_dict(self) -> dict:
        """JSON-safe: a non-finite tolerance or error (int8's "no tolerance", NaN outputs) becomes None."""
        d = {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in asdict(self).items()}
        return {**d, "ok": self.ok}


class OrtGraphs:
    """ONNX Runtime CPU sessions over staged graph files that share one ``weights.bin`` (validation only).

    One session is open at a time: running another graph closes the open one first. A session can hold far more
    than the mapped weights (ONNX Runtime's CPU provider turns every float16 weight of a graph into a float32 copy
    as the session loads: an fp16 engine's prefill and decode sessions side by side held 4.3x its bytes, which is
    why fp16 graphs are checked in the merged model, ``MergedGraphs``), and the checks switch graphs a few times.
    """

    def __init__(self, files: dict[str, Path], threads: int | None = None) -> None:
        from pauserec.runtime.weights import WEIGHTS_FILE, WeightStore

        self.files, self.threads = files, threads
        self.weights = WeightStore(next(iter(files.values())).parent / WEIGHTS_FILE)
        self.sessions = {n: None for n in files}

    def run(self, graph: str, **feeds) -> list[np.ndarray]:
        from pauserec.runtime.backends.ort import inference_session, session_options
        from pauserec.runtime.memory import release_memory

        if self.sessions[graph] is None:
            self.sessions = {n: None for n in self.files}
            release_memory(collect=False)
            opts = session_options(self.threads)
            self.weights.add_to(opts, self.files[graph])
            self.sessions[graph] = inference_session(self.files[graph], opts, ["CPUExecutionProvider"])
        return self.sessions[graph].run(None, feeds)


class MergedGraphs:
    """The graphs of an engine's merged model (one prepacked session), as a validation runner."""

    def __init__(self, path: Path, specs: dict, threads: int | None = None, kv_dtype: str = "float32",
                 cast_weights: bool = False) -> None:
        from pauserec.runtime.backends.ort import MergedSession
        from pauserec.runtime.memory import dropping_mapped_pages
        from pauserec.runtime.spec import GraphSpec
        from pauserec.runtime.weights import WEIGHTS_FILE

        concrete = {n: GraphSpec.from_manifest(n, s.to_dict(kv_dtype)) for n, s in specs.items()}
        with dropping_mapped_pages(path.parent / WEIGHTS_FILE):  # as the runtime opens it (prepacked)
            self.sessions = MergedSession(path, concrete, threads, cast_weights=cast_weights).views

    def run(self, graph: str, **feeds) -> list[np.ndarray]:
        view = self.sessions[graph]
        out = view.run(feeds)
        return [out[n] for n in view.io.output_names]


def merged_checks(checks: list[Check]) -> list[Check]:
    """The checks of a merged model's run, named ``merged:<graph>``."""
    from dataclasses import replace

    return [replace(c, graph=f"merged:{c.graph}") for c in checks]


def output_diff(want: np.ndarray, got: np.ndarray) -> float:
    """Largest |got - want| where both are finite; inf where only one of them is (or a NaN appears)."""
    want, got = np.asarray(want, np.float64), np.asarray(got, np.float64)
    if want.shape != got.shape:
        return float("inf")
    same = (want == got) | (np.isnan(want) & np.isnan(got))  # includes equal infinities
    finite = np.isfinite(want) & np.isfinite(got)
    if not (same | finite).all():
        return float("inf")
    with np.errstate(invalid="ignore"):  # inf - inf where same: not selected
        d = np.where(same, 0.0, np.abs(got - want))
    return float(d.max()) if d.size else 0.0


class PairedGraphs:
    """Runs every graph call on ``ref`` (whose outputs drive the validation case) and on ``other`` with
    the same feeds, and records the largest difference of each output (``take`` per case)."""

    def __init__(self, ref, other, output_names: dict[str, list[str]], label: str) -> None:
        self.ref, self.other, self.names, self.label = ref, other, output_names, label
        self.sessions = ref.sessions
        self.diffs: dict[tuple[str, str], float] = {}

    def run(self, graph: str, **feeds) -> list[np.ndarray]:
        want = self.ref.run(graph, **feeds)
        got = self.other.run(graph, **feeds)
        for name, w, g in zip(self.names[graph], want, got):
            key = (graph, name)
            self.diffs[key] = max(self.diffs.get(key, 0.0), output_diff(w, g))
        return want

    def take(self) -> dict[tuple[str, str], float]:
        out, self.diffs = self.diffs, {}
        return out


def level_logprobs(full: np.ndarray, token_ids, scoring: str) -> np.ndarray:
    """Full-vocabulary log-probs (..., vocab) -> one level's codes: as they are (``full``) or
    renormalised over the level (``sid``: the same as a softmax over those rows' logits only)."""
    from pauserec.runtime.beam import renormalize

    x = np.asarray(full, dtype=np.float64)[..., list(token_ids)]
    return x if scoring == "full" else renormalize(x)


def hf_logprobs(model, ids: list[int]) -> np.ndarray:
    """(len(ids), vocab) float64 log-probs of the HF model's own forward over the whole sequence."""
    import torch

    with torch.no_grad():
        logits = model(torch.tensor([ids], dtype=torch.long)).logits[0].double()
    return torch.log_softmax(logits, dim=-1).numpy()


class References:
    """The HF model's log-probs per token sequence, kept for the last ``rows`` positions only.

    Validation first runs with ``ShapeOnlyGraphs`` to compute every reference it will need (the random
    draws do not depend on graph outputs), so the model can be freed before the ONNX graphs run: the
    HF weights and the engine's mapped weights are never resident together.
    """

    def __init__(self, model, rows: int = 1, streamed=None) -> None:
        """``streamed``: a ``StreamedWeights`` (``model`` is then None): the sequences asked for are recorded, and
        ``compute_recorded`` runs them all through HF's decoder layers one layer at a time."""
        self.model, self.rows, self.cache, self.streamed = model, max(1, rows), {}, streamed
        self.recorded: list[tuple[int, ...]] = []

    def __call__(self, ids: list[int]) -> np.ndarray:
        key = tuple(int(i) for i in ids)
        if key not in self.cache:
            if self.streamed is not None:  # collecting: the values come in compute_recorded
                if key not in self.recorded:
                    self.recorded.append(key)
                return np.zeros((self.rows, self.streamed.model.get_output_embeddings().weight.shape[0]))
            if self.model is None:
                raise ExportError("validation asked for an HF reference that was not computed beforehand; "
                                  "report this as a pauserec bug")
            self.cache[key] = hf_logprobs(self.model, list(key))[-self.rows :].copy()  # not a view of all rows
        return self.cache[key]

    def compute_recorded(self) -> None:
        from pauserec.export.stream import layerwise_logprobs

        self.cache.update(layerwise_logprobs(self.streamed, self.recorded, self.rows))
        self.recorded, self.streamed = [], None

    def release_model(self) -> None:
        self.model, self.streamed = None, None


class ShapeOnlyGraphs:
    """Stand-in for ``OrtGraphs`` returning zeros of each graph's output shape (reference collection)."""

    def __init__(self, shape: ModelShape, graphs, kv_dtype) -> None:
        self.shape, self.sessions, self.kv_dtype = shape, {g: None for g in graphs}, kv_dtype

    def run(self, graph: str, **feeds) -> list[np.ndarray]:
        s = self.shape
        kv = lambda *mid: np.zeros((s.layers, feeds[next(iter(feeds))].shape[0], s.kv_heads, *mid, s.head_dim),  # noqa: E731
                                   self.kv_dtype)
        if graph == "prefill":
            b, t = feeds["history_ids"].shape
            return [np.zeros((b, s.first_width), np.float32), kv(t + s.suffix_len), kv(t + s.suffix_len)]
        if graph == "think":
            return [np.zeros((len(feeds["token"]), s.vocab), np.float32), kv(1), kv(1)]
        b, k = feeds["codes"].shape
        return [np.zeros((b, k, s.next_width), np.float32), kv(k, 1), kv(k, 1)]


class torch_threads:
    """Run torch on ``n`` threads (1 by default): export work is many small ops on short sequences, and
    busy-waiting OpenMP threads beside ONNX Runtime's slow both down on small, shared machines."""

    def __init__(self, n: int | None) -> None:
        self.n = n or 1

    def __enter__(self):
        import torch

        self.prev = torch.get_num_threads()
        torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        import torch

        torch.set_num_threads(self.prev)


def _err(graph: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """(largest difference once the row's common offset is removed, that offset): the offset is the median
    difference, the log-normaliser's error; the rest is what orders the row's codes."""
    graph = np.asarray(graph, dtype=np.float64)
    if not np.isfinite(graph).all():
        return float("inf"), float("inf")
    if not graph.size:
        return 0.0, 0.0
    d = graph - np.asarray(ref, dtype=np.float64)
    shift = float(np.median(d))
    return float(np.abs(d - shift).max()), abs(shift)


class _Case:
    """One batch of histories pushed through the graphs, with the HF reference per (row, beam)."""

    def __init__(self, name, graphs, refs: References, spec: PromptSpec, shape: ModelShape, histories, kv_dtype,
                 batch: int, hist: int | None, beams: int, rng) -> None:
        self.name, self.g, self.hf, self.spec, self.shape = name, graphs, refs, spec, shape
        self.kv_dtype, self.rng, self.beams = kv_dtype, rng, beams
        self.histories = [list(h) for h in (histories * batch)[:batch]]
        t = hist or max(len(h) for h in self.histories)
        self.ids = np.full((batch, t), spec.pad_id, np.int64)
        self.mask = np.zeros((batch, t), np.int64)
        for b, h in enumerate(self.histories):
            self.ids[b, : len(h)], self.mask[b, : len(h)] = h, 1
        self.rows = sorted({0, 1, batch - 1} & set(range(batch)))[:MAX_REF_ROWS]
        self.checks: dict[tuple[str, str], float] = {}

    def record(self, graph: str, output: str, err: tuple[float, float]) -> None:
        """``err``: ``_err``'s (within the row, the row's common offset), kept as two checks."""
        for key, e in (((graph, output), err[0]), ((graph, output + NORMALISER), err[1])):
            self.checks[key] = max(self.checks.get(key, 0.0), e)

    @property
    def tables(self) -> list[tuple[int, ...]]:
        """Token ids of each level the search steps through: the SID's, then one per token scored after it."""
        return [*self.spec.sid_token_ids, *((int(t),) for t in self.spec.after_ids)]

    def level_ref(self, full: np.ndarray, level: int) -> np.ndarray:
        """HF log-probs of level ``level``'s codes under the engine's scoring rule (full vocab or the level)."""
        return level_logprobs(full, self.tables[level], self.shape.scoring)

    def prompt(self, b: int) -> list[int]:
        return [*self.spec.prefix_ids, *self.histories[b], *self.spec.suffix_ids]

    def run(self) -> None:
        s = self.shape
        lp, ck, cv = self.g.run("prefill", history_ids=self.ids, history_mask=self.mask)
        cmask = np.concatenate([self.mask, np.ones((len(self.ids), s.suffix_len), np.int64)], axis=1)
        prefixes = {b: self.prompt(b) for b in self.rows}
        for b in self.rows:
            ref = self.hf(prefixes[b])[-1]
            self.record("prefill", "logprobs", _err(lp[b], ref if s.kind == "cot" else self.level_ref(ref, 0)))
        if s.kind == "cot":
            ck, cv, cmask, prefixes = self.think(lp, ck, cv, cmask, prefixes)
        if "decode" in self.g.sessions:
            self.decode(ck, cv, cmask, prefixes)

    def think(self, lp, ck, cv, cmask, prefixes):
        """Random rationales of 0..2 tokens per row, then ``</think>`` (and the text forced after it); every step checked."""
        spec, batch = self.spec, len(self.ids)
        steps = [list(self.rng.integers(0, self.shape.vocab, size=int(self.rng.integers(0, 3)))) for _ in range(batch)]
        for b in range(batch):
            steps[b] = [t if t != spec.think_end_id else spec.pad_id for t in steps[b]] + list(spec.rationale_end)
        cap = cmask.shape[1] + max(len(x) for x in steps) if self.static_ctx is None else self.static_ctx
        ck, cv, cmask = _grow(ck, cap), _grow(cv, cap), _grow(cmask, cap)
        used = len(self.mask[0]) + self.shape.suffix_len
        for j in range(max(len(x) for x in steps)):
            tok = np.array([x[j] if j < len(x) else spec.pad_id for x in steps], np.int64)
            ctx = cap if self.static_ctx else used
            out, nk, nv = self.g.run("think", token=tok, ctx_key=ck[:, :, :, :ctx], ctx_value=cv[:, :, :, :ctx],
                                     ctx_mask=cmask[:, :ctx])
            ck[:, :, :, used], cv[:, :, :, used] = nk[:, :, :, 0], nv[:, :, :, 0]
            cmask[:, used] = [1 if j < len(x) else 0 for x in steps]
            used += 1
            for b in self.rows:
                if j < len(steps[b]):
                    prefixes[b] = prefixes[b] + [int(tok[b])]
                    self.record("think", "logprobs", _err(out[b], self.hf(prefixes[b])[-1]))
        end = cap if self.static_ctx else used
        return ck[:, :, :, :end], cv[:, :, :, :end], cmask[:, :end], prefixes

    static_ctx: int | None = None

    def decode(self, ck, cv, cmask, prefixes) -> None:
        s, batch, k = self.shape, len(self.ids), self.beams
        tables, steps = self.tables, s.steps  # (past the SID: one-token levels, code 0)
        sizes = [len(t) for t in tables]
        codes = np.stack([self.rng.integers(0, v, size=(batch, k)) for v in sizes], axis=-1)  # (B, K, L + after)
        bk = np.zeros((*ck.shape[:3], k, steps, ck.shape[-1]), ck.dtype)  # the engine's KV layout
        bv = bk.copy()
        outs = []
        for step in range(steps):
            lp, nk, nv = self.g.run("decode", codes=codes[:, :, step].astype(np.int64), step=np.array(step, np.int64),
                                    ctx_key=ck, ctx_value=cv, ctx_mask=cmask, beam_key=bk, beam_value=bv)
            bk[:, :, :, :, step], bv[:, :, :, :, step] = nk[:, :, :, :, 0], nv[:, :, :, :, 0]
            outs.append(lp)
        for b in self.rows:
            for j in sorted({0, 1, k - 1} & set(range(k)))[:MAX_REF_BEAMS]:
                sid = [tables[lv][codes[b, j, lv]] for lv in range(steps)]
                ref = self.hf(prefixes[b] + sid)[-steps:]
                for step in range(steps):
                    v = sizes[step + 1]
                    r = self.level_ref(ref[step], step + 1)
                    err = _err(outs[step][b, j, :v], r)
                    if not np.all(np.isneginf(outs[step][b, j, v:])):
                        err = (float("inf"), float("inf"))
                    after = step + 1 - s.levels  # >= 0: a token scored after the SID
                    self.record("decode", f"logprobs[level {step + 2}]" if after < 0 else f"logprobs[after {after + 1}]",
                                err)


def _grow(x: np.ndarray, cap: int) -> np.ndarray:
    """Pad the context axis (axis 3 of KV, axis 1 of masks) with zeros up to ``cap`` slots."""
    axis = 3 if x.ndim == 5 else 1
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, cap - x.shape[axis])
    return np.pad(x, pad)


def collect_references(model, encoder: PromptEncoder, shape: ModelShape, graphs, static_env: dict | None = None,
                       seed: int = 0, threads: int | None = None, streamed=None) -> References:
    """Every HF reference that ``validate_graphs`` (same seed and shapes) will compare against. ``streamed``:
    no model in memory; the references are computed one decoder layer at a time from the checkpoint."""
    refs = References(None if streamed is not None else model, rows=shape.steps, streamed=streamed)
    validate_graphs(refs, encoder, shape, ShapeOnlyGraphs(shape, graphs, np.float32), atol=float("inf"),
                    static_env=static_env, seed=seed, threads=threads)
    if streamed is not None:
        with torch_threads(threads):
            refs.compute_recorded()
    return refs


def validate_graphs(refs: References, encoder: PromptEncoder, shape: ModelShape,
                    files: dict[str, Path] | ShapeOnlyGraphs | PairedGraphs, atol: float, kv_dtype=np.float32,
                    static_env: dict | None = None, seed: int = 0, threads: int | None = None,
                    precision: str = "fp32", paired_atol: float = float("inf")) -> list[Check]:
    """All checks for ``files`` (graph name -> ONNX file, or a runner); the caller decides what a mismatch
    means. With a ``PairedGraphs`` runner, also one ``against="onnx"`` check per (graph, case, output).
    ``encoder`` assembles the ``real`` case's histories (its spec and catalog are the engine's)."""
    spec, catalog = encoder.spec, encoder.catalog
    rng = np.random.default_rng(seed)
    graphs = files if hasattr(files, "run") else OrtGraphs(files, threads)
    batch = static_env["batch"] if static_env else 3
    beams = static_env["beams"] if static_env else 2
    hist = static_env["hist"] if static_env else None
    t_max = hist or spec.max_history_tokens
    lens = [t_max, max(1, t_max // 3), 1]
    if spec.embeds_any_token:  # any token may be embedded
        random_h = [list(rng.integers(0, shape.vocab, size=n)) for n in lens]
    else:  # direct/pause graphs embed only these tokens (the runtime feeds nothing else)
        allowed = np.array(spec.embedded_ids())
        random_h = [list(allowed[rng.integers(0, len(allowed), size=n)]) for n in lens]
    n_items = [spec.max_history, max(1, spec.max_history // 2), 1]
    real_h = [list(encoder(rng.integers(0, catalog.n_items, size=n))) for n in n_items]
    checks: list[Check] = []
    for name, hists in (("random", random_h), ("real", real_h)):
        case = _Case(name, graphs, refs, spec, shape, hists, kv_dtype, batch, hist, beams, rng)
        if static_env:
            case.static_ctx = static_env["hist"] + shape.suffix_len + shape.ctx_extra
        with torch_threads(threads):
            case.run()
        checks += [Check(g, name, out, err, atol * NORMALISER_FACTOR if out.endswith(NORMALISER) else atol, precision)
                   for (g, out), err in case.checks.items()]
        if isinstance(graphs, PairedGraphs):
            checks += [Check(g, name, f"{out} ({graphs.label})", err, paired_atol, precision, against="onnx")
                       for (g, out), err in graphs.take().items()]
    return checks


def raise_mismatches(checks: list[Check], precision: str) -> None:
    bad = [c for c in checks if not c.ok and c.precision == precision]
    if bad:
        lines = "\n".join(f"  {c.graph} [{c.case}] {c.output}: max abs err {c.max_abs_err:.3g} > atol {c.atol:g}"
                          for c in bad)
        raise ExportError(f"{len(bad)} {precision} graph output(s) differ from the HF model:\n{lines}\n"
                          "no engine was written; report this with the checkpoint's config.json, or raise --atol")


def summarize(checks: list[Check]) -> list[dict]:
    return [c.to_dict() for c in checks]


# The export's own runs of an engine (ranking sample, smoke test, popularity guard) give a search call a twelfth of
# the engine's bytes (at least 170 MB) for its KV and the graphs' working copies (``Recommender.kv_memory``, which
# counts two): an eighth (256 MB) for three, as the export's memory figures were measured. A 7B model with 32 KV heads
# holds ~140 MB per user in float32, so a batch of 8 would add 2 GB to the export's peak.
CHECK_KV_SHARE, CHECK_KV_FLOOR = 1 / 12, 170 << 20


def check_recommender(path: Path, provider: str = "cpu", beams: int = 20, threads: int | None = None):
    """The engine at ``path`` loaded for the export's own checks, its calls' KV within ``CHECK_KV_SHARE``."""
    from pauserec.runtime import Engine, Recommender

    engine = Engine.load(path, provider=provider, threads=threads)
    weights = sum(p.stat().st_size for p in engine.path.iterdir() if p.is_file())
    return Recommender(engine, kv_memory=max(CHECK_KV_FLOOR, int(weights * CHECK_KV_SHARE)))


def compare_quantized(ref_dir: Path, q_dir: Path, histories: list[list[str]], targets: list[str] | None,
                      beams: int = 20, providers: tuple[str, str] = ("cpu", "cpu")) -> dict:
    """Top-10 overlap, top-1 agreement and (when targets are known) Hit@10 of a reduced-precision engine
    against its fp32 twin (or of one engine on two ``providers``, e.g. its TensorRT plans against ONNX)."""
    k = min(10, beams)
    ref = check_recommender(ref_dir, providers[0], beams).recommend(histories, k=k, beams=beams)
    return compare_with_reference(q_dir, histories, ref.items, targets, beams, providers[1])


def compare_with_reference(q_dir: Path, histories: list[list[str]], ref_items: np.ndarray, targets: list[str] | None,
                           beams: int = 20, provider: str = "cpu") -> dict:
    """``compare_quantized`` against a reference top-10 given as item ids (B, 10), "" padding: the fp32 engine's,
    or the HF model's computed one decoder layer at a time (``pauserec.export.stream.layerwise_topk``)."""
    q = check_recommender(q_dir, provider, beams).recommend(histories, k=min(10, beams), beams=beams)
    ref_items = np.asarray(ref_items)
    overlap = float(np.mean([len(set(a[a != ""]) & set(b[b != ""])) / 10 for a, b in zip(ref_items, q.items)]))
    out = {"sample": len(histories), "top10_overlap": overlap, "top1_agreement": float(np.mean(ref_items[:, 0] == q.items[:, 0]))}
    if targets is not None:
        hit = lambda items: float(np.mean([t in row for t, row in zip(targets, items)]))  # noqa: E731
        out.update({"hit10_fp32": hit(ref_items), "hit10_lowered": hit(q.items), "hit10_change": hit(q.items) - hit(ref_items)})
    return out
