"""Benchmark reports: JSON (numbers + environment), Markdown with headline lines first, a PNG plot,
and one self-contained HTML page of a whole run (``compare_page``)."""

from __future__ import annotations

import base64
import html
import json
import re
from pathlib import Path

from pauserec.bench.env import environment, environment_line  # noqa: F401 - environment_line: part of this module's face
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
    if not isinstance(d, dict) or d.get("schema") != SCHEMA:
        got = d.get("schema") if isinstance(d, dict) else None
        raise PauserecError(f"{p} is not a pauserec-bench result (schema {got!r}, expected {SCHEMA})")
    return d


def _ms(x: float) -> str:
    return f"{x * 1000:,.1f}"


# -- cot quality beside the pause vs CoT headline ---------------------------------------------------
COT_QUALITY_FLOOR = 0.8  # cot's Hit@10 and NDCG@10 as a share of direct's below which the cot model is "not comparable"


def cot_quality_check(quality: dict, epochs: dict | None = None, floor: float = COT_QUALITY_FLOOR) -> dict | None:
    """cot's Hit@10 / NDCG@10 beside direct's from a quality result (one system per kind), for the pause vs CoT
    latency headline: ``comparable`` is False when either metric is under ``floor`` x direct's. ``epochs``: the
    epochs each kind trained ({kind: epochs}), named in the warning. None without a cot and a direct system."""
    by_kind = {s.get("kind"): s["metrics"] for s in quality.get("systems", []) if s.get("metrics")}
    if "cot" not in by_kind or "direct" not in by_kind:
        return None
    keys = ("hit@10", "ndcg@10")
    cot, direct = ({k: float(by_kind[kind][k]) for k in keys} for kind in ("cot", "direct"))
    share = {k: cot[k] / direct[k] if direct[k] > 0 else None for k in keys}
    comparable = all(v is None or v >= floor for v in share.values())
    out = {"cot": cot, "direct": direct, "share_of_direct": share, "floor": floor, "comparable": comparable}
    if "pause" in by_kind:
        out["pause"] = {k: float(by_kind["pause"][k]) for k in keys}
    if epochs:
        out["epochs"] = {k: v for k, v in epochs.items() if v is not None}
    return out


def cot_quality_line(check: dict | None) -> str | None:
    """One line for the reports and the console: a loud warning when the cot model is far below direct."""
    if not check:
        return None
    c, d, sh = check["cot"], check["direct"], check["share_of_direct"]

    def pct(k):
        return "n/a" if sh[k] is None else f"{sh[k] * 100:.0f} %"

    numbers = (f"Hit@10 {c['hit@10']:.4f} vs direct {d['hit@10']:.4f} ({pct('hit@10')}), "
               f"NDCG@10 {c['ndcg@10']:.4f} vs {d['ndcg@10']:.4f} ({pct('ndcg@10')})")
    ep = check.get("epochs") or {}
    trained = (f"; epochs trained: {', '.join(f'{k} {v:g}' for k, v in ep.items())}" if ep else "")
    if check["comparable"]:
        return (f"CoT quality, for the pause vs CoT latency: {numbers}, within the {check['floor'] * 100:.0f} % "
                f"of direct's asked of it{trained}")
    return (f"**WARNING: the CoT model is far below direct** ({numbers}; under {check['floor'] * 100:.0f} % of "
            f"direct's): the pause vs CoT latency compares against a CoT model no one would deploy{trained}")


# -- headlines -------------------------------------------------------------------------------------
def _times(by_batch: dict) -> str:
    return ", ".join(f"**{x:.1f}x** at batch {bs}" for bs, x in by_batch.items())


def headline_lines(result: dict) -> list[str]:
    """The answers a reader wants first: engine vs HF generate x, engine vs each other runtime x, pause vs cot %,
    and whether the answers are the same (top-10 identity against HF generate)."""
    if result.get("benchmark") != "latency":
        return []
    r = result.get("ratios", {})
    head = r.get("headline", {})
    lines = []
    for key, h in head.items():
        what = headline_name(key)
        if what and h:
            lines.append(f"Engine vs {what}: faster by {_times(h['by_batch'])} ({h['engine']} vs {h['baseline']}, "
                         "p50 batch latency)")
    for s in result.get("skipped", []):
        what = _runtime_of(s.get("system"))
        lines.append(f"Engine vs {what.what if what else s.get('system')}"
                     f"{' ' + s['precision'] if s.get('precision') else ''}: not measured ({s['reason']})")
    pvc = r.get("pause_vs_cot", {})
    if pvc:
        lines.append("Pause vs CoT latency (engines, p50): " + ", ".join(f"**{v['text']}** at batch {bs}"
                                                                         for bs, v in pvc.items()))
        if line := cot_quality_line(result.get("cot_quality")):
            lines.append(line)
    for s in result.get("systems", []):
        a = s.get("agreement")
        if a and a.get("users") and s["system"].startswith("engine") and s.get("scoring") != "sid":
            lines.append(f"Same answers: {s['name']} top-10 identical to {a['reference']} for "
                         f"{a['identical_top10']}/{a['users']} timed users (max |score diff| {a['max_score_diff']:.1e})")
            break
    return lines


# -- tables ----------------------------------------------------------------------------------------
def latency_markdown(result: dict) -> str:
    """One row per (system, batch size): latency percentiles, per-user time, throughput, speed-up
    against the named reference system; then the answer check against HF generate."""
    r = result.get("ratios", {})
    ref = r.get("reference")
    speed = r.get("speedup_vs_reference")
    if speed is None:  # results written before the reference was named: latency over the first system's
        ref, speed = result["systems"][0]["name"], {n: {b: 1 / x for b, x in v.items()}
                                                     for n, v in r.get("vs_first", {}).items()}
    head = (f"| system | scoring | batch | p50 ms | p95 ms | p99 ms | ms/user | users/s | speed-up vs {ref} "
            "| load 1m | peak RSS MB |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n")
    rows = []
    for s in result["systems"]:
        for bs, st in s["by_batch"].items():
            lat = st["batch_latency_s"]
            rss = f"{s['peak_rss_mb']:,.0f}" if s.get("peak_rss_mb") else "-"
            x = speed.get(s["name"], {}).get(bs)
            load = st.get("loadavg_1m")
            rows.append(
                f"| {s['name']} | {s.get('scoring') or '-'} | {bs} | {_ms(lat['p50'])} | {_ms(lat['p95'])} | "
                f"{_ms(lat['p99'])} | {_ms(st['per_user_s'])} | {st['throughput_users_per_s']:,.1f} | "
                f"{'-' if x is None else f'{x:.2f}x'} | {'-' if not load else f'{load[0]:.1f}–{load[1]:.1f}'} | {rss} |"
            )
    text = head + "\n".join(rows) + "\n"
    if (result.get("config") or {}).get("spin"):
        text += ("\nONNX Runtime's intra-op threads busy-wait between operators (`--spin`) for the engines and the "
                 "ONNX Runtime baselines; OpenVINO keeps its own threading.\n")
    text += agreement_markdown(result)
    text += prompt_lines(result)
    for s in result["systems"]:
        if _runtime_of(s["system"]) and s.get("facts"):
            text += worker_facts_line(s)
    return text


def prompt_lines(result: dict) -> str:
    """Which prompt each engine and HF baseline ran (a checkpoint trained elsewhere runs its engine's)."""
    lines = []
    for s in result["systems"]:
        prompt = s.get("prompt") or (s.get("facts") or {}).get("prompt")
        if prompt and s.get("system", "engine") in ("engine", "engine+prepack", "engine-unpacked", "hf-generate"):
            who = f"HF baseline {s['name']}" if s.get("system") == "hf-generate" else s["name"]
            lines.append(f"{who}: runs {prompt}")
    return ("\n" + "\n".join(f"- {x}" for x in lines) + "\n") if lines else ""


def _runtime_of(system: str | None):
    from pauserec.bench.workers import RUNTIMES

    return next((r for r in RUNTIMES.values() if r.system == system), None)


def headline_name(key: str) -> str | None:
    """'engine_vs_genai_int4' -> 'ORT GenAI int4 beam search (no trie)'; None for a key of no known baseline."""
    from pauserec.bench.workers import RUNTIMES

    if key == "engine_vs_hf":
        return "HF generate"
    name, _, precision = key.removeprefix("engine_vs_").partition("_")
    runtime = RUNTIMES.get(name)
    if runtime is None:
        return None
    return f"{runtime.what}{' ' + precision if precision else ''} {runtime.search}"


def worker_facts_line(s: dict) -> str:
    """What a baseline run in its own environment is, and what it cannot do: its conversion (command, time,
    cache), threads, config changes and patches, sequences that are not catalog SIDs, versions."""
    from pauserec.bench.workers import NO_TRIE_EFFECT

    f, runtime = s["facts"], _runtime_of(s["system"])
    threads = (f.get("session_options") or {}).get("intra_op_num_threads")
    convert = f.get("convert_command") or "conversion"
    convert += (f" {f['convert_s']:.1f} s" if f.get("convert_s") else " (time not recorded)")
    convert += " (reused from the cache)" if f.get("cached") else ""
    spin = (f.get("session_options") or {}).get("allow_spinning") == "1"
    text = (f"\n{runtime.what} baseline {s['name']}: {convert}, intra-op threads "
            f"{threads if threads else 'default (one per core)'}{' (spinning)' if spin else ''}, "
            + ("one batched beam search per batch" if f.get("searches", 0) <= f.get("batches", 0)
               else f"batches split by prompt length: {f['searches']:,} searches for {f['batches']:,} batches")
            + (f"; prompt: {f['prompt']}" if f.get("prompt") else "")
            + (f"; config for the converter: {'; '.join(f['config_changes'])}" if f.get("config_changes") else "")
            + (f"; patched: {'; '.join(f['patches'])}" if f.get("patches") else ""))
    if not runtime.trie:
        returned, invalid = f.get("returned_sequences") or 0, f.get("invalid_sequences") or 0
        text += (f"; {runtime.why_no_trie}, {NO_TRIE_EFFECT}: {invalid:,} of {returned:,} returned sequences were "
                 "not catalog SIDs" + (f" ({invalid / returned * 100:.1f} %)" if returned else "")
                 + f", {f.get('users_without_a_sid', 0):,} of {f.get('users', 0):,} users got no valid SID (every "
                 "call, warm-up included)")
    if not runtime.scores:
        text += f"; {runtime.what} returns no beam scores (score difference n/a)"
    return text + f"; versions {', '.join(f'{k} {v}' for k, v in f.get('versions', {}).items())}\n"


def agreement_markdown(result: dict) -> str:
    rows = []
    for s in result["systems"]:
        a = s.get("agreement")
        if not a or not a.get("users"):
            continue
        diff = "n/a" if a.get("max_score_diff") is None else f"{a['max_score_diff']:.1e}"
        rows.append(f"| {s['name']} | {s.get('scoring') or '-'} | {a['reference']} | {a['users']} | "
                    f"{a['identical_top10']} ({a['identical_rate'] * 100:.1f} %) | {a['top10_overlap']:.3f} | "
                    f"{diff} |")
    if not rows:
        return ""
    return ("\nSame answers (every timed call; `sid` scoring renormalises per level, so its scores, and near-tie "
            "ranks, differ from HF by design):\n\n| system | scoring | reference | users | identical top-10 | "
            "top-10 overlap | max score diff |\n|---|---|---|---:|---:|---:|---:|\n" + "\n".join(rows) + "\n")


def quality_users(result: dict) -> int | None:
    users = {s.get("metrics", {}).get("users") for s in result.get("systems", [])} - {None}
    return max(users) if users else None


def quality_title(result: dict, split: str = "test") -> str:
    """'Quality (test split, 400 users)': the count the metrics were computed over, not the one asked for."""
    n = quality_users(result)
    return f"Quality ({split} split" + (f", {n:,} users" if n else "") + ")"


def quality_markdown(result: dict) -> str:
    head = "| system | users | Hit@5 | Hit@10 | NDCG@5 | NDCG@10 | invalid |\n|---|---:|---:|---:|---:|---:|---:|\n"
    rows = []
    for s in result["systems"]:
        m = s["metrics"]
        rows.append(
            f"| {s['name']} | {m.get('users', '-')} | {m['hit@5']:.4f} | {m['hit@10']:.4f} | "
            f"{m['ndcg@5']:.4f} | {m['ndcg@10']:.4f} | {m.get('invalid_rate', 0):.4f} |"
        )
    line = cot_quality_line(result.get("cot_quality"))
    return head + "\n".join(rows) + "\n" + prompt_lines(result) + (f"\n{line}\n" if line else "")


def markdown(result: dict) -> str:
    kind = result.get("benchmark")
    if kind == "ablation":
        from pauserec.bench.ablation import ablation_markdown

        return ablation_markdown(result) + environment_line(result)
    if kind == "serve":
        from pauserec.bench.serve_load import serve_markdown

        return serve_markdown(result) + environment_line(result)
    heads = headline_lines(result)
    top = "".join(f"- {h}\n" for h in heads) + ("\n" if heads else "")
    body = latency_markdown(result) if kind == "latency" else quality_markdown(result)
    return top + body + environment_line(result)


# -- plots -----------------------------------------------------------------------------------------
def plot_latency(result: dict, path: Path) -> Path | None:
    """p50 latency vs batch size, one line per system, min–max band. None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6.8, 4.2), dpi=120)
    for s in result["systems"]:
        bss = sorted(int(b) for b in s["by_batch"])
        st = [s["by_batch"][str(b)]["batch_latency_s"] for b in bss]
        line, = ax.plot(bss, [x["p50"] * 1000 for x in st], marker="o", label=s["name"])
        ax.fill_between(bss, [x["min"] * 1000 for x in st], [x["max"] * 1000 for x in st], color=line.get_color(),
                        alpha=0.15)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    sizes = sorted({int(b) for s in result["systems"] for b in s["by_batch"]})
    ax.set_xticks(sizes, [str(b) for b in sizes])
    ax.set_xlabel("batch size (users per call)")
    ax.set_ylabel("batch latency (ms): p50, band min–max")
    cfg = result.get("config", {})
    ax.set_title(f"pauserec latency, beams {cfg.get('beams', '?')}, threads {cfg.get('threads') or 'default'}",
                 fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
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
    title = quality_title(result) if result.get("benchmark") == "quality" else "Latency"
    files["md"].write_text(f"# {title}\n\n" + markdown(result))
    if result.get("benchmark") == "latency":
        png = plot_latency(result, out / f"{stem}.png")
        if png:
            files["png"] = png
    return {k: str(v) for k, v in files.items()}


# -- one page for a whole run ----------------------------------------------------------------------
def collect_results(paths: list[Path]) -> list[tuple[Path, dict]]:
    """Result JSON files, given directly or found in run folders (recursively), in a stable order."""
    found: list[Path] = []
    for p in paths:
        if p.is_dir():
            for f in sorted(p.rglob("*.json")):
                try:
                    if json.loads(f.read_text()).get("schema") == SCHEMA:
                        found.append(f)
                except (OSError, json.JSONDecodeError, AttributeError):
                    continue
        else:
            found.append(p)
    if not found:
        raise PauserecError(f"no pauserec-bench result JSON found in {', '.join(map(str, paths))}")
    return [(f, load_result(f)) for f in found]


def _inline(md: str) -> str:
    t = html.escape(md)
    t = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", t)
    t = re.sub(r"`(.+?)`", r"<code>\1</code>", t)
    return re.sub(r"(?<![\w/])_(.+?)_(?![\w/])", r"<i>\1</i>", t)


def markdown_to_html(md: str) -> str:
    """The Markdown these reports write (headings, bullets, pipe tables, paragraphs) as HTML."""
    out, table = [], []

    def flush() -> None:
        if table:
            cells = [[c.strip() for c in row.strip().strip("|").split("|")] for row in table]
            body = "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in row) + "</tr>" for row in cells[2:])
            out.append("<table><tr>" + "".join(f"<th>{_inline(c)}</th>" for c in cells[0]) + "</tr>" + body + "</table>")
            table.clear()

    for line in md.splitlines():
        if line.startswith("|"):
            table.append(line)
            continue
        flush()
        if line.startswith("#"):
            level = min(len(line) - len(line.lstrip("#")) + 1, 6)
            out.append(f"<h{level}>{_inline(line.lstrip('#').strip())}</h{level}>")
        elif line.startswith("- "):
            out.append(f"<li>{_inline(line[2:])}</li>")
        elif line.strip():
            out.append(f"<p>{_inline(line)}</p>")
    flush()
    return "\n".join(out)


def _png_tag(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(path.name)}" src="data:image/png;base64,{data}">'


CSS = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
       "table{border-collapse:collapse;margin:.6em 0;font-size:.85em}td,th{border:1px solid #ccc;padding:3px 7px;"
       "text-align:right}td:first-child,th:first-child{text-align:left}th{background:#f3f3f3}"
       "li{margin:.2em 0}img{max-width:100%;border:1px solid #eee}code{background:#f6f6f6}")


def compare_page(paths: list[Path], title: str = "pauserec benchmark run") -> str:
    """One self-contained HTML page: every result's headlines, tables and plot (PNG inlined)."""
    parts = [f"<h1>{html.escape(title)}</h1>"]
    for f, result in collect_results(paths):
        kind = result.get("benchmark", "?")
        head = quality_title(result) if kind == "quality" else kind.capitalize()
        parts.append(f"<h2>{html.escape(head)} <small>({html.escape(f.parent.name + '/' + f.name)})</small></h2>")
        parts.append(markdown_to_html(markdown(result)))
        png = f.with_suffix(".png")
        if png.is_file():
            parts.append(_png_tag(png))
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n")


def compare_markdown(paths: list[Path]) -> str:
    """The same page as Markdown (plots linked by file name, not inlined)."""
    parts = []
    for f, result in collect_results(paths):
        kind = result.get("benchmark", "?")
        parts.append(f"## {quality_title(result) if kind == 'quality' else kind.capitalize()} ({f.parent.name}/{f.name})\n")
        parts.append(markdown(result))
        if f.with_suffix(".png").is_file():
            parts.append(f"\n![{kind}]({f.with_suffix('.png').name})\n")
    return "\n".join(parts)
