"""runmap.registry: what the client writes of its clusters, and when."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

import runmap as rm
from runmap import registry


def ident(x: int) -> int:
    return x


@pytest.fixture
def writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Every entry the registry writes, in order (under a registry of the test's own)."""
    monkeypatch.setenv("RUNMAP_HOME", str(tmp_path))
    written: list[dict[str, Any]] = []
    real = registry._write

    def write(path: Path, entry: dict[str, Any]) -> None:
        written.append(entry)
        real(path, entry)

    monkeypatch.setattr(registry, "_write", write)
    return written


def _listed(name: str) -> list[str]:
    [entry] = [e for e in registry.load() if e.name == name]
    return sorted(s.name for s in entry.servlets)


def test_updates_in_a_batch_are_written_once_as_it_ends(writes: list[dict[str, Any]]) -> None:
    with rm.LocalCluster(name="batched") as c:
        servlets = [c.start_servlet(rm.env(name=f"s{i}")) for i in range(3)]
        assert _listed("batched") == ["s0", "s1", "s2"]
        before = len(writes)
        with registry.batch():
            c.stop_servlet(servlets[0])
            with registry.batch():
                c.stop_servlet(servlets[1])
            assert len(writes) == before, "written before the outer batch ended"
        assert len(writes) == before + 1
        assert [s["name"] for s in writes[-1]["servlets"]] == ["s2"]
        assert _listed("batched") == ["s2"]
    assert [e.name for e in registry.load()] == []


def test_a_cluster_closed_in_a_batch_leaves_no_entry(writes: list[dict[str, Any]]) -> None:
    c = rm.LocalCluster(name="closed-in-batch")
    servlet = c.start_servlet(rm.env(name="s"))
    with registry.batch():
        c.stop_servlet(servlet)
        c.close()
    assert [e.name for e in registry.load()] == []


def test_closing_a_mapper_writes_its_cluster_once(writes: list[dict[str, Any]]) -> None:
    with rm.LocalCluster(name="mapped") as c:
        m = rm.mapper(ident, num_replicas=3, cluster=c)
        assert m.map(range(6), progress=False) == list(range(6))
        assert len(_listed("mapped")) == 3
        before = len(writes)
        m.close()
        assert len(writes) == before + 1
        assert _listed("mapped") == []
    assert os.listdir(registry.registry_dir()) == []


def test_starting_a_mapper_writes_its_cluster_once(writes: list[dict[str, Any]]) -> None:
    with rm.LocalCluster(name="starting") as c:
        with rm.mapper(ident, num_replicas=3, cluster=c) as m:
            assert len(writes) == 1, "one write for the three replicas' starts"
            assert len(writes[0]["servlets"]) == 3
            assert m.map(range(3), progress=False) == [0, 1, 2]


def test_a_batch_open_long_writes_as_updates_come(
    writes: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(registry, "BATCH_SECONDS", 0.0)  # as if it had been open a while
    with rm.LocalCluster(name="slow") as c, registry.batch():
        c.start_servlet(rm.env(name="s0"))
        assert len(writes) == 1 and _listed("slow") == ["s0"]
        c.start_servlet(rm.env(name="s1"))
        assert len(writes) == 2 and _listed("slow") == ["s0", "s1"]
