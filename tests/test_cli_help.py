"""Every command's --help renders what its source says: extras in install lines survive the help renderer (Rich
reads ``[ray]`` as markup and drops it), and the defaults a help text names are the code's."""

from __future__ import annotations

import re

import pytest
import typer
from typer.testing import CliRunner

from pauserec.cli.bench import app as bench_app
from pauserec.cli.export import app as export_app
from pauserec.cli.main import app as main_app

APPS = {"pauserec": main_app, "pauserec-export": export_app, "pauserec-bench": bench_app}
INSTALL = re.compile(r"pip install '([^']+)'")


def _commands(cmd, path: tuple[str, ...] = ()):
    yield path, cmd
    if hasattr(cmd, "commands"):  # a group (typer ships its own click)
        for name, sub in cmd.commands.items():
            yield from _commands(sub, (*path, name))


def _help(app, path: tuple[str, ...]) -> str:
    res = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "400", "NO_COLOR": "1", "TERM": "dumb"})
    assert res.exit_code == 0, res.output
    return re.sub(r"\s+", " ", res.output.replace("│", " "))


ALL = [(prog, path, cmd) for prog, app in APPS.items() for path, cmd in _commands(typer.main.get_command(app))]


@pytest.mark.parametrize("prog,path,cmd", ALL, ids=[" ".join((p, *path)) for p, path, _ in ALL])
def test_install_lines_keep_their_extras(prog, path, cmd):
    wanted = [INSTALL.search(p.help.replace("\\[", "[")).group(1) for p in cmd.params
              if getattr(p, "help", None) and INSTALL.search(p.help.replace("\\[", "["))]
    if not wanted:
        return
    shown = INSTALL.findall(_help(APPS[prog], path))
    assert sorted(shown) == sorted(wanted), f"{prog} {' '.join(path)}: help shows {shown}, source says {wanted}"
    assert all(w.startswith("pauserec[") for w in wanted if w.startswith("pauserec"))


def test_named_defaults_are_the_codes(tmp_path):
    from pathlib import Path

    from pauserec.frontends.batch import BatchConfig

    text = _help(main_app, ("recommend",))
    assert "the output's name without its suffix + .errors.jsonl" in text
    assert BatchConfig(input=Path("users.jsonl"), output=Path("out/recs.parquet")).errors_path == Path("out/recs.errors.jsonl")
    assert "pip install 'pauserec[ray]'" in text
    assert "--prompt layout's" in _help(export_app, ())
    assert "one copy per graph without" in _help(bench_app, ("latency",))
