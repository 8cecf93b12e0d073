"""gateway/asgi.py's stream writer, at the ASGI boundary: what goes to the server's `send`,
in which order and grouped how. (End to end through a real server and client, the streams are
covered in test_openai_door.py and test_baidu_door.py.)"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from gateway.asgi import stream_response


async def _never_disconnects() -> dict[str, Any]:
    await asyncio.Event().wait()
    return {"type": "http.disconnect"}


def _run(events: AsyncIterator[bytes]) -> tuple[bool, list[dict[str, Any]]]:
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def main() -> bool:
        return await stream_response(send, _never_disconnects, 200, [(b"x-a", b"1")], events)

    return asyncio.run(main()), sent


def test_the_first_event_leaves_alone_and_a_ready_burst_leaves_in_one_write() -> None:
    async def burst() -> AsyncIterator[bytes]:
        for i in range(6):
            yield b"e%d;" % i

    finished, sent = _run(burst())
    assert finished
    assert sent[0] == {"type": "http.response.start", "status": 200, "headers": [(b"x-a", b"1")]}
    bodies = [(m["body"], m["more_body"]) for m in sent[1:]]
    # the first event does not wait for the rest of its burst; the rest goes in one write
    assert bodies == [(b"e0;", True), (b"e1;e2;e3;e4;e5;", False)]


def test_events_apart_in_time_leave_apart() -> None:
    async def paced() -> AsyncIterator[bytes]:
        yield b"a;"
        yield b"b;"
        yield b"c;"
        await asyncio.sleep(0.02)  # the upstream is slow: what is ready goes now
        yield b"d;"
        await asyncio.sleep(0.02)

    finished, sent = _run(paced())
    assert finished
    bodies = [m["body"] for m in sent[1:]]
    assert bodies == [b"a;", b"b;c;", b"d;", b""]
    assert [m["more_body"] for m in sent[1:]] == [True, True, True, False]


def test_a_client_gone_mid_wait_stops_the_stream_and_closes_the_events() -> None:
    closed = asyncio.Event()
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def hangs_up() -> dict[str, Any]:
        await asyncio.sleep(0.05)
        return {"type": "http.disconnect"}

    async def slow_upstream() -> AsyncIterator[bytes]:
        try:
            yield b"a;"
            await asyncio.sleep(30)  # the next token never comes before the client leaves
            yield b"b;"
        finally:
            closed.set()

    async def main() -> bool:
        return await asyncio.wait_for(stream_response(send, hangs_up, 200, [], slow_upstream()), 5)

    assert asyncio.run(main()) is False
    assert closed.is_set()
    assert [m.get("body") for m in sent[1:]] == [b"a;"]
