"""One server-sent-events reader and writer, shared by every adapter and emulator.

The reader takes raw byte chunks as they come off the socket (any split, `\\n` or `\\r\\n`
line ends) and yields one `SSEEvent` per blank-line-terminated event. Comment lines
(`: keep-alive`) are skipped. `id:` and `event:` are kept because Replicate uses both.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator

import msgspec


class SSEEvent(msgspec.Struct):
    data: str = ""
    event: str = "message"
    id: str | None = None


class SSEDecoder:
    """Incremental decoder: feed bytes, get complete events."""

    __slots__ = ("_buf", "_data", "_event", "_id")

    def __init__(self) -> None:
        self._buf = b""
        self._data: list[str] = []
        self._event = ""
        self._id: str | None = None

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        buf = self._buf + chunk if self._buf else chunk
        if b"\r" not in buf and not self._data and not self._event:
            return self._feed_blocks(buf)
        return self._feed_lines(buf)

    def _feed_blocks(self, buf: bytes) -> list[SSEEvent]:
        """The common case (`\n` line ends, no event half-parsed): whole events at a time,
        and an event that is one `data: ` line without parsing it line by line. An incomplete
        event stays in the buffer unparsed."""
        events: list[SSEEvent] = []
        start = 0
        while (end := buf.find(b"\n\n", start)) >= 0:
            block = buf[start:end]
            start = end + 2
            if block.startswith(b"data: ") and b"\n" not in block:
                events.append(SSEEvent(block[6:].decode("utf-8"), "message", self._id))
            elif block:
                for line in block.split(b"\n"):
                    self._line(line.decode("utf-8"))
                ev = self._line("")
                if ev is not None:
                    events.append(ev)
        self._buf = buf[start:]
        return events

    def _feed_lines(self, buf: bytes) -> list[SSEEvent]:
        events: list[SSEEvent] = []
        start = 0
        while True:
            nl = buf.find(b"\n", start)
            if nl < 0:
                break
            line = buf[start:nl]
            start = nl + 1
            if line.endswith(b"\r"):
                line = line[:-1]
            ev = self._line(line.decode("utf-8"))
            if ev is not None:
                events.append(ev)
        self._buf = buf[start:]
        return events

    def _line(self, line: str) -> SSEEvent | None:
        if not line:
            if not self._data and not self._event:
                return None
            ev = SSEEvent("\n".join(self._data), self._event or "message", self._id)
            self._data = []
            self._event = ""
            return ev
        if line[0] == ":":
            return None
        field, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if field == "data":
            self._data.append(value)
        elif field == "event":
            self._event = value
        elif field == "id":
            self._id = value
        return None

    @property
    def pending(self) -> bool:
        """True when bytes or an unterminated event are buffered (a cut stream)."""
        return bool(self._buf.strip() or self._data)


async def iter_events(chunks: AsyncIterable[bytes]) -> AsyncIterator[SSEEvent]:
    decoder = SSEDecoder()
    async for chunk in chunks:
        for ev in decoder.feed(chunk):
            yield ev


def encode_event(data: bytes | str, event: str | None = None, id: str | None = None) -> bytes:
    """One SSE event. `data` must not contain newlines (compact JSON never does)."""
    if isinstance(data, str):
        data = data.encode()
    head = b""
    if id is not None:
        head += b"id: " + id.encode() + b"\n"
    if event is not None:
        head += b"event: " + event.encode() + b"\n"
    return head + b"data: " + data + b"\n\n"
