"""Resumable maps: each completed result saved as it arrives.

``mapper.map(xs, checkpoint="run.db")`` keeps a SQLite file (the standard
library's) of results keyed by input position and a hash of the input. Run the
same map again with the same file after a failure, a Ctrl-C or a killed client,
and only the inputs without a saved result are sent; the rest come from the
file. An input whose hash differs from the saved one (the inputs changed) is
run again.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import sqlite3
from typing import Any

from runmap import serialization as ser

_MISSING = object()


class Checkpoint:
    """A SQLite file of ``(index, input hash) -> pickled result``."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        # One connection used only from the map loop's thread.
        self._db = sqlite3.connect(self.path, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS results"
            " (idx INTEGER PRIMARY KEY, input_hash TEXT NOT NULL, result BLOB NOT NULL)"
        )

    @staticmethod
    def hash_input(item: Any) -> str:
        try:
            data = pickle.dumps(item, protocol=ser.PROTOCOL)
        except Exception:
            data = ser.dumps(item)
        return hashlib.blake2b(data, digest_size=16).hexdigest()

    def lookup(self, index: int, input_hash: str) -> Any:
        """The saved result of input ``index``, or ``MISSING``."""
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
        self._db.execute("BEGIN")
        self._db.executemany("INSERT OR REPLACE INTO results VALUES (?, ?, ?)", packed)
        self._db.execute("COMMIT")

    def count(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM results").fetchone()[0])

    def close(self) -> None:
        self._db.close()


MISSING = _MISSING
