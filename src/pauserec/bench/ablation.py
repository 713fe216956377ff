"""Where the engine's speed comes from: the same checkpoint with each idea switched off in turn.

Variants (one run, same users, interleaved like ``pauserec-bench latency``), each with every other
idea on; the reference is the engine with all of them on (``sid`` head, fused prefix, shared
context KV, native top-k):

* ``context KV per beam``: after the prefill, the context KV is tiled x K, one copy per beam, and
  every decode step runs the users' B*K beams as B*K one-beam rows over their own copies (the
  copy is made at every step, standing in for the per-step reorder of a per-beam cache).
* ``prompt per beam``: as HF ``generate`` does, each prompt is repeated K times *before* the
  prefill, so the prefill itself runs B*K rows; decode as in the previous variant.
* ``prefix recomputed``: an engine exported with ``fuse_prefix=False``: every row runs the
  instruction tokens through the layers instead of reading their KV from a graph constant.
* ``full-vocab head``: an engine exported with ``scoring="full"``: every step multiplies by the
  whole ``vocab x hidden`` head and normalises over the vocabulary (HF's scores).
* ``NumPy top-k``: the trie-masked top-k in the NumPy reference instead of the native kernel.

The engines are exported here from the checkpoint (or reused from ``engines_dir``); a checkpoint trained
elsewhere is exported with the prompt options ``pauserec-export`` takes (``prompt``, ``sid_index``, ...).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from pauserec.errors import PauserecError

ENGINES = {"sid": {"scoring": "sid"}, "sid-recompute": {"scoring": "sid", "fuse_prefix": False},
           "full": {"scoring": "full"}}


@dataclass(frozen=True)
class AblationConfig:
    checkpoint: Path
    out: Path
    engines_dir: Path | None = None  # default: <out>/engines
    data: Path | None = None
    index: str | None = None
    batch_sizes: tuple[int, ...] = (1, 16)
    beams: int = 20
    k: int = 10
    warmup: int = 1
    iters: int = 7
    threads: int | None = None
    history_len: int = 20
    seed: int = 0
    hf_baseline: bool = False  # also time HF generate (slow at real sizes)
    # a checkpoint trained elsewhere: what pauserec-export needs to read it (its --prompt, --index, ...)
    prompt: str | None = None
    sid_index: Path | None = None
    items: Path | None = None
    kind: str | None = None
    pause_k: int | None = None


@dataclass(frozen=True)
class Variant:
    name: str  # the idea switched off ("all on" for the reference)
    engine: str  # key of ENGINES
    how: str
    impl: str = "auto"
    wrap: str | None = None  # "kv-per-beam" | "prompt-per-beam"


VARIANTS = (
    Variant("all on", "sid", "sid head, fused prefix, shared context KV, native top-k"),
    Variant("context KV per beam", "sid", "prefill KV tiled xK; B*K one-beam decode rows", wrap="kv-per-beam"),
    Variant("prompt per beam", "sid", "prompt repeated xK before the prefill (HF generate's way)",
            wrap="prompt-per-beam"),
    Variant("prefix recomputed", "sid-recompute", "export fuse_prefix=False: instruction tokens prefilled per row"),
    Variant("full-vocab head", "full", "export scoring=full: vocab x hidden head every step"),
    Variant("NumPy top-k", "sid", "trie-masked top-k in NumPy (impl=numpy)", impl="numpy"),
)


class PerBeamContext:
    """An engine whose decode sees one private copy of the context KV per beam (no sharing).

    ``expand_prompt``: also repeat each prompt K times before the prefill (HF ``generate``'s
    ``_expand_inputs_for_generation``); otherwise the prefill runs once per user and its KV is tiled.
    Everything else is the wrapped engine's (attribute access falls through).
    """

    def __init__(self, engine, beams: int, expand_prompt: bool = False) -> None:
        if engine.kind == "cot":
            raise PauserecError("the per-beam context ablation runs direct and pause engines")
        self._e, self._k, self._expand = engine, int(beams), expand_prompt

    def __getattr__(self, name):
        return getattr(self._e, name)

    def device_ops(self):
        """None: the host beam loop, which calls this wrapper's prefill/decode (a device loop would not)."""
        return None

    def prefill(self, history_ids: np.ndarray, history_mask: np.ndarray, device: bool = False):
        # device: always False here (device_ops is None: the search runs on host arrays)
        if not self._expand:
            return self._e.prefill(history_ids, history_mask)
        k = self._k
        lp, key, value = self._e.prefill(np.repeat(history_ids, k, axis=0), np.repeat(history_mask, k, axis=0))
        return lp[::k], self._e.to_numpy(key), self._e.to_numpy(value)  # KV: (layers, B*K, Hkv, C, D)

    def decode(self, codes, step, ctx_key, ctx_value, ctx_mask, beam_key, beam_value, device: bool = False):
        b, k = codes.shape  # (B, K)
        key, value = self._e.to_numpy(ctx_key), self._e.to_numpy(ctx_value)
        if key.shape[1] == b:  # shared per user -> one copy per beam (copied again at every step)
            key, value = np.repeat(key, k, axis=1), np.repeat(value, k, axis=1)  # (layers, B*K, Hkv, C, D)
        else:  # expanded before the prefill: the per-beam copies exist; a per-beam cache still moves them
            key, value = np.ascontiguousarray(key.copy()), np.ascontiguousarray(value.copy())
        mask = np.repeat(ctx_mask, k, axis=0)  # (B*K, C)

        def rows(x):  # (layers, B, Hkv, K, S, D) -> (layers, B*K, Hkv, 1, S, D)
            x = np.moveaxis(x, 3, 2)
            return np.ascontiguousarray(x.reshape(x.shape[0], b * k, 1, *x.shape[3:]).swapaxes(2, 3))

        lp, nk, nv = self._e.decode(codes.reshape(b * k, 1), step, key, value, mask, rows(beam_key), rows(beam_value))

        def back(x):  # (layers, B*K, Hkv, 1, 1, D) -> (layers, B, Hkv, K, 1, D)
            return x[:, :, :, 0].reshape(x.shape[0], b, k, x.shape[2], 1, x.shape[-1]).swapaxes(2, 3)

        return lp.reshape(b, k, -1), back(nk), back(nv)


def wrapper(kind: str | None, beams: int) -> Callable | None:
    if kind is None:
        return None
    return lambda engine: PerBeamContext(engine, beams, expand_prompt=kind == "prompt-per-beam")


def export_engines(cfg: AblationConfig, say: Callable[[str], None]) -> dict[str, Path]:
    """The three engines the variants need, exported once (an existing engine directory is reused)."""
    from pauserec.export import ExportConfig, export_engine
    from pauserec.runtime.engine import read_manifest

    root = cfg.engines_dir or cfg.out / "engines"
    out = {}
    for name, opts in ENGINES.items():
        path = root / name
        if (path / "manifest.json").is_file():
            m = read_manifest(path)
            want_prefix = "fused" if opts.get("fuse_prefix", True) else "recomputed"
            if m.scoring != opts["scoring"] or m.shapes.prefix != want_prefix:
                raise PauserecError(f"{path} is not a {name} engine (scoring {m.scoring}, prefix "
                                    f"{m.shapes.prefix}); remove it or pass another --engines")
            say(f"reusing {path}")
        else:
            say(f"exporting {name} engine -> {path}")
            export_engine(ExportConfig(checkpoint=cfg.checkpoint, out=path, threads=cfg.threads, seed=cfg.seed,
                                       prompt=cfg.prompt, index=cfg.sid_index, items=cfg.items, kind=cfg.kind,
                                       pause_k=cfg.pause_k, **opts))
        out[name] = path
    return out


def run_ablation(cfg: AblationConfig, say: Callable[[str], None] = print,
                 tick: Callable[[], None] | None = None) -> dict:
    """Export (or reuse) the engines, time every variant on the same users; returns the result dict."""
    from pauserec.bench.latency import LatencyConfig, _EngineSystem, _HFSystem, _measure, agreement, user_histories

    engines = export_engines(cfg, say)
    variants = list(VARIANTS)
    systems = [_EngineSystem(engines[v.engine], cfg.threads, impl=v.impl, wrap=wrapper(v.wrap, cfg.beams), label=v.name)
               for v in variants]
    if cfg.hf_baseline:
        hf = _HFSystem(cfg.checkpoint, cfg.threads, engine=engines["full"])  # (the prompt of a card-less one)
        hf.label = "HF generate"
        systems.append(hf)
        variants.append(Variant("HF generate", "-", "transformers generate + prefix_allowed_tokens_fn (reference)"))
    lcfg = LatencyConfig(engines=(), data=cfg.data, index=cfg.index, batch_sizes=cfg.batch_sizes, beams=cfg.beams,
                         k=cfg.k, warmup=cfg.warmup, iters=cfg.iters, threads=cfg.threads, history_len=cfg.history_len,
                         seed=cfg.seed, rss=False)
    users = user_histories(lcfg, systems[0].catalog)
    say(f"measuring {len(systems)} variants x batch {', '.join(map(str, cfg.batch_sizes))}")
    stats, answers = _measure(systems, users, lcfg, tick)
    rows = []
    for i, (s, v) in enumerate(zip(systems, variants)):  # answers checked against the all-on engine
        rows.append({"name": v.name, "how": v.how, "engine": str(s.path), "scoring": s.scoring,
                     "by_batch": stats[i], "agreement": {"reference": "all on", **agreement(answers[i], answers[0])}})
    if cfg.hf_baseline:  # HF ranks as the full-vocabulary engine does: the same top-10, scores within 1e-4
        full = next(i for i, v in enumerate(variants) if v.engine == "full")
        rows[-1]["agreement_full_vocab"] = {"reference": variants[full].name,
                                         **agreement(answers[len(rows) - 1], answers[full])}
    base = rows[0]
    for r in rows:
        r["slowdown_vs_all_on"] = {bs: r["by_batch"][bs]["batch_latency_s"]["p50"]
                                   / base["by_batch"][bs]["batch_latency_s"]["p50"] for bs in r["by_batch"]}
    return {"config": {k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v)
                       for k, v in asdict(cfg).items()},
            "checkpoint": _checkpoint_facts(cfg.checkpoint), "variants": rows}


def _checkpoint_facts(ckpt: Path) -> dict:
    try:
        c = json.loads((Path(ckpt) / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return {k: c.get(k) for k in ("model_type", "num_hidden_layers", "hidden_size", "vocab_size",
                                  "num_attention_heads", "num_key_value_heads")}


# -- report ----------------------------------------------------------------------------------------
def ablation_markdown(result: dict) -> str:
    c = result.get("checkpoint", {})
    lines = [f"Checkpoint: {c.get('model_type', '?')}, {c.get('num_hidden_layers', '?')} layers, hidden "
             f"{c.get('hidden_size', '?')}, vocab {c.get('vocab_size', '?'):,}; beams "
             f"{result['config']['beams']}, threads {result['config'].get('threads') or 'default'}.\n\n"
             if isinstance(c.get("vocab_size"), int) else ""]
    bss = list(result["variants"][0]["by_batch"])
    head = "| idea switched off | how | " + " | ".join(f"batch {b} p50 ms | x all-on" for b in bss)
    big = bss[-1]
    head += f" | batch {big}: prefill / decode / top-k ms | top-10 identical |\n|---|---|" + "---:|---:|" * len(bss)
    head += "---:|---:|\n"
    rows = []
    for r in result["variants"]:
        cells = []
        for b in bss:
            st = r["by_batch"][b]["batch_latency_s"]
            cells.append(f"{st['p50'] * 1000:,.1f} ({st['min'] * 1000:,.1f}–{st['max'] * 1000:,.1f})")
            cells.append(f"{r['slowdown_vs_all_on'][b]:.2f}x")
        a = r["agreement"]
        same = f"{a['identical_top10']}/{a['users']} vs {a['reference']}"
        t = r["by_batch"][big].get("time_split_s", {})
        split = " / ".join(f"{t.get(k, 0) * 1000:,.1f}" for k in ("prefill", "decode", "topk"))
        rows.append(f"| {r['name']} | {r['how']} | " + " | ".join(cells) + f" | {split} | {same} |")
    loads = [r["by_batch"][b].get("loadavg_1m") for r in result["variants"][:1] for b in bss]
    load = ", ".join(f"{lo[0]:.1f}–{lo[1]:.1f}" for lo in loads if lo)
    foot = (f"\np50 (min–max) of {result['variants'][0]['by_batch'][bss[0]]['iters']} interleaved calls per cell "
            "(the split: mean seconds per phase inside the runtime); "
            f"1-minute load average while measuring: {load or '?'}.\n")
    return "".join(lines) + head + "\n".join(rows) + "\n" + foot


def plot_ablation(result: dict, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    variants = result["variants"]
    bss = list(variants[0]["by_batch"])
    fig, axes = plt.subplots(1, len(bss), figsize=(5.0 * len(bss), 3.8), dpi=120, squeeze=False)
    for ax, b in zip(axes[0], bss):
        p50 = [v["by_batch"][b]["batch_latency_s"]["p50"] * 1000 for v in variants]
        lo = [p - v["by_batch"][b]["batch_latency_s"]["min"] * 1000 for p, v in zip(p50, variants)]
        hi = [v["by_batch"][b]["batch_latency_s"]["max"] * 1000 - p for p, v in zip(p50, variants)]
        colors = ["tab:green"] + ["tab:red" if v["slowdown_vs_all_on"][b] > 1 else "tab:blue" for v in variants[1:]]
        y = range(len(variants))
        ax.barh(y, p50, xerr=[lo, hi], color=colors, alpha=0.8, capsize=3)
        ax.set_yticks(list(y), [v["name"] for v in variants], fontsize=8)
        ax.invert_yaxis()
        for yi, (p, h, v) in enumerate(zip(p50, hi, variants)):
            ax.text(p + h, yi, f"  {v['slowdown_vs_all_on'][b]:.2f}x", va="center", fontsize=7)
        ax.set_xscale("log")
        ax.set_xlim(right=max(p + h for p, h in zip(p50, hi)) * 2.5)
        ax.set_xlabel("batch latency (ms, log): p50, whiskers min–max")
        ax.set_title(f"batch {b}, beams {result['config']['beams']}", fontsize=9)
        ax.grid(True, axis="x", alpha=0.3)
    c = result.get("checkpoint", {})
    fig.suptitle(f"engine ablation: each idea off in turn ({c.get('model_type', '?')}, "
                 f"{c.get('num_hidden_layers', '?')} layers, hidden {c.get('hidden_size', '?')})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_ablation(result: dict, out: Path) -> dict[str, str]:
    from pauserec.bench.env import environment_line

    out.mkdir(parents=True, exist_ok=True)
    files = {"json": out / "ablation.json", "md": out / "ablation.md"}
    files["json"].write_text(json.dumps(result, indent=2) + "\n")
    files["md"].write_text("# Engine ablation\n\n" + ablation_markdown(result) + environment_line(result))
    png = plot_ablation(result, out / "ablation.png")
    if png:
        files["png"] = png
    return {k: str(v) for k, v in files.items()}
