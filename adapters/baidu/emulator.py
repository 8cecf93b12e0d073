"""A faithful fake of Baidu wenxinworkshop v1: a raw ASGI app, served by `LoopbackServer`.

- `POST /oauth/2.0/token?grant_type=client_credentials&client_id=..&client_secret=..` issues
  tokens that expire after `token_ttl` seconds (counted in `token_calls`); wrong credentials
  get `{"error": "invalid_client", ...}` with HTTP 401.
- `POST /rpc/2.0/ai_custom/v1/wenxinworkshop/chat/{endpoint}` accepts either
  `?access_token=` (unknown -> error_code 110, expired -> 111, none -> 110; all HTTP 200) or a
  `bce-auth-v1` signature, verified with `adapters.baidu.signer.verify` (unknown AK -> 401
  `NotFound`, bad signature -> 403 `SignatureDoesNotMatch`, stale date -> 403
  `RequestExpired`, as `X-Bce-Error-Code`/`X-Bce-Error-Message` headers and a JSON body). A
  signed `x-bce-content-sha256` must match the body (else 400 `BadDigest`).
- Baidu's body rules answer HTTP 200 with error_code 336003 (336002 for non-JSON, 336101 for
  a non-POST, 3 for an unknown endpoint, 336104 for a `system` field on Llama).
- Streams are `data: {...}\\n\\n` lines with `sentence_id`, `is_end`, usage on the last.

The control surface is the app object itself (`app.control is app`): `inject(code, ...)`,
`expire_tokens()`, `respond_with(...)`, `latency`, `chunk_delay`, `token_latency`,
`token_calls`, `chat_calls`, `received`, `streams_cancelled`.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

import msgspec

from adapters.baidu.signer import SignatureRejected, verify
from adapters.baidu.wire import (
    CHAT_PATH_PREFIX,
    TOKEN_PATH,
    BaiduChatRequest,
    BaiduChatResponse,
    BaiduStreamChunk,
    BaiduUsage,
    validate_request,
)
from adapters.sse import encode_event

DEMO_API_KEY = "demo-api-key"
DEMO_SECRET_KEY = "demo-secret-key"
DEMO_ACCESS_KEY = "demo-access-key"
DEMO_IAM_SECRET = "demo-iam-secret"

ERROR_MESSAGES = {
    1: "Unknown error",
    2: "Service temporarily unavailable",
    3: "Unsupported openapi method",
    4: "Open api request limit reached",
    6: "No permission to access data",
    13: "Get service token failed",
    14: "IAM Certification failed",
    15: "app not exists or create failed",
    17: "Open api daily request limit reached",
    18: "Open api qps request limit reached",
    19: "Open api total request limit reached",
    100: "Invalid parameter",
    110: "Access token invalid or no longer valid",
    111: "Access token expired",
    336000: "Internal error",
    336001: "Invalid Argument",
    336002: "Invalid JSON",
    336003: "Invalid Argument",
    336100: "try again later",
    336101: "Invalid HTTP Method",
    336104: "Invalid argument (system)",
    336501: "Rate limit reached for RPM",
    336502: "Rate limit reached for TPM",
}

_encode = msgspec.json.Encoder().encode
_decode_body = msgspec.json.Decoder(BaiduChatRequest).decode


@dataclass
class Fault:
    code: int
    msg: str
    times: int
    after_chunks: int | None  # streams only: error after this many chunks (None: before any)


@dataclass
class Received:
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes
    outcome: int = 0  # 0 ok, else the error_code or HTTP status answered

    def json(self) -> Any:
        return msgspec.json.decode(self.body)


@dataclass
class Scripted:
    result: str | None
    is_truncated: bool
    need_clear_history: bool


@dataclass
class BaiduEmulator:
    apps: dict[str, str] = field(default_factory=lambda: {DEMO_API_KEY: DEMO_SECRET_KEY})
    iam: dict[str, str] = field(default_factory=lambda: {DEMO_ACCESS_KEY: DEMO_IAM_SECRET})
    token_ttl: int = 2592000  # seconds; `expires_in` of every token issued
    endpoints: tuple[str, ...] = ("llama_3_8b", "llama_3_70b")
    latency: float = 0.0
    token_latency: float = 0.0
    chunk_delay: float = 0.0
    max_input_chars: int = 4800
    skew: float = 300.0
    require_content_digest: bool = False

    token_calls: int = 0
    chat_calls: int = 0
    streams_cancelled: int = 0
    received: list[Received] = field(default_factory=list)
    tokens: dict[str, float] = field(default_factory=dict)  # token -> expires at (unix s)
    _faults: deque[Fault] = field(default_factory=deque)
    _script: deque[Scripted] = field(default_factory=deque)
    _mutex: threading.Lock = field(default_factory=threading.Lock)

    @property
    def control(self) -> BaiduEmulator:
        return self

    # -- control ---------------------------------------------------------------------------

    def inject(self, code: int, times: int = 1, msg: str | None = None, after_chunks: int | None = None) -> None:
        """The next `times` chat requests (that pass auth) answer `error_code` `code`."""
        with self._mutex:
            self._faults.append(Fault(code, msg or ERROR_MESSAGES.get(code, "error"), times, after_chunks))

    def respond_with(self, result: str | None = None, *, is_truncated: bool = False,
                     need_clear_history: bool = False) -> None:
        """Script the next successful answer (default: an echo of the last user turn)."""
        with self._mutex:
            self._script.append(Scripted(result, is_truncated, need_clear_history))

    def expire_tokens(self) -> None:
        """Every token issued so far now answers 111 (expired)."""
        with self._mutex:
            for tok in self.tokens:
                self.tokens[tok] = 0.0

    def reset(self, forget_tokens: bool = True) -> None:
        """Clear faults, scripts, records and counters (and, by default, the issued tokens)."""
        with self._mutex:
            self._faults.clear()
            self._script.clear()
            self.received.clear()
            if forget_tokens:
                self.tokens.clear()
            self.token_calls = self.chat_calls = self.streams_cancelled = 0

    def _next_fault(self) -> Fault | None:
        with self._mutex:
            if not self._faults:
                return None
            fault = self._faults[0]
            fault.times -= 1
            if fault.times <= 0:
                self._faults.popleft()
            return fault

    # -- ASGI ------------------------------------------------------------------------------

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        path: str = scope["path"]
        query = dict(parse_qsl(scope["query_string"].decode("latin-1"), keep_blank_values=True))
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if path == TOKEN_PATH:
            await self._token(scope["method"], query, send)
        elif path.startswith(CHAT_PATH_PREFIX):
            rec = Received(path, query, headers, body)
            self.received.append(rec)
            self.chat_calls += 1
            await self._chat(scope, rec, receive, send)
        else:
            await _respond(send, 404, b'{"error_code":3,"error_msg":"Unsupported openapi method"}')

    async def _token(self, method: str, query: dict[str, str], send: Any) -> None:
        self.token_calls += 1
        if self.token_latency:
            await asyncio.sleep(self.token_latency)
        if query.get("grant_type") != "client_credentials":
            return await _respond(send, 400, _encode(
                {"error": "unsupported_grant_type", "error_description": "grant_type must be client_credentials"}))
        secret = self.apps.get(query.get("client_id", ""))
        if secret is None:
            return await _respond(send, 401, _encode(
                {"error": "invalid_client", "error_description": "unknown client id"}))
        if not secrets.compare_digest(secret, query.get("client_secret", "")):
            return await _respond(send, 401, _encode(
                {"error": "invalid_client", "error_description": "Client authentication failed"}))
        token = f"24.{secrets.token_hex(16)}.{int(self.token_ttl)}.{int(time.time())}.282335-35791246"
        self.tokens[token] = time.time() + int(self.token_ttl)  # as announced in expires_in
        await _respond(send, 200, _encode({
            "refresh_token": "25." + secrets.token_hex(16), "expires_in": int(self.token_ttl),
            "session_key": secrets.token_hex(8), "access_token": token,
            "scope": "public wise_adapt", "session_secret": secrets.token_hex(8),
        }))

    def _authenticate(self, method: str, rec: Received) -> tuple[int, dict[str, str], bytes] | int | None:
        """None when the caller is known; an error_code (HTTP 200 body) or an IAM rejection."""
        token = rec.query.get("access_token")
        if token is not None:
            expires = self.tokens.get(token)
            if expires is None:
                return 110
            return 111 if time.time() >= expires else None
        if "authorization" not in rec.headers:
            return 110
        try:
            auth = verify(method, rec.path, rec.query, rec.headers,
                          secret_for=self.iam, now=time.time(), skew=self.skew)
        except SignatureRejected as exc:
            return _iam_error(exc.status, exc.code, exc.message)
        digest = rec.headers.get("x-bce-content-sha256")
        signed = "x-bce-content-sha256" in auth.signed_headers or not auth.signed_headers
        if (digest is not None and signed and digest != hashlib.sha256(rec.body).hexdigest()) or (
            self.require_content_digest and digest is None
        ):
            return _iam_error(400, "BadDigest", "BadDigest, cause: the body does not match x-bce-content-sha256")
        return None

    async def _chat(self, scope: dict[str, Any], rec: Received, receive: Any, send: Any) -> None:
        if self.latency:
            await asyncio.sleep(self.latency)
        if scope["method"] != "POST":
            return await self._error(send, rec, 336101)
        if rec.path[len(CHAT_PATH_PREFIX):] not in self.endpoints:
            return await self._error(send, rec, 3)
        denied = self._authenticate(scope["method"], rec)
        if isinstance(denied, int):
            return await self._error(send, rec, denied)
        if denied is not None:
            status, headers, payload = denied
            rec.outcome = status
            return await _respond(send, status, payload, headers)
        try:
            raw = msgspec.json.decode(rec.body)
        except msgspec.DecodeError:
            return await self._error(send, rec, 336002)
        stream = isinstance(raw, dict) and raw.get("stream") is True
        fault = self._next_fault()
        if fault is not None and (fault.after_chunks is None or not stream):
            return await self._error(send, rec, fault.code, fault.msg)
        if isinstance(raw, dict) and "system" in raw:
            return await self._error(send, rec, 336104, "system is not supported by this model")
        try:
            req = _decode_body(rec.body)
        except msgspec.ValidationError as exc:
            return await self._error(send, rec, 336003, f"Invalid Argument: {exc}")
        problem = validate_request(req, self.max_input_chars)
        if problem is not None:
            return await self._error(send, rec, 336003, problem)
        with self._mutex:
            script = self._script.popleft() if self._script else None
        text = script.result if script and script.result is not None else _echo(req)
        flags = (script.is_truncated, script.need_clear_history) if script else (False, False)
        prompt_tokens = sum(len(m.content) for m in req.messages) // 4 + 1
        usage = BaiduUsage(prompt_tokens, len(text) // 4 + 1, prompt_tokens + len(text) // 4 + 1)
        rid = "as-" + secrets.token_hex(5)
        if not req.stream:
            resp = BaiduChatResponse(rid, "chat.completion", int(time.time()), text, flags[0], flags[1],
                                     usage=usage)
            return await _respond(send, 200, _encode(resp))
        await self._stream(send, receive, rid, text, flags, usage, fault)

    async def _stream(self, send: Any, receive: Any, rid: str, text: str, flags: tuple[bool, bool],
                      usage: BaiduUsage, fault: Fault | None) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]})
        gone = asyncio.ensure_future(_disconnected(receive))
        pieces = _pieces(text)
        partial = BaiduUsage(usage.prompt_tokens, 0, usage.prompt_tokens)
        try:
            for i, piece in enumerate([*pieces, ""]):
                if fault is not None and fault.after_chunks == i:
                    err = {"error_code": fault.code, "error_msg": fault.msg, "id": rid}
                    await send({"type": "http.response.body", "body": encode_event(_encode(err)),
                                "more_body": False})
                    return
                last = i == len(pieces)
                chunk = BaiduStreamChunk(
                    rid, "chat.completion", int(time.time()), i, last, flags[0] if last else False,
                    piece, flags[1] if last else False, usage=usage if last else partial,
                )
                if gone.done():
                    self.streams_cancelled += 1
                    return
                await send({"type": "http.response.body", "body": encode_event(_encode(chunk)),
                            "more_body": not last})
                if self.chunk_delay and not last:
                    await asyncio.sleep(self.chunk_delay)
        finally:
            gone.cancel()

    async def _error(self, send: Any, rec: Received, code: int, msg: str | None = None) -> None:
        rec.outcome = code
        payload = {"error_code": code, "error_msg": msg or ERROR_MESSAGES.get(code, "error"),
                   "id": "as-" + secrets.token_hex(5)}
        await _respond(send, 200, _encode(payload))


def _iam_error(status: int, code: str, message: str) -> tuple[int, dict[str, str], bytes]:
    rid = secrets.token_hex(8)
    headers = {"x-bce-error-code": code, "x-bce-error-message": message, "x-bce-request-id": rid}
    return status, headers, _encode({"requestId": rid, "code": code, "message": message})


def _echo(req: BaiduChatRequest) -> str:
    return "Hello! You said: " + req.messages[-1].content[:200]


def _pieces(text: str, size: int = 3) -> list[str]:
    """Split into runs of `size` words (whitespace kept), as Baidu streams sentence pieces."""
    words = text.split(" ")
    out = [" ".join(words[i:i + size]) + (" " if i + size < len(words) else "")
           for i in range(0, len(words), size)]
    return [p for p in out if p] or [text]


async def _disconnected(receive: Any) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _respond(send: Any, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
    hdrs = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    hdrs += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": hdrs})
    await send({"type": "http.response.body", "body": body})


def create_emulator(**options: Any) -> BaiduEmulator:
    """The ASGI app (also its own control object); options are `BaiduEmulator` fields."""
    return BaiduEmulator(**options)


def demo_backend() -> list[tuple[Any, str, dict[str, Any]]]:
    """For `llm-gateway demo`: one emulator, two backends (access_token and AK/SK mode).
    Returns (server, backend name, backend config) triples; stopping the server twice is fine."""
    from adapters.loopback import LoopbackServer

    server = LoopbackServer(create_emulator()).start()
    common = {"kind": "baidu", "endpoint": "llama_3_8b", "base_url": server.url}
    return [
        (server, "baidu-llama-3-8b", {**common, "api_key": DEMO_API_KEY, "secret_key": DEMO_SECRET_KEY}),
        (server, "baidu-llama-3-8b-aksk",
         {**common, "access_key": DEMO_ACCESS_KEY, "secret_key": DEMO_IAM_SECRET}),
    ]
