"""Small raw-ASGI helpers for the hot routes (the two chat doors).

The chat routes are plain ASGI callables mounted in Litestar: they read the body once,
write pre-built header lists, and watch for the client going away while streaming.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]

JSON = (b"content-type", b"application/json")
SSE = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache"),
       (b"x-accel-buffering", b"no")]


class BodyTooLarge(Exception):
    pass


async def read_body(receive: Receive, limit: int = 8 * 1024 * 1024) -> bytes:
    msg = await receive()
    body = msg.get("body", b"")
    while msg.get("more_body"):
        msg = await receive()
        body += msg.get("body", b"")
        if len(body) > limit:
            raise BodyTooLarge
    return body


def header(scope: Scope, name: bytes) -> str | None:
    for k, v in scope["headers"]:
        if k == name:
            return v.decode("latin-1")
    return None


def bearer(scope: Scope) -> str | None:
    value = header(scope, b"authorization")
    if value and value[:7].lower() == "bearer ":
        return value[7:].strip()
    return None


class IdMaker:
    """Unique ids without a syscall each: a random per-process prefix and a counter."""

    __slots__ = ("_count", "_prefix")

    def __init__(self) -> None:
        self._reset()
        os.register_at_fork(after_in_child=self._reset)  # a forked worker gets its own prefix

    def _reset(self) -> None:
        self._prefix = secrets.token_hex(6)
        self._count = itertools.count(1)

    def __call__(self) -> str:
        return f"{self._prefix}{next(self._count):012x}"


new_id = IdMaker()


def request_ids(scope: Scope) -> tuple[str, str]:
    """(internal id, id to echo in `x-request-id`). The internal id is always the gateway's
    own: limits and usage are idempotent by it, so a client must not be able to choose it."""
    internal = "req-" + new_id()
    echo = header(scope, b"x-request-id")
    if echo and len(echo) <= 128 and echo.isprintable():
        return internal, echo
    return internal, internal


def encode_headers(pairs: dict[str, str]) -> Headers:
    return [(k.encode(), v.encode("latin-1")) for k, v in pairs.items()]


async def send_response(send: Send, status: int, body: bytes, headers: Headers) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def stream_response(send: Send, receive: Receive, status: int, headers: Headers,
                          events: AsyncIterator[bytes]) -> bool:
    """Send `events` as they come. If the client disconnects, stop at once: the task
    iterating `events` is cancelled, so whatever it awaits upstream is abandoned, and
    `events` is closed. Returns False when the client went away.

    The first event of a loop turn leaves at once, so the client's time to first byte does not
    include the work on the rest of its burst. Events after it in the same turn (an upstream
    read often carries many) are gathered and leave in one write when this task next waits,
    usually for the upstream: nothing is held back waiting for more, and a 23-event stream
    that arrives in one read costs two or three socket writes, not 23.

    Tasks only where they are needed, which on the common paths is nowhere: an event that
    arrives alone is written by this task itself. A writer task exists only while a burst's
    gathered events are on their way. The disconnect watcher starts when this task first
    waits, so a stream that ends without waiting needs none."""
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    gone = done = False
    pending: list[bytes] = []
    writer: asyncio.Task[None] | None = None
    watcher: asyncio.Task[None] | None = None
    writing = False  # the writer task has started (a task not yet started can be dropped)
    turn = False  # something was written or gathered in this loop turn
    scheduled = False  # next_turn() is due

    async def watch() -> None:
        nonlocal gone
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                gone = True
                task.cancel()
                return

    async def write() -> None:
        nonlocal writing
        writing = True
        while pending:
            data = b"".join(pending) if len(pending) > 1 else pending[0]
            pending.clear()
            await send({"type": "http.response.body", "body": data, "more_body": True})

    def next_turn() -> None:
        """Runs once this task has waited: watch the client, send what was gathered."""
        nonlocal turn, scheduled, watcher, writer, writing
        turn = scheduled = False
        if done:
            return
        if watcher is None:
            watcher = loop.create_task(watch())
        if pending and writer is None:
            writing = False
            writer = loop.create_task(write())

    def schedule() -> None:
        nonlocal scheduled
        if not scheduled:
            scheduled = True
            loop.call_soon(next_turn)

    try:
        await send({"type": "http.response.start", "status": status, "headers": headers})
        schedule()
        async for data in events:
            if writer is not None and writer.done():
                writer.result()  # a failed write ends the stream
                writer = None
            if not turn and writer is None and not pending:
                turn = True
                schedule()
                await send({"type": "http.response.body", "body": data, "more_body": True})
                continue
            pending.append(data)
            if writer is None:
                schedule()
            elif len(pending) >= 256:
                await writer  # a slow client: wait for the socket rather than queue without end
        done = True
        if writer is not None:
            if writing:
                await writer
            else:
                writer.cancel()  # not started: what it would write goes with the end instead
        await send({"type": "http.response.body", "body": b"".join(pending), "more_body": False})
    except asyncio.CancelledError:
        if not gone:
            raise
        # The cancel was ours; swallow it so the server sees a normal end of the handler.
        task.uncancel()
    finally:
        done = True
        if watcher is not None:
            watcher.cancel()
        if writer is not None:
            writer.cancel()
        with contextlib.suppress(Exception):
            await events.aclose()  # type: ignore[attr-defined]
    return not gone
