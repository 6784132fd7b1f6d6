"""An HTTP proxy in front of a loopback S3 server (moto) that makes it behave like a remote one:
every request waits ``delay`` seconds before it is forwarded (a region's time to first byte, ~20 ms),
and the next ``failures`` requests are answered with S3's 500 ``InternalError`` (fault injection).

Connections are kept alive on both sides (HTTP/1.1: the client's pool is reused as it would be
against S3, and each client connection forwards over its own upstream connection) and served on
a thread each, so as many requests wait out their delay at once as the client sends. Bodies are
relayed in pieces as they arrive. ``requests`` counts what the proxy received, ``max_in_flight``
the most requests it was serving at one moment (how much of the delay a reader overlaps).

    with S3Proxy("http://127.0.0.1:5000", delay=0.02) as proxy:
        store = actstore.open_store(url, storage_options={"endpoint_url": proxy.url, "skip_instance_cache": True})

Used by ``tests/test_store.py`` (errors), ``tests/test_s3_latency.py`` and ``bench_stream.py``.
"""

from __future__ import annotations

import http.client
import http.server
import socket
import threading
import time
import urllib.parse
from typing import Any

_PIECE = 1 << 20  # bytes relayed at a time
_HOP_BY_HOP = frozenset(("connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "upgrade", "server", "date"))
INTERNAL_ERROR = b"<Error><Code>InternalError</Code><Message>We encountered an internal error.</Message></Error>"


class S3Proxy:
    """Forward HTTP requests to ``upstream`` after ``delay`` seconds each; see the module docstring.
    ``delay`` and ``failures`` may be changed while it runs."""

    def __init__(self, upstream: str, delay: float = 0.0, failures: int = 0):
        self.delay, self.failures = delay, failures
        self.requests = self.in_flight = self.max_in_flight = 0
        self.log: list[str] | None = None
        """Set to a list to record each request as it arrives: ``"<time.monotonic()> <method> <path> <range>"``."""
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        target = urllib.parse.urlsplit(upstream)
        host, port = target.hostname or "127.0.0.1", target.port or 80
        self.server = _Server(("127.0.0.1", 0), _handler(self, host, port))
        self.url = f"http://127.0.0.1:{self.server.server_port}"

    def reset_counts(self) -> None:
        with self._lock:
            self.requests = self.max_in_flight = 0

    def _begin(self, what: str) -> bool:
        """Count a request in; True when it is to be answered with an error."""
        with self._lock:
            if self.log is not None:
                self.log.append(what)
            self.requests += 1
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            fail = self.failures > 0
            self.failures -= fail
            return fail

    def _end(self) -> None:
        with self._lock:
            self.in_flight -= 1

    def __enter__(self) -> S3Proxy:
        threading.Thread(target=self.server.serve_forever, name="s3proxy", daemon=True).start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()
        with self._lock:  # kept-alive client connections: their threads wait on them
            for sock in self._sockets:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 512  # a client opening a pool of connections at once is not refused


def _handler(proxy: S3Proxy, host: str, port: int) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive
        upstream: http.client.HTTPConnection | None = None

        def log_message(self, *args: Any) -> None:
            pass

        def setup(self) -> None:
            super().setup()
            self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with proxy._lock:
                proxy._sockets.add(self.request)

        def finish(self) -> None:
            with proxy._lock:
                proxy._sockets.discard(self.request)
            if self.upstream is not None:
                self.upstream.close()
            try:
                super().finish()
            except OSError:
                pass

        def forward(self) -> None:
            body = self.read_body()
            fail = proxy._begin(f"{time.monotonic():.3f} {self.command} {self.path} {self.headers.get('Range', '')}")
            try:
                if proxy.delay > 0:
                    time.sleep(proxy.delay)
                if fail:
                    self.reply(500, [("Content-Type", "application/xml")], INTERNAL_ERROR)
                    return
                resp = self.ask_upstream(body)
                self.send_response(resp.status, resp.reason)
                for k, v in resp.getheaders():
                    if k.lower() not in _HOP_BY_HOP and not (k.lower() == "content-length" and resp.length is None):
                        self.send_header(k, v)
                if resp.length is None and self.command != "HEAD":  # not sized upstream: size it here
                    data = resp.read()
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return
                self.end_headers()
                while piece := resp.read(_PIECE):
                    self.wfile.write(piece)
                resp.close()
            finally:
                proxy._end()

        def read_body(self) -> bytes | None:
            if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                parts = []
                while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                    parts.append(self.rfile.read(size))
                    self.rfile.readline()
                while self.rfile.readline().strip():  # trailers, up to the blank line
                    pass
                return b"".join(parts)
            n = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(n) if n else None

        def ask_upstream(self, body: bytes | None) -> http.client.HTTPResponse:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP and k.lower() != "host"}
            for attempt in (0, 1):  # a kept-alive upstream connection may have been closed since
                if self.upstream is None:
                    self.upstream = http.client.HTTPConnection(host, port, timeout=60)
                try:
                    self.upstream.request(self.command, self.path, body=body, headers=headers)
                    return self.upstream.getresponse()
                except (ConnectionError, http.client.HTTPException):
                    self.upstream.close()
                    self.upstream = None
                    if attempt:
                        raise
            raise AssertionError("unreachable")

        def reply(self, status: int, headers: list[tuple[str, str]], data: bytes) -> None:
            self.send_response(status)
            for k, v in headers:
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        do_GET = do_PUT = do_HEAD = do_POST = do_DELETE = forward

    return Handler
