"""Checkpoint rows are unpickled: the file is private, and one not the user's own, or not a checkpoint, is refused."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

import runmap as rm
from runmap.exceptions import ConfigError
from runmap.mapper.checkpoint import Checkpoint

OTHER_UID = 12345  # no such user needed: chown takes a number


def noted(x: int, calls: str) -> int:
    with open(calls, "a") as f:
        f.write(f"{x}\n")
    return x * 10


@pytest.fixture
def umask_022() -> Iterator[None]:
    """The usual umask, under which SQLite alone would create the files 0644."""
    old = os.umask(0o022)
    yield
    os.umask(old)


@pytest.fixture
def mapper(cluster: rm.LocalCluster) -> Iterator[rm.Mapper]:
    with rm.mapper(noted, num_replicas=1, cluster=cluster) as m:
        yield m


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_a_checkpoint_is_private_and_so_are_the_files_sqlite_adds(
    tmp_path: Path, umask_022: None, mapper: rm.Mapper
) -> None:
    db, calls = tmp_path / "run.db", tmp_path / "calls"
    assert mapper.map(range(5), kwargs={"calls": str(calls)}, checkpoint=db, progress=False) == [0, 10, 20, 30, 40]
    assert _mode(db) == 0o600
    checkpoint = Checkpoint(db)
    try:
        checkpoint.save([(5, "h", 50)])  # the WAL and shared-memory files exist while it is open
        assert {p.name: _mode(p) for p in tmp_path.glob("run.db*")} == {
            "run.db": 0o600,
            "run.db-wal": 0o600,
            "run.db-shm": 0o600,
        }
        assert checkpoint.count() == 6
    finally:
        checkpoint.close()


@pytest.mark.parametrize("suffix", ["", "-wal", "-shm"])
def test_a_checkpoint_file_owned_by_another_user_is_refused_and_nothing_runs(
    tmp_path: Path, mapper: rm.Mapper, suffix: str
) -> None:
    db, calls = tmp_path / "run.db", tmp_path / "calls"
    Checkpoint(db).close()
    planted = Path(f"{db}{suffix}")
    planted.touch()
    os.chown(planted, OTHER_UID, OTHER_UID)
    with pytest.raises(ConfigError) as caught:
        mapper.map(range(5), kwargs={"calls": str(calls)}, checkpoint=db, progress=False)
    message = str(caught.value)
    assert str(planted) in message and f"uid {OTHER_UID}" in message and "Delete it" in message
    assert not calls.exists()
    assert planted.stat().st_uid == OTHER_UID


def test_a_checkpoint_writable_by_others_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "run.db"
    Checkpoint(db).close()
    db.chmod(0o666)
    with pytest.raises(ConfigError, match=r"writable by others \(mode 0666\).*chmod 600"):
        Checkpoint(db)


def test_a_symlink_checkpoint_is_refused(tmp_path: Path, mapper: rm.Mapper) -> None:
    target, db, calls = tmp_path / "target.db", tmp_path / "run.db", tmp_path / "calls"
    db.symlink_to(target)
    with pytest.raises(ConfigError, match=f"{db}: it is a symlink"):
        mapper.map(range(5), kwargs={"calls": str(calls)}, checkpoint=db, progress=False)
    assert not target.exists() and not calls.exists()


def test_a_symlink_beside_the_checkpoint_is_refused(tmp_path: Path) -> None:
    target, db = tmp_path / "target", tmp_path / "run.db"
    target.write_bytes(b"precious")
    Path(f"{db}-wal").symlink_to(target)
    with pytest.raises(ConfigError, match=f"{db}-wal: it is a symlink"):
        Checkpoint(db)
    assert target.read_bytes() == b"precious"


def _random_bytes(path: Path) -> None:
    path.write_bytes(os.urandom(8192))


def _another_database(path: Path) -> None:
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT)")
    db.close()


def _another_results_table(path: Path) -> None:
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE results (run TEXT, score REAL)")
    db.close()


@pytest.mark.parametrize("make", [_random_bytes, _another_database, _another_results_table])
def test_a_file_that_is_not_a_checkpoint_gives_a_clear_error_and_is_left_as_it_was(
    tmp_path: Path, mapper: rm.Mapper, make
) -> None:  # type: ignore[no-untyped-def]
    db, calls = tmp_path / "run.db", tmp_path / "calls"
    make(db)
    db.chmod(0o600)
    before = db.read_bytes()
    with pytest.raises(ConfigError) as caught:
        mapper.map(range(5), kwargs={"calls": str(calls)}, checkpoint=db, progress=False)
    message = str(caught.value)
    assert f"checkpoint {db} is not a runmap checkpoint" in message
    assert "delete it" in message and "another path as checkpoint=" in message
    assert isinstance(caught.value.__cause__, sqlite3.DatabaseError)
    assert not calls.exists()
    assert db.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.db"]


def test_a_good_checkpoint_still_resumes(tmp_path: Path, mapper: rm.Mapper) -> None:
    db, calls = tmp_path / "run.db", tmp_path / "calls"
    options = {"kwargs": {"calls": str(calls)}, "checkpoint": db, "progress": False}
    assert mapper.map(range(5), **options) == [0, 10, 20, 30, 40]
    calls.unlink()
    assert mapper.map(range(7), **options) == [0, 10, 20, 30, 40, 50, 60]
    assert sorted(int(x) for x in calls.read_text().split()) == [5, 6]
