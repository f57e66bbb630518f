"""A fault-injecting HTTP proxy in front of the local S3 server (moto), for fault tests.

Clients pointed at it (``AWS_ENDPOINT_URL``) talk to the real S3 server through it, except
that :attr:`FaultyS3Proxy.faults` may answer a request with a fault instead: the S3
throttling reply (``503 SlowDown``), a reset connection, a response cut off after half
its body (a truncated download), or a lost response (the request reached the server and
took effect, the reply never reaches the client). Faults are chosen by a function of
(method, key, n) where n counts the requests for that key, so they are deterministic: no
randomness, no timing.
"""

from __future__ import annotations

import http.client
import socket
import struct
import threading
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

#: A fault: None (forward), "slowdown" (503 SlowDown), "reset" (connection reset before
#: any reply), "truncate" (the real headers and half the body, then a reset), "drop" (the
#: request is forwarded and answered by the server, then the connection is reset before
#: any of the reply is sent: the client cannot tell whether it took effect).
Fault = str | None
FaultRule = Callable[[str, str, int], Fault]

SLOWDOWN_BODY = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message><RequestId>faulty</RequestId></Error>"
)
_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "upgrade"}


def _reset(sock: socket.socket) -> None:
    """Close with a TCP RST (SO_LINGER 0) rather than an orderly FIN."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    except OSError:
        pass


class FaultyS3Proxy:
    """Forwards to ``upstream`` (``http://host:port``), injecting :attr:`faults`.

    ``faults(method, key, n)``: ``key`` is the request path (``/bucket/key``, unquoted),
    ``n`` is 1 for the first request of that method and key, 2 for the second, ...
    ``counts`` records every (method, key) seen and ``injected`` every fault answered.
    """

    def __init__(self, upstream: str, faults: FaultRule | None = None) -> None:
        up = urlsplit(upstream)
        self.upstream = (up.hostname or "127.0.0.1", up.port or 80)
        self.faults: FaultRule = faults or (lambda method, key, n: None)
        self.counts: Counter[tuple[str, str]] = Counter()
        self.injected: Counter[str] = Counter()
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as the S3 clients expect

            def log_message(self, *args: object) -> None:  # quiet
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    data = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return data
                        data += self.rfile.read(size)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _handle(self) -> None:
                body = self._body()
                key = unquote(urlsplit(self.path).path)
                with proxy._lock:
                    proxy.counts[(self.command, key)] += 1
                    fault = proxy.faults(self.command, key, proxy.counts[(self.command, key)])
                    if fault:
                        proxy.injected[fault] += 1
                if fault == "reset":
                    self.close_connection = True
                    _reset(self.connection)
                    return
                if fault == "slowdown":
                    payload = b"" if self.command == "HEAD" else SLOWDOWN_BODY
                    self.send_response(503, "Slow Down")
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(SLOWDOWN_BODY)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
                    if body or self.command in ("PUT", "POST"):
                        headers["Content-Length"] = str(len(body))
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    if fault == "drop":
                        self.close_connection = True
                        _reset(self.connection)
                        return
                    self.send_response(resp.status, resp.reason)
                    for k, v in resp.getheaders():
                        if k.lower() not in _HOP and k.lower() != "content-length":
                            self.send_header(k, v)
                    length = resp.getheader("Content-Length") if self.command == "HEAD" else None
                    self.send_header("Content-Length", length or str(len(data)))
                    self.end_headers()
                    if fault == "truncate" and len(data) > 1:
                        self.wfile.write(data[: len(data) // 2])
                        self.wfile.flush()
                        self.close_connection = True
                        _reset(self.connection)
                        return
                    if self.command != "HEAD":
                        self.wfile.write(data)
                finally:
                    conn.close()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        """``http://127.0.0.1:<port>``, for ``AWS_ENDPOINT_URL``."""
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> FaultyS3Proxy:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
