"""`pauserec data info` on the real dataset and on bad input."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from pauserec.cli.main import app

runner = CliRunner()
INDEXES = (
    "letter_native", "letter_zcr", "mql4grec", "quasid_native", "quasid_zcr",
    "rkmeans_native", "rkmeans_zcr", "rkmeans_zcr_cf", "rqvae_native", "rqvae_zcr",
)


def test_info_json_on_scientific(scientific):
    r = runner.invoke(app, ["data", "info", str(scientific), "--index", "rkmeans_native", "--json"])
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert (s["users"], s["items"], s["interactions"]) == (8317, 4344, 58492)
    assert s["splits"] == {"train": 33541, "valid": 8317, "test": 8317}
    assert (s["levels"], s["codebook_sizes"], s["used_codes_per_level"]) == (4, [256] * 4, [256] * 4)
    assert (s["unique_sids"], s["collision_items"], s["collision_groups"], s["largest_group"]) == (3469, 1326, 451, 26)


def test_info_table_on_scientific(scientific):
    r = runner.invoke(app, ["data", "info", str(scientific), "--index", "mql4grec"])
    assert r.exit_code == 0, r.output
    for text in ("8,317", "4,344", "58,492", "33,541 / 8,317 / 8,317", "1, 8, 10, 229", "mql4grec"):
        assert text in r.stdout


def test_info_without_index_lists_all_indexes(scientific):
    r = runner.invoke(app, ["data", "info", str(scientific)])
    assert r.exit_code == 2
    assert "--index" in r.output and all(name in r.output for name in INDEXES)
    assert "Traceback" not in r.output


def test_info_errors_exit_2(tmp_path, synthetic_data):
    r = runner.invoke(app, ["data", "info", str(tmp_path)])
    assert r.exit_code == 2 and "unknown dataset layout" in r.output
    (tmp_path / "x.inter.json").write_text("{not json")
    (tmp_path / "x.item.json").write_text("{}")
    (tmp_path / "x.index.json").write_text('{"0": ["<a_0>"]}')
    r = runner.invoke(app, ["data", "info", str(tmp_path)])
    assert r.exit_code == 2 and "x.inter.json is not valid JSON" in r.output
    r = runner.invoke(app, ["data", "info", str(synthetic_data), "--max-history", "5", "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["items"] == 300
