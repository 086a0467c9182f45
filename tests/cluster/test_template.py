"""Local replicas forked from the client's warm template process (runmap/cluster/template.py)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
from processes import running

import runmap as rm
from runmap._template_start import TEMPLATE_CODE, TemplateProcess
from runmap.cluster import template
from runmap.cluster.process import ExitKind, ExitStatus, start_subprocess_servlet
from runmap.server.command import servlet_command


def parentage(_: object = None) -> tuple[int, int]:
    return os.getpid(), os.getppid()


def where_am_i(_: object = None) -> dict[str, object]:
    return {
        "cwd": os.getcwd(),
        "flavour": os.environ.get("FLAVOUR"),
        "breakpoint": os.environ.get("PYTHONBREAKPOINT"),
        "replica": os.environ.get("RUNMAP_REPLICA"),
    }


def random_bits(_: object = None) -> int:
    return random.getrandbits(64)


def leave_with(code: int) -> None:
    os._exit(code)


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def gone(pid: int) -> bool:
    return not running([pid])


@pytest.fixture
def own_template(monkeypatch: pytest.MonkeyPatch) -> Iterator[template.Template]:
    """A template of the test's own in place of the shared one, ended (with any that replaced it) after."""
    started: list[template.Template] = []
    real = template.Template

    def starting(env: dict[str, str], process: TemplateProcess | None = None) -> template.Template:
        started.append(real(env, process))
        return started[-1]

    monkeypatch.setattr(template, "Template", starting)
    monkeypatch.setattr(template, "_shared", None)
    template.shared()
    try:
        yield started[0]
    finally:
        for t in started:
            t.close(wait=10)


def test_replicas_are_forked_from_the_template_and_answer_in_order(cluster: rm.LocalCluster) -> None:
    shared = template.shared()
    assert shared is not None
    with rm.mapper(parentage, num_replicas=2, cluster=cluster) as m:
        out = m.map(range(20), progress=False)
    assert len(out) == 20
    assert {parent for _, parent in out} == {shared.proc.pid}, "every replica is a child of the template"
    assert len({pid for pid, _ in out}) == 2


def test_a_forked_replica_has_its_envs_variables_and_working_dir(cluster: rm.LocalCluster, tmp_path: Path) -> None:
    # PYTHONBREAKPOINT is read at each breakpoint(), not as the interpreter starts: a fork honours it.
    env_vars = {"FLAVOUR": "mint", "PYTHONBREAKPOINT": "0"}
    env = rm.env(name="flavoured", env_vars=env_vars, working_dir=str(tmp_path))
    remote = rm.function(where_am_i).to(cluster, env=env)
    assert remote() == {"cwd": str(tmp_path), "flavour": "mint", "breakpoint": "0", "replica": "flavoured"}
    assert psutil.Process(remote.servlet.pid).ppid() == template.shared().proc.pid  # type: ignore[union-attr]
    assert "FLAVOUR" not in os.environ


def test_forked_replicas_do_not_share_a_random_seed(cluster: rm.LocalCluster) -> None:
    with rm.mapper(random_bits, num_replicas=2, cluster=cluster, concurrency=1) as m:
        firsts = {r(None) for r in m.replicas}
    assert len(firsts) == 2


@pytest.mark.parametrize(("how", "expected"), [
    ("killed", ExitStatus(ExitKind.SIGNALED, signal=signal.SIGKILL)),
    ("exit 3", ExitStatus(ExitKind.EXITED, code=3)),
])
def test_how_a_forked_replica_ended_comes_from_the_template(
    cluster: rm.LocalCluster, how: str, expected: ExitStatus
) -> None:
    remote = rm.function(leave_with).to(cluster)
    servlet = remote.servlet
    assert psutil.Process(servlet.pid).ppid() == template.shared().proc.pid  # type: ignore[union-attr]
    if how == "killed":
        os.kill(servlet.pid, signal.SIGKILL)  # type: ignore[arg-type]
    else:
        with pytest.raises(rm.ReplicaDiedError):
            remote(3)
    assert wait_until(lambda: servlet.exit_status() is not None)
    assert servlet.exit_status() == expected


def test_closing_the_cluster_ends_its_forked_replicas_at_once(own_template: template.Template) -> None:
    with rm.LocalCluster(name="template-close") as c:
        remotes = [rm.function(parentage).to(c, env=rm.env(name=f"r{i}")) for i in range(3)]
        pids = [r()[0] for r in remotes]
        assert {r()[1] for r in remotes} == {own_template.proc.pid}
        started = time.monotonic()
    assert time.monotonic() - started < 2.0, "close waits for no grace period: the replicas leave on end-of-file"
    assert all(gone(pid) for pid in pids)
    assert [r.servlet.exit_status() for r in remotes] == [ExitStatus(ExitKind.STOPPED)] * 3


def who_am_i(_: object = None) -> tuple[str | None, int, int]:
    return os.environ.get("FLAVOUR"), os.getpid(), os.getppid()


def test_replicas_asked_for_at_once_each_get_their_own_answer(own_template: template.Template) -> None:
    # Requests go to the template while earlier ones wait for their answers: no answer may reach another.
    count = 6
    barrier = threading.Barrier(count)
    with rm.LocalCluster(name="template-at-once") as c:

        def start(i: int) -> rm.Remote:
            env = rm.env(name=f"r{i}", env_vars={"FLAVOUR": f"f{i}"})
            barrier.wait(timeout=10)
            return rm.function(who_am_i).to(c, env=env)

        with ThreadPoolExecutor(count) as pool:
            remotes = list(pool.map(start, range(count)))
        answers = [r() for r in remotes]
    assert [flavour for flavour, _, _ in answers] == [f"f{i}" for i in range(count)]
    assert [pid for _, pid, _ in answers] == [r.servlet.pid for r in remotes], "each knows its own servlet's pid"
    assert {parent for _, _, parent in answers} == {own_template.proc.pid}


def test_replicas_leave_with_a_killed_template_and_the_next_start_gets_a_new_one(
    own_template: template.Template,
) -> None:
    with rm.LocalCluster(name="template-killed") as c:
        first = rm.function(parentage).to(c, env=rm.env(name="first"))
        pid, parent = first()
        assert parent == own_template.proc.pid
        own_template.proc.kill()
        own_template.proc.wait()
        assert wait_until(lambda: gone(pid)), "a replica does not outlive the template that forked it"
        assert wait_until(lambda: first.servlet.exit_status() is not None)
        status = first.servlet.exit_status()
        assert status is not None and status.kind is ExitKind.GONE and "template" in str(status)
        second = rm.function(parentage).to(c, env=rm.env(name="second"))
        new = template.shared()
        assert new is not None and new is not own_template
        assert second()[1] == new.proc.pid


def test_an_env_with_other_start_up_variables_starts_plainly(cluster: rm.LocalCluster) -> None:
    env = rm.env(name="hashed", env_vars={"PYTHONHASHSEED": "7"})
    remote = rm.function(parentage).to(cluster, env=env)
    assert remote()[1] == os.getpid(), "started by the client itself: the interpreter reads PYTHON* as it starts"


def test_runmap_template_0_starts_replicas_plainly(cluster: rm.LocalCluster, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNMAP_TEMPLATE", "0")
    remote = rm.function(parentage).to(cluster)
    assert remote()[1] == os.getpid()


def test_a_template_that_never_comes_up_is_not_tried_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(template, "_broken", False)
    broken = template.Template({**os.environ, "PYTHONHOME": str(tmp_path)})  # no interpreter starts with this
    config = {"name": "fallback", "token": "t" * 32, "host": "127.0.0.1", "port": 0}
    proc, ready, _, _ = start_subprocess_servlet(
        servlet_command(sys.executable, sys.version_info[:2]), config, tmp_path / "fallback.log",
        name="fallback", env=os.environ, template=broken,
    )
    try:
        assert isinstance(proc, subprocess.Popen), "started plainly once the template failed"
        assert ready["pid"] == proc.pid and psutil.Process(proc.pid).ppid() == os.getpid()
        assert template._broken and not template.enabled()
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(10)
        broken.close(wait=10)


CLIENT = textwrap.dedent(
    """
    import json, os, sys, runmap as rm
    from runmap.cluster import template

    m = rm.mapper(lambda x: os.getpid(), num_replicas=2)
    replicas = set(m.map(range(8), progress=False))
    print(json.dumps({"template": template.shared().proc.pid, "replicas": sorted(replicas)}), flush=True)
    sys.stdin.read()
    """
)


def client_script(script: str) -> subprocess.Popen[str]:
    """A client interpreter running ``script``, with templates on, its stdin and stdout piped."""
    env = {k: v for k, v in os.environ.items() if k != "RUNMAP_TEMPLATE"}
    client = subprocess.Popen(
        [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True
    )
    assert client.stdout is not None and client.stdin is not None
    return client


@pytest.mark.parametrize("end", ["SIGKILL", "exit"])
def test_the_template_and_its_replicas_end_with_their_client(end: str) -> None:
    client = client_script(CLIENT)
    assert client.stdout is not None and client.stdin is not None
    try:
        started = json.loads(client.stdout.readline())
        pids = [started["template"], *started["replicas"]]
        assert {psutil.Process(p).ppid() for p in started["replicas"]} == {started["template"]}
        if end == "SIGKILL":
            client.kill()
        else:
            client.stdin.close()  # the script leaves the Mapper open: the interpreter's exit ends it
        client.wait(30)
        assert wait_until(lambda: all(gone(p) for p in pids)), [p for p in pids if not gone(p)]
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
        client.stdout.close()
        if not client.stdin.closed:
            client.stdin.close()


CLIENT_WITH_A_PIPE = textwrap.dedent(
    """
    import json, os, sys
    r, w = os.pipe()
    os.set_inheritable(w, True)  # as a library may leave one: the template must not hold it open
    import runmap as rm  # runmap.mapper starts the template as it is imported
    from runmap.cluster import template

    m = rm.mapper(lambda x: x + 1, num_replicas=1)
    assert m.map([1], progress=False) == [2]
    pid = template.shared().proc.pid
    held = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
    print(json.dumps({"template": pid, "sid": os.getsid(pid), "holds_pipe": os.readlink(f"/proc/self/fd/{w}") in held}))
    sys.stdout.flush()
    sys.stdin.read()
    """
)


def test_the_template_started_first_thing_is_the_one_used_and_holds_none_of_the_clients_descriptors() -> None:
    client = client_script(CLIENT_WITH_A_PIPE)
    assert client.stdout is not None and client.stdin is not None
    try:
        seen = json.loads(client.stdout.readline())
        templates = [c.pid for c in psutil.Process(client.pid).children() if TEMPLATE_CODE in c.cmdline()]
        assert templates == [seen["template"]], "one template: the one started early was adopted"
        assert seen["sid"] == seen["template"], "a session of its own: a Ctrl-C in the terminal is the client's"
        assert not seen["holds_pipe"]
    finally:
        client.stdin.close()
        client.wait(30)
        client.stdout.close()
