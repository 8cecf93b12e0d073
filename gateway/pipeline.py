"""The one path every request takes, whatever the inbound dialect.

    ChatRequest (normalised by the dialect)
      -> model check (the key may use the alias)
      -> admit (rate limits + quota reservation)
      -> cache lookup
      -> route: target after target until one answers (streaming: only before the first chunk)
      -> settle (real usage replaces the reservation; usage recorded)
      -> cache store
    and back to the dialect, which encodes the `ChatResult` or the `ChatChunk`s.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import msgspec

from adapters.base import Adapter
from adapters.tokens import estimate_prompt_tokens, estimate_tokens
from adapters.types import ChatChunk, ChatRequest, ChatResult, UpstreamError, Usage
from gateway.auth import KeyRing, Principal
from gateway.cache import CacheFill, ResponseCache, cache_use, replay
from gateway.config import Config
from gateway.errors import GatewayError, UpstreamFailed
from gateway.limits import Admission, Limiter, nothing_to_await, reservation_estimate
from gateway.metrics import Metrics
from gateway.routing import Router
from gateway.usage import UsageRecord


class CallMeta(msgspec.Struct):
    """What the pipeline learnt about one call; dialects turn it into response headers."""

    request_id: str
    alias: str
    backend: str = ""
    attempts: int = 0
    cache: str = "bypass"
    headers: dict[str, str] = {}
    decisions: list[dict[str, Any]] = msgspec.field(default_factory=list)
    started: float = msgspec.field(default_factory=time.monotonic)


_encode = msgspec.json.Encoder().encode
T = TypeVar("T")


def explain_json(meta: CallMeta) -> bytes:
    """The compact routing story for `x-gateway-explain`: candidates in the order considered,
    what happened to each (skipped for cooldown, failed with an error, answered)."""
    return _encode({"alias": meta.alias, "attempts": meta.attempts, "backend": meta.backend,
                    "considered": meta.decisions})


class StreamCall:
    """An open stream whose first chunk has already arrived (so failover is over).

    Iterate it for the chunks; it settles usage exactly once, when the stream ends, fails or
    is closed early (client gone): what was produced is what is billed. The settlement is sent
    to the store then, before the dialect writes its last events, and awaited by `settled()`
    after they are gone (as `Pipeline.complete` does): the stream's end does not wait a store
    round trip, yet the client's next request finds its slot free and its usage counted.
    """

    def __init__(self, pipeline: Pipeline, principal: Principal, req: ChatRequest, meta: CallMeta,
                 first: ChatChunk | None, rest: AsyncIterator[ChatChunk], admission: Any,
                 fill: CacheFill | None = None) -> None:
        self.meta = meta
        self._pipeline = pipeline
        self._principal = principal
        self._req = req
        self._first = first
        self._rest = rest
        self._admission = admission
        self._produced: list[str] = []
        self._usage: Usage | None = None
        self._error: str | None = None
        self._finish: str | None = None
        self._fill = fill  # this stream fills the cache entry for its request
        self._settled = False
        self._settling: Awaitable[None] | None = None
        self._calls = False  # function-call deltas went by: the text alone is not the answer

    async def __aiter__(self) -> AsyncIterator[ChatChunk]:
        try:
            if self._first is not None:
                yield self._observe(self._first)
            async for chunk in self._rest:
                yield self._observe(chunk)
        except UpstreamError as exc:
            self._error = exc.code
            self._pipeline.metrics.stream_failed(self.meta.backend, exc.code)
            raise UpstreamFailed(exc) from None
        finally:
            await self.aclose()

    def _observe(self, chunk: ChatChunk) -> ChatChunk:
        if chunk.text:
            self._produced.append(chunk.text)
        if chunk.usage is not None:
            self._usage = chunk.usage
        if chunk.tool_calls:
            self._calls = True
        if chunk.finish_reason is not None:
            self._finish = chunk.finish_reason
        return chunk

    async def aclose(self) -> None:
        """Close the upstream stream and send the settlement (`settled()` awaits it)."""
        if self._settled:
            return
        self._settled = True
        with contextlib.suppress(Exception):
            await self._rest.aclose()  # type: ignore[attr-defined]
        usage = self._usage or Usage(estimate_prompt_tokens(self._req),
                                     estimate_tokens("".join(self._produced)), "estimated")
        if self._fill is not None:
            # a streamed function call comes in pieces: such an answer is not cached
            if self._error is None and self._finish is not None and not self._calls:
                await self._fill.put(ChatResult("".join(self._produced), self._finish, usage),
                                     self._pipeline.cache_ttl(self._req.model))
            await self._fill.abandon()
        self._settling = self._pipeline.settle(self._principal, self._req, self.meta,
                                               self._admission, usage, self._error)

    async def settled(self) -> None:
        """Close the call if the stream did not, then wait for its settlement to be done. The
        dialect awaits this once the stream's last bytes are sent (or the client is gone)."""
        await self.aclose()
        settling, self._settling = self._settling, None
        if settling is not None:
            await settling


class Pipeline:
    def __init__(self, config: Config, keyring: KeyRing, adapters: dict[str, Adapter],
                 router: Router, limiter: Limiter | None = None, cache: ResponseCache | None = None,
                 metrics: Metrics | None = None, door: str = "openai") -> None:
        self.config = config
        self.keyring = keyring
        self.adapters = adapters
        self.router = router
        self.limiter = limiter  # None: no limits, quotas nor usage accounting
        self.cache = cache  # None: no response cache
        self.metrics = metrics if metrics is not None else Metrics()
        self.door = door  # the inbound dialect, a metrics label

    def for_door(self, door: str) -> Pipeline:
        """The same pipeline (shared router, limiter, cache, metrics), counting under `door`."""
        other = copy.copy(self)
        other.door = door
        return other

    def _count(self, alias: str, status: int, meta: CallMeta | None) -> None:
        route = self.config.models.get(alias)
        self.metrics.request(self.door, alias if route is not None else "unknown", status, meta,
                             route is not None and route.cache is not None)

    def _start(self, principal: Principal, req: ChatRequest) -> CallMeta:
        self.keyring.check_model(principal, req.model)
        req.user = principal.user
        req.trim_history = self.config.models[req.model].trim_history
        return CallMeta(request_id=req.request_id, alias=req.model)

    async def admit(self, principal: Principal, req: ChatRequest, meta: CallMeta) -> Admission | None:
        """Rate limits and quota reservation (one store round trip, none without limits)."""
        if self.limiter is None:
            return None
        est = reservation_estimate(req, self.config.models[req.model].default_max_tokens)
        admission = await self.limiter.admit(principal, req.model, req.request_id, est)
        limits = admission.headers()
        if limits:
            meta.headers = {**meta.headers, **limits}
        return admission

    def settle(self, principal: Principal, req: ChatRequest, meta: CallMeta, admission: Any,
               usage: Usage | None, error: str | None) -> Awaitable[None]:
        """Real usage replaces the reservation; the usage record is written. A cache hit
        costs no tokens: it counts as a request and a cache hit. Sent when called, done when
        awaited (`Limiter.settle`)."""
        if self.limiter is None or admission is None:
            return nothing_to_await()
        hit = meta.cache == "hit"
        charged = None if hit else usage
        u = charged or Usage(0, 0)
        record = UsageRecord(user=principal.user, key=principal.key_name, alias=meta.alias,
                             backend=meta.backend or "none", prompt_tokens=u.prompt_tokens,
                             completion_tokens=u.completion_tokens, source=u.source, cache_hit=hit,
                             error=error)
        return self.limiter.settle(admission, charged, record)

    def cache_ttl(self, alias: str) -> float:
        cfg = self.config.models[alias].cache
        return cfg.ttl if cfg is not None else 0.0

    async def _cache_lookup(self, principal: Principal, req: ChatRequest, meta: CallMeta,
                            cache_control: str | None) -> ChatResult | CacheFill | None:
        """A hit (meta.cache "hit"), a fill to complete (a "miss"), or None (a "bypass")."""
        cfg = self.config.models[req.model].cache
        if self.cache is None or cfg is None:
            return None
        use = cache_use(cfg, req, cache_control)
        if use == "bypass":
            return None
        key = self.cache.key(principal.user, req.model, req, cfg.shared)
        found = await self.cache.lookup(key, read=use == "use")
        if isinstance(found, ChatResult):
            meta.cache, meta.backend = "hit", "cache"
        elif use == "use":
            meta.cache = "miss"
        return found

    async def _counted(self, req: ChatRequest, opening: Awaitable[T], meta_of: Callable[[T], CallMeta]) -> T:
        """Await `opening`, counting the request: its error's status, or a 200."""
        try:
            out = await opening
        except GatewayError as exc:
            self._count(req.model, exc.status, exc.meta)
            raise
        except Exception:
            self._count(req.model, 500, None)
            raise
        self._count(req.model, 200, meta_of(out))
        return out

    async def complete(self, principal: Principal, req: ChatRequest, cache_control: str | None,
                       deliver: Callable[[ChatResult, CallMeta], Awaitable[None]]) -> None:
        """Answer `req` and hand the answer to `deliver` (which sends it to the client).

        The settlement is sent to the store before `deliver` runs and awaited after it: the
        client does not wait a store round trip for its answer, yet the settlement reaches
        Redis before the answer reaches the client, so the client's next request (to any
        gateway) finds its concurrency slot free and its usage counted."""
        result, meta, settling = await self._counted(
            req, self._complete(principal, req, cache_control), lambda out: out[1])
        try:
            await deliver(result, meta)
        finally:
            await settling

    async def _complete(self, principal: Principal, req: ChatRequest,
                        cache_control: str | None) -> tuple[ChatResult, CallMeta, Awaitable[None]]:
        meta = self._start(principal, req)
        admission = await self.admit(principal, req, meta)
        fill: CacheFill | None = None
        error: str | None = "gateway_error"  # settled here when the call fails
        try:
            found = await self._cache_lookup(principal, req, meta, cache_control)
            if isinstance(found, ChatResult):
                result = found
            else:
                fill = found
                result = await self.router.complete(req, meta)
                if fill is not None:
                    await fill.put(result, self.cache_ttl(req.model))
            error = None
        except UpstreamError as exc:
            error = exc.code
            failed = UpstreamFailed(exc)
            failed.meta = meta
            raise failed from None
        except GatewayError as exc:
            error = exc.code
            exc.meta = meta
            raise
        finally:
            if fill is not None:
                await fill.abandon()
            if error is not None:
                await self.settle(principal, req, meta, admission, None, error)
        usage = None if meta.cache == "hit" else result.usage
        return result, meta, self.settle(principal, req, meta, admission, usage, None)

    async def open_stream(self, principal: Principal, req: ChatRequest,
                          cache_control: str | None = None) -> StreamCall:
        """Counted as a 200 once the first chunk is in; a later failure is an upstream error."""
        return await self._counted(req, self._open_stream(principal, req, cache_control), lambda call: call.meta)

    async def _open_stream(self, principal: Principal, req: ChatRequest,
                           cache_control: str | None) -> StreamCall:
        meta = self._start(principal, req)
        admission = await self.admit(principal, req, meta)
        fill: CacheFill | None = None
        try:
            found = await self._cache_lookup(principal, req, meta, cache_control)
            if isinstance(found, ChatResult):
                return StreamCall(self, principal, req, meta, None, replay(found), admission)
            fill = found
            first, rest = await self.router.open_stream(req, meta)
        except UpstreamError as exc:
            if fill is not None:
                await fill.abandon()
            await self.settle(principal, req, meta, admission, None, exc.code)
            failed = UpstreamFailed(exc)
            failed.meta = meta
            raise failed from None
        except BaseException:
            if fill is not None:
                await fill.abandon()
            await self.settle(principal, req, meta, admission, None, "gateway_error")
            raise
        return StreamCall(self, principal, req, meta, first, rest, admission, fill)

