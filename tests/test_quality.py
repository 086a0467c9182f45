"""The package's hygiene, checked by the test suite so that CI (``make test``) covers it.

ruff and mypy pass on the package, the documentation builds with ``--strict``
(broken links, bad references and docstring problems fail it), and ``__all__``
lists exactly the package's public names, as httpx checks its own.
"""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import pytest
from needs import in_ci, need

import runmap

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True, timeout=600)


def test_ruff_passes() -> None:
    need("ruff")
    result = run("ruff", "check", "runmap", "tests")
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_passes() -> None:
    need("mypy")
    result = run("mypy", "runmap")
    assert result.returncode == 0, result.stdout + result.stderr


def test_docs_build_strict(tmp_path: Path) -> None:
    need("mkdocs")
    need("mkdocstrings")
    result = run("mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"), "--site-dir", str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "index.html").exists()


def test_every_nav_page_exists() -> None:
    yaml = need("yaml")
    config = yaml.load((ROOT / "mkdocs.yml").read_text(), Loader=yaml.BaseLoader)
    pages = [page for entry in config["nav"] for page in entry.values()]
    assert [p for p in pages if not (ROOT / "docs" / p).exists()] == []


def test_all_lists_exactly_the_public_names() -> None:
    # dir(), not vars(): most names are imported on first use (runmap/__init__.py).
    public = {
        name
        for name, value in ((n, getattr(runmap, n)) for n in dir(runmap))
        if not name.startswith("_")
        and not isinstance(value, types.ModuleType)
        and name != "annotations"  # from __future__
    }
    assert set(runmap.__all__) == public
    assert len(runmap.__all__) == len(set(runmap.__all__))


def test_the_api_reference_covers_all_public_names() -> None:
    api = (ROOT / "docs" / "api.md").read_text()
    # As ``::: runmap.Name``, from its defining module (``::: runmap.module.function``), by hand
    # (``rm.mapper``), or as a member of ``::: runmap.exceptions`` (``- RunmapError``).
    forms = ("runmap.{}", "rm.{}", ".{}\n", "- {}\n")
    missing = [name for name in runmap.__all__ if not any(form.format(name) in api for form in forms)]
    assert missing == []


def test_the_package_is_typed() -> None:
    assert (ROOT / "runmap" / "py.typed").exists()


def test_a_missing_tool_skips_here_but_fails_in_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    assert not in_ci()
    with pytest.raises(pytest.skip.Exception, match="runmap_no_such_tool"):
        need("runmap_no_such_tool")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="runmap_no_such_tool"):
        need("runmap_no_such_tool")
    assert need("types") is types
