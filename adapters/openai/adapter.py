"""The adapter for vLLM or any other OpenAI-compatible server."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any

import msgspec

from adapters import http1
from adapters.base import AdapterContext, BackendConfig
from adapters.openai.wire import UpstreamErrorDetail, UpstreamResponse
from adapters.sse import SSEDecoder
from adapters.tokens import estimate_prompt_tokens, estimate_tokens
from adapters.types import (
    ChatChunk,
    ChatRequest,
    ChatResult,
    UpstreamAuthError,
    UpstreamBadRequest,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamRateLimited,
    UpstreamTimeout,
    UpstreamUnavailable,
    Usage,
)

_decode_response = msgspec.json.Decoder(UpstreamResponse).decode
_encode = msgspec.json.Encoder().encode


class OpenAIBackend(BackendConfig, tag="openai"):
    base_url: str  # the API root including /v1, e.g. http://127.0.0.1:8000/v1
    model: str
    api_key: str = ""


def to_openai(req: ChatRequest, model: str) -> dict[str, Any]:
    """The upstream body: the normalised fields, then the client's vendor extras."""
    body: dict[str, Any] = {"model": model}
    if req.is_chat:
        body["messages"] = [msgspec.to_builtins(m) for m in req.messages or ()]
    else:
        body["prompt"] = req.prompt
    for field in ("max_tokens", "temperature", "top_p", "top_k", "presence_penalty",
                  "frequency_penalty", "seed", "stop"):
        value = getattr(req, field)
        if value is not None:
            body[field] = value
    if req.extra:
        body.update(req.extra)
    if req.stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return body


def _error_message(resp: UpstreamResponse | None, raw: bytes) -> str:
    if resp is not None:
        if isinstance(resp.error, UpstreamErrorDetail) and resp.error.message:
            return resp.error.message
        if isinstance(resp.error, str):
            return resp.error
        if resp.message:
            return resp.message
    return raw[:300].decode("utf-8", "replace") or "no body"


def _retry_after(headers: Mapping[str, str]) -> float | None:
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        value = headers.get(name)
        if value:
            try:
                return float(value) * scale
            except ValueError:
                return None
    return None


def error_from_status(backend: str, status: int, headers: Mapping[str, str], raw: bytes) -> UpstreamError:
    try:
        parsed: UpstreamResponse | None = _decode_response(raw) if raw else None
    except msgspec.DecodeError:
        parsed = None
    detail = _error_message(parsed, raw)
    if status == 429:
        return UpstreamRateLimited(f"backend {backend} is rate limiting: {detail}",
                                   retry_after=_retry_after(headers))
    if status in (401, 403):
        return UpstreamAuthError(f"backend {backend} refused the gateway's credentials ({status})")
    if status == 404:
        return UpstreamUnavailable(f"backend {backend} does not serve this model: {detail}",
                                   retryable=False, code="upstream_model_not_found")
    if status in (400, 413, 422):
        return UpstreamBadRequest(detail)
    if status in (408, 504):
        return UpstreamTimeout(f"backend {backend} timed out ({status})")
    return UpstreamUnavailable(f"backend {backend} failed with HTTP {status}: {detail}",
                               retry_after=_retry_after(headers))


class OpenAIAdapter:
    """One pool of keep-alive connections per backend (adapters/http1.py).

    Neither httpx nor aiohttp (DESIGN.md's stack choice, changed with a measured reason): this
    is the adapter on the hot path of every vLLM request, and bench/client_cost.py measures
    httpx at 1.2-6 ms of CPU per upstream call and aiohttp at about 0.2 ms, against a gateway
    budget of about 0.4 ms per request."""

    def __init__(self, cfg: OpenAIBackend, ctx: AdapterContext) -> None:
        self.name = ctx.name
        self.cfg = cfg
        headers = {"content-type": "application/json"}
        if cfg.api_key:
            headers["authorization"] = f"Bearer {cfg.api_key}"
        t = cfg.timeout
        self.pool = http1.Pool(cfg.base_url, max_connections=cfg.max_connections,
                               connect_timeout=t.connect, read_timeout=t.read, headers=headers)

    def _transport_error(self, exc: http1.HTTPError) -> UpstreamError:
        if isinstance(exc, http1.ConnectTimeout):
            return UpstreamTimeout(f"timed out connecting to backend {self.name}")
        if isinstance(exc, http1.ReadTimeout):
            return UpstreamTimeout(f"timed out waiting for backend {self.name}")
        if isinstance(exc, http1.CutShort):
            return UpstreamProtocolError(f"backend {self.name} cut the response short")
        if isinstance(exc, http1.ConnectFailed):
            return UpstreamUnavailable(f"cannot reach backend {self.name}: {exc}")
        return UpstreamUnavailable(f"cannot reach backend {self.name}: the connection closed")

    async def complete(self, req: ChatRequest) -> ChatResult:
        body = _encode(to_openai(req, self.cfg.model))
        try:
            status, headers, raw = await self.pool.request("POST", _path(req), body)
        except http1.HTTPError as exc:
            raise self._transport_error(exc) from None
        if status != 200:
            raise error_from_status(self.name, status, headers, raw)
        try:
            data = _decode_response(raw)
        except msgspec.DecodeError:
            raise UpstreamProtocolError(f"backend {self.name} sent malformed JSON") from None
        if data.error is not None or not data.choices:
            raise UpstreamProtocolError(
                f"backend {self.name} sent no choices: {_error_message(data, raw)}")
        choice = data.choices[0]
        text = (choice.message.content if choice.message else choice.text) or ""
        calls = choice.message.tool_calls if choice.message else None
        produced = text + "".join(_arguments(calls or ()))
        return ChatResult(text=text, finish_reason=choice.finish_reason or "stop",
                          usage=self._usage(data, req, produced), id=data.id, model=data.model,
                          tool_calls=calls or None)

    def _usage(self, data: UpstreamResponse, req: ChatRequest, text: str) -> Usage:
        if data.usage is not None:
            return Usage(data.usage.prompt_tokens, data.usage.completion_tokens, "reported")
        return Usage(estimate_prompt_tokens(req), estimate_tokens(text), "estimated")

    async def stream(self, req: ChatRequest) -> AsyncIterator[ChatChunk]:
        body = _encode(to_openai(req, self.cfg.model))
        try:
            resp = await self.pool.send("POST", _path(req), body)
        except http1.HTTPError as exc:
            raise self._transport_error(exc) from None
        try:
            if resp.status != 200:
                raise error_from_status(self.name, resp.status, resp.headers, await resp.read())
            # The reading loop is inline (not a generator of its own): one async-generator
            # layer less per streamed chunk.
            decoder = SSEDecoder()
            finish: str | None = None
            usage: Usage | None = None
            produced: list[str] = []
            while raw := await resp.read_some():
                for event in decoder.feed(raw):
                    if event.data == "[DONE]":
                        if usage is None:
                            usage = Usage(estimate_prompt_tokens(req),
                                          estimate_tokens("".join(produced)), "estimated")
                        await resp.read()  # the chunked terminator: keeps the connection
                        yield ChatChunk(finish_reason=finish or "stop", usage=usage)
                        return
                    try:
                        data = _decode_response(event.data)
                    except msgspec.DecodeError:
                        raise UpstreamProtocolError(
                            f"backend {self.name} sent a malformed stream event") from None
                    if data.error is not None:
                        raise UpstreamUnavailable(
                            f"backend {self.name} failed mid-stream: {_error_message(data, b'')}")
                    if data.usage is not None:
                        usage = Usage(data.usage.prompt_tokens, data.usage.completion_tokens, "reported")
                    for choice in data.choices[:1]:
                        delta = choice.delta
                        piece = delta.content if delta else choice.text
                        if choice.finish_reason:
                            finish = choice.finish_reason
                        if delta is not None and delta.tool_calls:
                            produced.extend(_arguments(delta.tool_calls))
                            yield ChatChunk(text=piece or "", tool_calls=delta.tool_calls)
                        elif piece:
                            produced.append(piece)
                            yield ChatChunk(text=piece)
            raise UpstreamProtocolError(f"backend {self.name} ended the stream without [DONE]")
        except http1.HTTPError as exc:
            raise self._transport_error(exc) from None
        finally:
            # A stream read to its end goes back to the pool; one left early is closed, so the
            # upstream sees the client go.
            resp.release()

    async def aclose(self) -> None:
        await self.pool.aclose()


def _arguments(calls: list[dict[str, Any]] | tuple[()]) -> list[str]:
    """The argument texts of function calls (or call deltas): what the model produced for them."""
    return [(c.get("function") or {}).get("arguments") or "" for c in calls]


def _path(req: ChatRequest) -> str:
    return "/chat/completions" if req.is_chat else "/completions"


def build(cfg: OpenAIBackend, ctx: AdapterContext) -> OpenAIAdapter:
    return OpenAIAdapter(cfg, ctx)
