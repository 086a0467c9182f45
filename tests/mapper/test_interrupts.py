"""Ctrl-C, endless inputs and memory: a map stops promptly and holds only a window."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from processes import assert_all_end

import runmap as rm
from runmap.mapper.dispatch import PIPELINE_DEPTH
from runmap.mapper.run import READ_AHEAD


def double(x: int) -> int:
    return 2 * x


def test_imap_over_count_stops_when_the_caller_stops() -> None:
    with rm.mapper(double, num_replicas=2) as mapper:
        results = []
        for r in mapper.imap(itertools.count(), progress=False):
            results.append(r)
            if len(results) == 1000:
                break
        assert results == [2 * x for x in range(1000)]
        assert mapper.map([1, 2], progress=False) == [2, 4]  # nothing stale left in the queue


CTRL_C_SCRIPT = textwrap.dedent(
    """
    import json, os, sys, time
    import runmap as rm

    def nap(x, started):
        open(os.path.join(started, str(x)), "w").close()
        time.sleep(30)
        return x

    mapper = rm.mapper(nap, num_replicas=2)
    print(json.dumps([r.servlet.pid for r in mapper.replicas]), flush=True)
    try:
        mapper.map(range(100), kwargs={"started": sys.argv[1]}, progress=False)
    except KeyboardInterrupt:
        print("interrupted", flush=True)
        raise
    """
)


def test_ctrl_c_returns_within_a_second_and_leaves_nothing(tmp_path: Path) -> None:
    client = subprocess.Popen(
        [sys.executable, "-c", CTRL_C_SCRIPT, str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert client.stdout is not None and client.stderr is not None
    pids = json.loads(client.stdout.readline())
    deadline = time.monotonic() + 30
    while len(os.listdir(tmp_path)) < 2 and time.monotonic() < deadline:  # both replicas are running a call
        time.sleep(0.02)
    assert len(os.listdir(tmp_path)) == 2, "the map did not get under way"
    sent = time.monotonic()
    client.send_signal(signal.SIGINT)
    line = client.stdout.readline()
    interrupted_after = time.monotonic() - sent
    client.wait(30)
    exited_after = time.monotonic() - sent
    stderr = client.stderr.read()
    client.stdout.close()
    client.stderr.close()
    assert line.strip() == "interrupted"
    assert interrupted_after < 1.0, interrupted_after
    assert "KeyboardInterrupt" in stderr
    assert exited_after < 10, exited_after
    assert_all_end(pids, within=5, what="servlets outlived an interrupted client")


MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, resource
    import runmap as rm

    def inc(x):
        return x + 1

    with rm.mapper(inc, num_replicas=2) as mapper:
        assert mapper.map([], progress=False) == []
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        total = 0
        count = 0
        for r in mapper.imap((i for i in range(1_000_000)), progress=False):
            total += r
            count += 1
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert count == 1_000_000 and total == sum(range(1, 1_000_001))
    print(json.dumps({"base_kb": base, "peak_kb": peak}))
    """
)


def test_a_million_inputs_from_a_generator_keep_memory_flat() -> None:
    out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    grown_mb = (figures["peak_kb"] - figures["base_kb"]) / 1024
    assert grown_mb < 100, f"the client grew by {grown_mb:.0f} MB over a million inputs"


def slow_first(x: int) -> int:
    if x == 0:
        time.sleep(1.5)
    return x


def test_a_slow_first_input_does_not_make_the_client_read_ahead_without_bound() -> None:
    consumed = 0

    def naturals():  # type: ignore[no-untyped-def]
        nonlocal consumed
        for n in itertools.count():
            consumed += 1
            yield n

    with rm.mapper(slow_first, num_replicas=2) as mapper:
        stream = mapper.imap(naturals(), chunksize=1, progress=False)
        assert next(stream) == 0  # 1.5 s, while the other replica could have raced ahead
        stream.close()  # type: ignore[attr-defined]
    # Read ahead: READ_AHEAD chunks a slot, and the short calls each replica may queue (dispatch.py).
    assert consumed <= 1 + READ_AHEAD * 2 + (PIPELINE_DEPTH - 1) * 2, consumed
