"""Datasets: LC-Rec/LETTER json and MiniOneRec csv layouts -> ``Dataset`` (torch-free).

LC-Rec / LETTER (``fmt="lcrec"``)::

    <name>.inter.json   user -> chronological item ids
    <name>.item.json    item id -> {title, description, brand, categories}
    <name>.index.json   item id -> [SID tokens]       (or indexes/<NAME>/<name>.index.json; ``index=NAME``)

MiniOneRec (``fmt="minionerec"``)::

    index/<name>.index.json   item id -> [SID tokens]
    index/<name>.item.json    item id -> {title, description, ...}      (optional: titles from info/)
    info/*.txt                SID<TAB>title<TAB>item_id                 (catalog when index/ is absent)
    train|valid|test/*.csv    user_id, history_item_title, item_title, history_item_id, item_id,
                              history_item_sid, item_sid (list columns as Python literals)

OneRec-Think (``fmt="onerec-think"``)::

    <name>.pretrain.json            item id -> {title, description, categories,
                                    sid: "<|sid_begin|><s_a_99><s_b_19><s_c_220><s_d_204><|sid_end|>"}
    sequential_data_processed.txt   one user a line: user_id item_id item_id ... (chronological)

Its SID strings lose the ``<|...|>`` markers around the level tokens (the onerec-think prompt preset writes
them back); its splits are the pipeline's own (``splits.last_three``: the last three items are the train,
valid and test targets, one of each per user).

The catalog's items are the index's keys (sorted numerically when every key is an integer, so
dense index == item id on LC-Rec data; file order otherwise). Items without text get empty text.
For MiniOneRec the splits are the CSV rows as given (histories cut to ``max_history``); each
user's ``sequence`` is reconstructed as the longest ``history + [target]`` among its rows
(ties -> the later split), which is the full sequence when the splits are leave-one-out windows.
"""

from __future__ import annotations

import ast
import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pauserec.data.catalog import Catalog, split_sid_string
from pauserec.data.splits import Splits, SplitSamples, last_three, leave_one_out, truncate
from pauserec.errors import DataError

FORMATS = ("lcrec", "minionerec", "onerec-think")
ONERECTHINK_SEQUENCES = "sequential_data_processed.txt"
EXPECTED = (
    "LC-Rec/LETTER files (<name>.inter.json, <name>.item.json and <name>.index.json or "
    "indexes/<NAME>/<name>.index.json), MiniOneRec folders (index/<name>.index.json, "
    "index/<name>.item.json, info/*.txt, train/*.csv, valid/*.csv, test/*.csv) or OneRec-Think files "
    f"(<name>.pretrain.json, {ONERECTHINK_SEQUENCES})"
)
TEXT_FIELDS = ("title", "description", "brand", "categories")
SPLIT_NAMES = ("train", "valid", "test")


@dataclass(frozen=True)
class ItemText:
    """Text of one item; ``categories`` is the comma-separated category path as in the data."""

    title: str = ""
    description: str = ""
    brand: str = ""
    categories: str = ""

    @property
    def category_list(self) -> list[str]:
        return [c.strip() for c in self.categories.split(",") if c.strip()]

    @classmethod
    def from_json(cls, raw, source: str, item_id: str) -> ItemText:
        if raw is None:
            return cls()
        if not isinstance(raw, dict):
            raise DataError(f"{source}: item {item_id!r} has {raw!r}; expected an object with {', '.join(TEXT_FIELDS)}")
        return cls(*(_text(raw.get(f), sep="," if f == "categories" else " ") for f in TEXT_FIELDS))


def _text(value, sep: str) -> str:
    if value is None:
        return ""
    if isinstance(value, list | tuple):
        return sep.join(_text(v, sep) for v in value)
    return str(value)


@dataclass
class Dataset:
    """Users, chronological item sequences (dense int32 indices), item texts and the SID catalog."""

    name: str
    fmt: str
    catalog: Catalog
    users: list[str]
    sequences: list[np.ndarray]
    items: list[ItemText]
    path: Path | None = None
    index: str | None = None  # name of the SID index used (None: the one beside the data)
    given_splits: Splits | None = field(default=None, repr=False)  # MiniOneRec: as given, full histories

    @property
    def n_interactions(self) -> int:
        return int(sum(len(s) for s in self.sequences))

    def splits(self, max_history: int = 20) -> Splits:
        """Train/valid/test samples (LC-Rec rule, the MiniOneRec CSVs as given, or OneRec-Think's last three)."""
        if self.given_splits is not None:
            return Splits(*(truncate(s, max_history) for s in self.given_splits))
        return leave_one_out(self.users, self.sequences, max_history)

    def info(self, max_history: int = 20) -> dict:
        """Counts for ``pauserec data info``: users, items, interactions, splits and SID statistics."""
        return {
            "name": self.name,
            "format": self.fmt,
            "index": self.index,
            "users": len(self.users),
            "items": self.catalog.n_items,
            "interactions": self.n_interactions,
            "max_history": max_history,
            "splits": self.splits(max_history).sizes(),
            **self.catalog.stats(),
        }


# -- entry point ----------------------------------------------------------------------------------
def load_dataset(path, index: str | None = None, fmt: str = "auto") -> Dataset:
    """Load a dataset directory; ``fmt`` is "auto" or one of ``FORMATS``; ``index`` picks a SID index (for
    OneRec-Think, the ``<index>.pretrain.json`` where a folder holds several)."""
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"dataset directory {root} not found; expected a folder with {EXPECTED}")
    if fmt == "auto":
        fmt = detect_format(root)
    if fmt == "lcrec":
        return load_lcrec(root, index)
    if fmt == "minionerec":
        return load_minionerec(root, index)
    if fmt == "onerec-think":
        return load_onerec_think(root, index)
    raise DataError(f"unknown dataset format {fmt!r}; use one of auto, {', '.join(FORMATS)}")


def detect_format(root: Path) -> str:
    if any(root.glob("*.inter.json")):
        return "lcrec"
    if (root / "index").is_dir() or (root / "info").is_dir() or any(root.glob("train/*.csv")):
        return "minionerec"
    if any(root.glob("*.pretrain.json")) or (root / ONERECTHINK_SEQUENCES).is_file():
        return "onerec-think"
    raise DataError(f"{root}: unknown dataset layout; expected {EXPECTED}")


def read_json(path: Path):
    """Parse a JSON file; missing file, bad JSON or a repeated object key -> DataError naming it."""
    if not path.is_file():
        raise DataError(f"{path} not found; expected {EXPECTED}")
    try:
        return json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}") from None
    except _DuplicateKey as e:
        raise DataError(f"{path}: key {e.args[0]!r} appears more than once; every id must be unique") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text ({e})") from None


class _DuplicateKey(Exception):
    pass


def _unique_keys(pairs):
    d = dict(pairs)
    if len(d) != len(pairs):
        seen: set = set()
        raise _DuplicateKey(next(k for k, _ in pairs if k in seen or seen.add(k)))
    return d


def _object(data, path: Path, what: str) -> dict:
    if not isinstance(data, dict) or not data:
        kind = "an empty object" if isinstance(data, dict) else type(data).__name__
        raise DataError(f"{path} holds {kind}; expected a non-empty JSON object mapping {what}")
    return data


def catalog_from_index(path: Path, name: str, data: dict | None = None) -> Catalog:
    """An item -> SID index (LC-Rec / MiniOneRec ``*.index.json``, or OneRec-Think's ``*.pretrain.json`` whose items
    carry a ``sid`` string); ``data`` is the file's parsed content where the caller has read it already."""
    data = _object(read_json(path) if data is None else data, path, "item id -> [SID tokens]")
    keys = list(data)
    if all(k.isdigit() for k in keys):
        keys.sort(key=int)
    entries = [(k, _onerec_think_sid(data[k], path, k) if isinstance(data[k], dict) else _sid_list(data[k]))
               for k in keys]
    return Catalog.from_tokens(entries, source=str(path), name=name)


def _sid_list(value):
    """Index values are token lists; a concatenated SID string ('<a_1><b_2>') is accepted too."""
    return (split_sid_string(value) or [value]) if isinstance(value, str) else value


def _item_lookup(catalog: Catalog) -> dict:
    """Raw id (str, or int for numeric ids as JSON/CSV lists hold them) -> dense index."""
    lookup: dict = {k: i for i, k in enumerate(catalog.item_ids)}
    lookup.update({int(k): i for k, i in list(lookup.items()) if k.isdigit()})
    return lookup


def _dense(raw_items, lookup: dict, where: str, index_path) -> np.ndarray:
    try:
        return np.fromiter((lookup[x] for x in raw_items), dtype=np.int32, count=len(raw_items))
    except (KeyError, TypeError):
        bad = next(x for x in raw_items if not _hashable(x) or x not in lookup)
        raise DataError(
            f"{where}: item {bad!r} has no SID in {index_path}; every item of a sequence needs one "
            "(use the index built for this dataset)"
        ) from None


def _hashable(x) -> bool:
    return isinstance(x, str | int) and not isinstance(x, bool)


def _texts(catalog: Catalog, raw: dict, source: str) -> list[ItemText]:
    return [ItemText.from_json(raw.get(k), source, k) for k in catalog.item_ids]


# -- LC-Rec / LETTER -------------------------------------------------------------------------------
def lcrec_name(root: Path) -> str:
    inters = sorted(root.glob("*.inter.json"))
    if not inters:
        raise DataError(f"{root}: no <name>.inter.json found; expected {EXPECTED}")
    if len(inters) > 1:
        names = ", ".join(p.name for p in inters)
        raise DataError(f"{root} holds several interaction files ({names}); keep one dataset per folder")
    return inters[0].name[: -len(".inter.json")]


def available_indexes(root: Path) -> list[str]:
    """Names of the ``indexes/<NAME>/`` folders that hold an ``*.index.json``."""
    d = root / "indexes"
    if not d.is_dir():
        return []
    return sorted(p.name for p in d.iterdir() if p.is_dir() and any(p.glob("*.index.json")))


def resolve_lcrec_index(root: Path, name: str, index: str | None) -> tuple[Path, str | None]:
    """The index file to use and its NAME (None for the one beside the data)."""
    beside = root / f"{name}.index.json"
    names = available_indexes(root)
    nested = f"{root}/indexes/<NAME>/{name}.index.json"
    if index is None:
        if beside.is_file():
            return beside, None
        if len(names) == 1:
            index = names[0]
        elif names:
            raise DataError(
                f"{root} has {len(names)} SID indexes: {', '.join(names)}; pick one with --index NAME "
                "(load_dataset(..., index=NAME))"
            )
        else:
            raise DataError(f"{root}: no SID index found; expected {beside} or {nested}")
    given = Path(index)
    if given.name.endswith(".index.json") and given.is_file():
        return given, given.name[: -len(".index.json")]
    folder = root / "indexes" / index
    exact = folder / f"{name}.index.json"
    if exact.is_file():
        return exact, index
    others = sorted(folder.glob("*.index.json"))
    if len(others) == 1:  # one index file under another name
        return others[0], index
    avail = f"available: {', '.join(names)}" if names else "this dataset has no indexes/ folder"
    raise DataError(f"SID index {index!r} not found: expected {folder / f'{name}.index.json'} ({avail})")


def load_lcrec(root: Path, index: str | None = None) -> Dataset:
    name = lcrec_name(root)
    index_path, index_name = resolve_lcrec_index(root, name, index)
    catalog = catalog_from_index(index_path, name if index_name is None else f"{name}/{index_name}")
    inter_path = root / f"{name}.inter.json"
    inter = _object(read_json(inter_path), inter_path, "user id -> [item ids]")
    item_path = root / f"{name}.item.json"
    items = _texts(catalog, _object(read_json(item_path), item_path, "item id -> item text"), str(item_path))
    lookup = _item_lookup(catalog)
    users, sequences = [], []
    for user, seq in inter.items():
        if not isinstance(seq, list):
            raise DataError(f"{inter_path}: user {user!r} has {seq!r}; expected a list of item ids")
        sequences.append(_dense(seq, lookup, f"{inter_path}: user {user!r}", index_path))
        users.append(user)
    if not any(len(s) for s in sequences):
        raise DataError(f"{inter_path}: no interactions; the dataset is empty")
    return Dataset(name, "lcrec", catalog, users, sequences, items, path=root, index=index_name)


# -- MiniOneRec -----------------------------------------------------------------------------------
def _single(paths: list[Path], what: str, root: Path, index: str | None = None) -> Path | None:
    if index is not None:
        paths = [p for p in paths if p.name == f"{index}.index.json" or p.name == index]
        if not paths:
            raise DataError(f"{root}: index {index!r} not found; expected {root}/index/{index}.index.json")
    if len(paths) > 1:
        names = ", ".join(p.name for p in paths)
        raise DataError(f"{root} holds several {what} files ({names}); pick one with --index NAME")
    return paths[0] if paths else None


def read_info(path: Path) -> tuple[list[tuple[str, list[str]]], dict[str, str]]:
    """``SID<TAB>title<TAB>item_id`` lines -> [(item_id, tokens)], {item_id: title}."""
    entries, titles = [], {}
    with open(path, encoding="utf-8", newline="") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.rstrip("\r\n").split("\t")
            if len(parts) < 3:
                raise DataError(f"{path}:{lineno}: expected SID<TAB>title<TAB>item_id, got {line.strip()!r}")
            sid, title, item_id = parts[0], "\t".join(parts[1:-1]), parts[-1].strip()
            entries.append((item_id, split_sid_string(sid.strip()) or [sid]))
            titles[item_id] = title
    return entries, titles


def load_minionerec(root: Path, index: str | None = None) -> Dataset:
    index_path = _single(sorted(root.glob("index/*.index.json")), "index", root, index)
    info_paths = sorted(root.glob("info/*.txt"))
    if index_path is None and not info_paths:
        raise DataError(f"{root}: no SID index found; expected index/<name>.index.json or info/*.txt")
    info_path = info_paths[0] if len(info_paths) == 1 else None
    info_entries, titles = read_info(info_path) if info_path else ([], {})
    if index_path is not None:
        name = index_path.name[: -len(".index.json")]
        catalog = catalog_from_index(index_path, name)
        _check_info(catalog, info_entries, info_path, index_path)
    else:
        if len(info_paths) > 1:
            raise DataError(f"{root}/info holds several .txt files; add index/<name>.index.json to pick the catalog")
        name = info_path.stem
        catalog = Catalog.from_tokens(info_entries, source=str(info_path), name=name)
    item_path = root / "index" / f"{name}.item.json"
    if item_path.is_file():
        items = _texts(catalog, _object(read_json(item_path), item_path, "item id -> item text"), str(item_path))
    else:
        items = [ItemText(title=titles.get(k, "")) for k in catalog.item_ids]
    sid_source = index_path or info_path
    raw = {s: read_split_csvs(root, s, catalog, sid_source) for s in SPLIT_NAMES}
    users, sequences = _reconstruct_sequences(raw)
    splits = Splits(*(raw[s] for s in SPLIT_NAMES))
    if not sum(len(s) for s in splits):
        raise DataError(f"{root}: the train/valid/test CSVs hold no samples; the dataset is empty")
    return Dataset(name, "minionerec", catalog, users, sequences, items, path=root, index=name, given_splits=splits)


def _check_info(catalog: Catalog, entries, info_path, index_path) -> None:
    for item_id, tokens in entries:
        try:
            i = catalog.index_of(item_id)
        except DataError:
            raise DataError(
                f"{info_path}: item {item_id!r} is not in {index_path}; the two must list the same items"
            ) from None
        if catalog.sid_tokens(i) != list(tokens):
            raise DataError(
                f"{info_path}: item {item_id!r} has SID {''.join(tokens)} but {index_path} says "
                f"{catalog.sid_string(i)}; regenerate info/ from the same index"
            )


REQUIRED_COLUMNS = ("user_id", "history_item_id", "item_id")


def read_split_csvs(root: Path, split: str, catalog: Catalog, sid_source) -> SplitSamples:
    """All ``<split>/*.csv`` files of one split -> samples with full (untruncated) histories."""
    paths = sorted((root / split).glob("*.csv"))
    if not paths:
        raise DataError(f"{root}: no {split}/*.csv found; expected {EXPECTED}")
    lookup = _item_lookup(catalog)
    out = SplitSamples()
    targets: list[int] = []
    for path in paths:
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise DataError(
                    f"{path}: missing column(s) {', '.join(missing)}; "
                    f"MiniOneRec CSVs need {', '.join(REQUIRED_COLUMNS)}"
                )
            for rowno, row in enumerate(reader, 2):
                where = f"{path}: row {rowno} (user {row['user_id']!r})"
                hist = _literal_list(row["history_item_id"], where, "history_item_id")
                history = _dense([_id(x) for x in hist], lookup, where, sid_source)
                target = int(_dense([_id(row["item_id"])], lookup, where, sid_source)[0])
                sid = (row.get("item_sid") or "").strip()
                if sid and sid != catalog.sid_string(target):
                    raise DataError(
                        f"{where}: item_sid {sid} differs from {catalog.sid_string(target)} in {sid_source} "
                        f"for item {row['item_id']!r}; the CSVs and the index must come from the same SID build"
                    )
                if len(history):
                    out.users.append(row["user_id"])
                    out.histories.append(history)
                    targets.append(target)
    out.targets = np.asarray(targets, dtype=np.int32)
    return out


def _id(x):
    """CSV/literal ids: ints stay ints, numeric strings become ints, other strings stay."""
    if isinstance(x, str):
        x = x.strip()
        return int(x) if x.isdigit() else x
    return x


def _literal_list(text: str, where: str, column: str) -> list:
    try:
        value = ast.literal_eval((text or "").strip() or "[]")
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        raise DataError(f"{where}: {column} {text!r} is not a Python list literal") from None
    if not isinstance(value, list | tuple):
        raise DataError(f"{where}: {column} {text!r} is not a list")
    return list(value)


def _reconstruct_sequences(raw: dict[str, SplitSamples]) -> tuple[list[str], list[np.ndarray]]:
    best: dict[str, np.ndarray] = {}
    for split in SPLIT_NAMES:
        s = raw[split]
        for user, hist, target in zip(s.users, s.histories, s.targets, strict=True):
            if user not in best or len(hist) + 1 >= len(best[user]):
                best[user] = np.append(hist, target).astype(np.int32)
    return list(best), list(best.values())


# -- OneRec-Think ---------------------------------------------------------------------------------
def _onerec_think_sid(raw, path: Path, item_id: str) -> list[str]:
    """``"<|sid_begin|><s_a_1><s_b_2><|sid_end|>"`` -> ``["<s_a_1>", "<s_b_2>"]`` (markers dropped)."""
    sid = raw.get("sid") if isinstance(raw, dict) else None
    tokens = split_sid_string(sid.strip()) if isinstance(sid, str) else []
    while tokens and tokens[0].startswith("<|") and tokens[0].endswith("|>"):
        tokens = tokens[1:]
    while tokens and tokens[-1].startswith("<|") and tokens[-1].endswith("|>"):
        tokens = tokens[:-1]
    if not tokens:
        raise DataError(f"{path}: item {item_id!r} has sid {sid!r}; expected a SID string such as "
                        "'<|sid_begin|><s_a_99><s_b_19><s_c_220><s_d_204><|sid_end|>' (every item needs one)")
    return tokens


def load_onerec_think(root: Path, index: str | None = None) -> Dataset:
    found = sorted(root.glob("*.pretrain.json"))
    if index is not None:  # NAME, NAME.pretrain.json or a path to it
        found = [p for p in found if p.name in (Path(index).name, f"{index}.pretrain.json")]
    if len(found) != 1:
        names = ", ".join(p.name for p in sorted(root.glob("*.pretrain.json"))) or "none"
        what = "pick one with --index NAME" if len(found) > 1 else (
            f"--index {index} names none of them" if index is not None else "expected <name>.pretrain.json")
        raise DataError(f"{root}: {len(found)} OneRec-Think item files match (found: {names}); {what}")
    item_path = found[0]
    name = item_path.name[: -len(".pretrain.json")]
    raw = _object(read_json(item_path), item_path, "item id -> {title, description, categories, sid}")
    if not all(isinstance(v, dict) for v in raw.values()):
        bad = next(k for k, v in raw.items() if not isinstance(v, dict))
        raise DataError(f"{item_path}: item {bad!r} has {raw[bad]!r}; expected an object with title, description, "
                        "categories and sid")
    catalog = catalog_from_index(item_path, name, raw)
    items = _texts(catalog, raw, str(item_path))
    seq_path = root / ONERECTHINK_SEQUENCES
    if not seq_path.is_file():
        raise DataError(f"{seq_path} not found; OneRec-Think data needs it beside {item_path.name} "
                        "(one user a line: user_id item_id item_id ...)")
    lookup = _item_lookup(catalog)
    users, sequences, seen = [], [], set()
    with open(seq_path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            parts = line.split()
            if len(parts) < 2:
                continue  # a blank line or a user without items, as its scripts skip them
            user = parts[0]
            if user in seen:
                raise DataError(f"{seq_path}:{lineno}: user {user!r} appears on more than one line; "
                                "write each user's whole sequence on one line")
            seen.add(user)
            users.append(user)
            sequences.append(_dense(parts[1:], lookup, f"{seq_path}:{lineno}: user {user!r}", item_path))
    if not users:
        raise DataError(f"{seq_path}: no user has an item; the dataset is empty")
    longest = max(len(s) for s in sequences)
    return Dataset(name, "onerec-think", catalog, users, sequences, items, path=root, index=name,
                   given_splits=last_three(users, sequences, max_history=longest))
