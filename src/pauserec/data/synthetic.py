"""A seeded SYNTHETIC dataset in LC-Rec layout, for tests and demos (no real users or products).

Structure a model can learn (so it can beat popularity):

* every item belongs to one category cluster (e.g. "Lab Equipment") and one subcategory, and has a
  brand drawn mostly from its cluster's brands; titles/descriptions/categories are built from these
  small vocabularies, so a rationale template over categories and brands is meaningful;
* an item's level-1 SID code encodes its cluster and its level-2 code correlates with the
  subcategory; deeper levels are random;
* every user prefers one cluster; within a cluster items follow a hidden cyclic order and a user's
  next item is often the successor of the previous one, else a popular item of the preferred
  cluster, else any item.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import numpy as np

from pauserec.errors import DataError

NAME = "synthetic"
CLUSTERS = {
    "Lab Equipment": ("Beakers", "Pipettes", "Test Tubes"),
    "Electrical": ("Capacitors", "Relays", "Fuses"),
    "Fasteners": ("Screws", "Staples", "Anchors"),
    "Safety": ("Gloves", "Goggles", "Respirators"),
    "Power Tools": ("Drill Bits", "Sanding Rolls", "Saw Blades"),
    "Measurement": ("Calipers", "Thermometers", "Scales"),
    "Adhesives": ("Epoxies", "Tapes", "Sealants"),
    "Plumbing": ("Valves", "Fittings", "Hoses"),
}
BRANDS = (
    "Acme", "Borealis", "Cobalt", "Dynalab", "Everpoint", "Fulcrum",
    "Gryphon", "Helix", "Ironwood", "Junoflex", "Kestrel", "Lumen",
)
ADJECTIVES = ("Heavy-Duty", "Compact", "Precision", "Professional", "Economy", "Premium")
USES = ("the lab", "field work", "the workshop", "maintenance crews", "classrooms", "production lines")


def write_synthetic(
    out_dir,
    *,
    n_items: int = 300,
    n_users: int = 400,
    levels: int = 4,
    codebook: int = 16,
    seed: int = 0,
    collisions: bool = True,
) -> Path:
    """Write a seeded synthetic dataset (``synthetic.{inter,item,index}.json``) to ``out_dir``.

    The data is SYNTHETIC: generated from small vocabularies and a simple user model (see the
    module docstring); it only serves tests and demos. Sequences have 5..15 items; item ids are
    "0".."n_items-1"; SIDs have ``levels`` levels with codes in [0, codebook). With
    ``collisions=True`` a few small groups of items share one SID; otherwise all SIDs are unique.
    Returns ``out_dir`` (pass it to ``load_dataset``).
    """
    if n_items < 2 or n_users < 1 or not 1 <= levels <= 26 or codebook < 2:
        raise DataError(
            f"write_synthetic needs n_items >= 2, n_users >= 1, 1 <= levels <= 26, codebook >= 2 "
            f"(got {n_items}, {n_users}, {levels}, {codebook})"
        )
    if not collisions and codebook**levels < n_items:
        raise DataError(f"{n_items} items cannot have unique SIDs with {levels} levels of {codebook} codes")
    rng = np.random.default_rng(seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cluster, sub, brand = _item_attributes(rng, n_items)
    sids = _sids(rng, cluster, sub, levels, codebook, collisions)
    seqs = _sequences(rng, cluster, n_users)
    prefixes = string.ascii_lowercase[:levels]
    index = {str(i): [f"<{p}_{c}>" for p, c in zip(prefixes, row, strict=True)] for i, row in enumerate(sids.tolist())}
    items = {str(i): _item_text(rng, int(cluster[i]), int(sub[i]), int(brand[i]), i) for i in range(n_items)}
    inter = {str(u): s for u, s in enumerate(seqs)}
    for kind, data in (("inter", inter), ("item", items), ("index", index)):
        (out / f"{NAME}.{kind}.json").write_text(json.dumps(data), encoding="utf-8")
    return out


def _item_attributes(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    k = len(CLUSTERS)
    cluster = rng.permutation(np.arange(n) % k)  # balanced clusters
    sub = rng.integers(0, 3, n)
    own = (cluster * 3 + rng.integers(0, 3, n)) % len(BRANDS)  # three "house" brands per cluster
    brand = np.where(rng.random(n) < 0.8, own, rng.integers(0, len(BRANDS), n))
    return cluster, sub, brand


def _sids(rng, cluster, sub, levels: int, V: int, collisions: bool) -> np.ndarray:
    n, k = len(cluster), len(CLUSTERS)
    codes = rng.integers(0, V, (n, levels))  # (n, L)
    codes[:, 0] = (cluster * V + rng.integers(0, V, n)) // k  # cluster c -> codes [c V/k, (c+1) V/k)
    if levels > 1:
        codes[:, 1] = (sub * V + rng.integers(0, V, n)) // 3  # subcategory s -> codes [s V/3, (s+1) V/3)
    codes = _make_unique(rng, codes, V)
    if collisions:
        for _ in range(max(2, n // 50)):  # a few groups of 2..3 items share a SID
            src = int(rng.integers(n))
            mates = np.flatnonzero((cluster == cluster[src]) & (np.arange(n) != src))
            for j in rng.choice(mates, size=min(len(mates), int(rng.integers(1, 3))), replace=False):
                codes[j] = codes[src]
    return codes.astype(np.int32)


def _make_unique(rng, codes: np.ndarray, V: int) -> np.ndarray:
    """Give every duplicated SID new deeper codes (first free last-level code under its prefix)."""
    n, L = codes.shape
    taken: set[tuple[int, ...]] = set()
    for i in range(n):
        row = tuple(int(c) for c in codes[i])
        for _ in range(10 * V):
            if row not in taken:
                break
            free = [c for c in range(V) if (*row[:-1], c) not in taken]
            if free:
                row = (*row[:-1], int(rng.choice(free)))
            else:  # prefix full: redraw the levels below the cluster code
                row = (row[0], *(int(c) for c in rng.integers(0, V, L - 1))) if L > 1 else row
        if row in taken:
            raise DataError(f"could not give item {i} a unique SID; use more levels or a larger codebook")
        taken.add(row)
        codes[i] = row
    return codes


def _sequences(rng, cluster: np.ndarray, n_users: int) -> list[list[int]]:
    n, k = len(cluster), len(CLUSTERS)
    members = [rng.permutation(np.flatnonzero(cluster == c)) for c in range(k)]  # hidden cyclic order
    successor = np.empty(n, dtype=np.int64)
    for m in members:
        successor[m] = np.roll(m, -1)
    pop = [1.0 / np.arange(1, len(m) + 1) ** 0.8 for m in members]  # Zipf popularity inside a cluster
    pop = [p / p.sum() for p in pop]
    prefs = rng.integers(0, k, n_users)
    lengths = np.minimum(rng.integers(5, 16, n_users), n)  # 5..15, at most every item once
    seqs = []
    for u in range(n_users):
        c = int(prefs[u])
        seq: list[int] = [int(rng.choice(members[c], p=pop[c]))]
        while len(seq) < lengths[u]:
            r = rng.random()
            if r < 0.55:
                nxt = int(successor[seq[-1]])
            elif r < 0.9:
                nxt = int(rng.choice(members[c], p=pop[c]))
            else:
                nxt = int(rng.integers(n))
            while nxt in seq:  # no repeats: walk on along the cluster order
                nxt = int(successor[nxt]) if rng.random() < 0.7 else int(rng.integers(n))
            seq.append(nxt)
        seqs.append(seq)
    return seqs


def _item_text(rng, c: int, s: int, b: int, i: int) -> dict[str, str]:
    cname = list(CLUSTERS)[c]
    subname = CLUSTERS[cname][s]
    adj = ADJECTIVES[int(rng.integers(len(ADJECTIVES)))]
    model = f"{string.ascii_uppercase[i % 26]}{string.ascii_uppercase[(i // 26) % 26]}-{100 + i}"
    return {
        "title": f"{BRANDS[b]} {adj} {subname} {model}.",
        "description": f"{adj} {subname.lower()} by {BRANDS[b]} for {USES[int(rng.integers(len(USES)))]}.",
        "brand": BRANDS[b],
        "categories": f"Industrial & Scientific,{cname},{subname}",
    }
