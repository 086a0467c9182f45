"""A stand-in for micromamba, mamba or conda: no conda channel is reachable from the test machines.

The script records the arguments it was run with (``conda-argv.txt``, one a line, its own path first)
and the environment file it was given (``conda-file.yml``) beside itself, then makes the prefix an
env: a venv of ``/usr/bin/python3`` (no pip in it, as a conda file without ``pip`` gives none), or,
with ``python_version``, a prefix whose ``bin/python`` only prints that version (an env of another
Python). What it stands in for is the solve and the download; everything around them is real.
"""

from __future__ import annotations

import shutil
from pathlib import Path

SCRIPT = r"""#!/bin/sh
here=$(dirname "$0")
printf '%s\n' "$0" "$@" > "$here/conda-argv.txt"
while [ $# -gt 0 ]; do
    case $1 in
        --prefix) prefix=$2; shift ;;
        --file) cp "$2" "$here/conda-file.yml"; shift ;;
    esac
    shift
done
"""
VENV = 'exec /usr/bin/python3 -m venv --without-pip "$prefix"\n'
OTHER_PYTHON = (
    'mkdir -p "$prefix/bin" && printf "#!/bin/sh\\necho %s\\n" > "$prefix/bin/python"\n'
    'chmod +x "$prefix/bin/python"\n'
)

CONDA_YML = "name: jokes\nchannels:\n  - conda-forge\ndependencies:\n  - python=3.11\n"


def fake_conda_tool(bin_dir: Path, name: str = "micromamba", python_version: str | None = None,
                    owner: str | None = None) -> Path:  # fmt: skip
    """Writes the stand-in as ``bin_dir/name`` (``bin_dir`` and the script owned by ``owner``, when given)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    tool = bin_dir / name
    tool.write_text(SCRIPT + (OTHER_PYTHON % python_version if python_version else VENV))
    tool.chmod(0o755)
    if owner is not None:
        for path in [bin_dir, *bin_dir.parents]:
            if path.owner() == owner or path == Path("/"):
                break
            shutil.chown(path, owner, owner)  # up to the owner's home, which is theirs already
        shutil.chown(tool, owner, owner)
    return tool


def recorded(tool: Path) -> tuple[list[str], str]:
    """What the stand-in at ``tool`` was last run with: its argv and the environment file's text."""
    return (tool.parent / "conda-argv.txt").read_text().splitlines(), (tool.parent / "conda-file.yml").read_text()
