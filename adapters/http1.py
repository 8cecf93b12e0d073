"""A lean keep-alive HTTP/1.1 client for the hot path: asyncio protocol + httptools parser.

Why not httpx or aiohttp: per upstream call, httpx costs 1.2-6 ms of CPU and aiohttp about
0.2 ms (bench/client_cost.py); at a gateway's 0.4 ms budget per request, aiohttp alone was
~30 % of the profile. This client does only what an upstream LLM call needs: one pool of
keep-alive connections per origin, POST with a body, a response read whole or as it arrives,
a connect timeout and a per-read timeout. No redirects, cookies, proxies or decompression
(it asks for `identity`).

A request on a reused connection that dies before any byte of the response arrives (the
server closed an idle keep-alive connection as we wrote) is sent again once on a fresh
connection: the server never saw it, so this cannot run a request twice.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from urllib.parse import urlsplit

import httptools


class HTTPError(Exception):
    """Base of the transport failures below."""


class ConnectFailed(HTTPError):
    pass


class ConnectTimeout(HTTPError):
    pass


class ReadTimeout(HTTPError):
    pass


class Disconnected(HTTPError):
    """The connection ended before the response's headers were complete."""


class CutShort(HTTPError):
    """The connection ended, or the response was malformed, after its headers."""


def _time_out(waiter: asyncio.Future[None], timeout: float) -> None:
    if not waiter.done():
        waiter.set_exception(ReadTimeout(f"no data for {timeout:g}s"))


class _Conn(asyncio.Protocol):
    """One connection; one response at a time. Callbacks fill state and wake the reader."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.status = 0
        self.headers: dict[str, str] = {}
        self.chunks: list[bytes] = []
        self.head_done = False
        self.done = False  # the whole response is in
        self.failed: HTTPError | None = None
        self.closed = False
        self.received = False  # any byte of the current response
        self.used = False  # served a response before: a reuse may find it closed by the peer
        self._waiter: asyncio.Future[None] | None = None

    # -- asyncio.Protocol --
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.received = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(CutShort("unexpected protocol upgrade"))
        except httptools.HttpParserError as exc:
            self._fail(CutShort(f"malformed HTTP response: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.done:
            if self.head_done:
                if self.headers.get("content-length") is None and \
                        "chunked" not in self.headers.get("transfer-encoding", ""):
                    self.done = True  # a body delimited by the connection's end
                else:
                    self._fail(CutShort("the connection closed in the middle of the response"))
            else:
                self._fail(Disconnected("the connection closed before the response"))
        self._wake()

    # -- httptools callbacks --
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.head_done = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self._wake()

    def on_message_complete(self) -> None:
        self.done = True
        if not self.parser.should_keep_alive():
            self.close()
        self._wake()

    # -- used by the pool and responses --
    def _fail(self, exc: HTTPError) -> None:
        if self.failed is None:
            self.failed = exc
        self.close()
        self._wake()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.close()

    def start(self, data: bytes) -> None:
        self.status, self.headers, self.chunks = 0, {}, []
        self.head_done = self.done = self.received = False
        assert self.transport is not None
        self.transport.write(data)

    async def wait(self, limit: float | None) -> None:
        """Until a callback wakes us; ReadTimeout (and the connection closed) after `limit` s."""
        if self.failed is not None:
            raise self.failed
        w = self._waiter = self.loop.create_future()
        timer = self.loop.call_later(limit, _time_out, w, limit) if limit is not None else None
        try:
            await w
        except BaseException:
            self.close()  # timed out or cancelled: the response is in an unknown state
            raise
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()
        if self.failed is not None:
            raise self.failed

    @property
    def reusable(self) -> bool:
        return self.done and not self.closed and self.failed is None


class Response:
    """Status and headers of a response whose body may still be arriving."""

    __slots__ = ("_conn", "_pool", "_timeout", "headers", "status")

    def __init__(self, pool: Pool, conn: _Conn) -> None:
        self._pool = pool
        self._conn: _Conn | None = conn
        self._timeout = pool.read_timeout
        self.status = conn.status
        self.headers = conn.headers

    async def read_some(self) -> bytes:
        """What arrived since the last call (waiting for something); b"" once the body is done."""
        conn = self._conn
        if conn is None:
            return b""
        while not conn.chunks:
            if conn.done:
                self.release()
                return b""
            await conn.wait(self._timeout)
        chunks = conn.chunks
        conn.chunks = []
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def read(self) -> bytes:
        """The rest of the body."""
        parts = []
        while piece := await self.read_some():
            parts.append(piece)
        return b"".join(parts)

    @property
    def at_eof(self) -> bool:
        conn = self._conn
        return conn is None or (conn.done and not conn.chunks)

    def release(self) -> None:
        """Back to the pool if the body was read to its end, else the connection is closed
        (so the server sees us go). Safe to call twice."""
        conn, self._conn = self._conn, None
        if conn is not None:
            if not conn.done:
                conn.close()
            self._pool._release(conn)


class Pool:
    """Keep-alive connections to one origin (scheme://host:port), at most `max_connections`."""

    def __init__(self, base_url: str, *, max_connections: int = 256, connect_timeout: float = 5.0,
                 read_timeout: float | None = 60.0, headers: dict[str, str] | None = None) -> None:
        u = urlsplit(base_url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        self.host = u.hostname
        self.port = u.port or (443 if u.scheme == "https" else 80)
        self.ssl: ssl.SSLContext | None = ssl.create_default_context() if u.scheme == "https" else None
        self.prefix = u.path.rstrip("/")
        self.max_connections = max_connections
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        name = f"[{self.host}]" if ":" in self.host else self.host  # an IPv6 literal
        host = name if self.port == (443 if self.ssl else 80) else f"{name}:{self.port}"
        lines = [f"host: {host}", "user-agent: llm-gateway", "accept-encoding: identity"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        self._head_tail = ("\r\n".join(lines) + "\r\n").encode("latin-1")
        self._idle: list[_Conn] = []
        self._count = 0  # open connections, idle or busy
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._closed = False

    def _request_bytes(self, method: str, path: str, body: bytes) -> bytes:
        return b"%s %s HTTP/1.1\r\n%scontent-length: %d\r\n\r\n%s" % (
            method.encode(), (self.prefix + path).encode(), self._head_tail, len(body), body)

    async def _connect(self) -> _Conn:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, conn = await loop.create_connection(
                    lambda: _Conn(loop), self.host, self.port, ssl=self.ssl,
                    server_hostname=self.host if self.ssl else None)
        except TimeoutError:
            raise ConnectTimeout(f"no connection within {self.connect_timeout:g}s") from None
        except OSError as exc:
            raise ConnectFailed(type(exc).__name__) from None
        return conn

    async def _acquire(self) -> _Conn:
        loop = asyncio.get_running_loop()
        while True:
            while self._idle:
                conn = self._idle.pop()
                if not conn.closed and conn.loop is loop:
                    return conn
                self._count -= 1  # closed by the peer, or left by an event loop that is gone
            if self._count < self.max_connections:
                self._count += 1
                try:
                    return await self._connect()
                except BaseException:
                    self._count -= 1
                    self._wake_one()
                    raise
            fut = loop.create_future()
            self._waiters.append(fut)
            try:
                await fut
            except asyncio.CancelledError:
                if fut.done() and not fut.cancelled():
                    self._wake_one()  # pass the turn on
                raise

    def _wake_one(self) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return

    def _release(self, conn: _Conn) -> None:
        if conn.reusable and not self._closed:
            conn.used = True
            self._idle.append(conn)
        else:
            conn.close()
            self._count -= 1
        self._wake_one()

    async def send(self, method: str, path: str, body: bytes) -> Response:
        """Send a request; return once the response's status and headers are in."""
        data = self._request_bytes(method, path, body)
        while True:
            conn = await self._acquire()
            try:
                conn.start(data)
                while not conn.head_done:
                    await conn.wait(self.read_timeout)
            except Disconnected:
                self._release(conn)
                if conn.used and not conn.received:
                    continue  # the peer closed it while idle and never saw this request
                raise
            except BaseException:
                conn.close()
                self._release(conn)
                raise
            return Response(self, conn)

    async def request(self, method: str, path: str, body: bytes) -> tuple[int, dict[str, str], bytes]:
        """Send a request and read the whole response."""
        resp = await self.send(method, path, body)
        try:
            raw = await resp.read()
        finally:
            resp.release()
        return resp.status, resp.headers, raw

    async def aclose(self) -> None:
        self._closed = True
        for conn in self._idle:
            conn.close()
        self._idle.clear()
