"""The response cache: exact match over the normalised request, scoped to the user unless
the alias shares it, with single flight so identical concurrent misses call upstream once.

A cache entry is a `ChatResult`; a streaming request is answered from it by `replay`.
Single flight works at two levels: in one process, followers await the leader's future; across
processes, the leader holds a store lock and the others poll for the entry (or for the lock
to go away, when the leader failed) until `wait` runs out. Store trouble never fails a
request: the cache is skipped (a miss, an unsaved entry, an uncoordinated call upstream).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Literal

import msgspec

from adapters.types import ChatChunk, ChatRequest, ChatResult
from gateway.config import CacheConfig
from gateway.store.base import Store, StoreUnavailable

log = logging.getLogger("llm_gateway.cache")

CacheUse = Literal["use", "refresh", "bypass"]

_encode = msgspec.msgpack.Encoder()
_decode = msgspec.msgpack.Decoder(ChatResult)
_normal = msgspec.json.Encoder(order="sorted")


def cache_use(cfg: CacheConfig | None, req: ChatRequest, cache_control: str | None = None) -> CacheUse:
    """`use` (read and write), `refresh` (client sent no-cache: skip the read, store the
    fresh answer) or `bypass` (alias not cached, request not deterministic, or no-store)."""
    if cfg is None:
        return "bypass"
    directives = {d.strip().split("=", 1)[0].lower() for d in (cache_control or "").split(",")}
    if "no-store" in directives:
        return "bypass"
    if cfg.mode != "always" and req.temperature != 0:
        return "bypass"
    return "refresh" if "no-cache" in directives else "use"


async def replay(result: ChatResult) -> AsyncIterator[ChatChunk]:
    """A cached answer as a stream: its text (and function calls), then the end with finish
    reason and usage."""
    if result.tool_calls:
        calls = [{"index": i, **call} for i, call in enumerate(result.tool_calls)]
        yield ChatChunk(text=result.text, tool_calls=calls)
    elif result.text:
        yield ChatChunk(text=result.text)
    yield ChatChunk(finish_reason=result.finish_reason, usage=result.usage)


class CacheFill:
    """The right (and duty) to call upstream for a missed key and store the answer.

    `put` stores it and wakes the waiters; leaving without `put` (an error) lets the next
    waiter try. Use as `async with fill:` so the lock is released whatever happens."""

    def __init__(self, cache: ResponseCache, key: str, future: asyncio.Future[ChatResult | None],
                 token: str | None) -> None:
        self._cache = cache
        self.key = key
        self._future = future
        self._token = token
        self._done = False

    async def put(self, result: ChatResult, ttl: float) -> None:
        await self._cache.put(self.key, result, ttl)
        self._finish(result)
        await self._unlock()

    async def abandon(self) -> None:
        self._finish(None)
        await self._unlock()

    def _finish(self, result: ChatResult | None) -> None:
        if self._done:
            return
        self._done = True
        if self._cache._flights.get(self.key) is self._future:
            del self._cache._flights[self.key]
        if not self._future.done():
            self._future.set_result(result)

    async def _unlock(self) -> None:
        token, self._token = self._token, None
        if token is not None:
            with contextlib.suppress(StoreUnavailable):
                await self._cache.store.release_lock(self._cache.lock_key(self.key), token)

    async def __aenter__(self) -> CacheFill:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.abandon()


class ResponseCache:
    def __init__(self, store: Store, *, lock_ttl: float = 60.0, wait: float = 60.0,
                 poll: float = 0.02) -> None:
        self.store = store
        self.lock_ttl = lock_ttl
        self.wait = wait
        self.poll = poll
        self._flights: dict[str, asyncio.Future[ChatResult | None]] = {}
        self.store_errors = 0

    def key(self, principal_user: str, alias: str, req: ChatRequest, shared: bool) -> str:
        """The entry's key: a digest of the whole request as the backend would see it
        (messages, every sampling parameter, vendor extras), the alias, and the user unless
        shared. What only concerns transport or bookkeeping (stream, request id) is left out."""
        norm = msgspec.structs.replace(req, model="", user=None, request_id="", stream=False)
        scope = "*" if shared else principal_user
        digest = hashlib.sha256(_normal.encode([scope, alias, norm])).hexdigest()
        return f"gw:cache:{alias}:{digest}"

    @staticmethod
    def lock_key(key: str) -> str:
        return key + ":fill"

    async def get(self, key: str) -> ChatResult | None:
        try:
            raw = await self.store.get(key)
        except StoreUnavailable as exc:
            self.store_errors += 1
            log.warning("cache skipped, store unavailable: %s", exc)
            return None
        if raw is None:
            return None
        try:
            return _decode.decode(raw)
        except msgspec.DecodeError:
            return None

    async def put(self, key: str, result: ChatResult, ttl: float) -> None:
        if result.finish_reason == "error":
            return
        try:
            await self.store.set(key, _encode.encode(result), ttl)
        except StoreUnavailable as exc:
            self.store_errors += 1
            log.warning("cache entry not stored, store unavailable: %s", exc)

    async def lookup(self, key: str, read: bool = True) -> ChatResult | CacheFill:
        """A cached answer, possibly after waiting for another caller that is already
        fetching it; or a `CacheFill`: this caller goes upstream and puts the answer.
        `read=False` (client sent no-cache) skips straight to filling."""
        if not read:
            return CacheFill(self, key, asyncio.get_running_loop().create_future(), None)
        deadline = time.monotonic() + self.wait
        while True:
            hit = await self.get(key)
            if hit is not None:
                return hit
            flight = self._flights.get(key)
            if flight is not None:  # someone in this process is fetching it
                remaining = deadline - time.monotonic()
                try:
                    result = await asyncio.wait_for(asyncio.shield(flight), max(0.0, remaining))
                except TimeoutError:
                    return CacheFill(self, key, asyncio.get_running_loop().create_future(), None)
                if result is not None:
                    return result
                continue  # the leader failed: try to lead
            future: asyncio.Future[ChatResult | None] = asyncio.get_running_loop().create_future()
            self._flights[key] = future
            led = await self._lead_across_processes(key, future, deadline)
            if isinstance(led, CacheFill):
                return led
            if self._flights.get(key) is future:  # another process fetched it for us
                del self._flights[key]
            future.set_result(led)
            return led

    async def _lead_across_processes(self, key: str, future: asyncio.Future[ChatResult | None],
                                     deadline: float) -> ChatResult | CacheFill:
        lock = self.lock_key(key)
        while True:
            try:
                token = await self.store.acquire_lock(lock, self.lock_ttl)
            except StoreUnavailable:
                self.store_errors += 1
                return CacheFill(self, key, future, None)  # uncoordinated, but never stuck
            if token is not None:
                # the entry may have landed between our miss and our lock
                hit = await self.get(key)
                if hit is not None:
                    with contextlib.suppress(StoreUnavailable):
                        await self.store.release_lock(lock, token)
                    return hit
                return CacheFill(self, key, future, token)
            # another process is fetching it: wait for the entry, or for its lock to go
            while True:
                if time.monotonic() >= deadline:
                    return CacheFill(self, key, future, None)
                await asyncio.sleep(self.poll)
                hit = await self.get(key)
                if hit is not None:
                    return hit
                try:
                    if await self.store.get(lock) is None:
                        break  # it gave up: try to take over
                except StoreUnavailable:
                    return CacheFill(self, key, future, None)
