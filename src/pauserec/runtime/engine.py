"""An engine directory, loaded: manifest checks, catalog, one backend session per graph, or one for all of them
on an engine's merged model (no torch)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from pauserec.data import Catalog
from pauserec.prompt.layout import read_item_fields
from pauserec.prompt.spec import ITEMS_FILE, TOKENIZER_FILE, PromptEncoder, PromptSpec
from pauserec.errors import DataError, EngineError, PauserecError
from pauserec.runtime.backends import available_cpus, open_sessions
from pauserec.runtime.manifest import FORMAT_VERSION, MANIFEST_FILE, REEXPORT, Manifest  # noqa: F401
from pauserec.runtime.spec import CAST_WEIGHTS, DTYPES, kv_width

PREFILL_TOKENS = 256  # history tokens per host prefill call: bounds its working memory (Engine.prefill)

CATALOG_FILE = "catalog.npz"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_manifest(path: Path) -> Manifest:
    """The typed manifest of an engine directory, its version checked; EngineError naming the fix."""
    return Manifest.read(Path(path))


def verify_files(path: Path, manifest: Manifest) -> None:
    """Every file listed in the manifest exists and has its recorded sha256."""
    files = manifest.files
    if not files:
        raise EngineError(f"{path / MANIFEST_FILE} lists no file checksums; re-export with `{REEXPORT.format(path=path)}`")
    for name, digest in files.items():
        f = path / name
        if not f.is_file():
            raise EngineError(f"{f} is missing from the engine; re-export with `{REEXPORT.format(path=path)}`")
        if sha256_file(f) != digest:
            raise EngineError(f"checksum mismatch for {f}: the file is corrupt or was changed after export; "
                              f"re-export with `{REEXPORT.format(path=path)}`")


def prompt_encoder(path: Path, spec: PromptSpec, catalog: Catalog) -> PromptEncoder:
    """The engine's history assembly; text-assembled prompts read the engine's tokenizer and item fields."""
    if spec.assembly == "ids":
        return PromptEncoder(spec, catalog)
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_file(str(path / TOKENIZER_FILE))
        table = json.loads((path / ITEMS_FILE).read_text()) if spec.fields else {}
    except Exception as e:  # tokenizers raises plain Exceptions
        raise EngineError(f"{path}: the prompt's {TOKENIZER_FILE} / {ITEMS_FILE} cannot be read ({e}); re-export with "
                          f"`{REEXPORT.format(path=path)}`") from e
    try:
        fields = read_item_fields(None, catalog, spec.fields, known=table)
    except DataError as e:
        raise DataError(f"{e}. The engine's prompt renders {', '.join(spec.fields)} per item: serve new items "
                        "through `pauserec catalog update ENGINE --index NEW.index.json --items ITEMS.json`") from e
    return PromptEncoder(spec, catalog, tok, fields)


class Engine:
    """A loaded engine: prompt spec, catalog, shapes and the graphs on one backend."""

    def __init__(self, path: Path, manifest: Manifest, catalog: Catalog, sessions: dict, provider: str,
                 threads: int | None = None, source: str | None = None) -> None:
        self.path, self.manifest, self.catalog, self.sessions, self.provider = path, manifest, catalog, sessions, provider
        self.threads = threads  # intra-op threads of each graph's session (CPU backends)
        self.source = source or str(path)  # what it was loaded from (a URI for a cached copy)
        shapes, model = manifest.shapes, manifest.model
        self.prompt: PromptSpec = manifest.prompt
        self.kind: str = manifest.kind
        self.scoring: str = manifest.scoring
        self.kv_dtype = DTYPES[manifest.kv_dtype]
        self.static: bool = shapes.static
        self.static_batch: int | None = shapes.batch
        self.static_beams: int | None = shapes.beams
        self.static_hist: int | None = shapes.hist
        self.suffix_len: int = shapes.suffix_len
        self.ctx_extra: int = shapes.ctx_extra
        self.layers, self.kv_heads, self.head_dim = model.layers, model.kv_heads, model.head_dim
        self.kv_width: int = kv_width(model.head_dim, manifest.kv_dtype)  # last axis of the KV tensors
        if catalog.levels != self.levels:
            raise EngineError(f"{path}: catalog has {catalog.levels} SID levels, the manifest {self.levels}; re-export it")
        self.first_ids = np.asarray(self.prompt.sid_token_ids[0], dtype=np.int64)  # cot: level-1 columns of the vocab
        self.encoder = prompt_encoder(path, self.prompt, catalog)
        self.ops = None  # device steps override (see device_ops)
        self.prefill_tokens = PREFILL_TOKENS  # history tokens per prefill call on the host (see prefill)

    @classmethod
    def load(cls, path: str | Path, provider: str = "auto", threads: int | None = None, verify: bool = True,
             prepack: bool | None = None, catalog: Catalog | str | Path | None = None, graphs: bool = True,
             tf32: bool = False, spin: bool = False) -> Engine:
        """Open an engine directory; ``provider`` is auto, cpu, cuda or tensorrt.

        ``path`` may also be a URI that pyarrow's filesystems read (``s3://``, ``gs://``, ``hdfs://``,
        ``file://``): it is copied once into this machine's engine cache and verified there
        (:mod:`pauserec.runtime.engine_cache`).

        ``threads``: intra-op threads per graph session; None: the CPUs this process may use (its CPU
        affinity and cgroup quota; ONNX Runtime's own default counts the host's cores). The graphs of
        an engine run one after another, so one session's threads are busy at a time.

        ``graphs=False`` opens the manifest and catalog only (checks, fingerprint): a driver that
        hands the work to other processes; its graph calls raise EngineError.

        ``catalog``: serve another catalog than the engine's catalog.npz (a ``Catalog``, a SID index
        file ``*.index.json`` or a catalog .npz), e.g. today's items; it must keep the SID levels,
        token prefixes and codebooks the graphs were exported for, or DataError says what differs
        (``pauserec.runtime.catalog_update``). The directory is left unchanged.

        Memory and speed on the CPU: ``prepack=True`` lets ONNX Runtime re-lay every MatMul weight into
        its GEMM's packed layout once, at load, instead of packing panels on every call (faster, most at
        small batches: a decode step multiplies 20 beams' rows per user). An engine with a merged model
        (``manifest.merged``, written by pauserec-export since it exists) then runs all its graphs in
        one session, each weight packed once, its unpacked bytes released: one copy of the weights
        (onnxruntime >= 1.32; older versions cannot run it and open the per-graph sessions instead).
        ``prepack=False`` computes from the one mapped ``weights.bin`` (one copy, shared by the graphs'
        sessions), slower. ``None`` (default): prepack when the engine has a merged model, and int4
        engines always; an older engine without one prepacks one copy per graph, so fp32 stays
        unpacked there.
        ``verify`` checks every file's sha256 (seconds for GB-sized weights).

        ``spin``: ONNX Runtime's intra-op threads busy-wait between operators instead of sleeping (its own
        default). A graph is thousands of small operators, so on a machine the engine has to itself this is
        faster (int8 at the Qwen3-0.6B shape on 2 cores: 0.55 -> 0.43 s for one user, 8 % at batch 8); off by
        default, since the threads then burn CPU that other processes on the machine (Ray workers, a second
        engine) would use.

        ``tf32`` (provider cuda): let ONNX Runtime's CUDA provider multiply float32 in TF32 (its default; faster on
        Ampere and later GPUs, scores ~1e-3 off). Off by default, so a float32 engine gives the CPU's results.
        """
        from pauserec.runtime.engine_cache import local_engine

        source = str(path)
        path, verified = local_engine(path)
        manifest = read_manifest(path)
        if verify and not verified:
            verify_files(path, manifest)
        if catalog is not None:
            from pauserec.runtime.catalog_update import fit_catalog, read_catalog

            catalog = fit_catalog(read_catalog(catalog), manifest, path)
        else:
            try:
                catalog = Catalog.load(path / CATALOG_FILE)
            except PauserecError as e:
                raise EngineError(f"{path}: {e}") from e
        threads = int(threads or available_cpus())
        if not graphs:
            return cls(path, manifest, catalog, {}, provider, threads, source)
        merged = manifest.merged
        if prepack is None:
            prepack = bool(merged) or manifest.precision == "int4"
        used, sessions = open_sessions(path, manifest.graphs, manifest.plans, provider, threads, prepack, merged, tf32,
                                       spin, cast_weights=manifest.precision in CAST_WEIGHTS)
        return cls(path, manifest, catalog, sessions, used, threads, source)

    def with_catalog(self, catalog: Catalog | str | Path) -> Engine:
        """This engine's graphs (the same sessions, nothing reloaded) serving another catalog: a ``Catalog``, a
        SID index file or a catalog .npz, checked as ``Engine.load(catalog=...)`` checks it (DataError saying
        what differs). ``self`` is unchanged and keeps serving its own catalog."""
        from pauserec.runtime.catalog_update import fit_catalog, read_catalog

        fitted = fit_catalog(read_catalog(catalog), self.manifest, self.path)
        other = Engine(self.path, self.manifest, fitted, self.sessions, self.provider, self.threads, self.source)
        other.ops, other.prefill_tokens = self.ops, self.prefill_tokens
        return other

    @property
    def batch_invariant(self) -> bool:
        """Whether a user's scores are the same alone and in any batch. False only for int8 engines exported
        before pauserec quantised activations per row: their graphs quantise each MatMul input with one scale
        for the whole tensor (ONNX Runtime's ``DynamicQuantizeLinear``), so the other users of a batch move
        a user's scores (batch jobs then make the batch size part of the job's identity)."""
        if self.manifest.precision != "int8":
            return True
        import onnx

        for io in self.manifest.graphs.values():
            model = onnx.load(str(self.path / io.file), load_external_data=False)
            if any(n.op_type == "DynamicQuantizeLinear" for n in model.graph.node):
                return False
        return True

    # -- shapes -----------------------------------------------------------------------------------
    @property
    def levels(self) -> int:
        return self.manifest.sid.levels

    @property
    def after(self) -> int:
        """Tokens the search scores after the SID (what the pipeline's own ``generate`` scores: "\\n", EOS)."""
        return len(self.prompt.after_ids)

    @property
    def steps(self) -> int:
        """Beam-search levels: the SID's, then one per token scored after it."""
        return self.levels + self.after

    @property
    def max_history(self) -> int:
        return self.prompt.max_history

    def kv_bytes_per_user(self, beams: int, history_tokens: int | None = None) -> int:
        """Bytes of KV cache one user holds between graph calls: its context (history, suffix, cot's
        rationale) shared by its beams, and each beam's SID slots; ``history_tokens``: the longest history the
        engine takes when None. The graphs' working copies during a call come on top (about as much again)."""
        hist = self.prompt.max_history_tokens if history_tokens is None else int(history_tokens)
        per_token = 2 * self.layers * self.kv_heads * self.kv_width * np.dtype(self.kv_dtype).itemsize  # keys + values
        return per_token * (hist + self.suffix_len + self.ctx_extra + int(beams) * (self.steps - 1))

    # -- graphs -----------------------------------------------------------------------------------
    # device=True: the outputs the search feeds back (log-probs for the top-k, KV) stay on the device
    # (backends with device memory; others return host arrays as always).
    def prefill(self, history_ids: np.ndarray, history_mask: np.ndarray, device: bool = False):
        """(B,T) ids + mask -> log-probs (B, V1 | vocab), ctx_key, ctx_value (layers, B, Hkv, T+S, D).

        On the host a batch is prefilled ``prefill_tokens`` history tokens at a time (whole users): the prefill's
        working memory (every token's activations, each layer's KV before it is stacked) grows with the tokens of
        one call, and was the peak of serving a batch (Llama-2-7B shape int4, batch 8: 93 MB per user, where the
        KV it keeps is 33). A user's rows are the same bits in any batch (see ``Recommender.padded_length``), so
        the results do not change; each part is copied into the batch's arrays as it comes."""
        b, t = history_ids.shape
        step = max(1, self.prefill_tokens // max(t, 1))
        if device or self.static or b <= step:
            return self._prefill(history_ids, history_mask, device)
        lp = key = value = None
        for i in range(0, b, step):
            part = self._prefill(history_ids[i : i + step], history_mask[i : i + step], False)
            if lp is None:
                lp = np.empty((b, *part[0].shape[1:]), part[0].dtype)
                key, value = (np.empty((x.shape[0], b, *x.shape[2:]), x.dtype) for x in part[1:])
            lp[i : i + step], key[:, i : i + step], value[:, i : i + step] = part
            del part
        return lp, key, value

    def _prefill(self, history_ids: np.ndarray, history_mask: np.ndarray, device: bool):
        keep = ("ctx_key", "ctx_value") + (("logprobs",) if device else ())
        out = self.session("prefill").run({"history_ids": history_ids, "history_mask": history_mask}, keep=keep)
        return out["logprobs"], out["ctx_key"], out["ctx_value"]

    def decode(self, codes, step: int, ctx_key, ctx_value, ctx_mask, beam_key, beam_value, device: bool = False):
        """Level ``step`` codes (B,K) -> log-probs of level step+1 (B,K,V), the beams' KV of slot ``step``
        (layers, B, Hkv, K, 1, D), to be written into the beam KV."""
        out = self.session("decode").run({
            "codes": codes, "step": np.array(step, np.int64), "ctx_key": ctx_key, "ctx_value": ctx_value,
            "ctx_mask": ctx_mask, "beam_key": beam_key, "beam_value": beam_value,
        }, keep=("logprobs", "new_key", "new_value") if device else ())
        return out["logprobs"], out["new_key"], out["new_value"]

    def think(self, token, ctx_key, ctx_value, ctx_mask, device: bool = False):
        """cot: one rationale token per user (B,) -> full-vocab log-probs (B, vocab), its KV (layers, B, Hkv, 1, D)."""
        out = self.session("think").run({"token": token, "ctx_key": ctx_key, "ctx_value": ctx_value, "ctx_mask": ctx_mask},
                                         keep=("new_key", "new_value") if device else ())
        return out["logprobs"], out["new_key"], out["new_value"]

    def device_ops(self):
        """The device steps of a GPU-resident search (``BeamSearch`` with ``CudaOps``), or None: host arrays.

        Set when the graphs run on a GPU (cuda, tensorrt) and the CUDA top-k can use it; with a GPU
        backend but no usable CUDA top-k the host loop runs (context KV still on the device).
        ``self.ops`` overrides the choice (tests run the device search on the host with ``HostOps``)."""
        if self.ops is not None or self.provider not in ("cuda", "tensorrt"):
            return self.ops
        from pauserec.runtime.device import CudaOps
        from pauserec.runtime.trie_topk import _load

        mod, _ = _load("cuda")
        return None if mod is None else CudaOps(mod)

    def to_numpy(self, value) -> np.ndarray:
        return self.session("prefill").to_numpy(value)

    def session(self, name: str):
        try:
            return self.sessions[name]
        except KeyError:
            why = "was opened with graphs=False" if not self.sessions else f"has no {name} graph"
            raise EngineError(f"engine {self.path} {why}; load it with Engine.load(path) to run it") from None

    def __repr__(self) -> str:
        shape = f"static B={self.static_batch} K={self.static_beams}" if self.static else "dynamic"
        return (f"Engine({str(self.path)!r}, kind={self.kind}, levels={self.levels}, {self.manifest.precision}, "
                f"{shape}, provider={self.provider})")
