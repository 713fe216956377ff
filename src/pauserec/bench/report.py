"""Benchmark reports: JSON (numbers + environment), a Markdown table, an optional PNG plot."""

from __future__ import annotations

import json
from pathlib import Path

from pauserec.bench.env import environment
from pauserec.errors import PauserecError

SCHEMA = "pauserec-bench/1"


def finish(result: dict, kind: str, threads: int | None = None, manifests: dict | None = None) -> dict:
    """Stamp a result with its schema, kind of benchmark and the environment it was measured in."""
    return {"schema": SCHEMA, "benchmark": kind, **result, "environment": environment(threads),
            "manifests": manifests or {}}


def load_result(path: str | Path) -> dict:
    p = Path(path)
    try:
        d = json.loads(p.read_text())
    except FileNotFoundError:
        raise PauserecError(f"result file {p} not found") from None
    except json.JSONDecodeError as e:
        raise PauserecError(f"{p} is not a JSON result ({e}); pass files written by pauserec-bench") from e
    if d.get("schema") != SCHEMA:
        raise PauserecError(f"{p} is not a pauserec-bench result (schema {d.get('schema')!r}, expected {SCHEMA})")
    return d


def _ms(x: float) -> str:
    return f"{x * 1000:,.1f}"


def latency_markdown(result: dict) -> str:
    """One row per (system, batch size): latency percentiles, per-user time, throughput, ratio."""
    head = "| system | batch | p50 ms | p95 ms | p99 ms | ms/user | users/s | vs first | peak RSS MB |\n"
    head += "|---|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    rows = []
    vs = result.get("ratios", {}).get("vs_first", {})
    for s in result["systems"]:
        for bs, st in s["by_batch"].items():
            lat = st["batch_latency_s"]
            rss = f"{s['peak_rss_mb']:,.0f}" if s.get("peak_rss_mb") else "-"
            ratio = vs.get(s["name"], {}).get(bs)
            rows.append(
                f"| {s['name']} | {bs} | {_ms(lat['p50'])} | {_ms(lat['p95'])} | {_ms(lat['p99'])} | "
                f"{_ms(st['per_user_s'])} | {st['throughput_users_per_s']:,.1f} | "
                f"{'-' if ratio is None else f'{ratio:.2f}x'} | {rss} |"
            )
    text = head + "\n".join(rows) + "\n"
    pvc = result.get("ratios", {}).get("pause_vs_cot", {})
    if pvc:
        text += "\nPause vs CoT latency (p50 per batch): " + ", ".join(
            f"batch {bs}: {v['text']}" for bs, v in pvc.items()
        ) + "\n"
    return text


def quality_markdown(result: dict) -> str:
    head = "| system | users | Hit@5 | Hit@10 | NDCG@5 | NDCG@10 | invalid |\n|---|---:|---:|---:|---:|---:|---:|\n"
    rows = []
    for s in result["systems"]:
        m = s["metrics"]
        rows.append(
            f"| {s['name']} | {m.get('users', '-')} | {m['hit@5']:.4f} | {m['hit@10']:.4f} | "
            f"{m['ndcg@5']:.4f} | {m['ndcg@10']:.4f} | {m.get('invalid_rate', 0):.4f} |"
        )
    return head + "\n".join(rows) + "\n"


def markdown(result: dict) -> str:
    env = result.get("environment", {})
    foot = (f"\n_{env.get('cpu', '?')}, {env.get('cores', '?')} cores, threads {env.get('threads') or 'default'}, "
            f"git {str(env.get('git_sha') or '?')[:12]}, {env.get('timestamp', '')}_\n")
    body = latency_markdown(result) if result.get("benchmark") == "latency" else quality_markdown(result)
    return body + foot


def plot_latency(result: dict, path: Path) -> Path | None:
    """Latency (p50) vs batch size, one line per system. None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    for s in result["systems"]:
        bss = sorted(int(b) for b in s["by_batch"])
        ax.plot(bss, [s["by_batch"][str(b)]["batch_latency_s"]["p50"] * 1000 for b in bss], marker="o", label=s["name"])
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size (users)")
    ax.set_ylabel("p50 batch latency (ms)")
    ax.set_title(f"pauserec latency, beams {result.get('config', {}).get('beams', '?')}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_report(result: dict, out_dir: str | Path, stem: str) -> dict[str, str]:
    """Write <stem>.json, <stem>.md and (latency, with matplotlib) <stem>.png; return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"json": out / f"{stem}.json", "md": out / f"{stem}.md"}
    files["json"].write_text(json.dumps(result, indent=2) + "\n")
    files["md"].write_text(markdown(result))
    if result.get("benchmark") == "latency":
        png = plot_latency(result, out / f"{stem}.png")
        if png:
            files["png"] = png
    return {k: str(v) for k, v in files.items()}
