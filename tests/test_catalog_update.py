"""Catalog updates without re-export: remove 10 % of the items and add new SIDs (some using codes the
export-time catalog never used), and the updated engine recommends exactly what a fresh export of the
new catalog does; other SID indexes are refused with a clear error, leaving the engine unchanged."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from test_export import exported, tiny_catalog  # noqa: E402

from pauserec.data import Catalog  # noqa: E402
from pauserec.errors import DataError  # noqa: E402

ARCH_OF = {"direct": "qwen2", "pause": "qwen3", "cot": "llama"}
REMOVED = ["item5", "item9"]  # 10 % of the 19 export-time items
NEW = {"new0": (2, 2, 1), "new1": (1, 2, 0), "new2": (3, 1, 1), "new3": (1, 0, 3)}  # b_2 unused at export; new3 collides
HISTORIES = [["new0", "item1"], ["new1"], ["item2", "new3", "item7"], ["item3"], ["new2", "item14", "new0"],
             ["item6", "item18"]]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _old_catalog() -> Catalog:
    """The export-time catalog: the tiny one without the items using code 2 at level 2 (sizes stay 4, 5, 6)."""
    cat = tiny_catalog()
    keep = [i for i in range(cat.n_items) if cat.sids[i, 1] != 2]
    return Catalog([cat.item_ids[i] for i in keep], cat.sids[keep], cat.token_prefixes, name="old")


def _new_catalog() -> Catalog:
    old = _old_catalog()
    keep = [i for i, x in enumerate(old.item_ids) if x not in REMOVED]
    ids = [old.item_ids[i] for i in keep] + list(NEW)
    sids = np.concatenate([old.sids[keep], np.array(list(NEW.values()))])
    return Catalog(ids, sids, old.token_prefixes, name="new")


def _write_index(path: Path, cat: Catalog) -> Path:
    path.write_text(json.dumps({x: cat.sid_tokens(i) for i, x in enumerate(cat.item_ids)}))
    return path


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("catalogs")
    old, new = _old_catalog(), _new_catalog()
    assert 2 not in old.sids[:, 1] and old.codebook_sizes == new.codebook_sizes == (4, 5, 6)
    return {"old": old.save(root / "old.npz"), "new": new.save(root / "new.npz"),
            "index": _write_index(root / "new.index.json", new)}


def _engine_pair(tmp_path_factory, tmp_path, sources, kind) -> tuple[Path, Path]:
    """(a copy of the old-catalog engine, a fresh export of the new catalog) for ``kind``."""
    arch = ARCH_OF[kind]
    old = exported(tmp_path_factory, arch, kind, suffix="-cat-old", catalog=sources["old"])
    fresh = exported(tmp_path_factory, arch, kind, suffix="-cat-new", catalog=sources["new"])
    copy = tmp_path / f"engine-{kind}"
    shutil.copytree(old, copy)
    return copy, fresh


def _recommend(path: Path, histories, **kw):
    from pauserec.runtime import Engine, Recommender

    return Recommender(Engine.load(path, provider="cpu")).recommend(histories, **kw)


@pytest.mark.parametrize("kind", list(ARCH_OF))
def test_updated_engine_equals_a_fresh_export(tmp_path_factory, tmp_path, sources, kind):
    from pauserec.runtime.catalog_update import update_catalog

    engine, fresh = _engine_pair(tmp_path_factory, tmp_path, sources, kind)
    weights_inode = (engine / "weights.bin").stat().st_ino
    report = update_catalog(engine, sources["index"])
    assert (report.items_before, report.items_after, report.added, report.removed) == (19, 21, 4, 2)
    assert (engine / "weights.bin").stat().st_ino == weights_inode  # linked, not copied
    manifest = json.loads((engine / "manifest.json").read_text())
    assert manifest["files"]["catalog.npz"] == report.catalog_sha256 and manifest["catalog"]["items"] == 21

    got = _recommend(engine, HISTORIES, k=21, beams=21)  # checksums verified on load
    want = _recommend(fresh, HISTORIES, k=21, beams=21)
    np.testing.assert_array_equal(got.items, want.items)
    np.testing.assert_allclose(got.scores, want.scores, rtol=1e-5, atol=1e-6)
    shown = set(got.items.ravel())
    assert not shown & set(REMOVED)  # removed items never appear
    assert set(NEW) <= shown  # new items are recommendable at once (everything fits in k = 21)


def test_engine_load_with_another_catalog_and_out_dir(tmp_path_factory, tmp_path, sources):
    from pauserec.runtime import Engine, Recommender
    from pauserec.runtime.catalog_update import update_catalog

    engine, fresh = _engine_pair(tmp_path_factory, tmp_path, sources, "direct")
    before = (engine / "catalog.npz").read_bytes()
    for source in (sources["index"], sources["new"], Catalog.load(sources["new"])):
        loaded = Engine.load(engine, provider="cpu", catalog=source)
        assert loaded.catalog.n_items == 21 and loaded.catalog.codebook_sizes == (4, 5, 6)
        got = Recommender(loaded).recommend(HISTORIES, k=8, beams=8)
        np.testing.assert_array_equal(got.items, _recommend(fresh, HISTORIES, k=8, beams=8).items)
    assert (engine / "catalog.npz").read_bytes() == before  # Engine.load never writes

    out = tmp_path / "updated"
    update_catalog(engine, sources["index"], out=out)
    assert (engine / "catalog.npz").read_bytes() == before
    np.testing.assert_array_equal(_recommend(out, HISTORIES, k=8, beams=8).items,
                                  _recommend(fresh, HISTORIES, k=8, beams=8).items)


def _index(tmp_path: Path, entries: dict) -> Path:
    path = tmp_path / "bad.index.json"
    path.write_text(json.dumps(entries))
    return path


REFUSED = {
    "levels": ({"x": ["<a_1>", "<b_2>"]}, r"has 2 SID levels but engine .* was exported for 3"),
    "codebook": ({"x": ["<a_1>", "<b_2>", "<c_6>"]}, r"uses code 6 at level 3 \(item 'x'\) .* codebook sizes \[4, 5, 6\]"),
    "prefix": ({"x": ["<a_1>", "<q_2>", "<c_3>"]}, r"prefixes \['a', 'q', 'c'\] .* uses \['a', 'b', 'c'\]"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_other_sid_indexes_are_refused(tmp_path_factory, tmp_path, sources, case):
    from pauserec.runtime import Engine
    from pauserec.runtime.catalog_update import update_catalog

    engine, _ = _engine_pair(tmp_path_factory, tmp_path, sources, "pause")
    entries, message = REFUSED[case]
    bad = _index(tmp_path, entries)
    before = {p.name: p.read_bytes() for p in engine.iterdir() if p.suffix in (".json", ".npz")}
    with pytest.raises(DataError, match=message) as err:
        update_catalog(engine, bad)
    assert "pauserec-export" in str(err.value)  # says what to do
    assert {p.name: p.read_bytes() for p in engine.iterdir() if p.suffix in (".json", ".npz")} == before
    assert not [p for p in engine.parent.iterdir() if p.name.startswith(".")]  # no staging left behind
    with pytest.raises(DataError, match=message):
        Engine.load(engine, provider="cpu", catalog=bad)


def test_a_catalog_declaring_a_larger_codebook_is_refused(tmp_path_factory, tmp_path, sources):
    from pauserec.runtime.catalog_update import update_catalog

    engine, _ = _engine_pair(tmp_path_factory, tmp_path, sources, "direct")
    cat = _new_catalog()
    bigger = Catalog(cat.item_ids, cat.sids, cat.token_prefixes, codebook_sizes=(4, 8, 6))
    with pytest.raises(DataError, match="declares 8 codes at level 2"):
        update_catalog(engine, bigger)
    with pytest.raises(DataError, match="not found"):
        update_catalog(engine, tmp_path / "missing.index.json")


def test_cli_catalog_update(tmp_path_factory, tmp_path, sources):
    from typer.testing import CliRunner

    from pauserec.cli.main import app

    engine, fresh = _engine_pair(tmp_path_factory, tmp_path, sources, "direct")
    res = CliRunner().invoke(app, ["catalog", "update", str(engine), "--index", str(sources["index"]), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["added"] == 4
    np.testing.assert_array_equal(_recommend(engine, HISTORIES, k=8, beams=8).items,
                                  _recommend(fresh, HISTORIES, k=8, beams=8).items)
    bad = _index(tmp_path, REFUSED["codebook"][0])
    res = CliRunner().invoke(app, ["catalog", "update", str(engine), "--index", str(bad)])
    assert res.exit_code == 2 and "uses code 6 at level 3" in res.output
