"""Model alias -> the backends that may answer it, in the order to try them.

A retryable `UpstreamError` moves on to the next target, then to the alias's fallbacks;
a non-retryable one (the client's 4xx) is raised at once. When streaming, moving on is only
possible before the first chunk has been produced.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import msgspec

from adapters.base import Adapter
from adapters.types import ChatChunk, ChatRequest, ChatResult, UpstreamError, UpstreamUnavailable
from gateway.config import Config

if TYPE_CHECKING:
    from gateway.pipeline import CallMeta


class Router:
    def __init__(self, config: Config, adapters: dict[str, Adapter]) -> None:
        self.config = config
        self.adapters = adapters
        self._plans = {alias: self._resolve(alias) for alias in config.models}

    def _resolve(self, alias: str, seen: frozenset[str] = frozenset()) -> list[str]:
        """Backends to try for an alias: targets by priority, then each fallback's own plan."""
        route = self.config.models[alias]
        plan = [t.backend for t in sorted(route.targets, key=lambda t: t.priority)]
        for fb in route.fallbacks:
            if fb in self.config.models and fb not in seen:
                plan += self._resolve(fb, seen | {alias})
            elif fb in self.config.backends:
                plan.append(fb)
        return list(dict.fromkeys(plan))

    def plan(self, alias: str) -> list[str]:
        return self._plans[alias]

    def _backend_request(self, req: ChatRequest, backend: str) -> ChatRequest:
        model = getattr(self.config.backends[backend], "model", None) or req.model
        return msgspec.structs.replace(req, model=model)

    async def complete(self, req: ChatRequest, meta: CallMeta) -> ChatResult:
        last: UpstreamError | None = None
        for backend in self.plan(req.model):
            meta.attempts += 1
            meta.backend = backend
            try:
                return await self.adapters[backend].complete(self._backend_request(req, backend))
            except UpstreamError as exc:
                if not exc.retryable:
                    raise
                last = exc
        raise last or UpstreamUnavailable(f"no backend for {req.model}")

    async def open_stream(self, req: ChatRequest,
                          meta: CallMeta) -> tuple[ChatChunk | None, AsyncIterator[ChatChunk]]:
        """Start a stream and wait for its first chunk, failing over until one produces it."""
        last: UpstreamError | None = None
        for backend in self.plan(req.model):
            meta.attempts += 1
            meta.backend = backend
            stream = self.adapters[backend].stream(self._backend_request(req, backend))
            try:
                first = await anext(stream, None)
            except UpstreamError as exc:
                await stream.aclose()  # type: ignore[attr-defined]
                if not exc.retryable:
                    raise
                last = exc
                continue
            except BaseException:
                await stream.aclose()  # type: ignore[attr-defined]
                raise
            return first, stream
        raise last or UpstreamUnavailable(f"no backend for {req.model}")
