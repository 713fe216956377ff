"""Validation during training: exact constrained search on a seeded validation sample, early stopping, curve.

* ``Validator``: Hit/NDCG@5/10 of the model on a fixed, seeded sample of the validation split (``users``
  users, default 500), with the same trie-constrained beam search as ``pauserec eval``
  (``ReferenceRecommender``: batched, ``no_grad``, eval mode). The sample is drawn once per run, so every
  evaluation of a run sees the same users (epoch-to-epoch differences are paired, not sampling noise).
* ``EarlyStopping``: keeps a copy of the best weights (in memory, on the CPU) by the selection metric
  (default NDCG@10); ``stop`` once ``patience`` evaluations in a row have not improved on the best by more
  than ``min_delta``. The trainer loads the best weights back before saving, so the checkpoint is the best
  evaluation's model, not the last step's.
* ``write_curve``: ``curve.png`` (validation metric and training loss per evaluation) beside the checkpoint
  when matplotlib is importable (the ``plot`` extra); otherwise a note. The curve itself always goes into the
  training card.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pauserec.errors import TrainError
from pauserec.metrics import hit_ndcg

METRICS = ("hit@5", "ndcg@5", "hit@10", "ndcg@10")
CURVE_FILE = "curve.png"
PROBE_USERS = 8  # users timed before the first evaluation, to size the sample for the model
MIN_USERS = 16  # a sample cut to fit the time allowed never goes below this; the evaluation is skipped instead


@dataclass(frozen=True)
class ValidationConfig:
    users: int = 500  # 0: no validation (the last step's weights are saved, as before)
    every: int | None = None  # evaluate every N optimizer steps; None: at the end of every epoch
    patience: int = 5  # evaluations without improvement before stopping
    metric: str = "ndcg@10"
    min_delta: float = 0.0
    beams: int = 20
    batch_size: int = 64
    seed: int = 0

    def check(self) -> None:
        if self.users < 0:
            raise TrainError(f"--val-users must be >= 0 (0 turns validation off), got {self.users}")
        if self.every is not None and self.every < 1:
            raise TrainError(f"--val-every must be >= 1 step (or left out: once per epoch), got {self.every}")
        if self.patience < 1:
            raise TrainError(f"--patience must be >= 1 evaluation, got {self.patience}")
        if self.metric not in METRICS:
            raise TrainError(f"--val-metric must be one of {', '.join(METRICS)}, got {self.metric!r}")
        if self.beams < 1 or self.batch_size < 1:
            raise TrainError(f"validation beams and batch size must be >= 1, got {self.beams} and {self.batch_size}")

    @property
    def enabled(self) -> bool:
        return self.users > 0


def sample_users(n: int, users: int, seed: int) -> np.ndarray:
    """A fixed seeded sample of ``min(users, n)`` indices of a split, sorted."""
    if users >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=users, replace=False))


class Validator:
    """Hit/NDCG of a model on a fixed sample of the validation split (exact trie-constrained beam search)."""

    def __init__(self, spec, catalog, valid, cfg: ValidationConfig, encoder=None):
        if len(valid) == 0:
            raise TrainError("the validation split is empty; pass --val-users 0 to train without validation")
        self.spec, self.catalog, self.cfg = spec, catalog, cfg
        self.encoder = encoder  # the training samples' PromptEncoder (None: the spec's ids assembly)
        idx = sample_users(len(valid), cfg.users, cfg.seed)
        # a seeded order of the sample: resize(n) keeps its first n users, an unbiased subsample
        self._hists = [valid.histories[i] for i in idx]
        self._targets = np.asarray(valid.targets, np.int64)[idx]
        self._order = np.random.default_rng(cfg.seed + 1).permutation(len(idx))
        self.resize(len(idx))

    def resize(self, n: int) -> None:
        """Keep the first ``n`` users of the seeded order (all evaluations of a run then see these)."""
        keep = self._order[:n]
        keep = keep[np.argsort([len(self._hists[i]) for i in keep], kind="stable")]  # similar lengths batch together
        self.histories = [self._hists[i] for i in keep]
        self.targets = self._targets[keep]

    def seconds_per_user(self, model, within_s: float, users: int = PROBE_USERS) -> float:
        """Seconds per validation user, timed one user at a time on up to ``users`` users spread over the
        sample's history lengths, stopping once half of ``within_s`` is spent (a big model is timed on one)."""
        n = min(users, self.users)
        was_training, t0 = model.training, time.perf_counter()
        done = 0
        try:
            for i in np.linspace(0, self.users - 1, n).astype(int):
                self.ranked_items(model, [self.histories[i]])
                done += 1
                if time.perf_counter() - t0 >= within_s / 2:
                    break
        finally:
            model.train(was_training)
        return (time.perf_counter() - t0) / done

    @property
    def users(self) -> int:
        return len(self.targets)

    def ranked_items(self, model, histories: list | None = None) -> np.ndarray:
        """Top-10 items of every sampled user (or of ``histories``), (U, 10); the model is left in eval mode."""
        import torch

        from pauserec.train.reference import ReferenceRecommender

        rec = ReferenceRecommender(model, self.spec, self.catalog, beams=self.cfg.beams, top_n=10, encoder=self.encoder)
        histories = self.histories if histories is None else histories
        bs, out = self.cfg.batch_size, []
        with torch.no_grad():
            for lo in range(0, len(histories), bs):
                out.append(rec.recommend(histories[lo : lo + bs]).items)
        return np.concatenate(out)

    def __call__(self, model) -> dict:
        """Metrics of ``model`` (switched to eval mode and back to its previous mode) and the seconds taken."""
        was_training = model.training
        t0 = time.perf_counter()
        try:
            m = hit_ndcg(self.ranked_items(model), self.targets)
        finally:
            model.train(was_training)
        return {**{k: round(v, 5) for k, v in m.items()}, "seconds": round(time.perf_counter() - t0, 3)}


@dataclass
class EarlyStopping:
    """Best weights by one metric (higher is better), stop after ``patience`` evaluations without a gain."""

    metric: str = "ndcg@10"
    patience: int = 3
    min_delta: float = 0.0
    best: float = -np.inf
    best_point: dict | None = None
    best_state: dict | None = field(default=None, repr=False)
    bad: int = 0
    curve: list[dict] = field(default_factory=list)

    def update(self, point: dict, model) -> bool:
        """Record one evaluation (``point`` holds the metrics, step, epoch, loss); True if it is the new best."""
        value = float(point[self.metric])
        improved = value > self.best + self.min_delta
        point = {**point, "best": improved}
        self.curve.append(point)
        if improved:
            self.best, self.best_point, self.bad = value, point, 0
            self.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            self.bad += 1
        return improved

    @property
    def stop(self) -> bool:
        return self.bad >= self.patience

    def restore(self, model) -> None:
        """Load the best weights back into ``model`` (no-op before the first evaluation)."""
        if self.best_state is not None:
            model.load_state_dict(copy.copy(self.best_state))

    def summary(self, stop_reason: str, val_seconds: float, train_seconds: float, users: int) -> dict:
        """What the training card records about validation."""
        return {
            "users": users,
            "metric": self.metric,
            "patience": self.patience,
            "min_delta": self.min_delta,
            "evaluations": len(self.curve),
            "best": self.best_point,
            "chosen_epoch": None if self.best_point is None else self.best_point["epoch"],
            "chosen_step": None if self.best_point is None else self.best_point["step"],
            "stop_reason": stop_reason,
            "seconds": round(val_seconds, 2),
            "share_of_sft_time": round(val_seconds / train_seconds, 4) if train_seconds > 0 else None,
            "curve": self.curve,
        }


SNAPSHOTS_DIR = "snapshots"


class Validation:
    """What a training stage calls at each evaluation point: evaluate, keep the best, say whether to stop.

    With ``snapshots`` (a folder) the weights of every evaluation are also saved there as
    ``step-<N>.pt`` (a torch state dict): a budget sweep in one run. Past the decay horizon the schedule
    does not depend on the epoch ceiling, so a run capped at E >= decay_epochs epochs ends with the weights
    of the epoch-E snapshot (a shorter cap compresses the decay into its E epochs instead).
    """

    def __init__(self, validator: Validator, early: EarlyStopping, snapshots: Path | None = None):
        self.validator, self.early, self.snapshots = validator, early, snapshots
        self.per_user_s: float | None = None  # measured: a probe before the first evaluation, then each evaluation
        self.sized: dict | None = None  # how the sample was cut to the time allowed, if it was
        self.skipped = 0  # evaluations left out because they would not fit the time allowed

    def fits(self, model, allowed_s: float) -> bool:
        """Whether the next evaluation fits in ``allowed_s`` seconds. The first call times a few users and, when
        the whole sample would not fit, cuts it (once, for the rest of the run) to the users that do, never
        below MIN_USERS; an evaluation that still does not fit is skipped (counted in the card)."""
        v = self.validator
        if allowed_s <= 0:  # the budget is spent: not even a probe
            self.skipped += 1
            return False
        if self.per_user_s is None:
            self.per_user_s = v.seconds_per_user(model, allowed_s)
            fit = int(allowed_s / self.per_user_s) if self.per_user_s > 0 else v.users
            if fit < v.users and fit >= MIN_USERS:
                self.sized = {"asked": v.users, "used": fit, "seconds_per_user": round(self.per_user_s, 4),
                              "allowed_s": round(allowed_s, 2)}
                v.resize(fit)
        if self.per_user_s * v.users <= allowed_s:
            return True
        self.skipped += 1
        return False

    def __call__(self, model, point: dict, progress=None, task=None) -> bool:
        if progress is not None:
            progress.update(task, val=f"validating {self.validator.users} users…")
        result = self.validator(model)
        self.per_user_s = result["seconds"] / max(1, self.validator.users)
        improved = self.early.update({**point, **result}, model)
        if self.snapshots is not None:
            import torch

            self.snapshots.mkdir(parents=True, exist_ok=True)
            torch.save(model.state_dict(), self.snapshots / f"step-{point['step']}.pt")
        if progress is not None:
            p, best, metric = self.early.curve[-1], self.early.best_point, self.early.metric
            progress.update(task, val=f"val {metric} {p[metric]:.4f} (best {best[metric]:.4f} @ ep {best['epoch']:g})")
            progress.console.print(
                f"  epoch {p['epoch']:6.2f}  step {p['step']:6d}  loss {p['train_loss']:.4f}  lr {p['lr']:.2e}  "
                f"val hit@10 {p['hit@10']:.4f}  ndcg@10 {p['ndcg@10']:.4f}  ({p['seconds']:.1f} s)"
                + ("  [green]best[/]" if improved else f"  [dim]no gain {self.early.bad}/{self.early.patience}[/]"),
                highlight=False,
            )
        return self.early.stop

    @property
    def evaluations(self) -> int:
        return len(self.early.curve)

    def restore(self, model) -> None:
        self.early.restore(model)


def build_validation(cfg: ValidationConfig, spec, catalog, valid, snapshots: Path | None = None,
                     encoder=None) -> Validation | None:
    """The stage's validation hook for a config (None when ``cfg.users == 0``); TrainError on bad settings."""
    cfg.check()
    if not cfg.enabled:
        if snapshots is not None:
            raise TrainError("--snapshots saves the weights at every validation; it needs validation (--val-users > 0)")
        return None
    early = EarlyStopping(metric=cfg.metric, patience=cfg.patience, min_delta=cfg.min_delta)
    return Validation(Validator(spec, catalog, valid, cfg, encoder), early, snapshots)


STOP_DETAIL = {
    "early_stopping": "early stopping: no gain in {metric} for {patience} evaluations",
    "epochs": "reached the epoch limit ({epochs})",
    "max_steps": "reached --max-steps ({max_steps})",
    "time_budget": "reached the time budget (--max-minutes {minutes:g})",
}


def validation_record(validation: Validation | None, stage: dict, epochs: int, max_steps: int | None,
                      budget_s: float | None) -> dict | None:
    """The card's validation entry for a finished stage (``run_stage``'s dict): curve, chosen epoch, why it stopped."""
    if validation is None:
        return None
    early, vcfg = validation.early, validation.validator.cfg
    detail = STOP_DETAIL[stage["stop_reason"]].format(
        metric=early.metric, patience=early.patience, epochs=epochs, max_steps=max_steps, minutes=(budget_s or 0) / 60)
    val_s = stage["validation_time_s"]
    rec = early.summary(stage["stop_reason"], val_s, stage["wall_time_s"] - val_s, validation.validator.users)
    if rec["chosen_epoch"] is not None:
        detail += f"; saved epoch {rec['chosen_epoch']:g} ({early.metric} {early.best:.4f})"
    rec.update(stop_detail=detail, beams=vcfg.beams, every_steps=vcfg.every, seed=vcfg.seed,
               sized_to_time=validation.sized, skipped_for_time=validation.skipped)
    if not early.curve and validation.skipped:
        rec["stop_detail"] += ("; no evaluation fitted the time allowed (the last step's weights were saved): "
                               "give the run more --max-minutes or lower --val-users")
    return rec


def write_curve(out: Path, curve: list[dict], metric: str, title: str = "") -> tuple[Path | None, str]:
    """``out/curve.png`` (validation ``metric`` and training loss per evaluation) -> (path or None, note)."""
    if not curve:
        return None, "no validation curve (validation was off or the run ended before the first evaluation)"
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None, "matplotlib is not installed (pip install 'pauserec[plot]'): no curve.png; the curve is in the card"
    epochs = [p["epoch"] for p in curve]
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    ax.plot(epochs, [p[metric] for p in curve], "o-", color="tab:blue", label=f"validation {metric}")
    if "hit@10" in curve[0] and metric != "hit@10":
        ax.plot(epochs, [p["hit@10"] for p in curve], "s--", color="tab:cyan", label="validation hit@10", alpha=0.7)
    best = max(curve, key=lambda p: p[metric])
    ax.axvline(best["epoch"], color="tab:green", linestyle=":", label=f"chosen (epoch {best['epoch']:g})")
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation metric")
    ax2 = ax.twinx()
    ax2.plot(epochs, [p["train_loss"] for p in curve], "^-", color="tab:red", label="training loss", alpha=0.7)
    ax2.set_ylabel("training loss (mean since the last evaluation)")
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=7, loc="best", framealpha=0.8)
    if title:
        import textwrap

        ax.set_title(textwrap.fill(title, 90), fontsize=8)
    fig.tight_layout()
    path = Path(out) / CURVE_FILE
    fig.savefig(path)
    plt.close(fig)
    return path, f"wrote {path.name}"
