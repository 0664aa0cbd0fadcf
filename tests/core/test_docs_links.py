"""The docs point at things that exist.

- The design note that used to be cited lives outside the repository, where a reader of the
  repository cannot open it; docs/architecture.md replaced it. No file may cite it again.
- Every relative markdown link of the README, CONTRIBUTING, the CHANGELOG and docs/ names a
  file or folder of the repository (anchors are not checked).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]

# Spelled in two pieces so that this file does not cite it itself.
OLD_NOTE = "DESIGN" + ".md"
# Paths (relative to the repository, "/"-separated) allowed to cite it: none any more.
STILL_CITING: tuple[str, ...] = ()
# Folders that are not the repository's own text: environments, caches, build outputs and the
# git-ignored working folders (see .gitignore).
SKIPPED_DIRS = {
    ".git",
    ".hypothesis",
    ".mypy_cache",
    ".pytest_cache",
    ".ruff_cache",
    "__pycache__",
    "node_modules",
}
SKIPPED_TOP = {"artifacts", "build", "bundle", "dist", "runs", ".whl", ".gl", ".device"}
LARGEST_TEXT = 2_000_000  # bytes; larger files are data, not docs or code

DOCS = ["README.md", "CONTRIBUTING.md", "CHANGELOG.md", "docs/*.md"]
# [text](target) or ![alt](target), with an optional "title"; the text may span lines, the
# target has no spaces.
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^ {0,3}(```|~~~).*?^ {0,3}\1[^\n]*$", re.M | re.S)
CODE_SPAN = re.compile(r"(`+)(?!`).*?(?<!`)\1(?!`)", re.S)
EXTERNAL = ("http://", "https://", "mailto:")


def _repository_files() -> Iterator[Path]:
    for path in sorted(REPO_ROOT.rglob("*")):
        parts = path.relative_to(REPO_ROOT).parts
        if (
            parts[0] in SKIPPED_TOP
            or parts[0].startswith(".venv")
            or any(p in SKIPPED_DIRS or p.endswith(".egg-info") for p in parts)
        ):
            continue
        if path.is_file() and not path.is_symlink():
            yield path


def _text(path: Path) -> str | None:
    """The file as text, or None for binary and large files."""
    if path.stat().st_size > LARGEST_TEXT:
        return None
    data = path.read_bytes()
    if b"\0" in data:
        return None
    return data.decode("utf-8", errors="replace")


def test_no_file_cites_the_old_design_note() -> None:
    citing = []
    for path in _repository_files():
        relative = path.relative_to(REPO_ROOT).as_posix()
        if relative.startswith(STILL_CITING):
            continue
        text = _text(path)
        if text is None:
            continue
        citing += [
            f"{relative}:{number}: {line.strip()}"
            for number, line in enumerate(text.splitlines(), start=1)
            if OLD_NOTE in line
        ]
    assert not citing, (
        f"{OLD_NOTE} is outside the repository; cite docs/architecture.md (and its section) "
        "instead:\n" + "\n".join(citing)
    )


def _doc_files() -> list[Path]:
    files: list[Path] = []
    for pattern in DOCS:
        files += sorted(REPO_ROOT.glob(pattern))
    return files


def links(markdown: str) -> list[str]:
    """The link targets of ``markdown`` outside code blocks and code spans."""
    prose = CODE_SPAN.sub("", FENCE.sub("", markdown))
    return LINK.findall(prose)


def test_links_are_found_outside_code_only() -> None:
    text = (
        'See [the guide](docs/guide.md#setup), ![plot](img/p.png "title"), [a long\n'
        "name](../x/) and [site](https://example.com).\n"
        "`[not](a-link.md)`\n"
        "```python\nx = funcs[0](y)\n```\n"
    )
    assert links(text) == ["docs/guide.md#setup", "img/p.png", "../x/", "https://example.com"]


@pytest.mark.parametrize(
    "doc",
    _doc_files(),
    ids=lambda path: path.relative_to(REPO_ROOT).as_posix(),
)
def test_relative_links_point_into_the_repository(doc: Path) -> None:
    broken = []
    for target in links(doc.read_text(encoding="utf-8")):
        if target.startswith(EXTERNAL):
            continue
        path = unquote(target.split("#", 1)[0])
        if not path:  # an anchor in the same file
            continue
        resolved = (doc.parent / path).resolve()
        inside = resolved == REPO_ROOT or REPO_ROOT in resolved.parents
        if not (inside and resolved.exists()):
            broken.append(target)
    assert not broken, f"{doc.relative_to(REPO_ROOT)}: links to nothing in the repository: {broken}"


def test_the_documents_are_there() -> None:
    names = {path.relative_to(REPO_ROOT).as_posix() for path in _doc_files()}
    expected = {"README.md", "CONTRIBUTING.md", "CHANGELOG.md", "docs/architecture.md"}
    assert expected <= names


def test_the_readme_is_a_front_door() -> None:
    # The README says what rmserve is, how to run it and where to go next; the reference
    # (routes, settings, metrics, performance) lives in docs/ (STYLE.md: nanoGPT's is ~14 kB).
    size = (REPO_ROOT / "README.md").stat().st_size
    assert size <= 12 * 1024, f"README.md is {size} bytes; move reference text into docs/"
