"""The command examples in docs/ are executed, so they cannot rot.

A fenced ```console block preceded by a marker comment is run line by line (each ``$ `` line is one command,
``\\`` continues it; lines without ``$ `` are sample output and are not compared):

- ``<!-- doctest: tiny -->``       default suite, on the tiny random model of docs/examples/make_tiny_model.py;
- ``<!-- doctest: tiny-slow -->``  the same tiny model, but long (ExecuTorch export, native runner): ``-m slow``;
- ``<!-- doctest: slow -->``       the real default model: ``-m slow`` only.

Blocks of one page share a working directory, in page order (a later block uses what an earlier one wrote).
firstkit commands run in-process through their click entry points (one import for all of them);
``python docs/examples/<script>.py`` runs that script's click command. Every ``--flag`` used in any marked block
must appear in the command's ``--help``.
"""

from __future__ import annotations

import functools
import importlib.util
import re
import shlex
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path

import pytest
from click.testing import CliRunner

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
MARKER = re.compile(r"<!--\s*doctest:\s*([\w-]+)\s*-->\s*\n```console\n(.*?)\n```", re.S)
KINDS = ("tiny", "tiny-slow", "slow")


@dataclass(frozen=True)
class Block:
    page: str
    index: int
    kind: str
    commands: tuple[str, ...]

    @property
    def id(self) -> str:
        return f"{self.page}#{self.index}-{self.kind}"


def parse_blocks(text: str, page: str) -> list[Block]:
    """Marked console blocks of a page, in order."""
    out = []
    for i, m in enumerate(MARKER.finditer(text)):
        kind, body = m.group(1), m.group(2)
        if kind not in KINDS:
            raise ValueError(f"{page}: unknown doctest marker {kind!r} (use one of {KINDS})")
        cmds, cur = [], None
        for line in body.splitlines():
            if cur is not None:
                cur += " " + line.strip()
            elif line.startswith("$ "):
                cur = line[2:].strip()
            else:
                continue
            if cur.endswith("\\"):
                cur = cur[:-1].rstrip()
            else:
                cmds.append(cur)
                cur = None
        if cur is not None:
            raise ValueError(f"{page}: block {i} ends inside a continued command")
        if not cmds:
            raise ValueError(f"{page}: marked block {i} has no '$ ' command")
        out.append(Block(page, i, kind, tuple(cmds)))
    return out


def all_blocks() -> list[Block]:
    blocks = []
    for md in sorted(DOCS.glob("*.md")):
        blocks += parse_blocks(md.read_text(), md.name)
    return blocks


@functools.cache
def console_scripts() -> dict:
    return {ep.name: ep for ep in entry_points(group="console_scripts") if ep.name.startswith("first-")}


def command_for(argv: list[str]):
    """(click command, args) for one documented command line."""
    if argv[0] in console_scripts():
        return console_scripts()[argv[0]].load(), argv[1:]
    if argv[0] == "python" and len(argv) > 1 and argv[1].endswith(".py"):
        script = REPO / argv[1]
        if not script.is_file():
            raise AssertionError(f"documented script {argv[1]} does not exist")
        spec = importlib.util.spec_from_file_location(f"docs_example_{script.stem}", script)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod.main, argv[2:]
    raise AssertionError(f"docs doctest cannot run {argv[0]!r}: use first-* commands or python docs/examples/*.py")


def run_command(line: str) -> str:
    argv = shlex.split(line)
    cmd, args = command_for(argv)
    res = CliRunner().invoke(cmd, args, catch_exceptions=False)
    assert res.exit_code == 0, f"`{line}` exited {res.exit_code}:\n{res.output[-3000:]}"
    return res.output


def _help_text(argv0: str, script: str | None = None) -> str:
    cmd, _ = command_for([argv0] if script is None else [argv0, script])
    res = CliRunner().invoke(cmd, ["--help"])
    assert res.exit_code == 0
    return res.output


def test_parser_reads_markers_and_continuations():
    text = ("x\n<!-- doctest: tiny -->\n```console\n$ first-run b \\\n    --json\n{\"out\": 1}\n$ first-eval\n```\n"
            "```console\n$ not-marked\n```\n")
    (b,) = parse_blocks(text, "p.md")
    assert b.kind == "tiny" and b.commands == ("first-run b --json", "first-eval")
    with pytest.raises(ValueError, match="unknown doctest marker"):
        parse_blocks("<!-- doctest: fast -->\n```console\n$ a\n```", "p.md")


def test_docs_have_examples_of_every_kind_and_every_cli():
    blocks = all_blocks()
    kinds = {b.kind for b in blocks}
    assert {"tiny", "slow"} <= kinds
    used = {shlex.split(c)[0] for b in blocks for c in b.commands}
    for cli in ("first-train", "first-eval", "first-export", "first-run", "first-bench"):
        assert cli in used, f"no executed docs example uses {cli}"


def test_documented_flags_exist():
    """Every --flag in an executed example is in that command's --help (so no example documents a made-up flag)."""
    seen: dict[tuple, str] = {}
    for b in all_blocks():
        for c in b.commands:
            argv = shlex.split(c)
            key = (argv[0], argv[1] if argv[0] == "python" else None)
            if key not in seen:
                seen[key] = _help_text(*key)
            for flag in re.findall(r"(?<!\S)(--[a-z][\w-]*)", c):
                assert flag in seen[key], f"{b.id}: `{c}` uses {flag}, not in `{' '.join(filter(None, key))} --help`"


def _blocks(kind: str) -> list[Block]:
    return [b for b in all_blocks() if b.kind == kind]


def _pages(kind: str) -> list[str]:
    return sorted({b.page for b in _blocks(kind)})


@pytest.mark.parametrize("page", _pages("tiny"))
def test_tiny_examples_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for b in _blocks("tiny"):
        if b.page == page:
            for c in b.commands:
                run_command(c)


@pytest.mark.slow
@pytest.mark.parametrize("page", _pages("tiny-slow"))
def test_tiny_slow_examples_run(page, tmp_path, monkeypatch):
    """The tiny blocks of the page first (they make the model), then its long ones."""
    monkeypatch.chdir(tmp_path)
    for b in all_blocks():
        if b.page == page and b.kind in ("tiny", "tiny-slow"):
            for c in b.commands:
                run_command(c)


@pytest.mark.slow
@pytest.mark.realmodel
@pytest.mark.parametrize("page", _pages("slow"))
def test_real_model_examples_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for b in _blocks("slow"):
        if b.page == page:
            for c in b.commands:
                run_command(c)


# Pages written for issue 5 (the others' pages are checked by their owners).
OWN_PAGES = ("index.md", "quickstart.md", "how_first_works.md", "devices.md", "troubleshooting.md",
             "architecture.md", "contributing.md")


@pytest.mark.parametrize("page", OWN_PAGES)
def test_relative_links_and_images_resolve(page):
    text = (DOCS / page).read_text()
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    assert links, page
    for link in links:
        if re.match(r"[a-z]+://", link):
            continue
        target = (DOCS / link.split("#")[0]).resolve()
        assert target.exists(), f"{page}: broken link {link}"


def test_index_links_every_page():
    index = (DOCS / "index.md").read_text()
    for md in sorted(DOCS.glob("*.md")):
        if md.name != "index.md":
            assert f"]({md.name})" in index, f"docs/index.md does not link {md.name}"


def test_figure_is_drawn_by_its_script(tmp_path):
    """docs/img/how_first_works.png exists and its script still draws it (for any valid mask)."""
    assert (DOCS / "img" / "how_first_works.png").stat().st_size > 10_000
    out = tmp_path / "fig.png"
    cmd, _ = command_for(["python", "docs/examples/first_figure.py"])
    res = CliRunner().invoke(cmd, ["--out", str(out), "--mask", "1101"])
    assert res.exit_code == 0, res.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    res = CliRunner().invoke(cmd, ["--out", str(out), "--mask", "0101"])
    assert res.exit_code == 2 and "first and last" in res.output


def _fenced_commands(text: str) -> list[str]:
    """Every `first-*` command line inside any fenced code block (continuations joined)."""
    cmds = []
    for body in re.findall(r"```[\w-]*\n(.*?)```", text, re.S):
        cur = None
        for line in body.splitlines():
            line = line.strip()
            if cur is not None:
                cur += " " + line
            elif re.match(r"(\$ )?first-[a-z-]+\b", line):
                cur = line.removeprefix("$ ")
            else:
                continue
            if cur.endswith("\\"):
                cur = cur[:-1].rstrip()
            else:
                cmds.append(cur.split(" #")[0])
                cur = None
    return cmds


@pytest.mark.parametrize("page", OWN_PAGES)
def test_flags_in_every_code_block_exist(page):
    """Also the commands that are shown but not executed (devices, real hardware) use only real flags."""
    helps: dict[str, str] = {}
    for c in _fenced_commands((DOCS / page).read_text()):
        name = c.split()[0]
        if name not in console_scripts():
            raise AssertionError(f"{page}: `{c}` names a command that does not exist")
        helps.setdefault(name, _help_text(name))
        for flag in re.findall(r"(?<!\S)(--[a-z][\w-]*)", c):
            assert flag in helps[name], f"{page}: `{c}` uses {flag}, not in `{name} --help`"
