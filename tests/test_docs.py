"""The docs run: every Python block of README.md and docs/*.md, and every shell block marked
to run, is executed, so no example goes stale.

Conventions (docs/index.md, "The docs are tested"):

- every fenced ``python`` block runs; a page's blocks run in order in one namespace, in a fresh
  temporary working directory (shipped configs are found by name or ``configs/...`` path);
- a block whose first line is ``# file: NAME`` is written to ``NAME`` there instead of run (a
  user's module or config, used by a later block);
- a fenced ``bash`` block runs only when the line before it is ``<!-- run -->``: the cheap
  commands. A block of plain ``moekit ...`` lines runs them in-process through
  :func:`moekit.cli.main` (each must return 0); any other block runs in ``bash -e`` with
  ``moekit`` on ``PATH`` and one thread. Long trainings, sweeps, benchmarks,
  real data and GPUs are shown, not run (``make demo`` has its own test);
- blocks without a language (command output, shapes) are text.

The same pages must not point outside the repository (no ``../shared``, no design notes).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")])
RUN_MARKER = "<!-- run -->"
FILE_PREFIX = "# file: "
FENCE = re.compile(
    r"^(?P<indent>[ ]*)```(?P<lang>[\w-]*)[ ]*\n(?P<body>.*?)^(?P=indent)```[ ]*$", re.M | re.S
)
OUTSIDE = re.compile(r"\.\./shared|shared/seeds|DESIGN\.md|REFERENCE\.md|/work/")


@dataclass(frozen=True)
class Block:
    page: str
    line: int
    lang: str
    body: str
    marked: bool

    @property
    def file(self) -> str | None:
        first = self.body.splitlines()[0] if self.body else ""
        return first[len(FILE_PREFIX) :].strip() if first.startswith(FILE_PREFIX) else None

    @property
    def runs(self) -> bool:
        return self.file is None and (
            self.lang == "python" or (self.lang == "bash" and self.marked)
        )


def blocks(page: Path) -> list[Block]:
    """The fenced blocks of ``page`` in order, dedented to their fence."""
    text = page.read_text()
    found = []
    for match in FENCE.finditer(text):
        indent = len(match["indent"])
        body = "".join(line[indent:] for line in match["body"].splitlines(keepends=True))
        before = text[: match.start()].rstrip().splitlines()
        marked = bool(before) and before[-1].strip() == RUN_MARKER
        line = text.count("\n", 0, match.start()) + 1
        found.append(Block(page.name, line, match["lang"], body, marked))
    return found


def _is_slow(page: Path) -> bool:
    return any(b.runs and (b.lang == "bash" or "Trainer(" in b.body) for b in blocks(page))


def _pages() -> list:
    return [
        pytest.param(p, id=p.name, marks=[pytest.mark.slow] if _is_slow(p) else [])
        for p in PAGES
        if any(b.runs or b.file for b in blocks(p))
    ]


def moekit_commands(block: Block) -> list[list[str]] | None:
    """The block's commands as argument lists when every one is a plain ``moekit ...`` call
    (run in-process, without a new interpreter's start-up each), else ``None`` (bash)."""
    commands = []
    for line in block.body.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        if not words:
            continue
        if words[0] != "moekit" or any(w in ("|", ">", "&&", ";") for w in words):
            return None
        commands.append(words[1:])
    return commands


def run_moekit(block: Block, commands: list[list[str]]) -> None:
    from moekit.cli import main

    for args in commands:
        code = main(args)
        assert code == 0, f"{block.page}:{block.line}: moekit {' '.join(args)} exited {code}"


def run_shell(block: Block, cwd: Path) -> None:
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "OMP_NUM_THREADS": "1",
        "MPLBACKEND": "Agg",
    }
    result = subprocess.run(
        ["bash", "-e", "-c", block.body], cwd=cwd, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, (
        f"{block.page}:{block.line}: exit {result.returncode}\n{block.body}\n"
        f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )


@pytest.mark.parametrize("page", _pages())
def test_page_examples_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    namespace: dict = {"__name__": "__docs__"}
    for block in blocks(page):
        if block.file is not None:
            target = tmp_path / block.file
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(block.body.split("\n", 1)[1])
        elif block.runs and block.lang == "bash":
            commands = moekit_commands(block)
            if commands is None:
                run_shell(block, tmp_path)
            else:
                run_moekit(block, commands)
        elif block.runs:
            exec(compile(block.body, f"{page.name}:{block.line}", "exec"), namespace)


def test_block_conventions_are_followed():
    """A run marker sits before a bash block; no shell block hides in a python fence."""
    for page in PAGES:
        text = page.read_text()
        for block in blocks(page):
            if block.marked:
                assert block.lang == "bash", (
                    f"{page.name}:{block.line}: {RUN_MARKER} on a non-bash block"
                )
            if block.lang == "python" and block.file is None:
                first = block.body.lstrip().splitlines()[0] if block.body.strip() else ""
                assert not first.startswith(("$ ", "moekit ")), f"{page.name}:{block.line}"
        markers = sum(line.strip() == RUN_MARKER for line in text.splitlines())
        assert markers == sum(b.marked for b in blocks(page)), f"{page.name}: a stray marker"


def test_docs_and_docstrings_stay_inside_the_repository():
    files = [*PAGES, *(ROOT / "moekit").rglob("*.py"), *(ROOT / "moekit").rglob("*.yaml")]
    offending = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in files
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if OUTSIDE.search(line)
    ]
    assert not offending, "\n".join(offending)


def test_relative_links_in_docs_resolve():
    link = re.compile(r"\]\(([^)#:\s]+)(?:#[^)]*)?\)")
    broken = [
        f"{page.relative_to(ROOT)}: {target}"
        for page in PAGES
        for target in link.findall(page.read_text())
        if not (page.parent / target).exists()
    ]
    assert not broken, "\n".join(broken)
