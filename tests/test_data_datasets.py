"""Dataset loading (LC-Rec/LETTER, MiniOneRec, OneRec-Think), LC-Rec splits, the synthetic generator, bad input."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pauserec.data import Dataset, ItemText, load_dataset, write_synthetic
from pauserec.data.splits import leave_one_out
from pauserec.errors import DataError


# -- real data ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sci(scientific) -> Dataset:
    return load_dataset(scientific, index="rkmeans_native")


def test_real_counts(sci):
    assert sci.fmt == "lcrec" and sci.name == "Scientific" and sci.index == "rkmeans_native"
    assert len(sci.users) == 8317 and sci.catalog.n_items == 4344 and sci.n_interactions == 58492
    assert len(sci.items) == 4344 and all(isinstance(t, ItemText) for t in sci.items)
    assert sci.catalog.item_ids[:3] == ["0", "1", "2"]  # numeric ids: dense index == item id
    assert sci.sequences[1].tolist() == [9, 10, 11, 12, 6] and sci.sequences[1].dtype == np.int32
    assert sci.items[1].brand == "Stanley" and "Staples" in sci.items[1].category_list
    assert sorted({len(s) for s in sci.sequences})[0] == 5


def test_real_splits(sci):
    sp = sci.splits()
    assert (len(sp.train), len(sp.valid), len(sp.test)) == (33541, 8317, 8317)
    assert sp.train.targets.dtype == np.int32 and len(sp.train.users) == len(sp.train.histories) == 33541
    assert max(len(h) for s in sp for h in s.histories) == 20
    assert sum(len(s) - 1 > 20 for s in sci.sequences) == 63  # test histories cut by max_history
    seq = sci.sequences[3]  # 19 items
    assert sp.test.users[3] == sci.users[3]
    assert sp.test.histories[3].tolist() == seq[-21:-1].tolist()[-20:] and sp.test.targets[3] == seq[-1]
    assert sp.valid.histories[3].tolist() == seq[:-2].tolist()[-20:] and sp.valid.targets[3] == seq[-2]
    short = sci.splits(max_history=3)
    assert max(len(h) for s in short for h in s.histories) == 3


def test_leave_one_out_rule():
    seq = np.array([10, 11, 12, 13, 14, 15], dtype=np.int32)
    sp = leave_one_out(["u", "v", "w"], [seq, np.array([1, 2], np.int32), np.array([7], np.int32)], max_history=2)
    assert [h.tolist() for h in sp.train.histories] == [[10], [10, 11], [11, 12]]
    assert sp.train.targets.tolist() == [11, 12, 13] and sp.train.users == ["u"] * 3
    assert sp.valid.users == ["u"] and sp.valid.histories[0].tolist() == [12, 13] and sp.valid.targets.tolist() == [14]
    # "v" (2 items): no valid sample (its history would be empty), one test sample; "w": nothing
    assert sp.test.users == ["u", "v"] and sp.test.targets.tolist() == [15, 2]
    assert [h.tolist() for h in sp.test.histories] == [[13, 14], [1]]
    with pytest.raises(DataError, match="max_history"):
        leave_one_out(["u"], [seq], max_history=0)


# -- synthetic ------------------------------------------------------------------------------------
def test_synthetic_is_seeded_and_loadable(tmp_path, synthetic_data):
    a = write_synthetic(tmp_path / "a", seed=0)
    for kind in ("inter", "item", "index"):
        assert (a / f"synthetic.{kind}.json").read_bytes() == (synthetic_data / f"synthetic.{kind}.json").read_bytes()
    ds = load_dataset(a)
    assert ds.name == "synthetic" and len(ds.users) == 400 and ds.catalog.n_items == 300
    assert ds.catalog.codebook_sizes == (16, 16, 16, 16)
    assert all(5 <= len(s) <= 15 and len(set(s.tolist())) == len(s) for s in ds.sequences)
    assert ds.catalog.stats()["collision_groups"] >= 2
    assert all(t.title and t.brand and len(t.category_list) == 3 for t in ds.items)
    b = load_dataset(write_synthetic(tmp_path / "b", seed=1, levels=3, codebook=8, collisions=False))
    assert b.catalog.levels == 3 and b.catalog.stats()["collision_items"] == 0
    c = load_dataset(write_synthetic(tmp_path / "c", n_items=16, n_users=5, levels=1, codebook=16, collisions=False))
    assert c.catalog.stats()["unique_sids"] == 16


def test_synthetic_has_learnable_structure(synthetic_data):
    """Level-1 codes encode the category, and 'successor of the last item' beats popularity."""
    ds = load_dataset(synthetic_data)
    cat_of = np.array([t.category_list[1] for t in ds.items])
    a = ds.catalog.sids[:, 0]
    assert all(len(set(cat_of[a == code])) == 1 for code in np.unique(a))
    sp = ds.splits()
    n = ds.catalog.n_items
    trans = np.zeros((n, n))
    np.add.at(trans, (np.array([h[-1] for h in sp.train.histories]), sp.train.targets), 1)
    pop = np.bincount(sp.train.targets, minlength=n)
    last = np.array([h[-1] for h in sp.test.histories])
    hit_pop = np.isin(sp.test.targets, np.argsort(-pop)[:10]).mean()
    top_trans = np.argsort(-(trans[last] + 1e-3 * pop), axis=1)[:, :10]
    hit_trans = (top_trans == sp.test.targets[:, None]).any(axis=1).mean()
    assert hit_trans > 2 * hit_pop


# -- LC-Rec bad input -----------------------------------------------------------------------------
def write_lcrec(root: Path, inter=None, items=None, index=None, name="toy", nested: str | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    inter = {"u1": [0, 1, 2, 3], "u2": [2, 1, 0]} if inter is None else inter
    items = {str(i): {"title": f"t{i}", "brand": "B", "categories": "X,Y"} for i in range(4)} if items is None else items
    index = {str(i): [f"<a_{i % 2}>", f"<b_{i}>", "<c_0>"] for i in range(4)} if index is None else index
    for kind, data in (("inter", inter), ("item", items)):
        (root / f"{name}.{kind}.json").write_text(data if isinstance(data, str) else json.dumps(data))
    ipath = root / f"{name}.index.json" if nested is None else root / "indexes" / nested / f"{name}.index.json"
    ipath.parent.mkdir(parents=True, exist_ok=True)
    ipath.write_text(index if isinstance(index, str) else json.dumps(index))
    return root


def test_lcrec_toy_and_index_layouts(tmp_path):
    ds = load_dataset(write_lcrec(tmp_path / "flat"))
    assert ds.catalog.levels == 3 and ds.catalog.codebook_sizes == (2, 4, 1) and ds.index is None
    strings = {str(i): f"<a_{i % 2}><b_{i}><c_0>" for i in range(4)}  # concatenated SID strings work too
    assert load_dataset(write_lcrec(tmp_path / "str", index=strings)).catalog == ds.catalog
    assert ds.users == ["u1", "u2"] and ds.sequences[1].tolist() == [2, 1, 0]
    one = write_lcrec(tmp_path / "one", nested="v1")
    assert load_dataset(one).index == "v1"
    write_lcrec(one, nested="v2", index={str(i): ["<a_0>", f"<b_{i}>"] for i in range(4)})
    with pytest.raises(DataError, match="2 SID indexes: v1, v2; pick one with --index"):
        load_dataset(one)
    assert load_dataset(one, index="v2").catalog.levels == 2
    with pytest.raises(DataError, match="'v3' not found.*available: v1, v2"):
        load_dataset(one, index="v3")


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"inter": {"u1": [0, 1, 9]}}, r"toy.inter.json: user 'u1': item 9 has no SID in .*toy.index.json"),
        ({"inter": {"u1": [0, "x"]}}, r"user 'u1': item 'x' has no SID"),
        ({"inter": {"u1": {"a": 1}}}, r"toy.inter.json: user 'u1' has .*expected a list"),
        ({"inter": {}}, r"toy.inter.json holds an empty object"),
        ({"inter": {"u1": []}}, r"toy.inter.json: no interactions"),
        ({"inter": '{"u1": [0, 1'}, r"toy.inter.json is not valid JSON"),
        ({"index": {"0": ["<a_0>", "<b_0>"], "1": ["<a_0>"]}}, r"toy.index.json: item '1' has 1 SID tokens"),
        ({"index": {"0": ["<a_0>", "<b_0>"], "1": ["<a_0>", "b_1"]}}, r"toy.index.json: item '1' has malformed SID token 'b_1'"),
        ({"index": {"0": ["<a_0>", "<b_0>"], "1": ["<a_0>", "<c_1>"]}}, r"item '1' uses prefix 'c' at level 2"),
        ({"index": {"0": ["<a_0>"], "1": 5}}, r"toy.index.json: item '1' has no list of SID tokens"),
        ({"index": {"0": ["<a_0>"], "1": "a_1"}}, r"toy.index.json: item '1' has malformed SID token 'a_1'"),
        ({"index": '{"0": ["<a_0>"], "1": ["<a_1>"], "0": ["<a_2>"]}'}, r"toy.index.json: key '0' appears more than once"),
        ({"index": "[]"}, r"toy.index.json holds list"),
        ({"items": {"0": "just a string"}}, r"toy.item.json: item '0' has 'just a string'"),
    ],
)
def test_lcrec_bad_input(tmp_path, kwargs, pattern):
    root = write_lcrec(tmp_path / "d", **kwargs)
    with pytest.raises(DataError, match=pattern):
        load_dataset(root)


def test_missing_files_and_unknown_layout(tmp_path):
    root = write_lcrec(tmp_path / "d")
    (root / "toy.item.json").unlink()
    with pytest.raises(DataError, match=r"toy.item.json not found"):
        load_dataset(root)
    (root / "toy.index.json").unlink()
    with pytest.raises(DataError, match=r"no SID index found; expected .*toy.index.json"):
        load_dataset(root)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"unknown dataset layout; expected LC-Rec.*inter.json.*MiniOneRec.*train/\*.csv"):
        load_dataset(tmp_path / "empty")
    with pytest.raises(DataError, match="not found"):
        load_dataset(tmp_path / "nowhere")
    with pytest.raises(DataError, match="unknown dataset format 'parquet'"):
        load_dataset(write_lcrec(tmp_path / "e"), fmt="parquet")


# -- MiniOneRec -----------------------------------------------------------------------------------
SIDS3 = {0: "<a_1><b_2><c_3>", 1: "<a_1><b_0><c_4>", 2: "<a_0><b_2><c_3>", 3: "<a_1><b_0><c_4>", 4: "<a_2><b_1><c_0>"}
COLUMNS = ["user_id", "history_item_title", "item_title", "history_item_id", "item_id", "history_item_sid", "item_sid"]


def mini_row(user: str, hist: list[int], target: int) -> dict:
    return {
        "user_id": user,
        "history_item_title": repr([f"Title {i}, \"quoted\"" for i in hist]),
        "item_title": f"Title {target}",
        "history_item_id": repr(hist),
        "item_id": str(target),
        "history_item_sid": repr([SIDS3[i] for i in hist]),
        "item_sid": SIDS3[target],
    }


def write_minionerec(root: Path, with_index: bool = True, rows: dict | None = None) -> Path:
    name = "Toy_5_2016-10-2018-11"
    for d in ("index", "info", "train", "valid", "test"):
        (root / d).mkdir(parents=True, exist_ok=True)
    if with_index:
        index = {str(i): [f"<{t}" for t in s.split("<")[1:]] for i, s in SIDS3.items()}
        (root / "index" / "Toy.index.json").write_text(json.dumps(index))
        items = {str(i): {"title": f"Title {i}", "description": f"desc {i}", "categories": ["A", "B"]} for i in SIDS3}
        (root / "index" / "Toy.item.json").write_text(json.dumps(items))
    (root / "info" / f"{name}.txt").write_text("".join(f"{s}\tTitle {i}\t{i}\n" for i, s in SIDS3.items()))
    rows = rows or {
        "train": [mini_row("A1", [0], 1), mini_row("A1", [0, 1], 2), mini_row("A2", [3], 4)],
        "valid": [mini_row("A1", [0, 1, 2], 3), mini_row("A2", [3, 4], 0)],
        "test": [mini_row("A1", [0, 1, 2, 3], 4), mini_row("A2", [3, 4, 0], 1), mini_row("A3", [2], 0)],
    }
    for split, rs in rows.items():
        with open(root / split / f"{name}.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS)
            w.writeheader()
            w.writerows(rs)
    return root


def test_minionerec_parsing(tmp_path):
    ds = load_dataset(write_minionerec(tmp_path / "m"))
    assert ds.fmt == "minionerec" and ds.name == "Toy"
    cat = ds.catalog
    assert cat.levels == 3 and cat.token_prefixes == ("a", "b", "c") and cat.codebook_sizes == (3, 3, 5)
    assert cat.sid_string(2) == "<a_0><b_2><c_3>"
    assert [g.tolist() for g in cat.collision_groups()] == [[1, 3]]
    assert ds.items[0] == ItemText("Title 0", "desc 0", "", "A,B")
    sp = ds.splits()
    assert (len(sp.train), len(sp.valid), len(sp.test)) == (3, 2, 3)
    assert sp.test.users == ["A1", "A2", "A3"] and sp.test.targets.tolist() == [4, 1, 0]
    assert sp.test.histories[0].tolist() == [0, 1, 2, 3]
    assert [h.tolist() for h in ds.splits(max_history=2).test.histories] == [[2, 3], [4, 0], [2]]
    assert ds.users == ["A1", "A2", "A3"]
    assert [s.tolist() for s in ds.sequences] == [[0, 1, 2, 3, 4], [3, 4, 0, 1], [2, 0]]


def test_minionerec_catalog_from_info(tmp_path):
    ds = load_dataset(write_minionerec(tmp_path / "m", with_index=False), fmt="minionerec")
    assert ds.name == "Toy_5_2016-10-2018-11" and ds.catalog.levels == 3
    assert ds.items[4].title == "Title 4" and ds.catalog.sid_string(4) == "<a_2><b_1><c_0>"
    info = tmp_path / "m" / "info" / "Toy_5_2016-10-2018-11.txt"
    info.write_text(info.read_text() + "<a_0><b_0><c_0>\tAgain\t2\n")
    with pytest.raises(DataError, match=r"Toy_5_2016-10-2018-11.txt: item id '2' appears more than once"):
        load_dataset(tmp_path / "m")


def test_minionerec_bad_input(tmp_path):
    bad_sid = mini_row("A1", [0], 1) | {"item_sid": "<a_9><b_9><c_9>"}
    root = write_minionerec(tmp_path / "a", rows={"train": [bad_sid], "valid": [], "test": []})
    with pytest.raises(DataError, match=r"train/Toy_5_2016-10-2018-11.csv: row 2 \(user 'A1'\): item_sid <a_9><b_9><c_9> differs"):
        load_dataset(root)
    bad_lit = mini_row("A1", [0], 1) | {"history_item_id": "[0, __import__('os')]"}
    root = write_minionerec(tmp_path / "b", rows={"train": [bad_lit], "valid": [], "test": []})
    with pytest.raises(DataError, match=r"row 2 \(user 'A1'\): history_item_id .* is not a Python list literal"):
        load_dataset(root)
    unknown = mini_row("A1", [0], 1) | {"item_id": "77", "item_sid": ""}
    root = write_minionerec(tmp_path / "c", rows={"train": [], "valid": [unknown], "test": []})
    with pytest.raises(DataError, match=r"valid/.*row 2 \(user 'A1'\): item 77 has no SID in .*Toy.index.json"):
        load_dataset(root)
    root = write_minionerec(tmp_path / "d")
    (root / "test" / "Toy_5_2016-10-2018-11.csv").write_text("user_id,item_id\nA1,0\n")
    with pytest.raises(DataError, match=r"test/Toy_5_2016-10-2018-11.csv: missing column\(s\) history_item_id"):
        load_dataset(root)
    root = write_minionerec(tmp_path / "e")
    (root / "valid" / "Toy_5_2016-10-2018-11.csv").unlink()
    with pytest.raises(DataError, match=r"no valid/\*.csv found"):
        load_dataset(root)
    root = write_minionerec(tmp_path / "f")
    (root / "info" / "Toy_5_2016-10-2018-11.txt").write_text("<a_0><b_0><c_0>\tTitle 0\t0\n")
    with pytest.raises(DataError, match=r"Toy_5_2016-10-2018-11.txt: item '0' has SID <a_0><b_0><c_0> but .*Toy.index.json says"):
        load_dataset(root)
    root = write_minionerec(tmp_path / "g", rows={"train": [], "valid": [], "test": []})
    with pytest.raises(DataError, match="hold no samples"):
        load_dataset(root)


# -- OneRec-Think ----------------------------------------------------------------------------------
def write_onerec_think(root: Path, sequences: dict[str, list[str]], sids: dict[str, str], name="Beauty") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    items = {i: {"title": f"T{i}", "description": f"d{i}", "categories": "Beauty > Skin", "sid": s}
             for i, s in sids.items()}
    (root / f"{name}.pretrain.json").write_text(json.dumps(items))
    (root / "sequential_data_processed.txt").write_text("".join(f"{u} {' '.join(s)}\n" for u, s in sequences.items()))
    return root


def onerec_think_rows(lines: list[str], items: dict, tail: int) -> list[tuple[str, str, str]]:
    """OneRec-Think's generate_sid_prediction_data.py rule, written from its description: drop ``tail`` items from
    the end, the last remaining one is the ground truth, the ones before it the description."""
    rows = []
    for line in lines:
        user, *ids = line.split()
        sids = [items[i]["sid"] for i in ids]
        if len(sids) <= tail + 1:
            continue
        kept = sids[: len(sids) - tail]
        rows.append((user, "The user has purchased the following items: " + "; ".join(kept[:-1]) + ";", kept[-1]))
    return rows


def test_onerec_think_real_data_gives_the_pipelines_own_splits(tmp_path, sci):
    """Amazon Scientific written in OneRec-Think's layout: the catalog and sequences are the LC-Rec load's, and each
    split's (user, description, ground truth) rows are the ones OneRec-Think's data script makes from the files."""
    from pauserec.prompt.layout import load_layout

    cat = sci.catalog
    sids = {k: "<|sid_begin|>" + "".join(f"<s_{'abcd'[lv]}_{c}>" for lv, c in enumerate(cat.sids[i])) + "<|sid_end|>"
            for i, k in enumerate(cat.item_ids)}
    seqs = {u: [cat.item_ids[i] for i in s] for u, s in zip(sci.users, sci.sequences)}
    root = write_onerec_think(tmp_path / "ot", seqs, sids)
    ds = load_dataset(root)
    assert ds.fmt == "onerec-think" and ds.name == "Beauty" and ds.catalog.token_prefixes == ("s_a", "s_b", "s_c", "s_d")
    assert np.array_equal(ds.catalog.sids, cat.sids) and ds.catalog.item_ids == cat.item_ids
    assert ds.items[1] == ItemText("T1", "d1", "", "Beauty > Skin")
    assert all(np.array_equal(a, b) for a, b in zip(ds.sequences, sci.sequences))
    layout = load_layout("onerec-think")

    def user_message(prompt: str) -> str:  # the preset's user turn, as the description column holds it
        return prompt.split("<|im_start|>user\n")[1].split("<|im_end|>")[0]

    lines = (root / "sequential_data_processed.txt").read_text().splitlines()
    items = json.loads((root / "Beauty.pretrain.json").read_text())
    longest = max(len(s) for s in ds.sequences)
    for split, tail in zip(ds.splits(max_history=longest), (2, 1, 0)):
        got = [(u, user_message(layout.render(layout.segments("direct"), [{"sid": ds.catalog.sid_string(int(i))}
                                                                             for i in h])[0]),
                "<|sid_begin|>" + ds.catalog.sid_string(int(t)) + "<|sid_end|>")
               for u, h, t in zip(split.users, split.histories, split.targets)]
        assert got == onerec_think_rows(lines, items, tail)
    sizes = ds.splits().sizes()
    assert sizes == {"train": 8317, "valid": 8317, "test": 8317}  # every user has >= 5 items
    assert ds.splits().test.histories[0].tolist() == sci.splits().test.histories[0].tolist()


@pytest.mark.parametrize("change, pattern", [
    ({"sid": "<s_a_1><s_b_2"}, "has sid '<s_a_1><s_b_2'; expected a SID string"),
    ({"sid": None}, "has sid None"),
    ({"seq": "u1 1 2\nu1 2 3\n"}, "user 'u1' appears on more than one line"),
    ({"seq": "u1 1 9\n"}, "item '9' has no SID"),
    ({"seq": None}, "sequential_data_processed.txt not found"),
    ({"second": True}, "2 OneRec-Think item files match .* pick one with --index NAME"),
])
def test_onerec_think_bad_input(tmp_path, change, pattern):
    root = write_onerec_think(tmp_path, {"u1": ["1", "2", "3"]}, {"1": "<|sid_begin|><s_a_1><s_b_2><|sid_end|>",
                                                                "2": "<s_a_0><s_b_1>", "3": "<s_a_1><s_b_1>"})
    items = json.loads((root / "Beauty.pretrain.json").read_text())
    if "sid" in change:
        items["2"]["sid"] = change["sid"]
    (root / "Beauty.pretrain.json").write_text(json.dumps(items))
    if change.get("seq") is None and "seq" in change:
        (root / "sequential_data_processed.txt").unlink()
    elif "seq" in change:
        (root / "sequential_data_processed.txt").write_text(change["seq"])
    if change.get("second"):
        (root / "Toys.pretrain.json").write_text(json.dumps(items))
    with pytest.raises(DataError, match=pattern):
        load_dataset(root)
    if change.get("second"):
        assert load_dataset(root, index="Toys").name == "Toys"


def test_data_package_never_imports_torch():
    code = "import sys, pauserec.data, pauserec.cli.data; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
