"""The cost of turning histories into prompt ids, and of a whole recommend call, for one pauserec version.

Engine format 4 assembles history ids through ``PromptEncoder`` (the prompt as data); format 3 gathered
a fixed ``(items, L + 1)`` table in the Recommender. Run this once per version on the same checkpoint
and histories, then compare the two JSON files (``--compare``): the pauserec template must not get slower.

    python benchmarks/prompt_assembly.py CKPT --out new.json                       # the installed pauserec
    python benchmarks/prompt_assembly.py CKPT --out old.json --src OLD_CHECKOUT/src   # another version's code
    python benchmarks/prompt_assembly.py --compare old.json new.json --out compare.json

``--src`` imports pauserec from another checkout's ``src`` (the compiled kernels of the installed
package are used by both). Each measurement is repeated ``--repeats`` times (median, min, max).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path


def use_source(src: Path) -> None:
    """Import pauserec from ``src`` instead of the installed (editable) package, keeping its compiled kernels."""
    import importlib.util

    installed = Path(importlib.util.find_spec("pauserec").submodule_search_locations[0])
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in type(f).__module__.lower()
                        and "editable" not in getattr(f, "__module__", "").lower()]
    sys.path.insert(0, str(src))
    for so in installed.glob("_trie_topk*.so"):
        target = src / "pauserec" / so.name
        if not target.exists():
            target.symlink_to(so)


def stats(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "runs": len(xs)}


def measure(a) -> dict:
    import numpy as np

    from pauserec.bench.env import environment
    from pauserec.export import ExportConfig, export_engine
    from pauserec.runtime import Engine, Recommender

    out = Path(a.engine_dir)
    if not (out / "manifest.json").is_file():
        export_engine(ExportConfig(checkpoint=a.checkpoint, out=out, threads=a.threads, force=True))
    rec = Recommender(Engine.load(out, provider="cpu", threads=a.threads), batch_size=a.batch)
    ids = rec.catalog.item_ids
    rng = np.random.default_rng(0)
    histories = [[ids[i] for i in rng.integers(0, len(ids), size=a.history)] for _ in range(a.users)]
    dense = rec.encode(histories)
    if hasattr(rec, "encoder"):  # format 4: the prompt as data
        assemble = rec.encoder.many
    else:  # format 3: the Recommender's own (items, L + 1) table
        assemble = lambda ds: [rec.item_tokens[d].reshape(-1) for d in ds]  # noqa: E731
    first = [np.asarray(x).tolist() for x in assemble(dense[:4])]
    assembly, total = [], []
    rec.recommend(histories[: a.batch], k=10, beams=a.beams)  # warm-up
    for _ in range(a.repeats):
        t0 = time.perf_counter()
        assemble(dense)
        assembly.append((time.perf_counter() - t0) / len(dense) * 1e6)
        t0 = time.perf_counter()
        res = rec.recommend(histories, k=10, beams=a.beams)
        total.append((time.perf_counter() - t0) / len(histories) * 1e3)
    return {"pauserec_version_src": "--src checkout" if a.src else "installed", "engine": out.name,
            "format_version": json.loads((out / "manifest.json").read_text())["format_version"],
            "users": a.users, "history_items": a.history, "batch": a.batch, "beams": a.beams, "threads": a.threads,
            "assembly_us_per_user": stats(assembly), "recommend_ms_per_user": stats(total),
            "first_prompts": first, "top10_first_user": res.items[0].tolist(), "environment": environment(a.threads)}


def compare(old: dict, new: dict) -> dict:
    same_ids = old["first_prompts"] == new["first_prompts"]
    same_top = old["top10_first_user"] == new["top10_first_user"]
    ratio = lambda key: new[key]["median"] / old[key]["median"]  # noqa: E731
    return {"old": old, "new": new, "identical_history_ids": same_ids, "identical_top10": same_top,
            "assembly_new_over_old": ratio("assembly_us_per_user"), "recommend_new_over_old": ratio("recommend_ms_per_user")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", type=Path, nargs="?")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--engine-dir", type=Path, default=None)
    ap.add_argument("--src", type=Path, default=None, help="import pauserec from this checkout's src/")
    ap.add_argument("--users", type=int, default=256)
    ap.add_argument("--history", type=int, default=20)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--beams", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--compare", type=Path, nargs=2, default=None, metavar=("OLD", "NEW"))
    a = ap.parse_args()
    if a.compare:
        result = compare(*(json.loads(p.read_text()) for p in a.compare))
    else:
        if a.src:
            use_source(a.src.resolve())
        a.engine_dir = a.engine_dir or a.out.with_suffix(".engine")
        result = measure(a)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("old", "new", "environment", "first_prompts")},
                     indent=2))


if __name__ == "__main__":
    main()
