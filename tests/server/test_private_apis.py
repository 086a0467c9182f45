"""What the servlet leans on that no documentation promises, so that an upgrade that breaks it fails here, by name.

runmap/server/http.py drives httptools' request parser through its callbacks and
relies on how it reports an upgrade, an error in a callback and bytes after a
last request; runmap/server/app.py swaps the running loop with
``asyncio.events._set_running_loop``; runmap/server/auth.py compares tokens with
``_operator._compare_digest`` (what ``hmac.compare_digest`` is when hashlib is
absent), so that a servlet need not import hmac, hashlib and OpenSSL's libcrypto.
"""

from __future__ import annotations

import asyncio
import inspect
from typing import Any

import httptools
import pytest


class Recorder:
    """The parser callbacks runmap/server/http.py defines, recording what they are given."""

    def __init__(self) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self.events: list[Any] = []

    def on_message_begin(self) -> None:
        self.events.append("begin")

    def on_url(self, url: bytes) -> None:
        self.events.append(("url", url))

    def on_header(self, name: bytes, value: bytes) -> None:
        self.events.append(("header", name, value))

    def on_headers_complete(self) -> None:
        p = self.parser
        self.events.append(("head", p.get_method(), p.get_http_version(), p.should_keep_alive(), p.should_upgrade()))

    def on_body(self, body: bytes) -> None:
        self.events.append(("body", body))

    def on_message_complete(self) -> None:
        self.events.append("end")


def test_the_parser_calls_back_once_a_header_is_whole_and_gives_the_url_in_pieces() -> None:
    r = Recorder()
    for piece in (b"GET /a", b"b?q=1 HTTP/1.1\r\nHo", b"st: x", b"y  \r\nX-Empty:\r\n\r\n"):
        r.parser.feed_data(piece)
    assert r.events == [
        "begin",
        ("url", b"/a"),
        ("url", b"b?q=1"),
        ("header", b"Host", b"xy  "),  # as sent: trailing whitespace kept, the name not lowercased
        ("header", b"X-Empty", b""),
        ("head", b"GET", "1.1", True, False),
        "end",
    ]
    url = httptools.parse_url(b"/a%2Fb?q=1")
    assert (url.path, url.query) == (b"/a%2Fb", b"q=1")


def test_the_parser_decodes_a_chunked_body_and_tells_keep_alive() -> None:
    r = Recorder()
    r.parser.feed_data(b"POST /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
    assert [e for e in r.events if e[0] == "body"] == [("body", b"abc"), ("body", b"de")]
    assert r.events[-1] == "end"
    for request, keep_alive in [
        (b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n", False),
        (b"GET / HTTP/1.0\r\n\r\n", False),
        (b"HEAD / HTTP/1.1\r\n\r\n", True),
    ]:
        r = Recorder()
        r.parser.feed_data(request)
        assert r.events[-2][3] is keep_alive, request


def test_bytes_after_a_last_request_are_an_error_once_it_is_complete() -> None:
    r = Recorder()
    with pytest.raises(httptools.HttpParserError):
        r.parser.feed_data(b"GET /1 HTTP/1.1\r\nConnection: close\r\n\r\nGET /2 HTTP/1.1\r\n\r\n")
    assert r.events[-1] == "end" and ("url", b"/2") not in r.events


def test_an_upgrade_stops_the_parser_after_the_request_with_the_offset_of_what_follows() -> None:
    r = Recorder()
    data = b"GET /frames HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: runmap-frames/1\r\nContent-Length: 0\r\n\r\nFRAMES"
    with pytest.raises(httptools.HttpParserUpgrade) as info:
        r.parser.feed_data(data)
    assert data[info.value.args[0] :] == b"FRAMES"
    assert r.events[-2][4] is True and r.events[-1] == "end"
    # An Upgrade header without "Connection: upgrade" is no upgrade.
    r = Recorder()
    r.parser.feed_data(b"GET / HTTP/1.1\r\nUpgrade: runmap-frames/1\r\n\r\n")
    assert r.events[-2][4] is False


def test_an_exception_in_a_callback_stops_the_parser_as_a_parser_error() -> None:
    class Refusing(Recorder):
        def on_header(self, name: bytes, value: bytes) -> None:
            super().on_header(name, value)
            raise KeyError("refused")

    r = Refusing()
    with pytest.raises(httptools.HttpParserError) as info:
        r.parser.feed_data(b"GET / HTTP/1.1\r\nA: 1\r\nB: 2\r\n\r\n")
    assert isinstance(info.value.__context__, KeyError)
    assert r.events == ["begin", ("url", b"/"), ("header", b"A", b"1")]


def test_httptools_parses_memoryview_slices() -> None:
    """A read that crosses the head limit is fed in two slices of a memoryview."""
    r = Recorder()
    view = memoryview(b"GET / HTTP/1.1\r\nHost: example\r\n\r\n")
    r.parser.feed_data(view[:20])
    r.parser.feed_data(view[20:])
    assert ("header", b"Host", b"example") in r.events and r.events[-1] == "end"


def test_asyncio_still_has_the_running_loop_setters() -> None:
    get, set_ = asyncio.events._get_running_loop, asyncio.events._set_running_loop
    assert list(inspect.signature(set_).parameters) == ["loop"]

    async def swap() -> None:
        loop = get()
        assert loop is asyncio.get_running_loop()
        set_(None)
        try:
            assert get() is None
        finally:
            set_(loop)
        assert get() is loop

    asyncio.run(swap())


def test_the_token_comparison_is_cpythons_constant_time_one_and_hmac_is_not_imported() -> None:
    import _operator
    import hmac
    import subprocess
    import sys

    from runmap.server.auth import compare_digest

    assert compare_digest is _operator._compare_digest  # CPython 3.11: this one, not the fallback
    for a, b in [(b"Bearer abc", b"Bearer abc"), (b"Bearer abc", b"Bearer abd"), (b"", b"x"), (b"x" * 64, b"x" * 64)]:
        assert compare_digest(a, b) == hmac.compare_digest(a, b)
    with pytest.raises(TypeError):
        compare_digest("text", b"bytes")
    probe = "import sys, runmap.server.template; print(sorted({'hmac', 'hashlib'} & set(sys.modules)))"
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "[]"  # what the comparison saves a servlet's start-up
