"""`mypy --strict` checks the tests as it checks the code (issue 13): pyproject's [tool.mypy] names `tests` beside
the two packages, nothing switches errors off for test modules, and `make lint` runs mypy on that configuration
(no paths of its own that would replace it). Read from the files' text, so the coverage cannot silently drop."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[3]
# The top-level names mypy gives test modules: tests/ is no package, tests/unit and tests/integration are.
TEST_MODULES = ("unit", "integration", "tests")


def _mypy() -> dict[str, Any]:
    config: dict[str, Any] = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mypy"]
    return config


def _lint_commands() -> list[list[str]]:
    """The command lines of the Makefile's `lint` recipe, split into words."""
    found = re.search(r"^lint:[^\n]*\n((?:\t[^\n]*\n)+)", (ROOT / "Makefile").read_text(), re.M)
    assert found, "the Makefile no longer has a lint target"
    return [line.split() for line in found.group(1).splitlines()]


class TestMypyConfiguration:
    """pyproject.toml's [tool.mypy] checks the packages and the tests, strictly."""

    def test_strict(self) -> None:
        """The strict flags apply to everything mypy checks."""
        assert _mypy().get("strict") is True

    @pytest.mark.parametrize("path", ["discovery", "proxy", "tests"], ids=["discovery", "proxy", "tests"])
    def test_files_name(self, path: str) -> None:
        """mypy's `files` names each package and the tests directory."""
        assert path in _mypy().get("files", [])

    def test_nothing_narrows_the_files(self) -> None:
        """No `exclude`, and no `packages` or `modules` (mypy refuses them beside `files`)."""
        config = _mypy()
        assert [key for key in ("exclude", "packages", "modules") if key in config] == []

    def test_no_override_silences_the_tests(self) -> None:
        """No per-module override ignores errors in, or stops following imports from, a test module."""
        silenced = []
        for override in _mypy().get("overrides", []):
            modules = override["module"] if isinstance(override["module"], list) else [override["module"]]
            tests = [m for m in modules if m.split(".")[0] in TEST_MODULES]
            if tests and (override.get("ignore_errors") or override.get("follow_imports") in ("skip", "silent")):
                silenced += tests
        assert silenced == []


class TestMakeLint:
    """`make lint` runs mypy on that configuration."""

    def test_runs_mypy_once_without_paths_of_its_own(self) -> None:
        """One mypy command, with options at most: paths given on its command line would replace `files`."""
        mypy = [words for words in _lint_commands() if words[0].rsplit("/", 1)[-1] == "mypy"]
        assert len(mypy) == 1, _lint_commands()
        assert [word for word in mypy[0][1:] if not word.startswith("-")] == []
