"""Builds an env's requirements into a virtual environment, once per content hash.

The venv sees the client's own packages too (runmap itself, cloudpickle and
the servlet's stack) through a ``.pth`` file placed *after* its own
site-packages, so the env's requirements win where both have a package and
nothing has to be installed twice. ``uv`` is used when it is on the PATH
(seconds), else ``venv`` and ``pip``. Concurrent builds of one env (replicas
starting in parallel, or two clients) wait on a file lock and build it once.
A build prints one line on the client when it starts and one when it is done,
with how long it took.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import site
import subprocess
import sys
import time
from pathlib import Path

from runmap.envs.env import Env
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


def build_venv(env: Env) -> str:
    """The interpreter of ``env``'s virtual environment, built if need be."""
    root = cache_dir("envs") / env.content_hash
    python = venv_python(root)
    if (root / DONE_MARKER).exists():
        return str(python)
    with os.fdopen(open_private(root.parent / f"{env.content_hash}.lock", os.O_WRONLY | os.O_CREAT), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / DONE_MARKER).exists():
            started = time.monotonic()
            _say(f"runmap: building env {env.name!r} ({', '.join(env.reqs)}) into a virtual environment")
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
    uv = shutil.which("uv")
    python = venv_python(root)
    try:
        if uv:
            _run([uv, "venv", "--quiet", "--python", sys.executable, str(root)], env)
            install = [uv, "pip", "install", "--quiet", "--python", str(python)]
        else:
            _run([sys.executable, "-m", "venv", str(root)], env)
            install = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
        _run(install + pip_arguments(env.reqs, env.working_dir), env)
        _link_client_packages(python)
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    (root / DONE_MARKER).touch()


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
            f"building env {env.name!r} (requirements {list(env.reqs)}) failed: "
            f"{' '.join(cmd[:3])} ... exited with {exc.returncode}:\n{(exc.stderr or exc.stdout)[-2000:]}"
        ) from None
    except subprocess.TimeoutExpired:
        raise ClusterError(f"building env {env.name!r} took over {BUILD_TIMEOUT} s") from None
