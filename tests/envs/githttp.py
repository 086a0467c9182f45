"""An HTTPS git server on loopback for tests: ``git http-backend`` behind a one-thread HTTP server.

    with serve_https(tmp_path / "served", tmp_path / "tls") as server:
        url = f"{server.url}/repo.git"        # https://127.0.0.1:<port>/repo.git
        os.environ["GIT_SSL_CAINFO"] = str(server.ca_file)

Every bare repository under ``root`` is served (``GIT_HTTP_EXPORT_ALL``), read-only: git's smart
HTTP protocol, run as the CGI program git ships for it. The certificate is self-signed, for
``127.0.0.1``, made with ``openssl`` for the test; git trusts it only when told to
(``GIT_SSL_CAINFO`` or ``http.sslCAInfo``). Requests are served one at a time, each connection closed
after its response (HTTP/1.0), which is all git's client needs.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import ssl
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from urllib.parse import unquote

import pytest


@dataclass
class HttpsGitServer:
    url: str  # https://127.0.0.1:<port>
    ca_file: Path  # the self-signed certificate, to trust
    requests: list[str]  # "GET /repo.git/info/refs?service=git-upload-pack -> 200", in order


def make_certificate(where: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key: (certificate, key)."""
    if shutil.which("openssl") is None:
        pytest.fail("the HTTPS git server needs openssl: scripts/install-test-tools.sh installs it", pytrace=False)
    where.mkdir(parents=True, exist_ok=True)
    cert, key = where / "cert.pem", where / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1", "-days", "1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return cert, key


def _cgi_response(output: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
    """A CGI program's output as (status, headers, body)."""
    for blank in (b"\r\n\r\n", b"\n\n"):
        head, sep, body = output.partition(blank)
        if sep:
            break
    else:
        return 502, [], output
    status, headers = 200, []
    for line in head.decode("latin-1").splitlines():
        name, _, value = line.partition(":")
        if name.strip().lower() == "status":
            status = int(value.split()[0])
        elif name.strip():
            headers.append((name.strip(), value.strip()))
    return status, headers, body


def _handler(root: Path, log: list[str]) -> type[BaseHTTPRequestHandler]:
    class GitBackend(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self._backend()

        def do_POST(self) -> None:
            self._backend()

        def _backend(self) -> None:
            path, _, query = self.path.partition("?")
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            environ = {
                "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                "GIT_CONFIG_GLOBAL": "/dev/null", "GIT_CONFIG_NOSYSTEM": "1",
                "GIT_PROJECT_ROOT": str(root), "GIT_HTTP_EXPORT_ALL": "1",
                "REQUEST_METHOD": self.command, "PATH_INFO": unquote(path), "QUERY_STRING": query,
                "CONTENT_TYPE": self.headers.get("Content-Type", ""), "CONTENT_LENGTH": str(len(body)),
                "REMOTE_ADDR": self.client_address[0], "SERVER_PROTOCOL": "HTTP/1.0",
            }  # fmt: skip
            if self.headers.get("Git-Protocol"):
                environ["GIT_PROTOCOL"] = self.headers["Git-Protocol"]
            if self.headers.get("Content-Encoding"):
                environ["HTTP_CONTENT_ENCODING"] = self.headers["Content-Encoding"]
            done = subprocess.run(["git", "http-backend"], input=body, env=environ, capture_output=True, timeout=60)
            status, headers, payload = _cgi_response(done.stdout)
            log.append(f"{self.command} {self.path} -> {status}")
            self.send_response(status)
            for name, value in headers:
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
            pass  # kept in `log`, not printed

    return GitBackend


@contextlib.contextmanager
def serve_https(root: Path, tls_dir: Path) -> Iterator[HttpsGitServer]:
    """Serves the bare repositories under ``root`` over HTTPS on 127.0.0.1, until the block ends."""
    cert, key = make_certificate(tls_dir)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    log: list[str] = []
    server = HTTPServer(("127.0.0.1", 0), _handler(root, log))
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              name="test-https-git", daemon=True)  # fmt: skip
    thread.start()
    try:
        yield HttpsGitServer(f"https://127.0.0.1:{server.server_address[1]}", cert, log)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
