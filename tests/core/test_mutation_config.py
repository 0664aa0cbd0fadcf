"""mutmut runs only the test files that ``[tool.mutmut]`` in pyproject.toml lists, so a new
test file of a mutated module that is not listed leaves its mutants alive in the next run
(it happened twice: test_formatting_response_start.py and test_batcher_packed.py). The list
must be exactly the files that docs/mutation-testing.md names by pattern."""

from __future__ import annotations

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


def test_the_docs_name_the_same_patterns() -> None:
    text = (REPO_ROOT / "docs" / "mutation-testing.md").read_text()
    for pattern in PATTERNS:
        name = pattern.removeprefix("tests/core/").removeprefix("tests/")
        assert name in text, pattern
