"""Model alias -> which backends to try, in what order, with what patience.

For each request the router orders the alias's targets by its strategy (`priority`,
`weighted`, `least-busy`, `latency`), appends its fallbacks (aliases or backends), skips
backends in cooldown, and tries them in turn:
- a retryable `UpstreamError` (429, 5xx, connect error, timeout) is retried on the same backend
  up to `retries.attempts` times with exponential backoff and jitter (honouring `Retry-After`
  up to `retries.max_backoff`; a longer hint moves on at once), then moves on;
- a non-retryable one (the client's 4xx, a refused credential) is raised at once;
- a stream can move on only before its first chunk; the backend's `first_byte`, `idle` and
  `total` timeouts bound the wait for every chunk.
Every upstream call counts in `meta.attempts`; `meta.decisions` says what happened to each
candidate (for `x-gateway-explain`).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

import msgspec

from adapters.base import Adapter, Cooldown, Timeouts
from adapters.types import ChatChunk, ChatRequest, ChatResult, UpstreamError, UpstreamTimeout, UpstreamUnavailable
from gateway.config import Config, ModelAlias
from gateway.cooldown import Cooldowns

if TYPE_CHECKING:
    from gateway.pipeline import CallMeta

T = TypeVar("T")

_LATENCY_DECAY = 0.2  # weight of the newest time-to-first-token sample


class BackendStats:
    """Per-process view used by `least-busy` and `latency`."""

    __slots__ = ("in_flight", "ttft")

    def __init__(self) -> None:
        self.in_flight = 0
        self.ttft: float | None = None

    def observe_ttft(self, seconds: float) -> None:
        self.ttft = seconds if self.ttft is None else (
            _LATENCY_DECAY * seconds + (1 - _LATENCY_DECAY) * self.ttft)


class Router:
    def __init__(self, config: Config, adapters: dict[str, Adapter], store: object,
                 stats: dict[str, BackendStats] | None = None) -> None:
        self.config = config
        self.adapters = adapters
        self.stats = stats if stats is not None else {}
        for name in config.backends:
            self.stats.setdefault(name, BackendStats())
        policies: dict[str, Cooldown] = {
            name: b.cooldown for name, b in config.backends.items() if b.cooldown is not None}
        self.cooldowns = Cooldowns(store, policies)
        self._timeouts: dict[str, Timeouts] = {name: b.timeout for name, b in config.backends.items()}
        self._models = {name: getattr(b, "model", None) for name, b in config.backends.items()}
        self._static_plans: dict[str, tuple[str, ...]] = {}

    # --- ordering --------------------------------------------------------------------------

    def _order(self, route: ModelAlias) -> list[str]:
        targets = route.targets
        if route.strategy == "weighted":
            pool = [(t.backend, t.weight) for t in targets if t.weight > 0]
            order: list[str] = []
            while pool:
                total = sum(w for _, w in pool)
                x = random.random() * total
                for i, (name, w) in enumerate(pool):
                    x -= w
                    if x < 0 or i == len(pool) - 1:
                        order.append(name)
                        del pool[i]
                        break
            return order
        if route.strategy == "least-busy":
            return [t.backend for t in sorted(
                targets, key=lambda t: (self.stats[t.backend].in_flight, t.priority, random.random()))]
        if route.strategy == "latency":
            # Unmeasured backends first, so that every backend gets measured.
            return [t.backend for t in sorted(
                targets, key=lambda t: (self.stats[t.backend].ttft or 0.0, t.priority))]
        return [t.backend for t in sorted(targets, key=lambda t: t.priority)]

    def plan(self, alias: str, seen: frozenset[str] = frozenset()) -> list[str]:
        """Every backend to try for an alias, in order: its targets, then its fallbacks'.
        A plan made only of priority routes is the same every time: it is made once."""
        if not seen:
            static = self._static_plans.get(alias)
            if static is not None:
                return list(static)
        route = self.config.models[alias]
        plan = self._order(route)
        for fb in route.fallbacks:
            if fb in self.config.models and fb not in seen:
                plan += self.plan(fb, seen | {alias})
            elif fb in self.config.backends:
                plan.append(fb)
        plan = list(dict.fromkeys(plan))
        if not seen and self._is_static(alias, frozenset()):
            self._static_plans[alias] = tuple(plan)
        return plan

    def _is_static(self, alias: str, seen: frozenset[str]) -> bool:
        route = self.config.models[alias]
        return route.strategy == "priority" and all(
            self._is_static(fb, seen | {alias}) for fb in route.fallbacks
            if fb in self.config.models and fb not in seen)

    def _backend_request(self, req: ChatRequest, backend: str) -> ChatRequest:
        return msgspec.structs.replace(req, model=self._models.get(backend) or req.model)

    # --- attempts --------------------------------------------------------------------------

    def _candidates(self, req: ChatRequest, meta: CallMeta) -> list[str]:
        plan = self.plan(req.model)
        live = []
        for backend in plan:
            if self.cooldowns.cooling(backend):
                meta.decisions.append({"backend": backend, "skipped": "cooldown"})
            else:
                live.append(backend)
        if not live and plan:
            # Everything is cooling down: try the one whose cooldown ends first rather than fail.
            live = [min(plan, key=lambda b: self.cooldowns._until.get(b, 0.0))]
        return live

    async def _backoff(self, route: ModelAlias, retry: int, exc: UpstreamError) -> bool:
        """Sleep before retry number `retry` (1-based); False when the hint is past the cap."""
        cap = route.retries.max_backoff
        if exc.retry_after is not None:
            if exc.retry_after > cap:
                return False
            delay = exc.retry_after
        else:
            delay = min(cap, 0.25 * 2 ** (retry - 1)) * random.uniform(0.5, 1.0)
        await asyncio.sleep(delay)
        return True

    async def _failed(self, backend: str, exc: UpstreamError, meta: CallMeta) -> None:
        meta.decisions.append({"backend": backend, "error": exc.code, "status": exc.status})
        if exc.retryable:
            await self.cooldowns.failed(backend)

    async def _first_answer(self, req: ChatRequest, meta: CallMeta,
                            attempt: Callable[[str, ChatRequest], Awaitable[T]]) -> T:
        """Candidates in order, each retried as the alias says, until one `attempt` answers."""
        route = self.config.models[req.model]
        last: UpstreamError | None = None
        for backend in self._candidates(req, meta):
            breq = self._backend_request(req, backend)
            for retry in range(route.retries.attempts + 1):
                if retry and last is not None and not await self._backoff(route, retry, last):
                    break
                meta.attempts += 1
                meta.backend = backend
                try:
                    answer = await attempt(backend, breq)
                except UpstreamError as exc:
                    await self._failed(backend, exc, meta)
                    if not exc.retryable:
                        raise
                    last = exc
                    continue
                meta.decisions.append({"backend": backend, "answered": True})
                return answer
        raise last or UpstreamUnavailable(f"no backend available for {req.model}")

    async def complete(self, req: ChatRequest, meta: CallMeta) -> ChatResult:
        async def attempt(backend: str, breq: ChatRequest) -> ChatResult:
            stats = self.stats[backend]
            stats.in_flight += 1
            started = time.monotonic()
            total = self._timeouts[backend].total
            try:
                if total is None:
                    result = await self.adapters[backend].complete(breq)
                else:
                    async with asyncio.timeout(total):
                        result = await self.adapters[backend].complete(breq)
            except TimeoutError:
                raise UpstreamTimeout(f"backend {backend} took longer than its total timeout") from None
            finally:
                stats.in_flight -= 1
            stats.observe_ttft(time.monotonic() - started)
            return result

        return await self._first_answer(req, meta, attempt)

    async def open_stream(self, req: ChatRequest,
                          meta: CallMeta) -> tuple[ChatChunk | None, AsyncIterator[ChatChunk]]:
        """Start a stream and wait for its first chunk, moving on until a backend produces it."""

        async def attempt(backend: str, breq: ChatRequest) -> tuple[ChatChunk | None, AsyncIterator[ChatChunk]]:
            t = self._timeouts[backend]
            deadline = time.monotonic() + t.total if t.total else None
            stream = self.adapters[backend].stream(breq)
            started = time.monotonic()
            try:
                first = await _next(stream, _budget(t.first_byte, deadline), backend, "first byte")
            except BaseException:
                await stream.aclose()  # type: ignore[attr-defined]
                raise
            self.stats[backend].observe_ttft(time.monotonic() - started)
            return first, self._guard(stream, backend, t, deadline)

        return await self._first_answer(req, meta, attempt)

    async def _guard(self, stream: AsyncIterator[ChatChunk], backend: str, t: Timeouts,
                     deadline: float | None) -> AsyncIterator[ChatChunk]:
        """The rest of a stream, each chunk within the idle and total budgets."""
        stats = self.stats[backend]
        stats.in_flight += 1
        try:
            if t.idle is None and deadline is None:  # nothing to bound: no timer per chunk
                async for chunk in stream:
                    yield chunk
                return
            while True:
                chunk = await _next(stream, _budget(t.idle, deadline), backend, "next chunk")
                if chunk is None:
                    return
                yield chunk
        except UpstreamError as exc:
            if exc.retryable:
                await self.cooldowns.failed(backend)
            raise
        finally:
            stats.in_flight -= 1
            await stream.aclose()  # type: ignore[attr-defined]


def _budget(limit: float | None, deadline: float | None) -> float | None:
    if deadline is None:
        return limit
    left = max(0.0, deadline - time.monotonic())
    return left if limit is None else min(limit, left)


async def _next(stream: AsyncIterator[ChatChunk], budget: float | None, backend: str,
                what: str) -> ChatChunk | None:
    if budget is None:
        return await anext(stream, None)
    try:
        async with asyncio.timeout(budget):
            return await anext(stream, None)
    except TimeoutError:
        raise UpstreamTimeout(f"backend {backend} sent no {what} within {budget:g}s") from None
