"""What replicas print reaches the client, prefixed with the replica's name."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

import runmap as rm
from runmap.logs import LogStreamer


def shout(x: int) -> int:
    print(f"shouting {x}")
    return x


def test_mapped_prints_reach_the_client_with_the_replica_prefix(
    cluster: rm.LocalCluster, capfd: pytest.CaptureFixture[str]
) -> None:
    with rm.mapper(shout, num_replicas=2, cluster=cluster) as m:
        assert m.map(range(6), progress=False) == list(range(6))
        names = {r.servlet.name for r in m.replicas}
    out = capfd.readouterr().out
    for x in range(6):
        assert any(f"({name}) shouting {x}" in out for name in names), out
    assert {line.split(")")[0][1:] for line in out.splitlines() if "shouting" in line} <= names


def test_stream_logs_false_silences_the_mapper_but_keeps_the_log_file(
    cluster: rm.LocalCluster, capfd: pytest.CaptureFixture[str]
) -> None:
    with rm.mapper(shout, num_replicas=2, cluster=cluster, stream_logs=False) as m:
        m.map(range(4), progress=False)
        logs = [Path(r.servlet.process.log) for r in m.replicas]  # type: ignore[arg-type]
    assert "shouting" not in capfd.readouterr().out
    assert "".join(p.read_text() for p in logs).count("shouting") >= 4


def test_a_cluster_with_stream_logs_false_starts_no_tailer(capfd: pytest.CaptureFixture[str]) -> None:
    with rm.LocalCluster(name="quiet", stream_logs=False) as c:
        remote = rm.function(shout).to(c)
        assert remote(7) == 7
        assert not any(t.name == "runmap-logs" for t in threading.enumerate())
    assert "shouting" not in capfd.readouterr().out


class _FakeCluster:
    stream_logs = True


class _FakeServlet:
    def __init__(self, name: str) -> None:
        self.name = name
        self.alive = True
        self.cluster = _FakeCluster()
        self.env = rm.Env(name=name)

    def is_alive(self) -> bool:
        return self.alive

    def output_done(self) -> bool:
        return not self.alive


def test_the_streamer_prints_new_lines_only_and_ends_with_its_last_servlet(tmp_path: Path) -> None:
    log = tmp_path / "a.log"
    log.write_text("from an earlier launch\n")
    lines: list[str] = []
    streamer = LogStreamer(write=lines.append, poll=0.01)
    servlet = _FakeServlet("a")
    streamer.follow(servlet, log, log.stat().st_size)  # type: ignore[arg-type]
    with log.open("a") as f:
        f.write("one\ntw")
        f.flush()
        deadline = time.monotonic() + 5
        while not lines and time.monotonic() < deadline:
            time.sleep(0.01)
        assert lines == ["(a) one"]
        f.write("o\nthree")  # the last line has no newline: printed when the servlet stops
    servlet.alive = False
    deadline = time.monotonic() + 5
    while streamer.following and time.monotonic() < deadline:
        time.sleep(0.01)
    assert lines == ["(a) one", "(a) two", "(a) three"]


def test_unfollow_prints_the_rest_at_once(tmp_path: Path) -> None:
    log = tmp_path / "b.log"
    log.write_text("")
    lines: list[str] = []
    streamer = LogStreamer(write=lines.append, poll=60)
    servlet = _FakeServlet("b")
    streamer.follow(servlet, log)  # type: ignore[arg-type]
    log.write_text("last words\n")
    streamer.unfollow(servlet)  # type: ignore[arg-type]
    assert lines == ["(b) last words"]
