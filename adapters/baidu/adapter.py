"""The Baidu wenxinworkshop adapter: normalised request in, normalised answer out.

One pooled `httpx.AsyncClient` per backend. In access_token mode every request carries the
shared token in `?access_token=` and an error_code 110/111 drops that token, fetches a new one
and retries once (streaming too, as long as nothing has been yielded). In AK/SK mode every
request is signed. Baidu reports most errors as HTTP 200 with `error_code`: every body is
checked, and a 200 carrying an error is never passed on as an answer.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import httpx
import msgspec
from msgspec import UNSET

from adapters.baidu.auth import AccessTokenSource, SigningAuth, install_log_redaction
from adapters.baidu.config import BaiduBackend
from adapters.baidu.errors import TOKEN_REFRESH, from_error_code, from_iam_rejection, redact
from adapters.baidu.wire import (
    BaiduChatResponse,
    BaiduError,
    BaiduStreamChunk,
    chat_path,
    finish_reason,
    from_baidu,
    to_baidu,
    usage_from,
)
from adapters.base import AdapterContext
from adapters.sse import SSEDecoder
from adapters.tokens import estimate_prompt_tokens, estimate_tokens
from adapters.types import (
    ChatChunk,
    ChatRequest,
    ChatResult,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamRateLimited,
    UpstreamTimeout,
    UpstreamUnavailable,
    Usage,
)

log = logging.getLogger("adapters.baidu")

_encode = msgspec.json.Encoder().encode
_decode_response = msgspec.json.Decoder(BaiduChatResponse).decode
_decode_chunk = msgspec.json.Decoder(BaiduStreamChunk).decode
_decode_error = msgspec.json.Decoder(BaiduError).decode
_JSON = {"Content-Type": "application/json"}


class BaiduAdapter:
    def __init__(self, cfg: BaiduBackend, ctx: AdapterContext) -> None:
        self.name = ctx.name
        self.cfg = cfg
        self._path = chat_path(cfg.endpoint)
        self._client = httpx.AsyncClient(
            base_url=cfg.base_url,
            timeout=httpx.Timeout(cfg.timeout.read, connect=cfg.timeout.connect),
            limits=httpx.Limits(max_connections=cfg.max_connections,
                                max_keepalive_connections=cfg.max_connections),
        )
        self._tokens: AccessTokenSource | None = None
        self._signer: SigningAuth | None = None
        if cfg.auth_mode == "access_token":
            self._tokens = AccessTokenSource(
                self._client, backend=ctx.name, api_key=cfg.api_key or "", secret_key=cfg.secret_key or "",
                state=ctx.state, refresh_margin=cfg.token_refresh_margin,
                fetch_timeout=cfg.timeout.connect + cfg.timeout.read,
            )
        else:
            self._signer = SigningAuth(cfg.access_key or "", cfg.secret_key or "", cfg.signature_expiration)
        install_log_redaction()

    @property
    def token_fetches(self) -> int:
        """Token endpoint calls made by this adapter (access_token mode)."""
        return self._tokens.fetches if self._tokens else 0

    async def complete(self, req: ChatRequest) -> ChatResult:
        payload = self._payload(req, stream=False)
        for attempt in (0, 1):
            request, token = await self._request(payload)
            resp = await self._send(request, stream=False)
            if resp.status_code != 200:
                raise self._http_error(resp)
            try:
                body = _decode_response(resp.content)
            except msgspec.DecodeError:
                raise UpstreamProtocolError(f"Baidu backend {self.name!r} answered unreadable JSON") from None
            if body.error_code is not UNSET:
                if await self._refreshed(body.error_code, token, attempt):
                    continue
                raise from_error_code(body.error_code, _msg(body.error_msg), self.name)
            result = from_baidu(body, model=req.model)
            if result.usage.source == "estimated":
                result.usage = Usage(estimate_prompt_tokens(req), estimate_tokens(result.text), "estimated")
            return result
        raise AssertionError("unreachable")

    async def stream(self, req: ChatRequest) -> AsyncIterator[ChatChunk]:
        payload = self._payload(req, stream=True)
        for attempt in (0, 1):
            request, token = await self._request(payload)
            resp = await self._send(request, stream=True)
            try:
                if resp.status_code != 200:
                    await resp.aread()
                    raise self._http_error(resp)
                if "json" in resp.headers.get("content-type", ""):
                    # An error answered in place of the event stream.
                    err = self._error_body(await resp.aread())
                    if await self._refreshed(err.error_code, token, attempt):
                        continue
                    raise from_error_code(err.error_code, err.error_msg, self.name)
                async for chunk in self._chunks(resp, req):
                    yield chunk
                return
            finally:
                await resp.aclose()

    async def aclose(self) -> None:
        if self._tokens is not None:
            await self._tokens.aclose()
        await self._client.aclose()

    # -- internals -------------------------------------------------------------------------

    def _payload(self, req: ChatRequest, stream: bool) -> bytes:
        trim = self.cfg.trim_history or req.trim_history
        body = to_baidu(req, max_input_chars=self.cfg.max_input_chars, trim_history=trim)
        body.stream = stream
        return _encode(body)

    async def _request(self, payload: bytes) -> tuple[httpx.Request, str | None]:
        token = await self._tokens.token() if self._tokens is not None else None
        request = self._client.build_request(
            "POST", self._path, content=payload, headers=_JSON,
            params={"access_token": token} if token is not None else None,
        )
        if self._signer is not None:
            self._signer.sign(request)
        return request, token

    async def _send(self, request: httpx.Request, stream: bool) -> httpx.Response:
        try:
            return await self._client.send(request, stream=stream)
        except httpx.TimeoutException:
            raise UpstreamTimeout(f"Baidu backend {self.name!r} timed out") from None
        except httpx.HTTPError as exc:
            raise UpstreamUnavailable(
                f"Baidu backend {self.name!r} is unreachable ({type(exc).__name__}: {redact(str(exc))})"
            ) from None

    async def _refreshed(self, code: int, token: str | None, attempt: int) -> bool:
        """On 110/111 in access_token mode (first attempt only): replace the token, say retry."""
        if code not in TOKEN_REFRESH or token is None or self._tokens is None or attempt > 0:
            return False
        log.warning("baidu backend %s: error_code %s, refreshing the access token and retrying once",
                    self.name, code)
        await self._tokens.invalidate(token)
        return True

    def _error_body(self, raw: bytes) -> BaiduError:
        try:
            return _decode_error(raw)
        except msgspec.DecodeError:
            raise UpstreamProtocolError(f"Baidu backend {self.name!r} answered an unreadable error") from None

    def _http_error(self, resp: httpx.Response) -> UpstreamError:
        bce_code = resp.headers.get("x-bce-error-code")
        if bce_code is not None:
            return from_iam_rejection(resp.status_code, bce_code, resp.headers.get("x-bce-error-message", ""),
                                      self.name)
        try:
            err = _decode_error(resp.content)
            return from_error_code(err.error_code, err.error_msg, self.name)
        except msgspec.DecodeError:
            pass
        if resp.status_code == 429:
            return UpstreamRateLimited(f"Baidu backend {self.name!r} answered HTTP 429")
        if resp.status_code >= 500:
            return UpstreamUnavailable(f"Baidu backend {self.name!r} answered HTTP {resp.status_code}")
        return from_iam_rejection(resp.status_code, "", "", self.name)

    async def _chunks(self, resp: httpx.Response, req: ChatRequest) -> AsyncIterator[ChatChunk]:
        decoder = SSEDecoder()
        tail = b""  # Baidu may also end a stream with a bare JSON error line (no `data:`)
        texts: list[str] = []
        try:
            async for raw in resp.aiter_bytes():
                tail = (tail + raw)[-4096:]
                for ev in decoder.feed(raw):
                    if not ev.data or ev.data == "[DONE]":
                        continue
                    try:
                        c = _decode_chunk(ev.data)
                    except msgspec.DecodeError:
                        raise UpstreamProtocolError(
                            f"Baidu backend {self.name!r} sent an unreadable stream chunk") from None
                    if c.error_code is not UNSET:
                        raise from_error_code(c.error_code, _msg(c.error_msg), self.name)
                    if not c.is_end:
                        if c.result:
                            texts.append(c.result)
                            yield ChatChunk(text=c.result)
                        continue
                    texts.append(c.result)
                    usage = usage_from(c.usage) or Usage(
                        estimate_prompt_tokens(req), estimate_tokens("".join(texts)), "estimated")
                    yield ChatChunk(text=c.result, finish_reason=finish_reason(c.is_truncated, c.need_clear_history),
                                    usage=usage)
                    return
        except httpx.TimeoutException:
            raise UpstreamTimeout(f"Baidu backend {self.name!r} timed out mid-stream") from None
        except httpx.HTTPError as exc:
            raise UpstreamProtocolError(
                f"Baidu backend {self.name!r} cut the stream ({type(exc).__name__})") from None
        for line in reversed(tail.splitlines()):
            if line.strip().startswith(b"{"):
                try:
                    err = _decode_error(line.strip())
                except msgspec.DecodeError:
                    break
                raise from_error_code(err.error_code, err.error_msg, self.name)
        raise UpstreamProtocolError(f"Baidu backend {self.name!r} ended the stream before is_end")


def _msg(value: object) -> str:
    return value if isinstance(value, str) else ""


def build(cfg: BaiduBackend, ctx: AdapterContext) -> BaiduAdapter:
    return BaiduAdapter(cfg, ctx)
