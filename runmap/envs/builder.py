"""Builds an env's requirements into a virtual environment, once per content hash.

The venv sees the client's own packages too (runmap itself, cloudpickle and
the servlet's stack) through a ``.pth`` file placed *after* its own
site-packages, so the env's requirements win where both have a package and
nothing has to be installed twice. ``uv`` (the ``uv`` package's binary, else one
on the PATH) is used when there is one (seconds), else ``venv`` and ``pip``. A git
env's checkout is fetched first (:mod:`runmap.envs.git`) and its ``reqs_file``
installed beside ``reqs``; its ``conda_file`` is built with micromamba, mamba or
conda (:mod:`runmap.envs.conda`, the same code an SSH host's build runs). One build per :func:`build_key`: the env's
content hash (requirements, git commit), the Python version and the platform. Concurrent builds of one env (replicas
starting in parallel, or two clients) wait on a file lock and build it once.
A build prints one line on the client when it starts and one when it is done,
with how long it took.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import threading
import time
from pathlib import Path

from runmap.envs.env import Env
from runmap.envs.git import checkout
from runmap.exceptions import ClusterError
from runmap.paths import cache_dir, open_private

DONE_MARKER = ".runmap-built"
BUILD_TIMEOUT = 1800


def venv_python(root: Path) -> Path:
    return root / "bin" / "python"


def pip_arguments(reqs: tuple[str, ...], base: str | None = None) -> list[str]:
    """pip's arguments for ``reqs``: a path to an existing ``.txt`` file is ``-r file``."""
    args: list[str] = []
    for req in reqs:
        path = Path(base or os.getcwd(), req) if not os.path.isabs(req) else Path(req)
        if req.endswith(".txt") and path.is_file():
            args += ["-r", str(path)]
        else:
            args.append(req)
    return args


_uv_lock = threading.Lock()


def uv_binary() -> str | None:
    """The ``uv`` package's binary, else ``uv`` on the PATH, else None.

    Under a lock: ``uv.find_uv_bin`` reads ``sysconfig``, whose first use is not thread-safe.
    """
    with _uv_lock:
        try:
            import uv  # type: ignore[import-not-found,unused-ignore]

            found = str(uv.find_uv_bin())
            if os.path.isfile(found):
                return found
        except (ImportError, FileNotFoundError, AttributeError):
            pass
        return shutil.which("uv")


def build_key(env: Env) -> str:
    """One build per (requirements, git commit, Python version, platform): the env's cache directory name."""
    body = f"{env.content_hash}\0{sys.implementation.name}-{sys.version_info[0]}.{sys.version_info[1]}\0"
    body += f"{sysconfig.get_platform()}\0{sys.executable}"
    return hashlib.sha256(body.encode()).hexdigest()[:16]


def _described(env: Env) -> str:
    parts = list(env.reqs)
    if env.git is not None and env.git.reqs_file:
        parts.append(f"{env.git.reqs_file} of {env.git.url}@{(env.git.commit or '')[:12]}")
    if env.git is not None and env.git.conda_file:
        parts.append(f"conda {env.git.conda_file} of {env.git.url}@{(env.git.commit or '')[:12]}")
    return ", ".join(parts)


def build_venv(env: Env) -> str:
    """The interpreter of ``env``'s virtual environment, built if need be."""
    key = build_key(env)
    root = cache_dir("envs") / key
    python = venv_python(root)
    if (root / DONE_MARKER).exists():
        return str(python)
    with os.fdopen(open_private(root.parent / f"{key}.lock", os.O_WRONLY | os.O_CREAT), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / DONE_MARKER).exists():
            started = time.monotonic()
            kind = "a conda environment" if env.git is not None and env.git.conda_file else "a virtual environment"
            _say(f"runmap: building env {env.name!r} ({_described(env)}) into {kind}")
            _build(env, root)
            _say(f"runmap: built env {env.name!r} in {time.monotonic() - started:.1f} s")
    return str(python)


def _say(line: str) -> None:
    """One line on the client's stdout, above any progress bar."""
    from runmap.logs import _print  # tqdm.write, as replicas' lines are

    _print(line)


def _build(env: Env, root: Path) -> None:
    if root.exists():
        shutil.rmtree(root)  # a half-built env from an interrupted build
    reqs = pip_arguments(env.reqs, env.working_dir)
    conda_file = None
    if env.git is not None:
        repo = checkout(env.git)
        if env.git.reqs_file:
            reqs += ["-r", str(repo / env.git.reqs_file)]
        if env.git.conda_file:
            conda_file = repo / env.git.conda_file
    uv = uv_binary()
    python = venv_python(root)
    try:
        if conda_file is not None:
            from runmap.envs.conda import conda_tool, create_command

            _run(create_command(conda_tool(), str(root), str(conda_file)), env)
            _check_python_version(python, env)
        elif uv:
            _run([uv, "venv", "--quiet", "--python", sys.executable, str(root)], env)
        else:
            _run([sys.executable, "-m", "venv", str(root)], env)
        # uv installs into any interpreter (a conda env's too, which has pip only if its file lists it).
        if uv:
            install = [uv, "pip", "install", "--quiet", "--python", str(python)]
        else:
            install = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
        if reqs:
            _run(install + reqs, env)
        _link_client_packages(python)
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    (root / DONE_MARKER).touch()


def _check_python_version(python: Path, env: Env) -> None:
    """A conda env must run the client's Python minor version: functions travel pickled by value."""
    from runmap.envs.conda import python_mismatch

    out = subprocess.run(
        [str(python), "-c", "import sys; print('%d.%d.%d' % sys.version_info[:3])"],
        capture_output=True, text=True, check=False,
    )
    why = python_mismatch(out.stdout.strip(), f"{sys.version_info[0]}.{sys.version_info[1]}")
    if why is not None:
        raise ClusterError(f"env {env.name!r}: {why}")


def _link_client_packages(python: Path) -> None:
    """Lets the venv import the client's packages, after its own."""
    out = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    )
    purelib = Path(out.stdout.strip())
    client_paths = [p for p in [*site.getsitepackages(), site.getusersitepackages()] if os.path.isdir(p)]
    # Editable installs add their own .pth files to the client's site-packages:
    # `import site; site.addsitedir(...)` processes those too.
    lines = [f"import site; site.addsitedir({p!r})" for p in client_paths]
    (purelib / "zz-runmap-client.pth").write_text("\n".join(lines) + "\n")


def _run(cmd: list[str], env: Env) -> None:
    try:
        subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=BUILD_TIMEOUT)
    except subprocess.CalledProcessError as exc:
        raise ClusterError(
            f"building env {env.name!r} (requirements {_described(env)}) failed: "
            f"{' '.join(cmd[:3])} ... exited with {exc.returncode}:\n{(exc.stderr or exc.stdout)[-2000:]}"
        ) from None
    except subprocess.TimeoutExpired:
        raise ClusterError(f"building env {env.name!r} took over {BUILD_TIMEOUT} s") from None
