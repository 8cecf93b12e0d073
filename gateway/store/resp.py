"""A lean pipelined RESP client for the two calls every request makes (admit and settle).

Commands arrive already packed (RESP bytes). Each call goes out on one of a few shared
connections (at once when the connection is idle; else with the other calls made until the
loop's next turn, in one write) and its replies are matched in order (a FIFO per connection,
many calls in flight), parsed by hiredis; an error reply is returned as a `ReplyError` value,
not raised. There is no task nor timer per call: one watchdog per connection, armed
only while something is pending, applies the store's timeout rule (gateway/store/redis.py):
it gives up when Redis has been silent for `timeout` (no reply on any connection of the
store, `Heard`) while something was pending, or when the oldest pending call is `hard_timeout`
old; then every call pending on that connection fails with `StoreUnavailable` and the
connection is closed (it holds unread replies). A refused or lost connection fails its
calls at once. The next call opens a new connection. Nothing is retried here.

A caller cancelled while waiting leaves its place in the FIFO: its reply is read and dropped.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from typing import Any, cast

import hiredis

from gateway.store.base import StoreUnavailable

_TICK = 0.001  # timers may fire up to a millisecond early (uvloop's clock is in ms)


class ReplyError(Exception):
    """An error reply (`-ERR ...`), returned in place of the reply."""

    @property
    def noscript(self) -> bool:
        return str(self).startswith("NOSCRIPT")


class Heard:
    """When Redis last answered anything on any connection of a store (handshakes too);
    None until it first did (a cold start's burst of handshakes is not a silent Redis)."""

    def __init__(self) -> None:
        self.at: float | None = None


def command(*args: str | int) -> bytes:
    """One command packed as RESP."""
    parts = [b"*%d\r\n" % len(args)]
    for a in args:
        b = str(a).encode()
        parts.append(b"$%d\r\n%b\r\n" % (len(b), b))
    return b"".join(parts)


class Endpoint:
    """Where and how to connect: TCP host/port or a unix socket path, TLS, and the commands
    that open a connection (AUTH, SELECT), from redis-py's `parse_url` options."""

    def __init__(self, options: dict[str, Any], tls: ssl.SSLContext | None = None) -> None:
        self.host: str = options.get("host", "localhost")
        self.port: int = int(options.get("port", 6379))
        self.path: str | None = options.get("path")
        self.tls = tls
        hello: list[bytes] = []
        password, username = options.get("password"), options.get("username")
        if password is not None or username is not None:
            hello.append(command("AUTH", username, password or "") if username else command("AUTH", password))
        if int(options.get("db") or 0):
            hello.append(command("SELECT", int(options["db"])))
        self.hello = hello


class RespConnection(asyncio.Protocol):
    """One connection: a FIFO of pending calls, replies resolved as they arrive."""

    def __init__(self, lane: RespLane, loop: asyncio.AbstractEventLoop) -> None:
        self.lane = lane
        self.loop = loop
        self.closed = False
        # (future, replies expected, sent at); future None: a handshake command
        self._pending: deque[tuple[asyncio.Future[Any] | None, int, float]] = deque()
        self._partial: list[Any] = []  # the replies read so far of a multi-reply call at the head
        self._reader = hiredis.Reader(replyError=ReplyError)
        self._transport: asyncio.Transport | None = None
        # calls not written yet: until the handshake is done (not pipelined behind it: after a
        # failed SELECT they would run in the wrong database), or until the loop's next turn
        self._queued: list[bytes] | None = []
        self._hello = 0  # handshake replies still expected
        self._busy_since = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._opening: asyncio.Task[None] | None = loop.create_task(self._open())

    async def _open(self) -> None:
        ep = self.lane.endpoint
        try:
            if ep.path is not None:
                await self.loop.create_unix_connection(lambda: self, ep.path, ssl=ep.tls)
            else:
                await self.loop.create_connection(lambda: self, ep.host, ep.port, ssl=ep.tls)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # refused, unreachable, TLS: fail the waiting calls now
            self._opening = None
            self.abort(f"redis: {type(exc).__name__}: {exc}")

    def send(self, packed: bytes, replies: int, fut: asyncio.Future[Any], at_once: bool = False) -> None:
        now = time.monotonic()
        idle = not self._pending
        if idle:
            self._busy_since = now
            if self._timer is None:
                self._timer = self.loop.call_later(self.lane.timeout, self._watch)
        self._pending.append((fut, replies, now))
        queued = self._queued
        if queued is not None:  # connecting, or more calls of this loop iteration to come
            queued.append(packed)
            if at_once and self._transport is not None and not self._hello:
                self._flush()  # the batch so far goes now, this call last
        elif idle or at_once:
            self._transport.write(packed)  # type: ignore[union-attr]
        else:
            # replies are due anyway: the calls made until the loop's next turn go out in one write
            self._queued = [packed]
            self.loop.call_soon(self._flush)

    # -- asyncio.Protocol --
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass it
        if self.closed:
            transport.abort()
            return
        self._transport = transport
        hello = self.lane.endpoint.hello
        if not hello:
            self._flush()
            return
        since = self._pending[0][2] if self._pending else time.monotonic()
        for _ in hello:  # their replies come first
            self._pending.appendleft((None, 1, since))
        self._hello = len(hello)
        transport.write(b"".join(hello))

    def _flush(self) -> None:
        queued, self._queued = self._queued, None
        if queued and self._transport is not None:
            self._transport.write(b"".join(queued))

    def data_received(self, data: bytes) -> None:
        self.lane.heard.at = time.monotonic()
        reader = self._reader
        reader.feed(data)
        pending = self._pending
        try:
            reply = reader.gets()
            while reply is not False:
                fut, replies, _ = pending[0]
                if replies == 1:
                    pending.popleft()
                    if fut is None:
                        if isinstance(reply, ReplyError):
                            self.abort(f"redis: handshake refused: {reply}")
                            return
                        self._hello -= 1
                        if not self._hello:
                            self._flush()
                    elif not fut.done():  # done: the caller was cancelled; the reply is dropped
                        fut.set_result(reply)
                else:
                    partial = self._partial
                    partial.append(reply)
                    if len(partial) == replies:
                        pending.popleft()
                        self._partial = []
                        if fut is not None and not fut.done():
                            fut.set_result(partial)
                reply = reader.gets()
        except (hiredis.ProtocolError, IndexError) as exc:  # garbage, or a reply nobody asked for
            self.abort(f"redis: protocol error: {exc!r}")

    def connection_lost(self, exc: Exception | None) -> None:
        self.abort(f"redis: connection lost ({exc or 'closed by the server'})")

    # -- the watchdog --
    def _due(self) -> float:
        """When the pending calls give up (monotonic clock)."""
        hard = self._pending[0][2] + self.lane.hard_timeout
        heard = self.lane.heard.at
        if heard is None:
            return hard
        return min(hard, max(heard, self._busy_since) + self.lane.timeout)

    def _watch(self) -> None:
        self._timer = None
        if not self._pending:
            return  # disarmed until the connection is busy again
        now = time.monotonic()
        left = self._due() - now
        if left > _TICK:
            self._timer = self.loop.call_later(left, self._watch)
        else:
            # look once more after the loop has polled the sockets again: replies that
            # arrived while it was busy may be waiting there unread
            self._timer = self.loop.call_later(_TICK, self._confirm)

    def _confirm(self) -> None:
        self._timer = None
        if not self._pending:
            return
        if self._due() - time.monotonic() > _TICK:
            self._watch()
        else:
            self.abort("redis: no reply in time")

    def abort(self, why: str) -> None:
        """Fail every pending call with StoreUnavailable(why) and close the connection."""
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._opening is not None and not self._opening.done():
            self._opening.cancel()  # the watchdog gave up while connecting
        transport, self._transport = self._transport, None
        if transport is not None:
            transport.abort()
        pending, self._pending = self._pending, deque()
        for fut, _, _ in pending:
            if fut is not None and not fut.done():
                fut.set_exception(StoreUnavailable(why))


class RespLane:
    """A few pipelined connections, used in turn; one that failed is replaced on next use."""

    def __init__(self, endpoint: Endpoint, heard: Heard, timeout: float, hard_timeout: float,
                 size: int = 2) -> None:
        self.endpoint = endpoint
        self.heard = heard
        self.timeout = timeout
        self.hard_timeout = hard_timeout
        self._conns: list[RespConnection | None] = [None] * max(1, size)
        self._next = 0

    def call(self, packed: bytes, replies: int = 1, at_once: bool = False) -> asyncio.Future[Any]:
        """Send packed commands; the future is their reply (a list of them when `replies` > 1),
        error replies as `ReplyError` values, or fails with StoreUnavailable. `at_once`: written
        to the socket before this returns (unless the connection is still opening), not batched
        with the calls of the rest of this loop iteration."""
        loop = asyncio.get_running_loop()
        i = self._next
        self._next = i + 1 if i + 1 < len(self._conns) else 0
        conn = self._conns[i]
        if conn is None or conn.closed or conn.loop is not loop:
            conn = self._conns[i] = RespConnection(self, loop)
        fut = loop.create_future()
        conn.send(packed, replies, fut, at_once)
        return fut

    def close(self) -> None:
        for i, conn in enumerate(self._conns):
            if conn is not None and not conn.loop.is_closed():
                conn.abort("redis: store closed")
            self._conns[i] = None
