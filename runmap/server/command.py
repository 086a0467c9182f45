"""The command line that starts a servlet process, on any host.

``python -m runmap.server`` would put the working directory first on the import
path, so a client started in a directory another user can write (a shared
project folder, ``/tmp``) would import that user's ``runmap/server`` instead of
its own, as the client's user and with the token on its stdin. Python 3.11's
``-P`` leaves the working directory off the path; older interpreters run a
one-line bootstrap that removes it before importing anything. The runner adds
the env's ``working_dir`` and the client's paths itself, after runmap's own
imports (:func:`runmap.server.runner.main`).
"""

from __future__ import annotations

_BOOTSTRAP = "import gc, sys; gc.disable(); del sys.path[0]; from runmap.server.runner import main; main()"


def servlet_command(python: str, version: tuple[int, int]) -> list[str]:
    """``python``'s argv for a servlet; ``version`` is that interpreter's (major, minor)."""
    if version >= (3, 11):
        return [python, "-P", "-m", "runmap.server"]
    return [python, "-c", _BOOTSTRAP]
