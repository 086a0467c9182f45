"""A replica's log file is capped and rotated, and the client's stream follows it across rotations."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import runmap as rm
from runmap import logs
from runmap.exceptions import ConfigError
from runmap.logs import LogStreamer, LogTail
from runmap.paths import log_dir
from runmap.server.logfile import RotatingLog, UnsafeLogError

CAP = 256 << 10


def _lines(start: int, stop: int) -> bytes:
    return b"".join(b"line %07d %s\n" % (i, b"x" * (i % 97)) for i in range(start, stop))


def _wait_until(condition, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


class _FakeCluster:
    stream_logs = True


class _FakeServlet:
    def __init__(self, name: str) -> None:
        self.name = name
        self.cluster = _FakeCluster()
        self.env = rm.Env(name=name)

    def is_alive(self) -> bool:
        return True

    def output_done(self) -> bool:
        return False


# ------------------------------------------------------------------ the writer


def test_each_file_stays_within_the_cap_and_the_last_two_hold_the_end_of_the_output(tmp_path: Path) -> None:
    path = tmp_path / "r.log"
    log = RotatingLog(path, CAP)
    data = _lines(0, 85_000)  # ~5 MB
    for start in range(0, len(data), 65536):  # as the thread gets it from the pipe: cut anywhere
        log.write(data[start : start + 65536])
    log.close()
    current, rotated = path.read_bytes(), Path(f"{path}.1").read_bytes()
    assert len(data) > 5_000_000
    assert len(current) <= CAP and len(rotated) <= CAP
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.log", "r.log.1"]
    assert len(rotated + current) > CAP and (rotated + current) == data[-len(rotated + current) :]
    for p in (path, Path(f"{path}.1")):
        assert p.stat().st_mode & 0o777 == 0o600


def test_the_cut_falls_after_the_last_whole_line_that_fits(tmp_path: Path) -> None:
    path = tmp_path / "r.log"
    log = RotatingLog(path, 100)
    log.write(b"a" * 39 + b"\n")
    log.write(b"b" * 39 + b"\n" + b"c" * 39 + b"\n" + b"d" * 10)
    log.close()
    assert Path(f"{path}.1").read_bytes() == b"a" * 39 + b"\n" + b"b" * 39 + b"\n"
    assert path.read_bytes() == b"c" * 39 + b"\n" + b"d" * 10


def test_a_line_longer_than_the_cap_is_split(tmp_path: Path) -> None:
    path = tmp_path / "r.log"
    log = RotatingLog(path, 100)
    log.write(b"a" * 250 + b"\n")
    log.close()
    assert Path(f"{path}.1").read_bytes() == b"a" * 100
    assert path.read_bytes() == b"a" * 50 + b"\n"


def test_a_symlink_at_the_log_path_is_not_written_through(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.write_bytes(b"precious\n")
    link = tmp_path / "r.log"
    link.symlink_to(target)
    with pytest.raises(UnsafeLogError, match="symlink"):
        RotatingLog(link, CAP)
    assert target.read_bytes() == b"precious\n"


def test_a_symlink_planted_at_rotation_is_not_written_through(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "target"
    target.write_bytes(b"precious\n")
    path = tmp_path / "r.log"
    rename = os.rename

    def rename_and_plant(src: str, dst: str) -> None:
        rename(src, dst)
        os.symlink(target, src)  # in the gap before the new file is created

    log = RotatingLog(path, 20)
    log.write(b"first line\n")
    monkeypatch.setattr(os, "rename", rename_and_plant)
    log.write(b"second line\n")  # rotates: the new file would be the symlink
    monkeypatch.undo()
    log.write(b"dropped\n")
    assert target.read_bytes() == b"precious\n"
    assert path.is_symlink()
    path.unlink()
    log.write(b"third line\n")  # once the symlink is gone, a new file of its own
    log.close()
    assert target.read_bytes() == b"precious\n"
    assert path.read_bytes() == b"third line\n" and not path.is_symlink()
    assert Path(f"{path}.1").read_bytes() == b"first line\n"


def test_a_rotation_waits_for_a_reader_still_on_the_file_before_last(tmp_path: Path) -> None:
    path = tmp_path / "r.log"
    log = RotatingLog(path, 10, reader_wait=60)
    reader = os.open(path, os.O_RDONLY)
    fcntl.flock(reader, fcntl.LOCK_SH)  # a reader on the first file, that does not move on
    log.write(b"file one\n")
    log.write(b"file two\n")  # the first rotation deletes nothing
    log.write(b"file 3\n")  # the second replaces the first file: the reader has it open, still fine
    writer = threading.Thread(target=log.write, args=(b"file four\n",))  # would delete "file two", never read
    writer.start()
    writer.join(0.3)
    assert writer.is_alive(), "rotated away a file the reader had not opened"
    assert Path(f"{path}.1").read_bytes() == b"file two\n"
    os.close(reader)  # the reader moves on
    writer.join(10)
    assert not writer.is_alive()
    log.close()
    assert Path(f"{path}.1").read_bytes() == b"file 3\n" and path.read_bytes() == b"file four\n"


def test_a_reader_that_stopped_reading_holds_a_rotation_up_only_so_long(tmp_path: Path) -> None:
    path = tmp_path / "r.log"
    log = RotatingLog(path, 10, reader_wait=0.2)
    reader = os.open(path, os.O_RDONLY)
    fcntl.flock(reader, fcntl.LOCK_SH)
    try:
        for text in (b"file one\n", b"file two\n", b"file 3\n", b"file four\n"):
            log.write(text)
    finally:
        os.close(reader)
        log.close()
    assert path.read_bytes() == b"file four\n"


# ---------------------------------------------------------------- the follower


def test_the_follower_reads_across_rotations_without_losing_or_repeating_a_line(tmp_path: Path) -> None:
    path = tmp_path / "r.log"
    rotations: list[int] = []

    class CountingLog(RotatingLog):
        def rotate(self) -> None:
            rotations[-1] += 1
            super().rotate()

    log = CountingLog(path, 4096)
    log.write(b"before this launch\n")
    followed = LogTail(path, path.stat().st_size)
    assert followed.open()
    received: list[str] = []
    n = 0
    # Between two looks: no rotation, one, or two (then <name>.log.1 is read before <name>.log).
    # Every write ends mid-line, so lines straddle the files.
    for lines_between_looks in (10, 60, 100, 7, 90, 1, 100, 45, 100, 100, 30):
        rotations.append(0)
        data = _lines(n, n + lines_between_looks)
        n += lines_between_looks
        log.write(data[:-5])
        received += followed.read_lines()
        log.write(data[-5:])
    received += followed.read_lines(final=True)
    log.close()
    followed.close()
    assert received == _lines(0, n).decode().splitlines()
    assert {0, 1, 2} <= set(rotations), rotations


def test_the_follower_does_not_read_through_a_symlink(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere.log"
    target.write_text("not yours\n")
    link = tmp_path / "r.log"
    link.symlink_to(target)
    lines: list[str] = []
    streamer = LogStreamer(write=lines.append, poll=60)
    servlet = _FakeServlet("r")
    streamer.follow(servlet, link)  # type: ignore[arg-type]
    streamer.unfollow(servlet)  # type: ignore[arg-type]
    assert lines == []


# ------------------------------------------------------------------ a servlet


def test_a_servlet_refuses_a_symlink_at_its_log_path(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.write_bytes(b"precious\n")
    link = tmp_path / "r.log"
    link.symlink_to(target)
    stderr = tmp_path / "stderr"
    config = {"name": "r", "token": "t0ken", "log": str(link), "sys_path": sys.path}
    with stderr.open("wb") as err:
        proc = subprocess.run(
            [sys.executable, "-m", "runmap.server"],
            input=json.dumps(config).encode() + b"\n",
            stdout=subprocess.PIPE,
            stderr=err,
            timeout=60,
        )
    assert proc.returncode != 0 and proc.stdout == b""  # no ready line: the launcher reports a failed start
    assert "symlink" in stderr.read_text()
    assert target.read_bytes() == b"precious\n"


@pytest.fixture
def streamed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[list[str]]:
    """What the client's log stream prints, as a list; servlets' files under a runtime dir of the test's."""
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    monkeypatch.setenv("RUNMAP_HOME", str(home))
    lines: list[str] = []
    monkeypatch.setattr(logs._streamer, "write", lines.append)
    yield lines


def chatter(start: int, stop: int) -> int:
    out = sys.stdout.buffer
    for i in range(start, stop):
        out.write(b"line %07d %s\n" % (i, b"x" * (i % 97)))
    out.flush()
    return stop - start


def test_a_chatty_replica_keeps_at_most_twice_the_cap_and_streams_every_line(streamed: list[str]) -> None:
    with rm.LocalCluster(name="chatty", log_max_bytes=CAP) as c:
        remote = rm.function(chatter).to(c)
        name = remote.servlet.name
        log = log_dir("chatty") / f"{name}.log"
        assert remote(0, 85_000) == 85_000  # ~5 MB at once, ~20 rotations
        assert remote(85_000, 85_010) == 10
        expected = [f"({name}) {line}" for line in _lines(0, 85_010).decode().splitlines()]
        _wait_until(lambda: len(streamed) >= len(expected))
        on_disk = {p.name: p.stat().st_size for p in log.parent.iterdir()}
    assert streamed == expected
    assert set(on_disk) == {log.name, f"{log.name}.1"}
    assert all(size <= CAP for size in on_disk.values()), on_disk


def test_log_max_bytes_must_be_positive() -> None:
    with pytest.raises(ConfigError, match="log_max_bytes"):
        rm.LocalCluster(name="nocap", log_max_bytes=0)
