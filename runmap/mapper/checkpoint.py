"""Resumable maps: each completed result saved as it arrives.

``mapper.map(xs, checkpoint="run.db")`` keeps a SQLite file (the standard
library's) of results keyed by input position and a hash of the input. Run the
same map again with the same file after a failure, a Ctrl-C or a killed client,
and only the inputs without a saved result are sent; the rest come from the
file. An input whose hash differs from the saved one (the inputs changed) is
run again.

The file's rows are unpickled, so whoever can write it can run code in the
client: it is created mode 0600 (before SQLite opens it, so that the ``-wal``
and ``-shm`` files SQLite makes take that mode too), never opened through a
symlink, and refused if it, or its ``-wal`` or ``-shm``, belongs to another
user or is writable by anyone else. A file that is not a checkpoint (not
SQLite, or SQLite with other tables) is refused too, with a :class:`ConfigError`
that says how to start over, rather than a bare ``sqlite3.DatabaseError``.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import sqlite3
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from runmap import serialization as ser
from runmap.exceptions import ConfigError
from runmap.paths import unsafe

_MISSING = object()


class Checkpoint:
    """A SQLite file of ``(index, input hash) -> pickled result``."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        """Opens (or creates) the checkpoint at ``path``.

        Raises:
            ConfigError: the file, or its ``-wal`` or ``-shm``, is a symlink,
                not a regular file, owned by another user or writable by others;
                or it is not a checkpoint (corrupt, or another SQLite database).
        """
        self.path = os.fspath(path)
        fd = _create_private(self.path)
        try:
            mine = os.fstat(fd)
            _check_owned(self.path, mine)
            for suffix in ("-wal", "-shm"):
                _check_companion(self.path + suffix)
            with self._translated():
                # One connection used only from the map loop's thread.
                self._db = sqlite3.connect(self.path, isolation_level=None)
                try:
                    self._setup(mine)
                except BaseException:
                    self._db.close()
                    raise
        finally:
            os.close(fd)

    def _setup(self, mine: os.stat_result) -> None:
        db = self._db
        # The file SQLite opened is the one checked above, not one swapped in since.
        now = os.stat(self.path, follow_symlinks=False)
        if (now.st_dev, now.st_ino) != (mine.st_dev, mine.st_ino):
            raise ConfigError(f"checkpoint {self.path} was replaced while it was being opened; run the map again")
        # Checked before anything is written: another program's database is left as it was.
        tables = [row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        if tables and "results" not in tables:
            raise sqlite3.DatabaseError(f"it holds other tables ({', '.join(sorted(tables))}) and no results")
        if tables:
            columns = [(row[1], row[2].upper(), row[5]) for row in db.execute("PRAGMA table_info(results)")]
            if columns != _COLUMNS:
                raise sqlite3.DatabaseError(f"its results table has columns {[c[0] for c in columns]}, not {_NAMES}")
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute(
            "CREATE TABLE IF NOT EXISTS results"
            " (idx INTEGER PRIMARY KEY, input_hash TEXT NOT NULL, result BLOB NOT NULL)"
        )

    @contextmanager
    def _translated(self) -> Iterator[None]:
        """SQLite's errors about the file, as a ConfigError naming it and saying how to start over."""
        try:
            yield
        except sqlite3.DatabaseError as exc:
            if isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc):
                raise  # another process is writing it: not the file's fault
            raise ConfigError(
                f"checkpoint {self.path} is not a runmap checkpoint, or is damaged ({exc}). "
                f"To start over, delete it (and any {self.path}-wal and {self.path}-shm), "
                "or pass another path as checkpoint=."
            ) from exc

    @staticmethod
    def hash_input(item: Any) -> str:
        try:
            data = pickle.dumps(item, protocol=ser.PROTOCOL)
        except Exception:
            data = ser.dumps(item)
        return hashlib.blake2b(data, digest_size=16).hexdigest()

    def lookup(self, index: int, input_hash: str) -> Any:
        """The saved result of input ``index``, or ``MISSING``."""
        with self._translated():
            row = self._db.execute("SELECT input_hash, result FROM results WHERE idx = ?", (index,)).fetchone()
        if row is None or row[0] != input_hash:
            return _MISSING
        return ser.loads(row[1])

    def save(self, rows: list[tuple[int, str, Any]]) -> None:
        """Saves ``(index, input hash, result)`` rows; a result that can't be pickled is skipped."""
        packed = []
        for index, input_hash, result in rows:
            try:
                packed.append((index, input_hash, ser.dumps(result)))
            except Exception:
                continue
        with self._translated():
            self._db.execute("BEGIN")
            try:
                self._db.executemany("INSERT OR REPLACE INTO results VALUES (?, ?, ?)", packed)
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise

    def count(self) -> int:
        with self._translated():
            return int(self._db.execute("SELECT COUNT(*) FROM results").fetchone()[0])

    def close(self) -> None:
        self._db.close()


MISSING = _MISSING

_NAMES = ["idx", "input_hash", "result"]
_COLUMNS = [("idx", "INTEGER", 1), ("input_hash", "TEXT", 0), ("result", "BLOB", 0)]


def _create_private(path: str) -> int:
    """A descriptor for ``path``, created mode 0600 if absent; never through a symlink."""
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        return os.open(path, flags, 0o600)
    except OSError as exc:
        if os.path.islink(path):
            raise ConfigError(f"refusing checkpoint {path}: it is a symlink. {_START_OVER}") from None
        raise ConfigError(f"cannot open checkpoint {path}: {exc.strerror or exc}") from None


def _check_companion(path: str) -> None:
    """A ``-wal`` or ``-shm`` file SQLite will open next to the checkpoint, if there is one."""
    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        raise ConfigError(f"refusing checkpoint file {path}: it is a symlink. {_START_OVER}")
    _check_owned(path, st)


def _check_owned(path: str, st: os.stat_result) -> None:
    """Refuses what another user could have written: its rows would run as code here."""
    problem = unsafe(st)
    hint = _START_OVER
    if problem.startswith("is writable by others"):
        hint = f"If only you could have written it, `chmod 600 {path}`; else: {_START_OVER}"
    if problem:
        raise ConfigError(
            f"refusing checkpoint file {path}: it {problem}. Its rows are unpickled, so whoever can write it "
            f"could run code here. {hint}"
        )


_START_OVER = "Delete it to start over, or pass another path as checkpoint=."
