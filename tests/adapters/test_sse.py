"""adapters/sse.py: the decoder gives the same events however the bytes are split."""

from __future__ import annotations

import random

import pytest

from adapters.sse import SSEDecoder

# (wire bytes, the events they carry as (data, event, id))
PIECES = [
    (b'data: {"a":1}\n\n', [('{"a":1}', "message", None)]),
    (b": keep-alive\n\n", []),
    (b"event: done\ndata: y\n\n", [("y", "done", None)]),
    (b"data:nospace\n\n", [("nospace", "message", None)]),
    (b"data: a\ndata: b\n\n", [("a\nb", "message", None)]),
    (b"\n\n", []),
    ("data: été 🦙\n\n".encode(), [("été 🦙", "message", None)]),
    (b"data: [DONE]\n\n", [("[DONE]", "message", None)]),
]


@pytest.mark.parametrize("crlf", [False, True])
def test_events_are_the_same_whatever_the_split(crlf: bool) -> None:
    rng = random.Random(8)
    for _ in range(500):
        chosen = [rng.choice(PIECES) for _ in range(rng.randint(1, 10))]
        wire = b"".join(w for w, _ in chosen)
        if crlf:
            wire = wire.replace(b"\n", b"\r\n")
        want = [ev for _, evs in chosen for ev in evs]
        decoder, got, i = SSEDecoder(), [], 0
        while i < len(wire):
            j = min(len(wire), i + rng.randint(1, 24))
            got += [(e.data, e.event, e.id) for e in decoder.feed(wire[i:j])]
            i = j
        assert got == want
        assert not decoder.pending


def test_an_id_applies_to_the_events_after_it_and_a_cut_event_is_pending() -> None:
    decoder = SSEDecoder()
    events = decoder.feed(b"id: 7\ndata: first\n\ndata: second\n\ndata: cut")
    assert [(e.data, e.id) for e in events] == [("first", "7"), ("second", "7")]
    assert decoder.pending
