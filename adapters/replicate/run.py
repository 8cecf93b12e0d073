"""One prediction in flight, as the adapter sees it: its last known state, the clock of its
phases (cold boot, then generation), its usage, and a body reader that survives a deadline."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx

from adapters.replicate.wire import Prediction
from adapters.tokens import estimate_tokens
from adapters.types import Usage

TIMED_OUT = object()


class PredictionRun:
    """One prediction in flight: the last state seen, its phase clock, and whether it is
    settled (terminal, or a cancel was sent) so that it is cancelled at most once."""

    __slots__ = ("created", "input", "pieces", "pred", "processing_since", "settled")

    def __init__(self, pred: Prediction, inp: dict[str, Any], created: float) -> None:
        self.pred, self.input, self.created = pred, inp, created
        self.settled = False
        self.processing_since: float | None = None
        self.pieces = 0
        self.saw(pred)

    def saw(self, pred: Prediction) -> None:
        self.pred = pred
        if pred.terminal:
            self.settled = True
        if pred.status != "starting" and self.processing_since is None:
            self.processing_since = time.monotonic()

    def deadline(self, cold_boot: float, generation: float) -> tuple[float, str]:
        if self.processing_since is None:
            return self.created + cold_boot, "cold_boot"
        return self.processing_since + generation, "generation"

    def usage(self, pred: Prediction | None, text: str) -> Usage:
        """Token counts from `metrics` (reported); otherwise estimated."""
        m = pred.metrics if pred is not None else None
        if m is not None and m.input_token_count is not None and m.output_token_count is not None:
            return Usage(m.input_token_count, m.output_token_count, "reported")
        # Each output piece of a Llama runtime is one token; count them when we have them.
        pieces = self.pieces or (len(pred.output) if pred is not None and isinstance(pred.output, list) else 0)
        return Usage(estimate_tokens(str(self.input.get("prompt") or "")),
                     pieces or estimate_tokens(text), "estimated")

    def finish_reason(self, pred: Prediction | None) -> str:
        """Replicate reports none: `length` when the output used all of max_tokens, else `stop`."""
        limit = self.input.get("max_tokens", self.input.get("max_new_tokens"))
        produced = self.usage(pred, "").completion_tokens
        return "length" if isinstance(limit, int) and produced >= limit else "stop"


class ChunkReader:
    """Reads the body in a side task so a deadline can pass without breaking the read: at the
    cold-boot deadline the adapter checks the status and may keep reading."""

    def __init__(self, resp: httpx.Response) -> None:
        self._it = resp.aiter_bytes()
        self._task: asyncio.Task[bytes | None] | None = None

    async def _read(self) -> bytes | None:
        return await anext(self._it, None)

    async def next(self, within: float) -> bytes | object | None:
        """The next chunk, None at the end, or `TIMED_OUT` (the read stays pending)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._read())
        done, _ = await asyncio.wait({self._task}, timeout=max(0.0, within))
        if not done:
            return TIMED_OUT
        task, self._task = self._task, None
        return task.result()

    def close(self) -> None:
        if self._task is not None:
            self._task.add_done_callback(lambda t: t.cancelled() or t.exception())
            self._task.cancel()
            self._task = None
