"""bootstrap() on the real sshd hosts (tests/sshd_hosts.py): an env built once per host from the
host's own Debian python3, holding the client's runmap source and the client's exact dependency
versions, then found in the host's cache by every later connection."""

from __future__ import annotations

import importlib.metadata
import json
import os
import secrets
import stat
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
from sshd_hosts import SshHosts

import runmap
from runmap.cluster.ssh.bootstrap import HostInfo, bootstrap, pinned_requirements, runmap_source
from runmap.cluster.ssh.connection import SSHConnection
from runmap.exceptions import ClusterError
from runmap.server.command import servlet_command

Connect = Callable[[str], SSHConnection]
CLIENT_VERSIONS = {name: importlib.metadata.version(name) for name in ("cloudpickle", "httptools", "uvloop", "tqdm")}
VERSIONS_SCRIPT = """
import importlib.metadata as m, json, sys
import runmap, cloudpickle, httptools, uvloop, tqdm
print(json.dumps({
    "runmap": runmap.__version__, "runmap_metadata": m.version("runmap"), "runmap_file": runmap.__file__,
    "cloudpickle": cloudpickle.__version__, "httptools": m.version("httptools"),
    "uvloop": m.version("uvloop"), "tqdm": m.version("tqdm"), "executable": sys.executable,
    "prefix": sys.prefix, "base_prefix": sys.base_prefix,
}))
"""


@pytest.fixture
def connect(ssh_hosts: SshHosts) -> Iterator[Connect]:
    control_dir = Path(tempfile.mkdtemp(prefix="b", dir=ssh_hosts.client_dir))
    opened: list[SSHConnection] = []

    def open_(host: str) -> SSHConnection:
        conn = SSHConnection(host, config_file=ssh_hosts.config, control_dir=control_dir)
        opened.append(conn)
        return conn

    yield open_
    for conn in opened:
        conn.close()
    control_dir.rmdir()  # nothing left in it


def _envs(home: Path, cache: str = ".cache/runmap") -> list[str]:
    envs = home / cache / "envs"
    return sorted(p.name for p in envs.iterdir()) if envs.is_dir() else []


@pytest.mark.slow
def test_a_host_is_built_once_then_found_in_its_cache(ssh_hosts: SshHosts, connect: Connect) -> None:
    host = ssh_hosts.host("host-a")
    # A cold host: no runmap cache, no uv cache (other tests of the session may have filled them).
    assert ssh_hosts.run("host-a", "rm -rf ~/.cache").returncode == 0
    first = bootstrap(connect("host-a"))
    second = bootstrap(connect("host-a"))  # a new connection: what a second cluster does
    print(f"\nbootstrap of host-a: first {first.seconds:.2f} s (built with {first.installer}: {_steps(first)}), "
          f"second {second.seconds:.2f} s (cache: {_steps(second)})")  # fmt: skip
    assert first.built and first.installer == "uv"
    assert not second.built and second.installer == ""
    assert second.seconds < first.seconds / 2 and second.seconds < 2, (first.seconds, second.seconds)
    assert second.python == first.python and second.env_dir == first.env_dir

    cache = host.home / ".cache" / "runmap"
    st = cache.lstat()
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == host.uid
    assert first.env_dir.startswith(f"{cache}/envs/") and first.python == f"{first.env_dir}/bin/python"
    assert (Path(first.env_dir) / ".runmap-built").is_file()
    source = runmap_source()
    assert sorted(p.name for p in (cache / "src").iterdir()) == [source.hash]
    assert (cache / "src" / source.hash / "runmap" / "cluster" / "ssh" / "bootstrap.py").read_bytes() == Path(
        runmap.__file__
    ).parent.joinpath("cluster", "ssh", "bootstrap.py").read_bytes()
    assert [p.name for p in (cache / "bin").iterdir()] == [f"uv-{_uv_hash()}"]
    assert not [p for p in cache.iterdir() if p.name.startswith(".incoming")]

    # The host's own facts: the hosts are users of this machine.
    local_python = subprocess.run(["/usr/bin/python3", "-c", "import sys; print(*sys.version_info[:3])"],
                                  capture_output=True, text=True, check=True).stdout.split()  # fmt: skip
    assert first.python_version == tuple(int(v) for v in local_python)
    assert first.cpus == len(os.sched_getaffinity(0))
    assert abs(first.memory_gb - psutil.virtual_memory().total / 2**30) < 0.01
    assert first.gpus == 0 and first.platform == "linux-x86_64" and first.host == "host-a"
    assert (second.python_version, second.cpus, second.memory_gb) == (
        first.python_version, first.cpus, first.memory_gb,
    )  # fmt: skip


def _steps(info: HostInfo) -> str:
    return ", ".join(f"{name} {seconds:.2f} s" for name, seconds in info.timings.items())


def _uv_hash() -> str:
    from runmap.cluster.ssh.bootstrap import _file_hash, uv_binary

    found = uv_binary()
    assert found is not None
    return _file_hash(found)


@pytest.mark.slow
def test_the_env_runs_the_clients_runmap_and_dependency_versions(ssh_hosts: SshHosts, connect: Connect) -> None:
    conn = connect("host-a")
    info = bootstrap(conn)
    r = conn.run([info.python, "-c", VERSIONS_SCRIPT], check=True)
    remote = json.loads(r.stdout)
    assert remote["runmap"] == runmap.__version__ and remote["runmap_metadata"] == importlib.metadata.version("runmap")
    assert {name: remote[name] for name in CLIENT_VERSIONS} == CLIENT_VERSIONS
    cache = info.env_dir.rsplit("/envs/", 1)[0]
    assert remote["runmap_file"] == f"{cache}/src/{runmap_source().hash}/runmap/__init__.py"
    assert remote["prefix"] == info.env_dir and remote["base_prefix"] == "/usr"  # built from the host's python3
    # The env starts a real servlet: config and token on stdin, the ready line back on stdout.
    token = secrets.token_hex(16)
    proc = conn.popen(servlet_command(info.python, info.python_version[:2]))
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    proc.stdin.write(json.dumps({"name": "probe", "token": token, "host": "127.0.0.1", "port": 0}).encode() + b"\n")
    proc.stdin.flush()
    ready = json.loads(proc.stdout.readline())
    assert ready["port"] > 0
    servlet = psutil.Process(ready["pid"])
    assert servlet.uids().real == ssh_hosts.host("host-a").uid
    assert not [p for p in ssh_hosts.processes("host-a") if token in " ".join(p.cmdline())]
    proc.stdin.close()  # the servlet's signal to leave
    assert proc.wait(15) == 0
    assert b"runmap-exit" not in proc.stderr.read()
    proc.stdout.close()
    proc.stderr.close()


@pytest.mark.slow
def test_a_bad_requirement_is_a_cluster_error_naming_it(ssh_hosts: SshHosts, connect: Connect) -> None:
    conn = connect("host-a")
    good = bootstrap(conn)
    before = _envs(ssh_hosts.host("host-a").home)
    with pytest.raises(ClusterError) as info:
        bootstrap(conn, ("runmap-no-such-package-xyz",))
    message = str(info.value)
    assert "host-a" in message and "runmap-no-such-package-xyz" in message
    assert "uv pip install" in message  # the step, then the tail of uv's own output
    assert message.count("runmap-no-such-package-xyz") >= 2, message
    after = _envs(ssh_hosts.host("host-a").home)
    assert [e for e in after if not e.endswith(".lock")] == [e for e in before if not e.endswith(".lock")]
    again = bootstrap(conn)
    assert not again.built and again.python == good.python


@pytest.mark.slow
def test_concurrent_bootstraps_of_one_env_build_it_once(ssh_hosts: SshHosts, connect: Connect) -> None:
    cache = f".cache/runmap-test-{secrets.token_hex(4)}"
    conns = [connect("host-b"), connect("host-b")]
    results: list[HostInfo | BaseException] = [RuntimeError("not run")] * 2

    def run(i: int) -> None:
        try:
            results[i] = bootstrap(conns[i], ("six==1.16.0",), cache=cache)
        except BaseException as e:  # noqa: BLE001 - handed to the test's thread
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,), name=f"bootstrap-{i}") for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    infos = [r for r in results if isinstance(r, HostInfo)]
    assert len(infos) == 2, results
    assert sorted(i.built for i in infos) == [False, True]
    assert infos[0].python == infos[1].python
    r = conns[0].run([infos[0].python, "-c", "import six, runmap; print(six.__version__)"], check=True)
    assert r.stdout.decode().strip() == "1.16.0"
    home = ssh_hosts.host("host-b").home
    assert [e for e in _envs(home, cache) if not e.endswith(".lock")] == [Path(infos[0].env_dir).name]


@pytest.mark.slow
def test_without_uv_the_env_is_built_with_venv_and_pip(ssh_hosts: SshHosts, connect: Connect) -> None:
    conn = connect("host-c")
    info = bootstrap(conn, cache=f".cache/runmap-pip-{secrets.token_hex(4)}", use_uv=False)
    print(f"\nbootstrap of host-c with venv and pip: {info.seconds:.2f} s ({_steps(info)})")
    assert info.built and info.installer == "pip"
    remote = json.loads(conn.run([info.python, "-c", VERSIONS_SCRIPT], check=True).stdout)
    assert {name: remote[name] for name in CLIENT_VERSIONS} == CLIENT_VERSIONS
    assert remote["runmap"] == runmap.__version__


def test_a_cache_directory_that_is_a_symlink_is_refused(ssh_hosts: SshHosts, connect: Connect) -> None:
    conn = connect("host-b")
    conn.run("mkdir -p .cache && rm -rf .cache/evil && ln -s /tmp .cache/evil", check=True)
    with pytest.raises(ClusterError, match=r"host-b: refusing the cache directory .*/\.cache/evil: it is a symlink"):
        bootstrap(conn, cache=".cache/evil")
    conn.run("rm .cache/evil", check=True)


def test_a_missing_python_is_a_cluster_error(connect: Connect) -> None:
    conn = connect("host-c")
    with pytest.raises(ClusterError, match=r"preparing host-c: the probe failed \(exit 127\):\n.*not found"):
        bootstrap(conn, python="python3-not-there")


def test_the_pins_are_the_clients_installed_versions_for_the_hosts_platform() -> None:
    linux = {
        "implementation_name": "cpython", "implementation_version": "3.11.2", "os_name": "posix",
        "platform_machine": "x86_64", "platform_python_implementation": "CPython", "platform_release": "6",
        "platform_system": "Linux", "platform_version": "1", "python_full_version": "3.11.2",
        "python_version": "3.11", "sys_platform": "linux",
    }  # fmt: skip
    pins = pinned_requirements(linux)
    names = {p.split("==")[0].lower(): p.split("==")[1] for p in pins}
    for name, version in CLIENT_VERSIONS.items():
        assert names[name] == version
    assert "uv" not in names and "runmap" not in names  # client tools
    assert "uvicorn" not in names  # servlets serve HTTP on their own (runmap/server/http.py)
    assert "colorama" not in names  # tqdm wants it on Windows only
    windows = pinned_requirements({**linux, "sys_platform": "win32", "platform_system": "Windows", "os_name": "nt"})
    assert "colorama" in {p.split("==")[0].lower() for p in windows}  # a requirement's own, all the way down
    assert "uvloop" not in {p.split("==")[0].lower() for p in windows}
