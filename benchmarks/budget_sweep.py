"""Budget sweep from one training run: is the validation-chosen checkpoint as good as the best fixed budget?

A run trained with ``pauserec train --snapshots`` keeps the weights of every evaluation in
``snapshots/step-N.pt``. The learning-rate schedule is by steps; past its decay horizon (``--decay-epochs``,
8) it does not depend on the epoch ceiling, and validation draws no random numbers, so a run capped at
E >= 8 epochs would end with exactly the epoch-E snapshot (tests/test_train_validation.py checks this).
Shorter budgets compress the decay into their E epochs, so they are real runs (``--fixed``: trained with
``--epochs E --val-users 0``, last weights). The script ranks the whole test split with every budget
(exact trie-constrained search, torch reference recommender, 20 beams) and compares the checkpoint that
validation chose with the best budget *by test metric* (an oracle no user has): a paired bootstrap over
users of chosen - oracle best.

    python benchmarks/budget_sweep.py RUN --fixed RUN_E4 RUN_E6 --data DATA --index rkmeans_zcr \
        [--epochs 8,10,12,15,20] --out benchmarks/results/training-scientific/budget-sweep.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


LIMIT = None  # --limit: a seeded sample of N test users (smoke runs)


def ranked_test_items(model, ck, dataset, beams: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(U, 10) ranked items of every test user (or a seeded LIMIT of them) and the (U,) targets, in one fixed order
    (the training validator's batched exact search, here over the test split)."""
    from pauserec.train.validation import ValidationConfig, Validator

    test = dataset.splits(ck.spec.max_history).test
    cfg = ValidationConfig(users=LIMIT or len(test), beams=beams, batch_size=batch_size)
    v = Validator(ck.spec, ck.catalog, test, cfg)
    return v.ranked_items(model), v.targets


def sweep(run: Path, fixed: list[Path], data: Path, index: str, epochs: list[float] | None, beams: int,
          batch_size: int, resamples: int) -> dict:
    import torch

    from pauserec.data import load_dataset
    from pauserec.metrics import hit_ndcg, paired_bootstrap, per_user, popularity_metrics
    from pauserec.train.model import load_checkpoint
    from pauserec.train.reference import check_index

    ck = load_checkpoint(run)
    dataset = load_dataset(data, index)
    check_index(ck, dataset)
    val = ck.card.train["validation"]
    curve = {p["step"]: p for p in val["curve"]}
    snaps = sorted((int(p.stem.split("-")[1]), p) for p in (run / "snapshots").glob("step-*.pt"))
    if not snaps:
        raise SystemExit(f"{run}: no snapshots/ (train with --snapshots)")
    chosen_step = val["chosen_step"]
    if epochs:
        keep = {min(snaps, key=lambda s: abs(curve[s[0]]["epoch"] - e))[0] for e in epochs} | {chosen_step}
        snaps = [s for s in snaps if s[0] in keep]
    horizon = ck.card.train["lr_schedule"]["decay_steps"] / ck.card.train["steps_per_epoch"]
    model = ck.model
    rows, per = [], {}
    for fx in fixed:  # fixed-budget runs (validation off): their saved weights are their last
        f = load_checkpoint(fx)
        if f.card.train.get("validation") is not None or f.card.train["kind"] != ck.card.train["kind"]:
            raise SystemExit(f"{fx}: a --fixed run must be of the same kind and trained with --val-users 0")
        items, targets = ranked_test_items(f.model, f, dataset, beams, batch_size)
        per[fx.name] = per_user(items, targets, 10)
        rows.append({"budget": f"{f.card.train['epochs']:g} epochs (own run, decay over its budget)", "key": fx.name,
                     "epoch": f.card.train["epochs"], "seed": f.card.seed, "chosen_by_validation": False,
                     **{f"test_{k}": round(v, 5) for k, v in hit_ndcg(items, targets).items()}})
        print(json.dumps(rows[-1]), flush=True)
    for step, path in snaps:
        t0 = time.perf_counter()
        model.load_state_dict(torch.load(path, map_location="cpu"))
        model.eval()
        items, targets = ranked_test_items(model, ck, dataset, beams, batch_size)
        m = hit_ndcg(items, targets)
        per[step] = per_user(items, targets, 10)
        p = curve[step]
        exact = p["epoch"] >= horizon - 1e-9
        rows.append({"budget": f"{p['epoch']:g} epochs (snapshot{'' if exact else ', decay not finished'})",
                     "key": step, "equals_fixed_budget_run": exact, "step": step, "epoch": p["epoch"], "lr": p["lr"], "train_loss": p["train_loss"],
                     "val_ndcg@10": p["ndcg@10"], "val_hit@10": p["hit@10"], "chosen_by_validation": step == chosen_step,
                     **{f"test_{k}": round(v, 5) for k, v in m.items()}, "seconds": round(time.perf_counter() - t0, 1)})
        print(json.dumps(rows[-1]), flush=True)
    budgets = [r for r in rows if r.get("equals_fixed_budget_run", True)]  # what a fixed-budget run would give
    best = max(budgets, key=lambda r: r["test_ndcg@10"])
    compare = {}
    for metric in ("hit@10", "ndcg@10"):
        compare[metric] = paired_bootstrap(per[chosen_step][metric], per[best["key"]][metric], resamples=resamples)
    pop = popularity_metrics(dataset.sequences, ck.catalog.n_items, targets, "test")
    return {
        "run": run.name, "kind": ck.card.train["kind"], "seed": ck.card.seed, "users": len(targets),
        "stop_detail": val["stop_detail"], "chosen_step": chosen_step, "chosen_epoch": val["chosen_epoch"],
        "decay_horizon_epochs": horizon, "oracle_best_budget": best["budget"], "chosen_minus_oracle_best": compare, "popularity": pop, "budgets": rows,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, help="a run trained with --snapshots")
    ap.add_argument("--fixed", nargs="*", type=Path, default=[], help="fixed-budget runs (--val-users 0), same kind")
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--index", default=None)
    ap.add_argument("--epochs", default=None, help="comma-separated budgets in epochs (default: every snapshot)")
    ap.add_argument("--beams", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--resamples", type=int, default=1000)
    ap.add_argument("--limit", type=int, default=None, help="a seeded sample of N test users (smoke runs)")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    import torch

    from pauserec.bench.env import environment

    global LIMIT
    LIMIT = a.limit
    torch.set_num_threads(a.threads)
    epochs = [float(x) for x in a.epochs.split(",")] if a.epochs else None
    res = {"benchmark": "budget-sweep", "environment": environment(threads=a.threads),
           "protocol": __doc__.split("\n\n")[1].replace("\n", " "), "beams": a.beams,
           "sweep": sweep(a.run, a.fixed, a.data, a.index, epochs, a.beams, a.batch_size, a.resamples)}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
