"""The Baidu door: wenxinworkshop v1 chat, `/oauth/2.0/token`, and the console's service list,
so that Baidu clients (the qianfan SDKs, plain HTTP) work unchanged against the gateway.

Decodes Baidu chat bodies into `ChatRequest`s (with Baidu's own validation and error codes),
hands them to the same pipeline as the OpenAI door, and encodes the answers as Baidu's compact
JSON or SSE. Every failure becomes `{"error_code", "error_msg"}` at HTTP 200, as Baidu answers,
except IAM signature failures, which Baidu's IAM answers with a non-2xx status and
`X-Bce-Error-*` headers. The wire Structs and the bce-auth-v1 verifier are the Baidu backend's
own (`adapters/baidu/wire.py`, `adapters/baidu/signer.py`): one definition serves both ways.

Callers authenticate in one of three ways, tried in this order:
- `?access_token=` from `/oauth/2.0/token`, where `client_id` is a gateway key's name and
  `client_secret` the key. Tokens are opaque random strings kept in the store (Redis when
  configured, so every gateway process accepts every token) under the SHA-256 of the token.
- `Authorization: bce-auth-v1/...` signed with a key's name as access key and the key as secret.
- `Authorization: Bearer <key>`, for plain HTTP clients.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import string
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qsl, unquote

import msgspec
from msgspec import UNSET

from adapters.baidu.signer import SignatureRejected, parse_authorization, verify
from adapters.baidu.wire import (
    CHAT_PATH_PREFIX,
    BaiduChatRequest,
    BaiduChatResponse,
    BaiduError,
    BaiduStreamChunk,
    BaiduUsage,
    TokenResponse,
    validate_request,
)
from adapters.tokens import estimate_prompt_tokens, estimate_tokens
from adapters.types import (
    ChatChunk,
    ChatRequest,
    ChatResult,
    Message,
    UpstreamBadRequest,
    UpstreamQuotaExhausted,
    UpstreamRateLimited,
    Usage,
)
from gateway.asgi import (
    JSON,
    SSE,
    BodyTooLarge,
    Headers,
    Receive,
    Scope,
    Send,
    bearer,
    encode_headers,
    header,
    read_body,
    send_response,
    stream_response,
)
from gateway.auth import Principal
from gateway.config import Config
from gateway.errors import (
    AuthenticationFailed,
    GatewayError,
    InvalidRequest,
    ModelNotFound,
    PermissionDenied,
    QuotaExceeded,
    RateLimited,
    StoreUnavailableError,
    UpstreamFailed,
)
from gateway.pipeline import CallMeta, Pipeline
from gateway.store import Store, StoreUnavailable

log = logging.getLogger("llm_gateway.baidu")

API_PREFIX = CHAT_PATH_PREFIX.removesuffix("/chat/")  # /rpc/2.0/ai_custom/v1/wenxinworkshop
SERVICE_LIST_PATH = "/wenxinworkshop/service/list"  # on the console host, IAM mode only
MAX_INPUT_CHARS = 4800  # Llama-3-8B's limit on the total content of `messages`
EXPIRED_GRACE = 86_400.0  # seconds an expired token is remembered, to answer 111 rather than 110

_MESSAGES = {
    3: "Unsupported openapi method",
    4: "Open api request limit reached",
    6: "No permission to access data",
    17: "Open api daily request limit reached",
    18: "Open api qps request limit reached",
    110: "Access token invalid or no longer valid",
    111: "Access token expired",
    336000: "Internal error",
    336002: "Invalid JSON",
    336100: "try again later",
    336101: "Invalid HTTP Method",
}
_KNOWN_FIELDS = frozenset(BaiduChatRequest.__struct_fields__) | {"max_output_tokens"}
_ID_ALPHABET = string.ascii_lowercase + string.digits

_encode = msgspec.json.Encoder().encode
_decode_any = msgspec.json.Decoder().decode


class BaiduFault(Exception):
    """An answer in Baidu's chat dialect: `{"error_code", "error_msg"}` at HTTP 200."""

    def __init__(self, code: int, message: str | None = None) -> None:
        self.code = code
        self.message = message or _MESSAGES.get(code, "Internal error")
        super().__init__(f"{code}: {self.message}")


def new_id() -> str:
    """Baidu's answer id shape, `as-` and ten lowercase letters or digits."""
    return "as-" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(10))


# --- errors ---------------------------------------------------------------------------------


def fault_for(err: GatewayError) -> BaiduFault:
    """A gateway error as the Baidu error code its clients react to correctly (the qianfan SDK
    retries 18 and 336100, refreshes its token on 110/111, and raises the rest at once)."""
    if isinstance(err, RateLimited):
        return BaiduFault(4 if err.limit == "tpm" else 18)
    if isinstance(err, QuotaExceeded):
        return BaiduFault(17)
    if isinstance(err, AuthenticationFailed):
        return BaiduFault(110)
    if isinstance(err, PermissionDenied):
        return BaiduFault(6)
    if isinstance(err, ModelNotFound):
        return BaiduFault(3)
    if isinstance(err, InvalidRequest):
        return BaiduFault(336003, err.message)
    if isinstance(err, StoreUnavailableError):
        return BaiduFault(336100)
    if isinstance(err, UpstreamFailed):
        up = err.upstream
        if isinstance(up, UpstreamQuotaExhausted):
            return BaiduFault(17)
        if isinstance(up, UpstreamRateLimited):
            return BaiduFault(18)
        if isinstance(up, UpstreamBadRequest):
            return BaiduFault(336003, up.message)
        if up.retryable:  # unavailable, timeout, unreadable answer: worth another try
            return BaiduFault(336100)
        return BaiduFault(336000, up.message)
    if 400 <= err.status < 500:
        return BaiduFault(336003, err.message)
    return BaiduFault(336000, err.message)


def error_body(fault: BaiduFault, rid: str | None = None) -> bytes:
    return _encode(BaiduError(fault.code, fault.message, UNSET if rid is None else rid))


def iam_rejection(exc: SignatureRejected, rid: str) -> tuple[int, bytes, Headers]:
    """What BCE IAM answers for a bad signature: the SDK shows the `X-Bce-Error-*` headers."""
    body = _encode({"requestId": rid, "code": exc.code, "message": exc.message})
    return exc.status, body, [JSON, (b"x-bce-request-id", rid.encode()),
                              (b"x-bce-error-code", exc.code.encode()),
                              (b"x-bce-error-message", exc.message.encode("latin-1", "replace"))]


# --- decoding -------------------------------------------------------------------------------


def _explain(exc: msgspec.ValidationError) -> str:
    text = str(exc)
    if "missing required field `messages`" in text:
        return "the messages field is required and must not be empty"
    message, _, path = text.partition(" - at `$")
    field = path.rstrip("`").lstrip(".")
    return f"invalid argument {field}: {message}" if field else f"invalid argument: {message}"


def decode_chat(body: bytes, alias: str, rid: str) -> ChatRequest:
    """A Baidu chat body -> `ChatRequest`, refused exactly where Baidu refuses it (336002 for a
    body that is not JSON, 336003 with the rule's message for everything else)."""
    try:
        raw = _decode_any(body)
    except msgspec.DecodeError:
        raise BaiduFault(336002) from None
    if not isinstance(raw, dict):
        raise BaiduFault(336003, "the request body must be a JSON object")
    try:
        wire = msgspec.convert(raw, BaiduChatRequest)
    except msgspec.ValidationError as exc:
        raise BaiduFault(336003, _explain(exc)) from None
    problem = validate_request(wire, MAX_INPUT_CHARS)
    if problem is not None:
        raise BaiduFault(336003, problem)
    max_tokens = raw.get("max_output_tokens")  # ERNIE's name for it; Llama endpoints lack one
    if max_tokens is not None and (not isinstance(max_tokens, int) or isinstance(max_tokens, bool)
                                   or max_tokens < 1):
        raise BaiduFault(336003, "max_output_tokens must be a positive integer")
    # Keys beyond Baidu's own travel to the backend as vendor inputs, like the OpenAI door's
    # extra_body. `extra_parameters` (SDK telemetry) and `user_id` stay here.
    extra: dict[str, Any] = {k: v for k, v in raw.items() if k not in _KNOWN_FIELDS}
    if wire.penalty_score is not None:
        extra["repetition_penalty"] = wire.penalty_score  # vLLM's name; the Baidu adapter reads it too
    messages = [Message(m.role, m.content) for m in wire.messages]
    if wire.system:
        messages.insert(0, Message("system", wire.system))
    return ChatRequest(
        model=alias, messages=messages, max_tokens=max_tokens, temperature=wire.temperature,
        top_p=wire.top_p, top_k=wire.top_k, stop=wire.stop or None, stream=wire.stream,
        request_id=rid, extra=extra)


# --- encoding -------------------------------------------------------------------------------


def _usage(u: Usage) -> BaiduUsage:
    return BaiduUsage(u.prompt_tokens, u.completion_tokens, u.total_tokens)


def encode_result(result: ChatResult, rid: str, created: int) -> bytes:
    flagged = result.finish_reason == "content_filter"
    return _encode(BaiduChatResponse(
        id=rid, created=created, result=result.text, is_truncated=result.finish_reason == "length",
        need_clear_history=flagged, ban_round=-1 if flagged else UNSET, usage=_usage(result.usage)))


def _event(obj: Any) -> bytes:
    # The Go SDK skips any stream line containing "event"; `\u0065` keeps the JSON identical.
    return b"data: " + _encode(obj).replace(b"event", b"\\u0065vent") + b"\n\n"


async def encode_stream(req: ChatRequest, chunks: AsyncIterator[ChatChunk], rid: str,
                        created: int) -> AsyncIterator[bytes]:
    """One `data:` event per piece of text (`sentence_id` from 0), then exactly one `is_end`
    event with an empty `result` and the final usage. Interim events carry the estimated prompt
    tokens and no completion tokens, as Baidu's own interim events do."""
    prompt = estimate_prompt_tokens(req)
    interim = BaiduUsage(prompt, 0, prompt)
    sentence, usage, finish, pieces = 0, None, "stop", []
    try:
        async for chunk in chunks:
            if chunk.usage is not None:
                usage = chunk.usage
            if chunk.finish_reason:
                finish = chunk.finish_reason
            if chunk.text:
                pieces.append(chunk.text)
                yield _event(BaiduStreamChunk(id=rid, created=created, sentence_id=sentence,
                                              result=chunk.text, usage=interim))
                sentence += 1
    except GatewayError as err:
        # Text has reached the client: a retryable code would make the SDK send the request
        # again and repeat it, so a failure now is always 336000 (raised, not retried).
        yield _event(BaiduError(336000, f"Internal error: {fault_for(err).message}", rid))
        return
    if usage is None:
        usage = Usage(prompt, estimate_tokens("".join(pieces)), "estimated")
    flagged = finish == "content_filter"
    yield _event(BaiduStreamChunk(
        id=rid, created=created, sentence_id=sentence, is_end=True, is_truncated=finish == "length",
        result="", need_clear_history=flagged, ban_round=-1 if flagged else UNSET, usage=_usage(usage)))


def meta_headers(meta: CallMeta) -> Headers:
    headers = [(b"x-baidu-request-id", meta.request_id.encode()),
               (b"x-gateway-backend", meta.backend.encode()),
               (b"x-gateway-attempts", str(meta.attempts).encode()),
               (b"x-gateway-cache", meta.cache.encode())]
    if meta.headers:  # the limiter's X-Ratelimit-* values, numeric as the SDK requires
        headers += encode_headers(meta.headers)
    return headers


def token_body(tok: TokenResponse) -> bytes:
    """A token answer with only the fields of its kind (success, or error + description)."""
    fields = msgspec.structs.asdict(tok)
    failed = bool(tok.error)
    return _encode({k: v for k, v in fields.items() if k.startswith("error") == failed})


# --- access tokens --------------------------------------------------------------------------


class IssuedToken(msgspec.Struct, frozen=True):
    key_name: str
    secret_sha256: str  # a token dies with its key: rotating the key invalidates it
    expires_at: float


class AccessTokens:
    """Access tokens in the store, keyed by the token's SHA-256 (the store never holds one)."""

    def __init__(self, store: Store, ttl: int) -> None:
        self.store = store
        self.ttl = ttl

    @staticmethod
    def _key(token: str) -> str:
        return "gw:baidu:token:" + hashlib.sha256(token.encode()).hexdigest()

    async def issue(self, principal: Principal) -> TokenResponse:
        token = "24." + secrets.token_hex(24)
        record = IssuedToken(principal.key_name, principal.secret_sha256, time.time() + self.ttl)
        await self.store.set(self._key(token), _encode(record), self.ttl + EXPIRED_GRACE)
        return TokenResponse(access_token=token, expires_in=self.ttl,
                             refresh_token="25." + secrets.token_hex(24), scope="public",
                             session_key=secrets.token_hex(16), session_secret=secrets.token_hex(16))

    async def principal(self, token: str, pipeline: Pipeline) -> Principal:
        """The key a token was issued to; 110 when unknown (or its key is gone), 111 when expired."""
        if not token:
            raise BaiduFault(110)
        try:
            raw = await self.store.get(self._key(token))
        except StoreUnavailable:
            raise BaiduFault(336100) from None
        if raw is None:
            raise BaiduFault(110)
        record = msgspec.json.decode(raw, type=IssuedToken)
        principal = pipeline.keyring.by_name(record.key_name)
        if principal is None or principal.secret_sha256 != record.secret_sha256:
            raise BaiduFault(110)
        if time.time() >= record.expires_at:
            raise BaiduFault(111)
        return principal


# --- routes ---------------------------------------------------------------------------------


def endpoint_map(config: Config) -> dict[str, str]:
    """Chat endpoint -> model alias: an alias's `baidu_endpoint`, else the alias's own name
    (a declared endpoint wins over an alias that merely has that name)."""
    endpoints = {alias: alias for alias, route in config.models.items() if not route.baidu_endpoint}
    endpoints.update({route.baidu_endpoint: alias for alias, route in config.models.items()
                      if route.baidu_endpoint})
    return endpoints


def _path(scope: Scope, mount: str = "") -> str:
    """The request path as the client sent it (a mount rewrites `scope["path"]`)."""
    raw = scope.get("raw_path")
    if raw:
        return unquote(raw.decode("latin-1").partition("?")[0])
    return mount + scope["path"].rstrip("/") if mount else scope["path"]


class BaiduDoor:
    def __init__(self, pipeline: Pipeline, store: Store, config: Config) -> None:
        self.pipeline = pipeline
        self.tokens = AccessTokens(store, config.inbound.baidu.token_ttl)
        self.endpoints = endpoint_map(config)

    async def chat(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Everything under /rpc/2.0/ai_custom/v1/wenxinworkshop (a mount): chat/{endpoint}."""
        rid = new_id()
        created = int(time.time())
        try:
            if scope["method"] != "POST":
                raise BaiduFault(336101)
            path = _path(scope, API_PREFIX)
            principal = await self._authenticate(scope, path)
            alias = self.endpoints.get(path.removeprefix(CHAT_PATH_PREFIX)) \
                if path.startswith(CHAT_PATH_PREFIX) else None
            if alias is None:
                raise BaiduFault(3)
            if not principal.may_use(alias):
                raise BaiduFault(6)
            try:
                body = await read_body(receive)
            except BodyTooLarge:
                raise BaiduFault(336003, "the request body is too large") from None
            req = decode_chat(body, alias, rid)
            if req.stream:
                call = await self.pipeline.open_stream(principal, req)
            else:
                result, meta = await self.pipeline.complete(principal, req)
        except SignatureRejected as exc:
            await send_response(send, *iam_rejection(exc, rid))
            return
        except BaiduFault as fault:
            await send_response(send, 200, error_body(fault, rid), [JSON, (b"x-baidu-request-id", rid.encode())])
            return
        except GatewayError as err:
            await send_response(send, 200, error_body(fault_for(err), rid),
                                [JSON, (b"x-baidu-request-id", rid.encode())])
            return
        if req.stream:
            await stream_response(send, receive, 200, [*SSE, *meta_headers(call.meta)],
                                  encode_stream(req, call.__aiter__(), rid, created))
            return
        await send_response(send, 200, encode_result(result, rid, created), [JSON, *meta_headers(meta)])

    async def _authenticate(self, scope: Scope, path: str) -> Principal:
        query = parse_qsl(scope["query_string"].decode("latin-1"), keep_blank_values=True)
        token = next((v for k, v in query if k == "access_token"), None)
        if token is not None:
            return await self.tokens.principal(token, self.pipeline)
        authorization = header(scope, b"authorization") or ""
        if authorization.startswith("bce-auth-v1/"):
            return self._signed(scope, path, query, authorization)
        if bearer(scope) is not None:
            return self.pipeline.keyring.by_secret(bearer(scope))  # AuthenticationFailed -> 110
        raise BaiduFault(110)

    def _signed(self, scope: Scope, path: str, query: list[tuple[str, str]], authorization: str) -> Principal:
        """A bce-auth-v1 signature by a key's name (access key) and the key (secret key)."""
        keyring = self.pipeline.keyring
        name = parse_authorization(authorization).access_key
        secret = keyring.signing_secret(name)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        verify(scope["method"], path, query, headers, secret_for={name: secret} if secret else {},
               now=time.time())
        principal = keyring.by_name(name)
        if principal is None:
            raise SignatureRejected("NotFound", "Could not find credential.", 401)
        return principal

    async def token(self, scope: Scope, receive: Receive, send: Send) -> None:
        """POST /oauth/2.0/token?grant_type=client_credentials&client_id=<key name>&client_secret=<key>."""
        headers = [JSON, (b"cache-control", b"no-store")]

        async def answer(status: int, tok: TokenResponse) -> None:
            await send_response(send, status, token_body(tok), headers)

        try:
            body = await read_body(receive, limit=64 * 1024)
        except BodyTooLarge:
            body = b""
        params = dict(parse_qsl(scope["query_string"].decode("latin-1"), keep_blank_values=True))
        if "x-www-form-urlencoded" in (header(scope, b"content-type") or ""):
            for k, v in parse_qsl(body.decode("latin-1"), keep_blank_values=True):
                params.setdefault(k, v)  # the query string wins
        if scope["method"] not in ("GET", "POST"):
            return await answer(405, TokenResponse(error="invalid_request", error_description="use POST"))
        if params.get("grant_type") != "client_credentials":
            return await answer(400, TokenResponse(
                error="unsupported_grant_type",
                error_description="The authorization grant type is not supported; use client_credentials"))
        keyring = self.pipeline.keyring
        name = params.get("client_id", "")
        if keyring.by_name(name) is None:
            return await answer(401, TokenResponse(error="invalid_client", error_description="unknown client id"))
        principal = keyring.by_name_and_secret(name, params.get("client_secret", ""))
        if principal is None:
            return await answer(401, TokenResponse(error="invalid_client",
                                                   error_description="Client authentication failed"))
        try:
            tok = await self.tokens.issue(principal)
        except StoreUnavailable:
            return await answer(503, TokenResponse(error="temporarily_unavailable",
                                                   error_description="try again later"))
        await answer(200, tok)

    async def service_list(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The console's service list (the SDK asks for it in IAM mode): one preset chat service
        per alias the caller may use, so `ChatCompletion(model=<alias>)` resolves too."""
        rid = new_id()
        try:
            await read_body(receive, limit=64 * 1024)
            principal = await self._authenticate(scope, _path(scope))
        except SignatureRejected as exc:
            await send_response(send, *iam_rejection(exc, rid))
            return
        except (BaiduFault, GatewayError, BodyTooLarge) as exc:
            fault = exc if isinstance(exc, BaiduFault) else BaiduFault(110)
            await send_response(send, 200, error_body(fault, rid), [JSON])
            return
        host = header(scope, b"host") or "127.0.0.1"
        common = [{"name": alias, "url": f"http://{host}{CHAT_PATH_PREFIX}{endpoint}", "apiType": "chat",
                   "chargeStatus": "RUNNING"}
                  for endpoint, alias in self.endpoints.items() if principal.may_use(alias)]
        await send_response(send, 200, _encode({"log_id": rid, "success": True,
                                                "result": {"common": common, "custom": []}}), [JSON])
