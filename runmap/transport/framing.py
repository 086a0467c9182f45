"""The wire format of call frames, shared by the client (http.py) and the servlet (server/frames.py).

A connection that presented the token may switch from HTTP to frames with an
HTTP/1.1 upgrade (``Connection: Upgrade``, ``Upgrade: runmap-frames/1``,
answered ``101``). It then carries calls only, one at a time:

    request   !BBHHHQ header: version, flags, token length, module length,
              method length, body length; then token, module, method (UTF-8),
              and the body (the pickled chunk, as in ``POST /call``)
    response  !HQ header: status, body length; then the body: the pickled
              outcome with 200, else JSON ``{"detail": ...}`` as over HTTP
"""

from __future__ import annotations

import struct

UPGRADE = b"runmap-frames/1"
VERSION = 1
IN_THREAD = 1  # flag: run in a thread, never on the loop (the ``?thread`` of HTTP)
REQUEST = struct.Struct("!BBHHHQ")
RESPONSE = struct.Struct("!HQ")
MAX_TOKEN = 1024
MAX_NAMES = 8192  # module and method names, together, in bytes


def request_head(token: bytes, module: bytes, method: bytes, body_length: int, flags: int = 0) -> bytes:
    """A call frame's header, token and names: the body follows them."""
    return REQUEST.pack(VERSION, flags, len(token), len(module), len(method), body_length) + token + module + method
