"""A fault-injecting HTTP proxy for S3 tests: sits on loopback in front of moto's server.

Clients are pointed at it with ``AWS_ENDPOINT_URL_S3=proxy.url``. Every request is read whole
(Content-Length or chunked body), then either forwarded to the upstream server or answered with
a fault. On the requests `Faults` selects (every Nth, or a seeded random share) it injects, in
turn, one of these kinds:

- ``"500"``: HTTP 500 InternalError, with S3's XML error body (the request never reaches S3).
- ``"503"``: HTTP 503 SlowDown, with S3's XML error body (never reaches S3).
- ``"reset"``: the connection is reset (RST) without a response (never reaches S3).
- ``"truncate"``: forwarded; the response announces its full Content-Length, then the connection
  is closed halfway through the body. Only for responses with a body.
- ``"short"``: forwarded; an object GET's response is sent without Content-Length (delimited by
  closing the connection) and cut short, so HTTP framing cannot reveal it: only a client that
  checks the length announced by Content-Range (or the range it asked for) notices.
- ``"bare"``: like ``short``, and without Content-Range either: only a client that knows the
  object's size (or its checksum) can notice.
- ``"latency"``: forwarded after `Faults.latency` seconds.

`outage` (set it to ``"503"``, ``"500"`` or ``"reset"``) answers *every* request with that
fault until it is set back to None: a persistent outage. `outage_from` = (kind, predicate)
starts one at the first request for which ``predicate(method, path)`` is true. `stats` counts requests, injected
faults by kind, retries (a request identical to one that was faulted: same method, path, query
and Range) and the bytes a fault wasted (request bodies that never reached S3 and partial
response bodies).
"""

from __future__ import annotations

import http.client
import random
import socket
import struct
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

KINDS = ("500", "503", "reset", "truncate", "short", "bare", "latency")
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "expect",
    }
)
_ERRORS = {
    "500": (500, "InternalError", "We encountered an internal error. Please try again."),
    "503": (503, "SlowDown", "Please reduce your request rate."),
}


@dataclass
class Faults:
    """Which requests get a fault, and which faults. `every` (inject on request N, 2N, ...) wins
    over `share` (a random share of requests from a generator seeded with `seed`). `methods`
    limits faults to those HTTP methods (None: all; N counts only those). Kinds are used in
    turn. `max_in_a_row` (None: no limit) spares a request repeated after that many faults in a
    row, so a client whose retries outnumber it is sure to get through."""

    every: int = 0
    share: float = 0.0
    kinds: tuple[str, ...] = KINDS
    seed: int = 0
    latency: float = 0.2
    methods: frozenset[str] | None = None
    max_in_a_row: int | None = None

    def __post_init__(self) -> None:
        unknown = set(self.kinds) - set(KINDS)
        if unknown:
            raise ValueError(f"unknown fault kinds {sorted(unknown)}; known: {KINDS}")


@dataclass
class Stats:
    """What the proxy saw and did (read it under `FaultProxy.lock`, or after the traffic ended)."""

    requests: int = 0
    forwarded: int = 0
    faults: Counter = field(default_factory=Counter)  # kind → how many were injected
    outage: int = 0  # requests answered by a persistent outage
    retries: int = 0  # requests repeating one that was faulted
    wasted_bytes: int = 0  # request bodies that never reached S3 + partial response bodies
    body_bytes: int = 0  # response body bytes sent to clients (whole and partial)
    by_method: Counter = field(default_factory=Counter)

    @property
    def injected(self) -> int:
        return sum(self.faults.values())


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, proxy: FaultProxy) -> None:
        self.proxy = proxy
        self.aborted: set[int] = set()  # fds of sockets to reset rather than close gracefully
        super().__init__(("127.0.0.1", 0), _Handler)

    def shutdown_request(self, request: socket.socket) -> None:
        if request.fileno() in self.aborted:
            self.aborted.discard(request.fileno())
            request.close()  # SO_LINGER 0: the close sends RST, no FIN first
            return
        super().shutdown_request(request)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as botocore's connection pool expects
    timeout = 60
    server: _Server

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _handle(self) -> None:
        proxy = self.server.proxy
        body = self._body()
        kind = proxy._choose(self.command, self.path, self.headers.get("Range"), len(body))
        if kind in ("500", "503"):
            self._error(kind)
        elif kind == "reset":
            self._reset()
        else:
            if kind == "latency":
                time.sleep(proxy.faults.latency)
            status, reason, headers, data = proxy._forward(
                self.command, self.path, self.headers, body
            )
            self._respond(status, reason, headers, data, kind)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

    def _error(self, kind: str) -> None:
        status, code, message = _ERRORS[kind]
        request_id = uuid.uuid4().hex[:16].upper()
        xml = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{code}</Code><Message>{message}</Message>"
            f"<Resource>{self.path.split('?')[0]}</Resource>"
            f"<RequestId>{request_id}</RequestId></Error>"
        ).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("x-amz-request-id", request_id)
        self.send_header("Content-Length", str(len(xml)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(xml)

    def _reset(self) -> None:
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.server.aborted.add(self.connection.fileno())
        self.close_connection = True

    def _respond(
        self,
        status: int,
        reason: str,
        headers: list[tuple[str, str]],
        data: bytes,
        kind: str | None,
    ) -> None:
        proxy = self.server.proxy
        cut = len(data) // 2
        self.send_response(status, reason)
        for name, value in headers:
            if name.lower() in _HOP_BY_HOP:
                continue
            if kind in ("short", "bare") and name.lower() == "content-length":
                continue  # the body's end is the connection's end
            if kind == "bare" and name.lower() == "content-range":
                continue
            self.send_header(name, value)
        if kind in ("short", "bare"):
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command == "HEAD":
            return
        if kind in ("truncate", "short", "bare"):
            self.wfile.write(data[:cut])
            self.wfile.flush()
            with proxy.lock:
                proxy.stats.wasted_bytes += cut
                proxy.stats.body_bytes += cut
            if kind == "bare":  # the client asks for the rest: that is its retry
                proxy._continued((self.command, self.path, self.headers.get("Range")), cut)
            if kind == "truncate":
                self._reset()
            else:
                self.close_connection = True
            return
        self.wfile.write(data)
        with proxy.lock:
            proxy.stats.body_bytes += len(data)


class FaultProxy:
    """The proxy: `start()` (or use as a context manager), point clients at `url`, read `stats`."""

    def __init__(self, upstream: str, faults: Faults | None = None) -> None:
        parts = urlsplit(upstream)
        self.upstream_host, self.upstream_port = parts.hostname, parts.port or 80
        self.faults = faults or Faults()
        self.outage: str | None = None
        self.outage_from: tuple[str, Callable[[str, str], bool]] | None = None
        self.lock = threading.Lock()
        self.stats = Stats()
        self._random = random.Random(self.faults.seed)
        self._turn = 0  # index of the next fault kind
        self._eligible = 0  # requests faults may be injected into, so far
        self._streak: dict[tuple, int] = {}  # request → faults in a row, until it gets through
        self._local = threading.local()
        self._server: _Server | None = None

    @property
    def url(self) -> str:
        assert self._server is not None, "start() the proxy first"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FaultProxy:
        self._server = _Server(self)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def configure(self, faults: Faults) -> None:
        """Use `faults` from now on (the random generator is re-seeded)."""
        with self.lock:
            self.faults = faults
            self._random = random.Random(faults.seed)
            self._turn = self._eligible = 0

    def reset_stats(self) -> Stats:
        """Start counting afresh; returns what was counted so far."""
        with self.lock:
            old, self.stats = self.stats, Stats()
            self._streak.clear()
        return old

    # -- decisions and forwarding (called from handler threads) ---------------------------------

    def _choose(self, method: str, path: str, range_: str | None, body_bytes: int) -> str | None:
        """The fault for this request (None: forward it as it is), counted in `stats`."""
        key = (method, path, range_)
        with self.lock:
            self.stats.requests += 1
            self.stats.by_method[method] += 1
            streak = self._streak.pop(key, 0)
            if streak:
                self.stats.retries += 1
            if self.outage is None and self.outage_from and self.outage_from[1](method, path):
                self.outage, self.outage_from = self.outage_from[0], None
            if self.outage is not None:
                self.stats.outage += 1
                self.stats.wasted_bytes += body_bytes
                self._streak[key] = streak + 1
                return self.outage
            faults = self.faults
            if faults.methods is not None and method not in faults.methods:
                return None
            self._eligible += 1
            if faults.every:
                hit = self._eligible % faults.every == 0
            else:
                hit = faults.share > 0 and self._random.random() < faults.share
            if faults.max_in_a_row is not None and streak >= faults.max_in_a_row:
                hit = False
            applicable = [k for k in faults.kinds if _applies(k, method, path)]
            if not hit or not applicable:
                return None
            kind = applicable[self._turn % len(applicable)]
            self._turn += 1
            self.stats.faults[kind] += 1
            if kind in ("500", "503", "reset"):
                self.stats.wasted_bytes += body_bytes
            if kind != "latency":
                self._streak[key] = streak + 1
            return kind

    def _continued(self, key: tuple, cut: int) -> None:
        """A ranged GET was cut after `cut` bytes: a GET of the rest repeats it, as a retry (so
        does the same GET again, if the client noticed, e.g. from a checksum)."""
        method, path, range_ = key
        if not range_ or not range_.startswith("bytes="):
            return
        first, _, last = range_[len("bytes=") :].partition("-")
        with self.lock:
            streak = self._streak.get(key, 1)
            self._streak[(method, path, f"bytes={int(first) + cut}-{last}")] = streak

    def _connection(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = http.client.HTTPConnection(self.upstream_host, self.upstream_port, timeout=60)
            self._local.conn = conn
        return conn

    def _forward(
        self, method: str, path: str, headers: object, body: bytes
    ) -> tuple[int, str, list[tuple[str, str]], bytes]:
        """Send the request upstream (one keep-alive connection per handler thread)."""
        out = {k: v for k, v in headers.items() if k.lower() not in _HOP_BY_HOP}  # type: ignore[attr-defined]
        out["Content-Length"] = str(len(body))
        for attempt in range(2):
            conn = self._connection()
            try:
                conn.request(method, path, body=body, headers=out)
                response = conn.getresponse()
                data = response.read()
                break
            except (OSError, http.client.HTTPException):
                conn.close()
                self._local.conn = None
                if attempt:
                    raise
        with self.lock:
            self.stats.forwarded += 1
        return response.status, response.reason, response.getheaders(), data


def _applies(kind: str, method: str, path: str) -> bool:
    """Body faults need a response body: GETs (``short``, ``bare``: object GETs, /bucket/key)."""
    if kind == "truncate":
        return method == "GET"
    if kind in ("short", "bare"):
        return method == "GET" and "/" in urlsplit(path).path.strip("/")
    return True
