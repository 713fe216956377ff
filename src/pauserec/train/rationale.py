"""Template rationales for cot models (OneRec-Think style; deterministic; no torch).

A rationale summarises the history items' categories and brands, e.g.::

    The user bought 3 items, mostly Lab Tubes and Pipettes, often from Eppendorf.
    The user is likely to buy items in the Lab Tubes category.

Rules (so the same history always yields the same text):

* an item's category is the leaf of its category path (``"A,B,C"`` -> ``"C"``); items without
  categories are skipped; brands are stripped, empty ones skipped;
* "mostly": the two most frequent categories (count descending, ties -> the more recent one);
* "often from": the most frequent brand, named only when it occurs at least twice;
* "likely": the category of the most recent item that has one;
* a history with no category at all yields ``"The user bought N items."``.
"""

from __future__ import annotations

from collections.abc import Sequence

TEMPLATE_TEXTS = (
    "The user bought 3 items, mostly Tools and Parts, often from Brand.",
    "The user is likely to buy items in the Supplies category.",
)


def category_path(categories) -> list[str]:
    """Category path as a list of non-empty names (accepts ``"A,B,C"`` or a list)."""
    if isinstance(categories, str):
        parts = categories.split(",")
    elif isinstance(categories, Sequence):
        parts = [str(c) for c in categories]
    else:
        parts = []
    return [p.strip() for p in parts if p and p.strip()]


def leaf_category(item) -> str:
    path = category_path(getattr(item, "categories", ""))
    return path[-1] if path else ""


def _ranked(values: list[str]) -> list[tuple[str, int]]:
    """Distinct non-empty values by count descending, ties -> most recent last occurrence first."""
    last: dict[str, int] = {}
    count: dict[str, int] = {}
    for pos, v in enumerate(values):
        if v:
            count[v] = count.get(v, 0) + 1
            last[v] = pos
    return sorted(count.items(), key=lambda kv: (-kv[1], -last[kv[0]]))


def rationale_text(items: Sequence, history: Sequence[int]) -> str:
    """The rationale for a history of dense item indices (chronological), over ``items`` (ItemText)."""
    hist = [int(i) for i in history]
    cats = [leaf_category(items[i]) for i in hist]
    brands = [str(getattr(items[i], "brand", "") or "").strip() for i in hist]
    n = len(hist)
    head = f"The user bought {n} item{'s' if n != 1 else ''}"
    top = _ranked(cats)
    if not top:
        return head + "."
    mostly = " and ".join(c for c, _ in top[:2])
    text = f"{head}, mostly {mostly}"
    top_brand = _ranked(brands)
    if top_brand and top_brand[0][1] >= 2:
        text += f", often from {top_brand[0][0]}"
    recent = next(c for c in reversed(cats) if c)
    return f"{text}. The user is likely to buy items in the {recent} category."
