"""Every code block of README.md and docs/ runs as written (issue 19 §2), and the site builds.

Collected per Markdown file, in order:
- ```python blocks run one after another in one namespace per file (a later block may use what
  an earlier one defined), each block a test of its own;
- ```bash / ```console blocks: every command starting with ``robustkit `` (continuation lines
  joined, ``# comments`` and a ``$ `` prompt dropped) runs through ``robustkit.cli.main`` in a
  temporary folder that links the checkout's ``configs/``, ``evaluate/`` and ``experiments/``,
  and must exit 0. Other commands of such a block (make, pip, torchrun, tensorboard) are not run.

A block that cannot run here (real data, hours, a GPU, the network) is preceded by a visible
``<!-- skip: reason -->`` comment and reported as skipped with that reason. Sizes in the docs are
kept small (shipped samples, a few images) so the whole file stays within about a minute.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FILES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
SKIP = re.compile(r"^<!--\s*skip:\s*(.+?)\s*-->$")
FENCE = re.compile(r"^(\s*)```(\w*)\s*$")
LINKED = ("configs", "evaluate", "experiments")


@dataclass
class Block:
    file: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    skip: str | None

    @property
    def id(self) -> str:
        return f"{self.file.relative_to(ROOT)}:{self.line}"


def blocks(path: Path) -> list[Block]:
    """The fenced blocks of one Markdown file, with the reason of a preceding skip comment."""
    out: list[Block] = []
    lines = path.read_text(encoding="utf-8").splitlines()
    i, previous = 0, ""
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            if lines[i].strip():
                previous = lines[i].strip()
            i += 1
            continue
        indent, lang = match.groups()
        end = i + 1
        while end < len(lines) and not re.match(rf"^{indent}```\s*$", lines[end]):
            end += 1
        code = textwrap.dedent("\n".join(lines[i + 1:end]))
        skip = SKIP.match(previous)
        out.append(Block(path, i + 1, lang, code, skip.group(1) if skip else None))
        previous, i = "", end + 1
    return out


def commands(code: str) -> list[list[str]]:
    """The ``robustkit ...`` commands of a shell block, as argv lists (without ``robustkit``)."""
    joined = re.sub(r"\\\n\s*", " ", code)
    argvs = []
    for line in joined.splitlines():
        line = line.strip().removeprefix("$ ")
        if line.startswith("robustkit "):
            argvs.append(shlex.split(line, comments=True)[1:])
    return argvs


def _workdir(tmp_path: Path, monkeypatch) -> None:
    """Run in tmp_path, where the checkout's configs/, evaluate/ and experiments/ are linked."""
    for name in LINKED:
        (tmp_path / name).symlink_to(ROOT / name, target_is_directory=True)
    monkeypatch.chdir(tmp_path)


ALL = [b for f in FILES for b in blocks(f)]
PYTHON = [b for b in ALL if b.lang == "python"]
SHELL = [b for b in ALL if b.lang in ("bash", "console", "sh") and commands(b.code)]
_NAMESPACES: dict[Path, dict] = {}
_FAILED: dict[Path, str] = {}


def test_the_collector_finds_blocks_and_skip_reasons(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("text\n\n<!-- skip: needs ../shared/data -->\n```bash\nrobustkit evaluate "
                    "\\\n  --dataset mnist  # comment\nmake test\n```\n\n- item\n\n  ```python\n"
                    "  a = 1\n  ```\n")
    (shell, py) = blocks(page)
    assert (shell.lang, shell.skip, shell.line) == ("bash", "needs ../shared/data", 4)
    assert commands(shell.code) == [["evaluate", "--dataset", "mnist"]]
    assert (py.lang, py.skip, py.code) == ("python", None, "a = 1")
    assert PYTHON and SHELL


@pytest.mark.parametrize("block", PYTHON, ids=[b.id for b in PYTHON])
def test_python_block_runs(block: Block, tmp_path, monkeypatch):
    if block.skip:
        pytest.skip(block.skip)
    if block.file in _FAILED:
        pytest.skip(f"an earlier block of this file failed: {_FAILED[block.file]}")
    namespace = _NAMESPACES.setdefault(block.file, {"__name__": "__docs__"})
    _workdir(tmp_path, monkeypatch)  # files a block writes (runs/...) land in a temporary folder
    try:
        exec(compile(block.code, block.id, "exec"), namespace)
    except BaseException:
        _FAILED[block.file] = block.id
        raise
    finally:
        import matplotlib.pyplot as plt

        plt.close("all")


@pytest.mark.parametrize("block", SHELL, ids=[b.id for b in SHELL])
def test_shell_block_runs(block: Block, tmp_path, monkeypatch):
    if block.skip:
        pytest.skip(block.skip)
    from robustkit.cli import main

    _workdir(tmp_path, monkeypatch)
    for argv in commands(block.code):
        assert main(argv) == 0, f"robustkit {shlex.join(argv)} failed"


def test_every_cli_example_names_its_data():
    """A command that reads data says where from: --data-root, a sample-* dataset, a config
    (whose data section names it), or a shipped robustkit: model's own sample."""
    for block in SHELL:
        if (block.skip or "").startswith("synopsis"):
            continue
        for argv in commands(block.code):
            text = " ".join(argv)
            if argv[0] in ("evaluate", "sensitivity", "inspect") and "--help" not in argv:
                assert "--data-root" in text or "sample-" in text or "-c " in text, (
                    block.id, text)


@pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None
                    or importlib.util.find_spec("material") is None
                    or importlib.util.find_spec("mkdocstrings") is None,
                    reason="mkdocs-material / mkdocstrings not installed (pip install -e .[dev])")
def test_docs_site_builds_strict(tmp_path):
    """`make docs` in a temporary folder: any warning (a broken link, a missing page, a
    docstring mkdocstrings cannot render) fails the strict build."""
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict",
                           "-f", str(ROOT / "mkdocs.yml"), "-d", str(tmp_path / "site")],
                          capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    # -q would hide the warnings from the strict count: read the log instead
    assert done.returncode == 0, done.stdout + done.stderr
    assert "WARNING" not in done.stderr, done.stderr
    assert (tmp_path / "site" / "index.html").is_file()
    assert (tmp_path / "site" / "api" / "index.html").is_file()
