"""The Baidu door: wenxinworkshop v1 chat, `/oauth/2.0/token`, and the console's service list,
so that Baidu clients (the qianfan SDKs, plain HTTP) work unchanged against the gateway.

Requests go through the same pipeline as the OpenAI door; only decoding and encoding differ
(`gateway/inbound/baidu_codec.py`). Every failure becomes `{"error_code", "error_msg"}` at
HTTP 200, as Baidu answers, except IAM signature failures, which Baidu's IAM answers with a
non-2xx status and `X-Bce-Error-*` headers. The wire Structs and the bce-auth-v1 verifier are
the Baidu backend's own (`adapters/baidu/wire.py`, `adapters/baidu/signer.py`): one definition
of each serves both directions.

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
import time
from collections.abc import Awaitable
from urllib.parse import parse_qsl, unquote

import msgspec

from adapters.baidu.signer import SignatureRejected, parse_authorization, verify
from adapters.baidu.wire import CHAT_PATH_PREFIX, TokenResponse
from adapters.types import ChatResult
from gateway.asgi import (
    JSON,
    SSE,
    BodyTooLarge,
    Receive,
    Scope,
    Send,
    bearer,
    header,
    read_body,
    send_response,
    stream_response,
)
from gateway.auth import KeyRing, Principal
from gateway.config import Config
from gateway.errors import GatewayError
from gateway.inbound.baidu_codec import (
    BaiduFault,
    decode_chat,
    encode_result,
    encode_stream,
    error_body,
    fault_for,
    iam_rejection,
    meta_headers,
    new_id,
    token_body,
)
from gateway.pipeline import CallMeta, Pipeline
from gateway.store import Store, StoreUnavailable

_encode = msgspec.json.Encoder().encode
log = logging.getLogger("llm_gateway.baidu")

API_PREFIX = CHAT_PATH_PREFIX.removesuffix("/chat/")  # /rpc/2.0/ai_custom/v1/wenxinworkshop
SERVICE_LIST_PATH = "/wenxinworkshop/service/list"  # on the console host, IAM mode only
EXPIRED_GRACE = 86_400.0  # seconds an expired token is remembered, to answer 111 rather than 110


# --- access tokens --------------------------------------------------------------------------


class IssuedToken(msgspec.Struct, frozen=True):
    key_name: str
    secret_sha256: str  # a token dies with its key: rotating the key invalidates it
    expires_at: float


class AccessTokens:
    """Access tokens in the store, keyed by the token's SHA-256 (the store never holds one).

    A token never changes and is never revoked (it dies with its key, which the key ring
    decides), so a record once read is kept in-process until it expires: a steady client costs
    no store round trip beyond the pipeline's own."""

    def __init__(self, store: Store, ttl: int, remember: int = 10_000) -> None:
        self.store = store
        self.ttl = ttl
        self._seen: dict[str, IssuedToken] = {}
        self._remember = remember

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

    async def _record(self, key: str) -> IssuedToken | None:
        record = self._seen.get(key)
        if record is not None:
            return record
        try:
            raw = await self.store.get(key)
        except StoreUnavailable:
            raise BaiduFault(336100) from None
        if raw is None:
            return None  # not remembered: another process may issue it any moment
        try:
            record = msgspec.json.decode(raw, type=IssuedToken)
        except msgspec.DecodeError:
            return None
        if len(self._seen) >= self._remember:
            self._seen.pop(next(iter(self._seen)))  # the oldest
        self._seen[key] = record
        return record

    async def principal(self, token: str, keyring: KeyRing) -> Principal:
        """The key a token was issued to; 110 when unknown (or its key is gone), 111 when expired."""
        if not token:
            raise BaiduFault(110)
        key = self._key(token)
        record = await self._record(key)
        if record is None:
            raise BaiduFault(110)
        principal = keyring.by_name(record.key_name)
        if principal is None or principal.secret_sha256 != record.secret_sha256:
            raise BaiduFault(110)
        if time.time() >= record.expires_at:
            self._seen.pop(key, None)
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
            endpoint = path.removeprefix(CHAT_PATH_PREFIX) if path.startswith(CHAT_PATH_PREFIX) else ""
            alias = self.endpoints.get(endpoint)
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
                call = await self.pipeline.open_stream(principal, req, header(scope, b"cache-control"))
            else:
                def deliver(result: ChatResult, meta: CallMeta) -> Awaitable[None]:
                    return send_response(send, 200, encode_result(result, rid, created),
                                         [JSON, *meta_headers(meta)])

                await self.pipeline.complete(principal, req, header(scope, b"cache-control"), deliver)
                return
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
        except Exception:
            log.exception("Baidu chat request %s failed", rid)
            await send_response(send, 200, error_body(BaiduFault(336000), rid),
                                [JSON, (b"x-baidu-request-id", rid.encode())])
            return
        try:
            await stream_response(send, receive, 200, [*SSE, *meta_headers(call.meta)],
                                  encode_stream(req, call.__aiter__(), rid, created))
        finally:
            await call.settled()

    async def _authenticate(self, scope: Scope, path: str) -> Principal:
        query = parse_qsl(scope["query_string"].decode("latin-1"), keep_blank_values=True)
        token = next((v for k, v in query if k == "access_token"), None)
        if token is not None:
            return await self.tokens.principal(token, self.pipeline.keyring)
        authorization = header(scope, b"authorization") or ""
        if authorization.startswith("bce-auth-v1/"):
            return self._signed(scope, path, query, authorization)
        key = bearer(scope)
        if key is not None:
            return self.pipeline.keyring.by_secret(key)  # AuthenticationFailed -> 110
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
        except BodyTooLarge:
            await send_response(send, 200, error_body(BaiduFault(336003, "the request body is too large"), rid),
                                [JSON])
            return
        except (BaiduFault, GatewayError) as exc:
            fault = exc if isinstance(exc, BaiduFault) else fault_for(exc)
            await send_response(send, 200, error_body(fault, rid), [JSON])
            return
        host = header(scope, b"host") or "127.0.0.1"
        common = [{"name": alias, "url": f"http://{host}{CHAT_PATH_PREFIX}{endpoint}", "apiType": "chat",
                   "chargeStatus": "RUNNING"}
                  for endpoint, alias in self.endpoints.items() if principal.may_use(alias)]
        await send_response(send, 200, _encode({"log_id": rid, "success": True,
                                                "result": {"common": common, "custom": []}}), [JSON])
