"""What an export is asked to do (``ExportConfig``) and what it reports (``ExportReport``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

PRECISIONS = ("fp32", "bf16", "fp16", "int8", "int4")
INT4_COMPUTE = {"fp32": None, "int8": 4}  # MatMulNBits accuracy_level: activations in fp32, or quantised to int8
INT4_BLOCKS = (16, 32, 64, 128, 256)  # block sizes (weights per scale along K) MatMulNBits takes
KV_DTYPES = ("float32", "float16", "int8")  # how the KV cache is held between graph calls (runtime.spec.KV_STORAGE)
SCORING = ("full", "sid")
BACKENDS = ("onnx", "tensorrt")
Progress = Callable[[str, str], None]  # (stage, detail)


@dataclass(frozen=True)
class ExportConfig:
    checkpoint: Path
    out: Path
    precision: str = "fp32"
    backend: str = "onnx"
    static: bool = False
    batch: int | None = None  # static only
    beams: int | None = None  # static only
    max_history: int | None = None  # default: the card's
    atol: float | None = None  # fp32 validation tolerance on log-probs (default 1e-4)
    scoring: str = "full"  # "full": log_softmax over the vocabulary (HF parity); "sid": over each level's codes
    after_sid: bool = True  # score what the layout says the pipeline generates after the SID (False: the SID only)
    fuse_prefix: bool = True  # False (ablation): the prefill graph recomputes the instruction prefix per row
    min_agreement: float = 0.8  # reduced precisions: least top-10 overlap with the fp32 engine on the sample
    int4_block: int = 32  # int4: weights per scale along K (16..256; larger: smaller engine, coarser)
    int4_compute: str = "int8"  # int4: multiply in int8 with activations quantised per block (faster), or in fp32
    kv_dtype: str = "float32"  # int8/int4: "float16" / "int8" hold the KV cache in 1/2 / ~1/4 of the memory (fp16 engines: float16)
    force: bool = False
    prompt: str | None = None  # prompt layout: a preset name or a JSON file (checkpoints trained elsewhere)
    index: Path | None = None  # item -> SID index (LC-Rec/MiniOneRec *.index.json, OneRec-Think *.pretrain.json)
    items: Path | None = None  # item fields the prompt renders (LC-Rec .item.json, MiniOneRec info .txt)
    base: Path | None = None  # the base checkpoint of a PEFT adapter directory (merged at export)
    kind: str | None = None  # the model kind (a card's own when it has one)
    pause_k: int | None = None  # pause models trained elsewhere: required
    catalog: Path | None = None
    max_rationale: int | None = None
    data: Path | None = None  # dataset folder: reduced precisions' Hit@10 change is measured on its test split
    quant_sample: int = 64  # users in the reduced-precision comparison sample
    exporter: str = "torchscript"
    prompt_sample: int = 64  # users whose prompt ids are checked against the checkpoint's HF tokenizer
    check_users: int = 8  # users whose top-10 is checked against HF generate + trie (fp32, full scoring)
    guard_users: int = 500  # --data: test users of the Hit@10-against-popularity guard
    seed: int = 0
    threads: int | None = None
    stream: bool = False  # never load the model: weights read tensor by tensor from its safetensors


@dataclass(frozen=True)
class ExportReport:
    out: Path
    kind: str
    precision: str
    backend: str
    static: bool
    files: dict[str, int]  # file -> bytes
    checks: list[dict]  # every validation check (graph, case, output, max_abs_err, atol, precision, ok)
    quantized: dict | None  # bf16/fp16/int8/int4: top-10 agreement (and Hit@10 change) against the fp32 engine
    seconds: dict[str, float] = field(default_factory=dict)
    manifest: dict = field(default_factory=dict)
    prompt: dict = field(default_factory=dict)  # the prompt checks: HF tokenizer ids, HF generate top-10

    @property
    def max_abs_err(self) -> dict[str, float]:
        """Largest log-prob error per graph, of the graphs in the engine (this precision)."""
        out: dict[str, float] = {}
        for c in self.checks:
            if c["precision"] == self.precision:
                err = float("inf") if c["max_abs_err"] is None else c["max_abs_err"]
                out[c["graph"]] = max(out.get(c["graph"], 0.0), err)
        return out
