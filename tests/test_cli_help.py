"""Every command's --help renders what its source says: extras in install lines survive the help renderer (Rich
reads ``[ray]`` as markup and drops it) and name extras pyproject.toml declares, the ``[default: X]`` each option
shows is its default, and the defaults a help text names in words are the code's."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

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


EXTRAS = set(tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["optional-dependencies"])
PAUSEREC_INSTALL = re.compile(r"pip install ['\"]?pauserec(\\*\[[^\]'\"]*\])?")  # \[ray]: escaped for Rich


def _bad_installs(text: str) -> list[str]:
    """``pip install pauserec...`` in ``text`` that name no extra, or one pyproject.toml does not declare."""
    bad = []
    for m in PAUSEREC_INSTALL.finditer(text):
        extra = (m.group(1) or "").strip("\\[]")
        if extra not in EXTRAS:
            bad.append(m.group(0))
    return bad


@pytest.mark.parametrize("prog,path,cmd", ALL, ids=[" ".join((p, *path)) for p, path, _ in ALL])
def test_install_lines_name_declared_extras(prog, path, cmd):
    bad = _bad_installs(_help(APPS[prog], path))
    assert not bad, f"{prog} {' '.join(path)} shows {bad}; the extras are {sorted(EXTRAS)}"


def test_install_lines_in_messages_name_declared_extras():
    """Error messages and docstrings too: an extra renamed in pyproject.toml must not leave a dead install line."""
    src = Path(__file__).parents[1] / "src" / "pauserec"
    bad = {f"{p.relative_to(src)}: {b}" for p in src.rglob("*.py") for b in _bad_installs(p.read_text())}
    assert not bad, f"{sorted(bad)}; the extras are {sorted(EXTRAS)}"
    assert _bad_installs("pip install 'pauserec'") and _bad_installs("pip install 'pauserec[rey]'")
    assert not _bad_installs("pip install 'pauserec\\[ray]'") and not _bad_installs(r"pip install 'pauserec\\[ray]'")


ROW = re.compile(r"^│ (?:[* ]  )?(--[\w-]+)")  # the first line of an option's row (wrapped lines are indented)
SHOWN_DEFAULT = re.compile(r"\[default: (.*?)\]")


def _option_rows(app, path: tuple[str, ...]) -> dict[str, str]:
    """{"--k": the text of that option's row in the rendered help}, wrapped lines joined."""
    res = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "400", "NO_COLOR": "1", "TERM": "dumb"})
    assert res.exit_code == 0, res.output
    rows: dict[str, str] = {}
    current = None
    for line in res.output.splitlines():
        if not line.startswith("│"):
            current = None  # a panel's border
            continue
        m = ROW.match(line)
        if m:
            current = m.group(1)
            rows[current] = ""
        if current:
            rows[current] += " " + line.strip("│ ")
    return {k: re.sub(r"\s+", " ", v).strip() for k, v in rows.items()}


def _shown(default) -> str:
    """A default as the help renderer prints it."""
    if isinstance(default, (list, tuple)):
        return ", ".join(map(str, default))
    return str(default)


def test_shown_defaults_are_the_options_defaults():
    """A ``[default: X]`` in the rendered help equals the option's default, for every option of every command
    (a show_default string or the markup renderer could print another value)."""
    checked, wrong = 0, []
    for prog, path, cmd in ALL:
        rows = _option_rows(APPS[prog], path)
        for p in cmd.params:
            if p.param_type_name != "option" or p.hidden:  # (typer ships its own click: no isinstance)
                continue
            row = rows.get(next(o for o in p.opts if o.startswith("--")))
            assert row is not None, f"{prog} {' '.join(path)}: {p.opts} has no row in the help"
            shown = SHOWN_DEFAULT.findall(row)
            if shown:
                checked += 1
                want = _shown(p.default)
                if getattr(p, "secondary_opts", None) and isinstance(p.default, bool):  # --x/--no-x: the flag's name
                    want = (p.opts if p.default else p.secondary_opts)[0].lstrip("-")
                if shown != [want]:
                    wrong.append(f"{prog} {' '.join(path)} {p.opts[0]}: help shows {shown}, default is {p.default!r}")
    assert not wrong, "\n".join(wrong)
    assert checked >= 40  # the rows were found: most commands show defaults


def _sci(x: float) -> str:
    """4e-3, as the help texts write small numbers."""
    mantissa, exp = f"{x:.0e}".split("e")
    return f"{mantissa}e{int(exp)}"


def _prose_defaults() -> dict[tuple[str, tuple[str, ...], str], str]:
    """What help texts say in words about defaults that live in the code, written from the code."""
    from pauserec.export.validate import ATOL, torch_threads
    from pauserec.train.model import PRESETS
    from pauserec.train.sft import FINETUNE_GROUNDING_LR, FINETUNE_LR

    small, tiny = PRESETS["small"], PRESETS["tiny"]
    return {
        ("pauserec-export", (), "--atol"): f"(default {_sci(ATOL['fp32'])})",
        ("pauserec-export", (), "--threads"): f"(default: {torch_threads(None).n} / all)",
        ("pauserec", ("train",), "--lr"): f"(small {_sci(small.lr)}, tiny {_sci(tiny.lr)}); with --init-from "
                                          f"{_sci(FINETUNE_LR)} for SFT and {_sci(FINETUNE_GROUNDING_LR)} for --grounding",
        ("pauserec", ("train",), "--init-from"): f"its default lr is {_sci(FINETUNE_LR)} ({_sci(FINETUNE_GROUNDING_LR)} "
                                                 "for --grounding)",
        ("pauserec", ("train",), "--val-users"): f"(default: the preset's, small {small.val_users})",
        ("pauserec", ("train",), "--sid-share"): f"(default: the preset's, tiny {tiny.sid_share:g}, small "
                                                 f"{small.sid_share or 0:g})",
    }


NUMBER_AS_DEFAULT = re.compile(r"default[^.;)]*?\d", re.IGNORECASE)


def test_defaults_named_in_words_are_the_codes():
    """A help text that names a default value in words (a number the option's own default does not carry) is
    checked against the code that applies it; a new one must be added to ``_prose_defaults``."""
    prose = _prose_defaults()
    named = set()
    for prog, path, cmd in ALL:
        rows = _option_rows(APPS[prog], path)
        for p in cmd.params:
            help_text = (getattr(p, "help", None) or "").replace("\\[", "[")
            if not NUMBER_AS_DEFAULT.search(help_text):
                continue
            key = (prog, path, p.opts[0])
            named.add(key)
            assert key in prose, f"{key}: its help names a default ({help_text!r}); check it against the code here"
            assert prose[key] in rows[p.opts[0]], f"{key}: the code says {prose[key]!r}, the help {rows[p.opts[0]]!r}"
    assert named == set(prose)
