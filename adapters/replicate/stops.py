"""Cutting generated text at the first stop sequence, as pieces arrive.

Replicate's runtimes may run past a stop sequence (or never see it: a stop containing a comma
cannot be sent in `stop_sequences`), so the adapter cuts the text itself. A piece that could be
the start of a stop sequence is held back until the next piece settles it, so no byte of a stop
sequence ever reaches the client.
"""

from __future__ import annotations

from collections.abc import Sequence


class StopCutter:
    __slots__ = ("_held", "_longest", "_stops", "hit")

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = [s for s in stops if s]
        self._longest = max((len(s) for s in self._stops), default=0)
        self._held = ""
        self.hit = False

    def feed(self, piece: str) -> str:
        """The text that is safe to emit now; sets `hit` once a stop sequence appeared."""
        if self.hit:
            return ""
        if not self._stops:
            return piece
        buf = self._held + piece
        found = [i for s in self._stops if (i := buf.find(s)) >= 0]
        if found:
            self.hit = True
            self._held = ""
            return buf[: min(found)]
        keep = self._partial_suffix(buf)
        self._held = buf[len(buf) - keep:] if keep else ""
        return buf[: len(buf) - keep]

    def flush(self) -> str:
        """The held-back tail, once the output has ended without completing a stop."""
        held, self._held = self._held, ""
        return held

    def _partial_suffix(self, buf: str) -> int:
        for k in range(min(len(buf), self._longest - 1), 0, -1):
            tail = buf[-k:]
            if any(s.startswith(tail) for s in self._stops):
                return k
        return 0


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """`text` up to the first stop sequence, and whether one was found."""
    cutter = StopCutter(stops)
    head = cutter.feed(text)
    return (head, True) if cutter.hit else (head + cutter.flush(), False)
