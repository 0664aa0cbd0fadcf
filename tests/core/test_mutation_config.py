"""mutmut runs only the test files that ``[tool.mutmut]`` in pyproject.toml lists, so a new
test file of a mutated module that is not listed leaves its mutants alive in the next run.
The list must be exactly the files that docs/mutation-testing.md names by pattern."""

from __future__ import annotations

import re

import tomllib

from tests.conftest import REPO_ROOT

# The patterns of docs/mutation-testing.md: the fast tests of the five mutated modules.
PATTERNS = (
    "tests/core/test_encoding*.py",
    "tests/core/test_chat_template.py",
    "tests/core/test_formatting*.py",
    "tests/core/test_manifest*.py",
    "tests/service/test_batcher*.py",
    "tests/client/test_retr*.py",
)


def test_mutmut_runs_every_test_file_of_the_mutated_modules() -> None:
    config = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["mutmut"]
    listed = config["pytest_add_cli_args_test_selection"]
    on_disk = sorted(
        str(path.relative_to(REPO_ROOT)) for pattern in PATTERNS for path in REPO_ROOT.glob(pattern)
    )
    assert len(listed) == len(set(listed)), "a test file is listed twice"
    assert sorted(listed) == on_disk


# The section of docs/mutation-testing.md that says which tests mutmut runs.
DOCS_SECTION = "Running it"


def documented_patterns(markdown: str) -> list[str]:
    """The test file patterns that the doc's DOCS_SECTION names in its prose, in order.

    The doc writes them in backticks and names a folder once: ``tests/core/test_a*.py``,
    ``test_b.py`` (also in tests/core/), ``tests/service/test_c*.py``. Fenced code blocks
    (commands run in mutmut's copy) are not the list."""
    section = re.search(rf"^## {re.escape(DOCS_SECTION)}\n(.*?)(?=^## |\Z)", markdown, re.M | re.S)
    assert section is not None, f"docs/mutation-testing.md has no section '## {DOCS_SECTION}'"
    prose = re.sub(r"^```.*?^```", "", section.group(1), flags=re.M | re.S)
    found: list[str] = []
    folder = ""
    for quoted in re.findall(r"`([^`\n]+)`", prose):
        head, _, name = quoted.rpartition("/")
        if not re.fullmatch(r"test_[\w*]+\.py", name):
            continue
        if head:
            folder = head + "/"
        assert folder, f"{quoted} is named before any folder"
        found.append(folder + name)
    return found


def test_the_docs_name_the_same_patterns() -> None:
    listed = documented_patterns((REPO_ROOT / "docs" / "mutation-testing.md").read_text())
    for pattern in PATTERNS:
        assert pattern in listed, f"{pattern} missing from the doc's '{DOCS_SECTION}' section"
    assert sorted(listed) == sorted(PATTERNS), listed
