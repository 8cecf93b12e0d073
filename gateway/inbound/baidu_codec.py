"""The Baidu dialect: wenxinworkshop chat bodies <-> the normalised model, and Baidu's error codes.

`decode_chat` refuses a body exactly where Baidu does (336002 for a body that is not JSON,
336003 with the broken rule's message for the rest, using the Baidu backend's own
`validate_request`); `encode_result` / `encode_stream` write Baidu's compact JSON and SSE with
the backend's wire Structs; `fault_for` turns any `GatewayError` into the `error_code` Baidu
clients react to correctly. The routes and the credentials are in `gateway/inbound/baidu.py`.
"""

from __future__ import annotations

import secrets
import string
from collections.abc import AsyncIterator
from typing import Any

import msgspec
from msgspec import UNSET

from adapters.baidu.signer import SignatureRejected
from adapters.baidu.wire import (
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
from gateway.asgi import JSON, Headers, encode_headers
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
from gateway.pipeline import CallMeta

MAX_INPUT_CHARS = 4800  # Llama-3-8B's limit on the total content of `messages`

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


