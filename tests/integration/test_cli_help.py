"""Issue 16 item 1: every command, option and argument of ``diredi`` says what it is, every
``--help`` runs, and there is one command per job (a removed twin says which command replaced it).

The tree is walked from the real app object (``diredi_secure.cli.app``, with every layer mounted),
hidden commands included: a command a script may call deserves help as much as a listed one.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from diredi_secure.cli import MOVED_COMMANDS, app
from diredi_secure.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]

# Help still missing in files this change did not own; each entry is checked to be still missing
# (below), so the one who adds the help must delete the entry, and the list can only shrink.
_MISSING_ELSEWHERE: frozenset[tuple[str, str]] = frozenset()


def _commands(command: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    yield path, command
    for name, sub in sorted(getattr(command, "commands", {}).items()):
        yield from _commands(sub, (*path, name))


TREE = list(_commands(typer.main.get_command(app)))
ALL_PATHS = [path for path, _ in TREE]


def _missing_help() -> set[tuple[str, str]]:
    missing: set[tuple[str, str]] = set()
    for path, command in TREE:
        where = " ".join(path) or "diredi"
        if not (command.help or command.short_help):
            missing.add((where, "(command)"))
        for param in command.params:
            if param.name == "help":
                continue
            if not (getattr(param, "help", None) or "").strip():
                missing.add((where, str(param.name)))
    return missing


def test_the_tree_is_the_whole_cli() -> None:
    # Guards the walk itself: a walk that found nothing would pass every check below.
    paths = {" ".join(p) for p in ALL_PATHS}
    for expected in ("keys device-ca", "packet seal", "release publish", "audit run",
                     "cloud serve", "cloud config show", "edge reverse", "provision kit",
                     "ml loop", "ml scenario", "bench reproduce", "demo"):
        assert expected in paths, expected
    assert len(paths) > 50


def test_every_command_option_and_argument_has_help() -> None:
    missing = _missing_help()
    new = sorted(missing - _MISSING_ELSEWHERE)
    assert not new, f"commands or parameters without help text: {new}"
    fixed = sorted(_MISSING_ELSEWHERE - missing)
    assert not fixed, f"these have help now: delete them from _MISSING_ELSEWHERE: {fixed}"


@pytest.mark.parametrize("path", ALL_PATHS, ids=lambda p: " ".join(p) or "diredi")
def test_every_help_exits_0(path: tuple[str, ...]) -> None:
    result = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output


def _diredi(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "diredi_secure.cli", *args],
                          capture_output=True, text=True, env=env, timeout=120, check=False)


# A sample only: each start of the CLI costs about a second (5 s on a loaded machine); the
# in-process test above covers every command.
@pytest.mark.parametrize("args", [("--help",), ("provision", "kit", "-h"),
                                  ("edge", "reverse", "--help")], ids=" ".join)
def test_help_as_a_user_runs_it(args: tuple[str, ...]) -> None:
    result = _diredi(*args)
    assert result.returncode == 0, result.stderr
    assert "Usage:" in result.stdout and not result.stderr.strip()


# ------------------------------------------------------------------------------------------------
# one command per job
# ------------------------------------------------------------------------------------------------
REMOVED = {
    ("scenario", "make", "--out", "x", "--seed", "3"): "diredi ml scenario",
    ("scenario",): "diredi ml scenario",
    ("bench", "loop", "--epsilon", "8", "--seed", "0"): "diredi ml loop",
    # every device's ledger was `cloud devices` again; `cloud ledger DEVICE` is one device's
    ("cloud", "ledger", "-w", "W"): "diredi cloud devices",
}


@pytest.mark.parametrize("args", list(REMOVED), ids=" ".join)
def test_a_removed_twin_raises_moved_naming_its_replacement(args: tuple[str, ...]) -> None:
    result = CliRunner().invoke(app, list(args))
    assert isinstance(result.exception, ConfigError), result.output
    assert result.exception.reason == "moved"
    assert f"`{REMOVED[args]}" in str(result.exception)


@pytest.mark.parametrize("args", [a for a in REMOVED if a[0] != "scenario" or len(a) > 1],
                         ids=" ".join)
def test_a_removed_twin_says_which_command_replaced_it(args: tuple[str, ...],
                                                        tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "diredi_secure.cli", *args], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("diredi: moved: "), result.stderr
    assert f"`{REMOVED[args]}" in lines[0]
    assert not any(tmp_path.iterdir()), "a removed command must not do anything"


def test_removed_twins_are_hidden_and_their_replacements_exist() -> None:
    visible = {" ".join(p) for p, c in TREE if not c.hidden}
    assert "bench loop" not in visible and "scenario" not in visible
    assert "scenario make" in MOVED_COMMANDS
    for kept in ("ml scenario", "ml loop"):
        assert kept in visible


# Documents owned by others that still name a removed command (checked still stale, as above).
_STALE_ELSEWHERE: frozenset[str] = frozenset()


def test_no_document_script_or_test_uses_a_removed_name() -> None:
    removed = ("diredi scenario make", "diredi bench loop", '"scenario", "make"',
               '"bench", "loop"')
    files = [ROOT / "README.md", ROOT / "Makefile", *sorted((ROOT / "docs").rglob("*.md")),
             *sorted((ROOT / "examples").rglob("*.py")), *sorted((ROOT / ".github").rglob("*.yml")),
             *sorted((ROOT / "tests").rglob("*.py"))]
    stale = set()
    for f in files:
        if not f.is_file() or f == Path(__file__).resolve():
            continue
        text = f.read_text(errors="replace")
        if any(name in text for name in removed):
            stale.add(str(f.relative_to(ROOT)))
    assert not stale - _STALE_ELSEWHERE, sorted(stale - _STALE_ELSEWHERE)
    assert not _STALE_ELSEWHERE - stale, "fixed: delete it from _STALE_ELSEWHERE"
