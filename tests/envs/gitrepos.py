"""Git repositories made in a test, served as ``file://`` URLs or copied where a server serves them."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

GIT_ENV = {
    "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
    "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com",
    "GIT_CONFIG_GLOBAL": "/dev/null", "GIT_CONFIG_NOSYSTEM": "1", "PATH": "/usr/bin:/bin",
}


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, env=GIT_ENV, check=True, capture_output=True, text=True).stdout


def make_repo(root: Path, files: dict[str, str], branch: str = "main") -> tuple[str, str]:
    """A repository at ``root`` holding ``files`` on ``branch``: its file:// URL and its commit."""
    root.mkdir(parents=True, exist_ok=True)
    git(root, "init", "--quiet", "-b", branch)
    return f"file://{root}", commit(root, files)


def commit(root: Path, files: dict[str, str], message: str = "change") -> str:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    git(root, "add", "-A")
    git(root, "commit", "--quiet", "-m", message)
    return git(root, "rev-parse", "HEAD").strip()


JOKES_MODULE = '''
import sys


def joke_length(i):
    from importlib.metadata import version

    import pyjokes

    return i, len(pyjokes.get_joke()) > 0, version("pyjokes"), sys.prefix


class Greeter:
    def __init__(self, greeting):
        self.greeting = greeting

    def greet(self, name):
        return f"{self.greeting}, {name}"
'''

JOKES_FILES = {
    "src/gitonly_jokes/__init__.py": JOKES_MODULE,
    "requirements.txt": "pyjokes==0.8.3\n",
}


def bare_copy(repo: Path, dest: Path, owner: str | None = None) -> Path:
    """A bare clone of ``repo`` at ``dest`` (owned by the local user ``owner``, when given), as servers hold one."""
    subprocess.run(["git", "clone", "--quiet", "--bare", str(repo), str(dest)], env=GIT_ENV, check=True,
                   capture_output=True)  # fmt: skip
    if owner is not None:
        shutil.chown(dest, owner, owner)
        for path in dest.rglob("*"):
            shutil.chown(path, owner, owner)
    return dest


URL_MODULE = '''
import os


def double(x):
    return 2 * x


def where(_=None):
    return os.path.dirname(os.path.abspath(__file__))
'''
