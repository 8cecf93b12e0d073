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
import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec

from adapters.base import Adapter
from adapters.tokens import estimate_prompt_tokens, estimate_tokens
from adapters.types import ChatChunk, ChatRequest, ChatResult, UpstreamError, Usage
from gateway.auth import KeyRing, Principal
from gateway.config import Config
from gateway.errors import GatewayError, UpstreamFailed
from gateway.routing import Router


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


def explain_json(meta: CallMeta) -> bytes:
    """The compact routing story for `x-gateway-explain`: candidates in the order considered,
    what happened to each (skipped for cooldown, failed with an error, answered)."""
    return _encode({"alias": meta.alias, "attempts": meta.attempts, "backend": meta.backend,
                    "considered": meta.decisions})


class StreamCall:
    """An open stream whose first chunk has already arrived (so failover is over).

    Iterate it for the chunks; it settles usage exactly once, when the stream ends, fails or
    is closed early (client gone): what was produced is what is billed.
    """

    def __init__(self, pipeline: Pipeline, principal: Principal, req: ChatRequest, meta: CallMeta,
                 first: ChatChunk | None, rest: AsyncIterator[ChatChunk], admission: Any) -> None:
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
        self._settled = False

    async def __aiter__(self) -> AsyncIterator[ChatChunk]:
        try:
            if self._first is not None:
                yield self._observe(self._first)
            async for chunk in self._rest:
                yield self._observe(chunk)
        except UpstreamError as exc:
            self._error = exc.code
            raise UpstreamFailed(exc) from None
        finally:
            await self.aclose()

    def _observe(self, chunk: ChatChunk) -> ChatChunk:
        if chunk.text:
            self._produced.append(chunk.text)
        if chunk.usage is not None:
            self._usage = chunk.usage
        return chunk

    async def aclose(self) -> None:
        if self._settled:
            return
        self._settled = True
        with contextlib.suppress(Exception):
            await self._rest.aclose()  # type: ignore[attr-defined]
        usage = self._usage or Usage(estimate_prompt_tokens(self._req),
                                     estimate_tokens("".join(self._produced)), "estimated")
        await self._pipeline.settle(self._principal, self._req, self.meta, self._admission,
                                    usage, self._error)


class Pipeline:
    def __init__(self, config: Config, keyring: KeyRing, adapters: dict[str, Adapter],
                 router: Router) -> None:
        self.config = config
        self.keyring = keyring
        self.adapters = adapters
        self.router = router

    def _start(self, principal: Principal, req: ChatRequest) -> CallMeta:
        self.keyring.check_model(principal, req.model)
        return CallMeta(request_id=req.request_id, alias=req.model)

    async def admit(self, principal: Principal, req: ChatRequest, meta: CallMeta) -> Any:
        """Rate limits and quota reservation (one store round trip). Returns the admission."""
        return None

    async def settle(self, principal: Principal, req: ChatRequest, meta: CallMeta, admission: Any,
                     usage: Usage | None, error: str | None) -> None:
        """Real usage replaces the reservation; the usage record is written."""
        return None

    async def complete(self, principal: Principal, req: ChatRequest) -> tuple[ChatResult, CallMeta]:
        meta = self._start(principal, req)
        admission = await self.admit(principal, req, meta)
        usage: Usage | None = None
        error: str | None = "gateway_error"
        try:
            result = await self.router.complete(req, meta)
            usage, error = result.usage, None
            return result, meta
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
            await self.settle(principal, req, meta, admission, usage, error)

    async def open_stream(self, principal: Principal, req: ChatRequest) -> StreamCall:
        meta = self._start(principal, req)
        admission = await self.admit(principal, req, meta)
        try:
            first, rest = await self.router.open_stream(req, meta)
        except UpstreamError as exc:
            await self.settle(principal, req, meta, admission, None, exc.code)
            failed = UpstreamFailed(exc)
            failed.meta = meta
            raise failed from None
        except BaseException:
            await self.settle(principal, req, meta, admission, None, "gateway_error")
            raise
        return StreamCall(self, principal, req, meta, first, rest, admission)
