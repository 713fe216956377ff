"""Train/valid/test samples: (user, history, target) with histories truncated to the last N items.

The LC-Rec/LETTER leave-one-out rule, for each user sequence ``seq`` (chronological):

* train: for i in 1..len(seq)-3, history ``seq[:i]`` -> target ``seq[i]`` (every prefix of ``seq[:-2]``);
* valid: history ``seq[:-2]`` -> target ``seq[-2]``;
* test:  history ``seq[:-1]`` -> target ``seq[-1]``.

Samples whose history would be empty (users with fewer than 3 items) are skipped. Histories keep
only the last ``max_history`` items.

OneRec-Think's rule (``last_three``) keeps valid and test as above but trains on one sample per user:
history ``seq[:-3]`` -> target ``seq[-3]`` (its ``generate_sid_prediction_data.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pauserec.errors import DataError


@dataclass
class SplitSamples:
    """One split: parallel lists of users, (truncated) histories and targets (dense item indices)."""

    users: list[str] = field(default_factory=list)
    histories: list[np.ndarray] = field(default_factory=list)  # each (h,) int32, 1 <= h <= max_history
    targets: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int32))  # (n,) int32

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[str, np.ndarray, int]:
        return self.users[i], self.histories[i], int(self.targets[i])

    def history_lengths(self) -> np.ndarray:
        return np.fromiter((len(h) for h in self.histories), dtype=np.int32, count=len(self.histories))


@dataclass
class Splits:
    train: SplitSamples
    valid: SplitSamples
    test: SplitSamples

    def __iter__(self):
        return iter((self.train, self.valid, self.test))

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "valid": len(self.valid), "test": len(self.test)}


def check_max_history(max_history: int) -> int:
    if int(max_history) < 1:
        raise DataError(f"max_history must be >= 1, got {max_history}")
    return int(max_history)


def leave_one_out(users: list[str], sequences: list[np.ndarray], max_history: int = 20) -> Splits:
    """The LC-Rec rule above over every user's sequence."""
    m = check_max_history(max_history)
    tr_u: list[str] = []
    tr_h: list[np.ndarray] = []
    tr_t: list[np.ndarray] = []
    va, te = SplitSamples(), SplitSamples()
    va_t: list[int] = []
    te_t: list[int] = []
    for user, seq in zip(users, sequences, strict=True):
        n = len(seq)
        if n >= 4:  # train targets seq[1 : n-2]
            tr_u.extend([user] * (n - 3))
            tr_h.extend(seq[max(0, i - m) : i] for i in range(1, n - 2))
            tr_t.append(seq[1 : n - 2])
        if n >= 3:
            va.users.append(user)
            va.histories.append(seq[max(0, n - 2 - m) : n - 2])
            va_t.append(int(seq[n - 2]))
        if n >= 2:
            te.users.append(user)
            te.histories.append(seq[max(0, n - 1 - m) : n - 1])
            te_t.append(int(seq[n - 1]))
    train = SplitSamples(tr_u, tr_h, np.concatenate(tr_t).astype(np.int32) if tr_t else np.empty(0, np.int32))
    va.targets = np.asarray(va_t, dtype=np.int32)
    te.targets = np.asarray(te_t, dtype=np.int32)
    return Splits(train, va, te)


def last_three(users: list[str], sequences: list[np.ndarray], max_history: int = 20) -> Splits:
    """OneRec-Think's rule: each user's last three items are the train, valid and test targets, each with the
    items before it as history (users with fewer than 4 items give no train sample, as leave-one-out)."""
    m = check_max_history(max_history)
    out = []
    for tail in (3, 2, 1):
        kept = [(u, s) for u, s in zip(users, sequences, strict=True) if len(s) > tail]
        out.append(SplitSamples([u for u, _ in kept], [s[max(0, len(s) - tail - m): len(s) - tail] for _, s in kept],
                                np.asarray([s[len(s) - tail] for _, s in kept], dtype=np.int32)))
    return Splits(*out)


def truncate(samples: SplitSamples, max_history: int) -> SplitSamples:
    """Copy of ``samples`` with every history cut to its last ``max_history`` items."""
    m = check_max_history(max_history)
    return SplitSamples(list(samples.users), [h[-m:] for h in samples.histories], samples.targets.copy())
