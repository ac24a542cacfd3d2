"""A fault-injecting HTTP proxy in front of the local S3 server, for the reliability tests.

Every S3 request of the test session (the driver's and every Ray worker's: ``AWS_ENDPOINT_URL``
points here) passes through it to the upstream server unchanged, until a test asks for faults.
Faults are rules, set over HTTP on the proxy's own control path (no S3 bucket can be called
``__faults__``), so a test in one process steers the requests of all the others::

    PUT    /__faults__   [{"kind": "status", "code": 503, "method": "GET", "target": "/bucket/archive/",
                           "times": 3}, ...]       replace the rules
    DELETE /__faults__                             no faults again
    GET    /__faults__   {"requests": n, "by_method": {...}, "rules": [... with "fired"]}

A rule fires on requests whose method matches ``method`` (empty: any) and whose target (path and
query, percent-encoded as sent) contains ``target`` as a regular expression; it lets ``after``
matching requests pass first, then fires on every ``every``-th one, at most ``times`` times
(``null``: without end). Kinds:

``status``     answer ``code`` (503 SlowDown, 500 InternalError, ...) with S3's XML error, upstream untouched
``reset``      close the connection with a TCP reset before anything is forwarded
``truncate``   forward, answer the status line, the headers (full Content-Length) and ``fraction`` of
               the body, then reset: a reply cut off mid-body
``delay``      wait ``seconds`` before forwarding (longer than the client's read timeout: a stall)
``drop_reply`` forward (the upstream applies the request: a PUT lands), then reset instead of answering

Run as ``python faultproxy.py --upstream http://127.0.0.1:PORT --port P``.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import re
import socket
import struct
import sys
import threading
import time
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

CONTROL = "/__faults__"
ERRORS = {500: "InternalError", 503: "SlowDown", 502: "BadGateway", 504: "GatewayTimeout"}
HOP_HEADERS = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade"}


class Rules:
    """The current fault rules and what they did, shared by the handler threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.rules: list[dict[str, Any]] = []
        self.requests = 0
        self.by_method: dict[str, int] = {}

    def set(self, rules: list[dict[str, Any]]) -> None:
        with self.lock:
            self.rules = [{"method": "", "target": "", "after": 0, "every": 1, "times": None, **r, "matched": 0,
                           "fired": 0} for r in rules]
            for r in self.rules:
                r["_re"] = re.compile(r["target"])

    def pick(self, method: str, target: str) -> dict[str, Any] | None:
        """The first rule that fires on this request (and count it), or None."""
        with self.lock:
            self.requests += 1
            self.by_method[method] = self.by_method.get(method, 0) + 1
            for r in self.rules:
                if (r["method"] and r["method"] != method) or not r["_re"].search(target):
                    continue
                r["matched"] += 1
                n = r["matched"] - r["after"]
                if n <= 0 or (n - 1) % r["every"] or (r["times"] is not None and r["fired"] >= r["times"]):
                    continue
                r["fired"] += 1
                return dict(r)
            return None

    def state(self) -> dict[str, Any]:
        with self.lock:
            return {"requests": self.requests, "by_method": dict(self.by_method),
                    "rules": [{k: v for k, v in r.items() if k != "_re"} for r in self.rules]}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    upstream: tuple[str, int] = ("127.0.0.1", 0)
    rules: Rules = Rules()

    def log_message(self, *args: Any) -> None:  # quiet
        pass

    # every method S3 clients use goes through one path
    def do_GET(self) -> None:
        self._handle()

    do_PUT = do_POST = do_HEAD = do_DELETE = do_GET  # noqa: N815 (http.server's names)

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            raw = b""
            while True:  # keep the chunked encoding as sent: the upstream de-chunks it
                line = self.rfile.readline()
                raw += line
                size = int(line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while True:
                        trailer = self.rfile.readline()
                        raw += trailer
                        if trailer in (b"\r\n", b"\n", b""):
                            return raw
                raw += self.rfile.read(size + 2)
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _reset(self) -> None:
        """Close with a TCP reset (SO_LINGER 0): the client sees 'connection reset by peer'."""
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.close()

    def _control(self, body: bytes) -> None:
        if self.command == "PUT":
            self.rules.set(json.loads(body or b"[]"))
        elif self.command == "DELETE":
            self.rules.set([])
        data = json.dumps(self.rules.state()).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _handle(self) -> None:
        body = self._body()
        if self.path.startswith(CONTROL):
            self._control(body)
            return
        rule = self.rules.pick(self.command, self.path)
        kind = rule["kind"] if rule else None
        if kind == "reset":
            self._reset()
            return
        if kind == "status":
            code = int(rule.get("code", 503))
            self._answer(code, {"Content-Type": "application/xml"}, _error_xml(code, self.path))
            return
        if kind == "delay":
            time.sleep(float(rule.get("seconds", 1.0)))
        try:
            status, headers, data = self._forward(body)
        except OSError:
            self._reset()
            return
        if kind == "drop_reply":
            self._reset()
            return
        if kind == "truncate" and data:
            self._answer(status, headers, data[: int(len(data) * float(rule.get("fraction", 0.5)))],
                         content_length=len(data))
            self._reset()
            return
        self._answer(status, headers, data)

    def _forward(self, body: bytes) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection(*self.upstream, timeout=120)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_HEADERS - {"transfer-encoding"}}
            conn.request(self.command, self.path, body=body if body else None, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            out = {k: v for k, v in resp.getheaders() if k.lower() not in HOP_HEADERS}
            return resp.status, out, data
        finally:
            conn.close()

    def _answer(self, status: int, headers: dict[str, str], data: bytes, content_length: int | None = None) -> None:
        self.send_response(status)
        for k, v in headers.items():
            if k.lower() != "content-length":
                self.send_header(k, v)
        length = content_length if content_length is not None else len(data)
        if self.command == "HEAD":
            length = int(headers.get("Content-Length", headers.get("content-length", length)))
        self.send_header("Content-Length", str(length))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        self.wfile.flush()


def _error_xml(code: int, path: str) -> bytes:
    name = ERRORS.get(code, "InternalError")
    message = "Please reduce your request rate." if code == 503 else "We encountered an internal error."
    return (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{name}</Code><Message>{message}</Message>'
            f"<Resource>{path}</Resource><RequestId>faultproxy</RequestId></Error>").encode()


class FaultProxy:
    """The tests' handle on a running proxy: ``inject`` rules, ``clear`` them, read ``stats``."""

    def __init__(self, url: str) -> None:
        self.url = url

    def _call(self, method: str, rules: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        data = json.dumps(rules).encode() if rules is not None else None
        req = urllib.request.Request(self.url + CONTROL, data=data, method=method)
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())

    def inject(self, *rules: dict[str, Any]) -> None:
        self._call("PUT", list(rules))

    def clear(self) -> dict[str, Any]:
        """Stop all faults; returns the state just before (what fired)."""
        state = self.stats()
        self._call("DELETE")
        return state

    def stats(self) -> dict[str, Any]:
        return self._call("GET")

    def fired(self) -> int:
        return sum(r["fired"] for r in self.stats()["rules"])


def serve(upstream: str, port: int) -> None:
    u = urllib.parse.urlsplit(upstream)
    Handler.upstream = (u.hostname or "127.0.0.1", u.port or 80)
    ThreadingHTTPServer.request_queue_size = 256
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    server.handle_error = lambda request, address: None  # clients that gave up (timeouts, resets) are expected
    print(f"faultproxy on http://127.0.0.1:{port} -> {upstream}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--upstream", required=True)
    p.add_argument("--port", type=int, required=True)
    a = p.parse_args()
    sys.exit(serve(a.upstream, a.port))
