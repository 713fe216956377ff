"""Engines from URIs: copied once per machine into a cache, verified on the way in, shared by processes."""

from __future__ import annotations

import shutil
import threading

import pytest

from pauserec.errors import DataError, EngineError
from pauserec.runtime import Engine, Recommender
from pauserec.runtime.backends import available_cpus
from pauserec.runtime.engine_cache import CACHE_ENV, CAP_ENV, ENTRY_FILE, local_engine


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache" / "engines"


def test_a_file_uri_is_copied_once_verified_and_reused(trained_engines, cache):
    engine = trained_engines["pause"]
    loaded = Engine.load(engine.as_uri(), threads=1)
    (entry,) = cache.glob("pause-*")
    assert loaded.path == entry and loaded.source == engine.as_uri()
    assert sorted(p.name for p in entry.iterdir() if p.name != ENTRY_FILE) == sorted(p.name for p in engine.iterdir() if p.is_file())
    stamp = (entry / "weights.bin").stat().st_mtime_ns
    ids = list(loaded.catalog.item_ids[:3])
    want = Recommender(Engine.load(engine, threads=1)).recommend([ids], k=5, beams=8)
    got = Recommender(Engine.load(engine.as_uri() + "/", threads=1)).recommend([ids], k=5, beams=8)
    assert list(got.items[0]) == list(want.items[0]) and (entry / "weights.bin").stat().st_mtime_ns == stamp
    assert list(cache.iterdir()) == [entry]  # no second copy, no temporary or lock left


def test_processes_of_one_machine_copy_it_once(trained_engines, cache):
    uri = trained_engines["direct"].as_uri()
    paths, errors = [], []

    def load():
        try:
            paths.append(local_engine(uri)[0])
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=load) for _ in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors and len(set(paths)) == 1 and len(list(cache.iterdir())) == 1


def test_a_corrupt_or_missing_engine_never_enters_the_cache(trained_engines, tmp_path, cache):
    bad = tmp_path / "bad"
    shutil.copytree(trained_engines["direct"], bad)
    with open(bad / "catalog.npz", "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02")
    with pytest.raises(EngineError, match="checksum mismatch for .*catalog.npz"):
        Engine.load(bad.as_uri())
    assert not cache.exists() or not [p for p in cache.iterdir() if not p.name.startswith(".")]
    with pytest.raises(EngineError, match="is .* an engine directory"):
        Engine.load((tmp_path / "nowhere").as_uri())
    with pytest.raises(EngineError, match="cannot open the engine URI"):
        Engine.load("nosuchscheme://bucket/engine")


def test_a_copy_killed_half_way_is_cleaned_up_and_done_again(trained_engines, cache):
    """kill -9 after the first file is copied: no entry appears; the next load removes the temporary folder and
    copies the engine whole."""
    import os
    import signal
    import subprocess
    import sys

    uri = trained_engines["direct"].as_uri()
    child = ("import os, signal\n"
             "from pauserec.runtime import engine_cache as c\n"
             "real = c._copy\n"
             "def copy(*a):\n"
             "    real(*a)\n"
             "    os.kill(os.getpid(), signal.SIGKILL)\n"
             "c._copy = copy\n"
             f"c.local_engine({uri!r})\n")
    done = subprocess.run([sys.executable, "-c", child], env={**os.environ}, capture_output=True)
    assert done.returncode == -signal.SIGKILL
    assert [p.name for p in cache.iterdir() if ".tmp-" in p.name]  # what the killed copy left
    assert not [p for p in cache.iterdir() if not p.name.startswith(".")]
    entry, _ = local_engine(uri)
    assert list(cache.iterdir()) == [entry]  # the temporary folder and the lock are gone
    Recommender(Engine.load(uri, threads=1)).recommend([list(Engine.load(entry).catalog.item_ids[:2])], k=2, beams=2)


def test_a_damaged_hit_is_copied_again(trained_engines, cache):
    uri = trained_engines["direct"].as_uri()
    entry, _ = local_engine(uri)
    with open(entry / "weights.bin", "r+b") as f:  # a full disk or a hand truncated it
        f.truncate(100)
    (entry / "catalog.npz").unlink()
    again, verified = local_engine(uri)
    assert again == entry and verified
    assert (entry / "weights.bin").read_bytes() == (trained_engines["direct"] / "weights.bin").read_bytes()
    assert (entry / "catalog.npz").is_file()


def test_the_cache_is_capped_least_recently_used_first(trained_engines, cache, tmp_path, monkeypatch):
    engines = {k: trained_engines[k] for k in ("direct", "pause", "cot")}
    size = max(sum(p.stat().st_size for p in e.iterdir()) for e in engines.values())
    monkeypatch.setenv(CAP_ENV, str(2.5 * size / 1e9))  # room for two engines, not three
    direct, _ = local_engine(engines["direct"].as_uri())
    pause, _ = local_engine(engines["pause"].as_uri())
    local_engine(engines["direct"].as_uri())  # used again: pause is now the least recently used
    cot, _ = local_engine(engines["cot"].as_uri())
    assert sorted(p.name for p in cache.iterdir()) == sorted([direct.name, cot.name])
    monkeypatch.setenv(CAP_ENV, "lots")
    with pytest.raises(EngineError, match="PAUSEREC_CACHE_MAX_GB"):
        local_engine(engines["pause"].as_uri())


def test_threads_default_to_the_cpus_this_process_may_use(trained_engines):
    engine = Engine.load(trained_engines["direct"])
    assert engine.threads == available_cpus()
    assert {s.sess.get_session_options().intra_op_num_threads for s in engine.sessions.values()} == {available_cpus()}


def test_k_above_beams_is_refused_not_padded(trained_engines):
    rec = Recommender(Engine.load(trained_engines["direct"], threads=1))
    history = [list(rec.catalog.item_ids[:2])]
    with pytest.raises(DataError, match="k=9 > beams=8"):
        rec.recommend(history, k=9, beams=8)
    with pytest.raises(DataError, match="k=9 > beams=8"):
        rec.check_request(9, 8)
    inspect = Recommender(Engine.load(trained_engines["direct"], graphs=False))
    assert inspect.fingerprint() == {**rec.fingerprint(), "provider": "auto"}
    with pytest.raises(EngineError, match="graphs=False"):
        inspect.recommend(history, k=2, beams=2)
