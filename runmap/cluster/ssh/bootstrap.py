"""A host prepared once for servlets: the client's runmap, pinned dependencies, an env's requirements.

:func:`bootstrap` builds, on the host and from the host's own ``python3``, a
virtual environment holding

- the client's exact runmap source: runmap is not on PyPI, so the client's
  ``runmap`` package directory travels as a tar stream, keyed by a hash of its
  files, unpacked once into ``<cache>/src/<hash>/`` and put on the env's path
  by a ``.pth`` file (a ``runmap-<version>.dist-info`` beside it lets
  ``importlib.metadata`` find its version);
- the client's exact versions of runmap's runtime dependencies, all the way
  down (``cloudpickle``, ``httptools``, ``uvloop``, ``tqdm``...), read with :mod:`importlib.metadata`
  and pinned ``name==version`` (markers are evaluated for the host's Python
  when ``packaging`` is importable on the client);
- the env's own requirements (``reqs``).

The host's layout, under the *remote* user's ``${XDG_CACHE_HOME:-$HOME/.cache}/runmap``
(mode 0700, refused if it is a symlink, someone else's, or writable by others)::

    src/<source hash>/runmap/...                 the client's package, as it was
    src/<source hash>/runmap-<v>.dist-info/
    bin/uv-<hash of the binary>                  the client's uv, when the host can run it
    envs/<env key>/                              the venv; .runmap-built written last
    envs/<env key>.lock                          flock: one build at a time per env

``<env key>`` hashes the source hash, the pins, ``reqs`` and the host's
interpreter (path, version, implementation, platform, libc), so a second
cluster on the same host with the same env starts without building anything:
one round trip (:data:`PROBE`) finds the env done and reads the host's facts
(CPUs, memory, GPUs) at the same time. A build is a second round trip whose
stdin carries what the host lacks (the source, uv) as a tar stream; under the
env's lock it builds with ``uv`` (the client's own binary, copied once, when
the client has one and the host runs the same OS on the same machine type;
it trusts the host's certificate store, as the host's pip does, unless the
user's environment sets ``UV_SYSTEM_CERTS``, ``UV_NATIVE_TLS`` or ``SSL_CERT_FILE``)
or else ``python3 -m venv`` and ``pip``; an env with a conda file is created by the
host's micromamba, mamba or conda instead, with the client's own :mod:`runmap.envs.conda`
(loaded from the shipped source), its Python checked against the client's minor version, and
the pins and ``reqs`` installed into it the same way. It checks that the env imports runmap,
cloudpickle and httptools, and writes the done marker last. A build that fails
leaves no env behind and raises :class:`~runmap.exceptions.ClusterError`
naming the host and quoting the tail of the tool's output.

Nothing is printed; :class:`HostInfo` tells what was found and how long it took.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import io
import json
import os
import re
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runmap.cluster.ssh.connection import SSHConnection, remote_python
from runmap.exceptions import ClusterError, ConfigError

PROBE_TIMEOUT = 120.0
BUILD_TIMEOUT = 1800.0
DONE_MARKER = ".runmap-built"
RESULT_PREFIX = "runmap-json:"
# Tools of the client, not of a servlet: never installed on a host.
NOT_PINNED = frozenset({"runmap", "uv", "pip", "setuptools", "wheel"})
# runmap's runtime requirements when it runs from a source tree with no installed metadata.
FALLBACK_REQUIREMENTS = ("cloudpickle", "httptools", "uvloop; sys_platform != 'win32'", "tqdm")
IMPORT_CHECK = "import runmap, cloudpickle, httptools"
MIN_PYTHON = (3, 10)


@dataclass(frozen=True)
class HostInfo:
    """A host prepared by :func:`bootstrap`.

    Attributes:
        python: the remote path of the env's interpreter.
        python_version: its ``(major, minor, micro)``; for a conda env, the client's major and minor
            version (its build checked the env's against them) and micro 0.
        cpus: CPUs the host gives its user's processes (``sched_getaffinity``, else ``os.cpu_count``).
        memory_gb: the host's memory (``MemTotal``), in GiB.
        gpus: NVIDIA GPUs (``nvidia-smi -L``), 0 without the tool.
        platform: ``sysconfig.get_platform()`` of the host's Python (``linux-x86_64``).
        built: whether this call built the env (False: it was in the host's cache).
        seconds: how long the call took.
        host: the host, as the connection names it.
        env_dir: the env's remote directory.
        installer: ``"uv"`` or ``"pip"`` if this call built the env (``"micromamba+uv"``... for a
            conda env), else ``""``.
        timings: seconds per step (``probe``, ``ship``, ``uv venv``, ``uv pip install``...).
    """

    python: str
    python_version: tuple[int, int, int]
    cpus: int
    memory_gb: float
    gpus: int
    platform: str
    built: bool
    seconds: float
    host: str = ""
    env_dir: str = ""
    installer: str = ""
    timings: Mapping[str, float] = field(default_factory=dict, compare=False, hash=False)


# ---------------------------------------------------------------------- on the host

# argv[1]: JSON {"cache": path or null, "src": source hash, "uv": binary name or null}.
# Prints one line: RESULT_PREFIX + JSON of the host's facts and of what its cache holds.
PROBE = r"""
import json, os, platform, shutil, stat, subprocess, sys, sysconfig
a = json.loads(sys.argv[1])
def fail(message):
    print("runmap-json:" + json.dumps({"error": message}), flush=True)
    sys.exit(0)
home = os.path.expanduser("~")
if a["cache"]:
    cache = os.path.join(home, os.path.expanduser(a["cache"]))
else:
    base = os.environ.get("XDG_CACHE_HOME", "")
    cache = os.path.join(base if os.path.isabs(base) else os.path.join(home, ".cache"), "runmap")
try:
    os.makedirs(cache, mode=0o700, exist_ok=True)
    st = os.lstat(cache)
except OSError as e:
    fail("cannot create the cache directory %s: %s" % (cache, e))
if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
    fail("refusing the cache directory %s: it is a symlink or not a directory" % cache)
if st.st_uid != os.getuid():
    fail("refusing the cache directory %s: it belongs to uid %d, not to you (uid %d)" % (cache, st.st_uid, os.getuid()))
if st.st_mode & 0o022:
    fail("refusing the cache directory %s: it is writable by others (mode %o)" % (cache, stat.S_IMODE(st.st_mode)))
try:
    cpus = len(os.sched_getaffinity(0))
except (AttributeError, OSError):
    cpus = os.cpu_count() or 1
memory = 0
try:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                memory = int(line.split()[1]) * 1024
except OSError:
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        pass
gpus = 0
if shutil.which("nvidia-smi"):
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout
        gpus = sum(1 for line in out.splitlines() if line.startswith("GPU "))
    except (OSError, subprocess.SubprocessError):
        pass
try:
    libc = os.confstr("CS_GNU_LIBC_VERSION") or ""
except (ValueError, OSError, AttributeError):
    libc = ""
impl = sys.implementation
envs = os.path.join(cache, "envs")
done = []
if os.path.isdir(envs):
    done = [n for n in os.listdir(envs) if os.path.isfile(os.path.join(envs, n, ".runmap-built"))]
markers = {
    "implementation_name": impl.name,
    "implementation_version": "%d.%d.%d" % impl.version[:3],
    "os_name": os.name,
    "platform_machine": platform.machine(),
    "platform_python_implementation": platform.python_implementation(),
    "platform_release": platform.release(),
    "platform_system": platform.system(),
    "platform_version": platform.version(),
    "python_full_version": platform.python_version(),
    "python_version": "%d.%d" % sys.version_info[:2],
    "sys_platform": sys.platform,
}
print("runmap-json:" + json.dumps({
    "cache": cache,
    "python": sys.executable,
    "python_real": os.path.realpath(sys.executable),
    "version": list(sys.version_info[:3]),
    "implementation": impl.name,
    "platform": sysconfig.get_platform(),
    "sys_platform": sys.platform,
    "machine": platform.machine(),
    "libc": libc,
    "cpus": cpus,
    "memory": memory,
    "gpus": gpus,
    "src": os.path.isdir(os.path.join(cache, "src", a["src"], "runmap")),
    "uv": bool(a["uv"]) and os.access(os.path.join(cache, "bin", a["uv"]), os.X_OK),
    "done": done,
    "markers": markers,
}), flush=True)
"""

# argv[1]: base64 of JSON {"cache", "key", "src", "python", "pins", "reqs", "uv": name or null,
#          "conda": null or {"name", "text" of an environment.yml, "client_python": "3.11"}}.
# stdin: a tar stream of what the host lacks (src/<hash>/..., bin/uv-<hash>).
BUILD = r"""
import base64, fcntl, json, os, shutil, subprocess, sys, tarfile, tempfile, time
a = json.loads(base64.b64decode(sys.argv[1]))
cache, key = a["cache"], a["key"]
timings = {}
def out(**kw):
    kw["timings"] = timings
    print("runmap-json:" + json.dumps(kw), flush=True)
    sys.exit(0)
started = time.monotonic()
incoming = tempfile.mkdtemp(prefix=".incoming-", dir=cache)
try:
    with tarfile.open(fileobj=sys.stdin.buffer, mode="r|") as tf:
        if hasattr(tarfile, "data_filter"):
            tf.extractall(incoming, filter="data")
        else:
            tf.extractall(incoming)
    for kind in ("src", "bin"):
        d = os.path.join(incoming, kind)
        if os.path.isdir(d):
            os.makedirs(os.path.join(cache, kind), mode=0o700, exist_ok=True)
            for name in os.listdir(d):
                try:
                    os.rename(os.path.join(d, name), os.path.join(cache, kind, name))
                except OSError:
                    pass  # another build put the same there first
finally:
    shutil.rmtree(incoming, ignore_errors=True)
timings["unpack"] = time.monotonic() - started
envs = os.path.join(cache, "envs")
os.makedirs(envs, mode=0o700, exist_ok=True)
env = os.path.join(envs, key)
marker = os.path.join(env, ".runmap-built")
src = os.path.join(cache, "src", a["src"])
lock = open(env + ".lock", "a")
started = time.monotonic()
fcntl.flock(lock, fcntl.LOCK_EX)
timings["lock"] = time.monotonic() - started
if os.path.exists(marker):
    out(ok=True, built=False, env=env)
if os.path.lexists(env):
    shutil.rmtree(env)  # what an interrupted build left
environ = dict(os.environ, UV_PYTHON_DOWNLOADS="never", PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
# The host's certificate store, as its pip uses (a proxy's CA is there), unless the user chose otherwise.
if not any(v in environ for v in ("UV_SYSTEM_CERTS", "UV_NATIVE_TLS", "SSL_CERT_FILE")):
    environ["UV_SYSTEM_CERTS"] = environ["UV_NATIVE_TLS"] = "1"
def step(name, argv, timeout=1800):
    started = time.monotonic()
    try:
        r = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           env=environ, cwd=cache, timeout=timeout)
        code, output = r.returncode, r.stdout.decode(errors="replace")
    except subprocess.TimeoutExpired as e:
        code, output = "timeout", (e.stdout or b"").decode(errors="replace") + "\n(took over %d s)" % timeout
    except OSError as e:
        code, output = "error", str(e)
    timings[name] = time.monotonic() - started
    if code != 0:
        shutil.rmtree(env, ignore_errors=True)
        out(ok=False, step=name, code=code, output=output[-3000:], argv=" ".join(argv[:4]))
    return output
python = os.path.join(env, "bin", "python")
uv = os.path.join(cache, "bin", a["uv"]) if a["uv"] else None
note = ""
if uv:
    try:
        subprocess.run([uv, "--version"], capture_output=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError) as e:
        note, uv = "the copied uv does not run here (%s): built with venv and pip" % e, None
conda_file = a.get("conda")
if conda_file:
    # The client's own runmap/envs/conda.py (shipped above): the tool search and argv of a local build.
    import importlib.util
    spec = importlib.util.spec_from_file_location("runmap_conda", os.path.join(src, "runmap", "envs", "conda.py"))
    conda = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conda)
    tool = conda.find_tool()
    if tool is None:
        out(error=conda.missing_message())
    yml = env + ".environment.yml"
    with open(yml, "w") as f:
        f.write(conda_file["text"])
    try:
        step(os.path.basename(tool) + " create", conda.create_command(tool, env, yml))
    finally:
        os.unlink(yml)
    version = step("python version", [python, "-c", "import sys; print('%d.%d.%d' % sys.version_info[:3])"]).strip()
    why = conda.python_mismatch(version, conda_file["client_python"])
    if why:
        shutil.rmtree(env, ignore_errors=True)
        out(error="env of %s: %s" % (conda_file["name"], why))
if uv:
    installer = "uv"
    if not conda_file:
        step("uv venv", [uv, "venv", "--quiet", "--python", a["python"], env])
    step("uv pip install", [uv, "pip", "install", "--quiet", "--python", python] + a["pins"] + a["reqs"])
else:
    installer = "pip"
    if not conda_file:
        step("venv", [a["python"], "-m", "venv", env])
    step("pip install", [python, "-m", "pip", "install", "--quiet"] + a["pins"] + a["reqs"])
if conda_file:
    installer = os.path.basename(tool) + "+" + installer
purelib = step("site-packages", [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).strip()
with open(os.path.join(purelib, "_runmap_source.pth"), "w") as f:
    f.write(src + "\n")
step("import check", [python, "-c", a["check"] + "; assert runmap.__file__.startswith(%r), runmap.__file__" % src])
with open(os.path.join(env, "runmap-env.json"), "w") as f:
    json.dump({k: a.get(k) for k in ("src", "python", "pins", "reqs", "conda")}, f, indent=1)
with open(marker, "w") as f:
    f.write(installer + "\n")
out(ok=True, built=True, env=env, installer=installer, note=note)
"""


# ---------------------------------------------------------------------- on the client


@dataclass(frozen=True)
class Source:
    """The client's runmap package: its files, their hash, its version."""

    root: Path
    files: tuple[tuple[str, bytes], ...]  # (path relative to root's parent: "runmap/__init__.py", content)
    hash: str
    version: str


def runmap_source() -> Source:
    """The client's ``runmap`` package directory, read and hashed (``__pycache__`` and ``.pyc`` left out).

    What is shipped is what was hashed, even if a file changes meanwhile.
    """
    import runmap

    root = Path(runmap.__file__).resolve().parent
    version = _runmap_version()
    digest = hashlib.sha256(f"runmap {version}\0".encode())
    files = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root.parent)
        if "__pycache__" in rel.parts or path.suffix in (".pyc", ".pyo") or not path.is_file():
            continue
        content = path.read_bytes()
        files.append((rel.as_posix(), content))
        digest.update(rel.as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(content).digest())
    return Source(root, tuple(files), digest.hexdigest()[:16], version)


def _runmap_version() -> str:
    try:
        return importlib.metadata.version("runmap")
    except importlib.metadata.PackageNotFoundError:
        import runmap

        return str(getattr(runmap, "__version__", "0"))


_REQ_RE = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[([^\]]*)\])?")
_EXTRA_RE = re.compile(r"""extra\s*==\s*['"]([^'"]+)['"]""")


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pinned_requirements(markers: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """``name==version`` of every distribution runmap needs at run time, as installed on this client.

    Follows runmap's requirements (and the extras they ask for) through the
    installed metadata. A requirement is followed if its marker holds for ``markers`` (the
    host's environment) when ``packaging`` can evaluate it, else if it names no extra but
    one asked for; one that is not installed here is left to the host's installer.
    """
    built = _built_with()
    if built is not None:
        return built
    try:
        root_reqs: Sequence[str] = [
            r for r in importlib.metadata.requires("runmap") or () if "extra" not in r.partition(";")[2]
        ]
    except importlib.metadata.PackageNotFoundError:
        root_reqs = FALLBACK_REQUIREMENTS
    pins: dict[str, str] = {}
    seen: set[tuple[str, frozenset[str]]] = set()
    queue = [_parse(r) for r in root_reqs if _wanted(r, frozenset(), markers)]
    while queue:
        name, extras = queue.pop()
        key = (_normalize(name), extras)
        if key in seen or key[0] in NOT_PINNED:
            continue
        seen.add(key)
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        pins[key[0]] = f"{dist.metadata['Name']}=={dist.version}"
        queue.extend(_parse(r) for r in dist.requires or () if _wanted(r, extras, markers))
    return tuple(sorted(pins.values(), key=str.lower))


def _built_with() -> tuple[str, ...] | None:
    """The pins of the env this process runs in, if :func:`bootstrap` built it (runmap runs from
    shipped source there, without its metadata). A servlet on a host that reaches other hosts (a Mapper placed
    on the cluster) then asks for the very env the client built on each: it is found in their caches."""
    try:
        with open(os.path.join(sys.prefix, "runmap-env.json")) as f:
            return tuple(json.load(f)["pins"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _parse(requirement: str) -> tuple[str, frozenset[str]]:
    m = _REQ_RE.match(requirement)
    if m is None:
        raise ConfigError(f"cannot read the requirement {requirement!r}")
    extras = frozenset(e.strip() for e in (m.group(2) or "").split(",") if e.strip())
    return m.group(1), extras


def _wanted(requirement: str, extras: frozenset[str], markers: Mapping[str, str] | None) -> bool:
    marker = requirement.partition(";")[2].strip()
    if not marker:
        return True
    if markers is not None:
        try:
            from packaging.markers import Marker

            parsed = Marker(marker)
            return any(parsed.evaluate({**markers, "extra": e}) for e in (extras or {""}))
        except Exception:  # noqa: BLE001 - no packaging, or a marker it cannot read: fall back
            pass
    named = set(_EXTRA_RE.findall(marker))
    return not named or bool(named & extras)


def env_key(
    source_hash: str, pins: Iterable[str], reqs: Iterable[str], host: Mapping[str, Any], conda_file: str | None = None
) -> str:
    """The name of an env on a host: what it holds, and the interpreter it is built from.

    A conda env's interpreter is the conda file's: its text and the client's Python minor version
    (which the build checks the env's against) take the host interpreter's place.
    """
    facts: dict[str, Any] = {
        "src": source_hash,
        "pins": sorted(pins),
        "reqs": list(reqs),
        "python": host["python_real"],
        "version": list(host["version"]),
        "implementation": host["implementation"],
        "platform": host["platform"],
        "libc": host["libc"],
    }
    if conda_file is not None:
        facts.update(python="conda", version=list(sys.version_info[:2]), conda=conda_file)
    body = json.dumps(facts, sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()[:16]


_uv_lock = threading.Lock()


def uv_binary() -> Path | None:
    """The client's ``uv`` executable: the ``uv`` package's, else one on the PATH.

    Under a lock: ``uv.find_uv_bin`` reads ``sysconfig``, whose first use is not
    thread-safe in 3.11 (a host bootstrapped in parallel saw ``EXE`` as None).
    """
    with _uv_lock:
        return _uv_binary()


def _uv_binary() -> Path | None:
    try:
        import uv  # type: ignore[import-not-found,unused-ignore]

        found = Path(uv.find_uv_bin())
        if found.is_file():
            return found
    except (ImportError, FileNotFoundError, AttributeError):
        pass
    import shutil

    which = shutil.which("uv")
    return Path(which) if which else None


_file_hashes: dict[tuple[str, int, int], str] = {}
_file_hashes_lock = threading.Lock()


def _file_hash(path: Path) -> str:
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    with _file_hashes_lock:
        known = _file_hashes.get(key)
    if known is None:
        digest = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        known = digest.hexdigest()[:16]
        with _file_hashes_lock:
            _file_hashes[key] = known
    return known


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes, mode: int = 0o600) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = mode
    info.mtime = int(time.time())
    tar.addfile(info, io.BytesIO(data))


def _shipment(source: Source, ship_source: bool, uv: tuple[Path, str] | None) -> Any:
    """A temporary file holding the tar stream of what the host lacks (maybe nothing: an empty archive)."""
    f = tempfile.TemporaryFile()
    with tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
        if ship_source:
            base = f"src/{source.hash}"
            for rel, content in source.files:
                _add_bytes(tar, f"{base}/{rel}", content, 0o600)
            meta = f"Metadata-Version: 2.1\nName: runmap\nVersion: {source.version}\n"
            _add_bytes(tar, f"{base}/runmap-{source.version}.dist-info/METADATA", meta.encode())
        if uv is not None:
            path, name = uv
            info = tar.gettarinfo(str(path), arcname=f"bin/{name}")
            info.mode, info.uid, info.gid, info.uname, info.gname = 0o700, 0, 0, "", ""
            with path.open("rb") as data:
                tar.addfile(info, data)
    f.seek(0)
    return f


def _result(completed: Any, what: str, host: str) -> dict[str, Any]:
    """The ``runmap-json:`` line a host script printed, or a ClusterError quoting what it said."""
    stdout = completed.stdout.decode(errors="replace")
    for line in reversed(stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            result: dict[str, Any] = json.loads(line[len(RESULT_PREFIX) :])
            if "error" in result:
                raise ClusterError(f"preparing {host}: {result['error']}")
            return result
    said = (completed.stderr.decode(errors="replace") + stdout).strip()[-2000:]
    raise ClusterError(f"preparing {host}: the {what} failed (exit {completed.returncode}):\n{said or '(no output)'}")


def bootstrap(
    conn: SSHConnection,
    reqs: tuple[str, ...] = (),
    *,
    python: str = "python3",
    cache: str | None = None,
    use_uv: bool = True,
    conda_file: tuple[str, str] | None = None,
) -> HostInfo:
    """Prepares ``conn``'s host for servlets (once per env: see the module docstring).

    Args:
        conn: the host's connection.
        reqs: the env's requirement specifiers (``"numpy>=2"``), installed beside the pins.
        conda_file: ``(name, text)`` of an ``environment.yml`` the env is built from, with the
            host's micromamba, mamba or conda (found as :mod:`runmap.envs.conda` finds it locally),
            in place of a venv of the host's ``python``; the pins and ``reqs`` go in after.
        python: the host's interpreter to build from (found on the remote ``PATH``).
        cache: the remote cache directory, absolute or relative to the remote home;
            default ``${XDG_CACHE_HOME:-$HOME/.cache}/runmap``.
        use_uv: build with the client's ``uv`` when the host can run it; False: ``venv`` and ``pip``.

    Raises:
        ClusterError: the host has no usable Python or cache directory, or the build failed
            (the message names the host and quotes the tool's output).
    """
    if isinstance(reqs, str):
        raise ConfigError(f"reqs must be a tuple of requirement strings, not the string {reqs!r}")
    reqs = tuple(reqs)
    started = time.monotonic()
    timings: dict[str, float] = {}
    source = runmap_source()
    client_uv = uv_binary() if use_uv else None
    uv_name = f"uv-{_file_hash(client_uv)}" if client_uv is not None else None
    args = json.dumps({"cache": cache, "src": source.hash, "uv": uv_name})
    probe = _result(conn.run(remote_python(python, PROBE, args), timeout=PROBE_TIMEOUT), "probe", conn.host)
    timings["probe"] = time.monotonic() - started
    version = tuple(int(v) for v in probe["version"][:3])
    if version < MIN_PYTHON:
        raise ClusterError(
            f"preparing {conn.host}: its {python} is Python {'.'.join(map(str, version))} ({probe['python']}); "
            f"runmap needs {'.'.join(map(str, MIN_PYTHON))} or newer: pass python='python3.X' to use another"
        )
    pins = pinned_requirements(probe["markers"])
    key = env_key(source.hash, pins, reqs, probe, conda_file[1] if conda_file else None)
    env_dir = f"{probe['cache']}/envs/{key}"
    built = False
    installer = ""
    if key not in probe["done"]:
        same_machine = probe["sys_platform"] == sys.platform and probe["machine"] == os.uname().machine
        ship_uv = client_uv is not None and uv_name is not None and same_machine and not probe["uv"]
        usable_uv = uv_name if client_uv is not None and same_machine else None
        build_args = {
            "cache": probe["cache"],
            "key": key,
            "src": source.hash,
            "python": probe["python"],
            "pins": list(pins),
            "reqs": list(reqs),
            "uv": usable_uv,
            "check": IMPORT_CHECK,
            "conda": None if conda_file is None else {
                "name": conda_file[0], "text": conda_file[1],
                "client_python": f"{sys.version_info[0]}.{sys.version_info[1]}",
            },
        }
        encoded = base64.b64encode(json.dumps(build_args).encode()).decode()
        shipped = time.monotonic()
        uv_part = (client_uv, uv_name) if ship_uv and client_uv is not None and uv_name is not None else None
        with _shipment(source, not probe["src"], uv_part) as stream:
            timings["pack"] = time.monotonic() - shipped
            completed = conn.run(remote_python(python, BUILD, encoded), input=stream, timeout=BUILD_TIMEOUT)
        result = _result(completed, "build", conn.host)
        timings.update({name: float(t) for name, t in result.get("timings", {}).items()})
        timings["build"] = time.monotonic() - shipped
        if not result["ok"]:
            raise ClusterError(
                f"preparing {conn.host}: {result['step']} failed ({result['code']}) building an env of "
                f"runmap {source.version} with requirements {list(reqs)} (`{result['argv']} ...`). "
                f"Its output ends with:\n{result['output'].strip()}"
            )
        built = bool(result["built"])
        installer = str(result.get("installer", "")) if built else ""
    if conda_file is not None:  # the env's own Python, whose minor version its build checked is the client's
        version = (sys.version_info[0], sys.version_info[1], 0)
    return HostInfo(
        python=f"{env_dir}/bin/python",
        python_version=(version[0], version[1], version[2]),
        cpus=int(probe["cpus"]),
        memory_gb=int(probe["memory"]) / 2**30,
        gpus=int(probe["gpus"]),
        platform=str(probe["platform"]),
        built=built,
        seconds=time.monotonic() - started,
        host=conn.host,
        env_dir=env_dir,
        installer=installer,
        timings=timings,
    )


# ---------------------------------------------------------------------- shipped directories

IGNORE_FILE = ".runmapignore"
ALWAYS_IGNORED = (".git", "__pycache__")
SHIPPED_MARKER = ".runmap-shipped"

# argv[1]: JSON {"dest": path}. stdin: a tar stream of the directory's files.
SHIP = r"""
import json, os, shutil, sys, tarfile, tempfile
a = json.loads(sys.argv[1])
dest = a["dest"]
parent = os.path.dirname(dest)
os.makedirs(parent, mode=0o700, exist_ok=True)
if os.path.exists(os.path.join(dest, ".runmap-shipped")):
    sys.stdin.buffer.read()
    print("runmap-json:" + json.dumps({"sent": False}), flush=True)
    sys.exit(0)
incoming = tempfile.mkdtemp(prefix=".incoming-", dir=parent)
try:
    with tarfile.open(fileobj=sys.stdin.buffer, mode="r|") as tf:
        if hasattr(tarfile, "data_filter"):
            tf.extractall(incoming, filter="data")
        else:
            tf.extractall(incoming)
    open(os.path.join(incoming, ".runmap-shipped"), "w").close()
    if os.path.lexists(dest):
        shutil.rmtree(dest)  # an interrupted shipment
    try:
        os.rename(incoming, dest)
    except OSError:
        pass  # another shipment of the same content got there first
finally:
    shutil.rmtree(incoming, ignore_errors=True)
print("runmap-json:" + json.dumps({"sent": True}), flush=True)
"""


def ignored_patterns(root: Path) -> list[str]:
    """The patterns of ``root``'s ``.runmapignore`` (one a line, ``#`` comments), and ``.git``, ``__pycache__``."""
    patterns = list(ALWAYS_IGNORED)
    ignore = root / IGNORE_FILE
    if ignore.is_file():
        for line in ignore.read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                patterns.append(line.strip("/"))
    return patterns


def directory_files(root: Path) -> tuple[str, list[tuple[str, Path]]]:
    """The files of ``root`` that are shipped (relative path, path) and their content hash."""
    import fnmatch

    patterns = ignored_patterns(root)

    def skipped(rel: str) -> bool:
        parts = rel.split("/")
        return any(
            fnmatch.fnmatch(rel, p) or any(fnmatch.fnmatch(part, p) for part in parts) for p in patterns
        )

    digest = hashlib.sha256(b"runmap dir\0")
    files: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        base = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not skipped((base / d).relative_to(root).as_posix()))
        for name in sorted(filenames):
            path = base / name
            rel = path.relative_to(root).as_posix()
            if skipped(rel) or not path.is_file() or path.is_symlink():
                continue
            files.append((rel, path))
            digest.update(rel.encode() + b"\0" + (b"x" if os.access(path, os.X_OK) else b"-"))
            digest.update(bytes.fromhex(_content_hash(path)))
    return digest.hexdigest()[:16], files


def _content_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def ship_directory(conn: SSHConnection, root: Path, cache: str) -> tuple[str, bool]:
    """Ships ``root``'s files (less ``.git``, ``__pycache__`` and ``.runmapignore``'s paths) to the host,
    once per content hash: ``<cache>/dirs/<hash>``. Returns that remote path, and whether it was sent now.
    """
    content, files = directory_files(root)
    dest = f"{cache}/dirs/{content}"
    probe = conn.run(["test", "-f", f"{dest}/{SHIPPED_MARKER}"], timeout=PROBE_TIMEOUT)
    if probe.returncode == 0:
        return dest, False
    with tempfile.TemporaryFile() as f:
        with tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for rel, path in files:
                info = tar.gettarinfo(str(path), arcname=rel)
                info.mode = 0o700 if os.access(path, os.X_OK) else 0o600
                info.uid, info.gid, info.uname, info.gname = 0, 0, "", ""
                with path.open("rb") as data:
                    tar.addfile(info, data)
        f.seek(0)
        completed = conn.run(remote_python("python3", SHIP, json.dumps({"dest": dest})), input=f, timeout=BUILD_TIMEOUT)
    result = _result(completed, f"shipment of {root}", conn.host)
    return dest, bool(result["sent"])
