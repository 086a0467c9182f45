"""moto's AWS server on loopback for the EC2 tests, reached by boto3 through AWS_ENDPOINT_URL."""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from needs import need


@pytest.fixture
def moto(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[str]:
    """moto's server on 127.0.0.1 (a free port), with fake credentials and private config and cache dirs."""
    moto_server = need("moto.server")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        for name, value in {
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-2",
            "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-credentials"),
            "RUNMAP_CONFIG": str(tmp_path / "config"),
            "RUNMAP_CACHE": str(tmp_path / "cache"),
        }.items():
            monkeypatch.setenv(name, value)
        monkeypatch.delenv("AWS_PROFILE", raising=False)
        yield endpoint
    finally:
        server.stop()


FIXTURES = Path(__file__).parent / "fixtures"


class FixtureServer:
    """AWS's public data on loopback: Spot Advisor's JSON on GET, the Pricing API's GetProducts on POST.

    GetProducts answers ``page_size`` products a page, with a NextToken, as the real API pages.
    """

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, dict[str, Any]]] = []  # (method, path or target, body)
        self.spot_advisor = (FIXTURES / "spot-advisor-data.json").read_bytes()
        self.products = [json.dumps(p) for p in json.loads((FIXTURES / "pricing-us-east-2.json").read_text())]
        self.page_size = 2
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, body: bytes, content_type: str = "application/json", status: int = 200) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                server.requests.append(("GET", self.path, {}))
                if self.path == "/spot-advisor-data.json":
                    self._send(server.spot_advisor)
                else:
                    self._send(b"not found", "text/plain", 404)

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])) or b"{}")
                target = self.headers.get("X-Amz-Target", "")
                server.requests.append(("POST", target, body))
                if target != "AWSPriceListService.GetProducts":
                    self._send(b'{"__type": "UnknownOperationException"}', "application/x-amz-json-1.1", 400)
                    return
                start = int(body.get("NextToken") or 0)
                page = server.products[start : start + server.page_size]
                answer: dict[str, Any] = {"FormatVersion": "aws_v1", "PriceList": page}
                if start + server.page_size < len(server.products):
                    answer["NextToken"] = str(start + server.page_size)
                self._send(json.dumps(answer).encode(), "application/x-amz-json-1.1")

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="fixture-aws-data", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        if not self.thread.is_alive():
            return
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


@pytest.fixture
def aws_data(moto: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[FixtureServer]:
    """Spot Advisor data and the Pricing API served from fixtures, where runmap looks for them."""
    server = FixtureServer()
    monkeypatch.setenv("RUNMAP_SPOT_ADVISOR_URL", f"{server.url}/spot-advisor-data.json")
    monkeypatch.setenv("AWS_ENDPOINT_URL_PRICING", server.url)  # boto3's per-service endpoint setting
    try:
        yield server
    finally:
        server.stop()
