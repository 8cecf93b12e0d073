"""The OpenAI door: /v1/chat/completions, /v1/completions, /v1/models.

Decodes OpenAI requests into `ChatRequest`s, hands them to the pipeline, and encodes the
answers (JSON or SSE) and every `GatewayError` as OpenAI error objects. Unknown top-level
fields are vendor inputs (the SDK's `extra_body`) and travel to the backend in `extra`.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import msgspec

from adapters.openai.wire import (
    CHAT_FIELDS,
    COMPLETION_FIELDS,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChunkChoice,
    CompletionRequest,
    CompletionUsage,
    Delta,
    ErrorBody,
    ErrorDetail,
    ModelCard,
    ModelList,
    ResponseMessage,
    TextChoice,
    TextCompletion,
)
from adapters.types import ChatChunk, ChatRequest, ChatResult, Message, Usage
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
    new_id,
    read_body,
    request_ids,
    send_response,
    stream_response,
)
from gateway.errors import GatewayError, InvalidRequest
from gateway.pipeline import CallMeta, Pipeline, explain_json

_encode = msgspec.json.Encoder().encode
_decode_any = msgspec.json.Decoder().decode
_PATH = re.compile(r" - at `\$\.?(.*)`$")


# --- decoding -------------------------------------------------------------------------------


def _validation_error(exc: msgspec.ValidationError) -> InvalidRequest:
    text = str(exc)
    m = _PATH.search(text)
    param = m.group(1) if m else None
    message = text[: m.start()] if m else text
    missing = re.match(r"Object missing required field `(.+)`", message)
    if missing:
        param = f"{param}.{missing.group(1)}" if param else missing.group(1)
        return InvalidRequest(f"Missing required parameter: '{param}'.", param=param,
                              code="missing_required_parameter")
    return InvalidRequest(f"Invalid value for '{param}': {message}", param=param)


def _decode_object(body: bytes) -> dict[str, Any]:
    try:
        raw = _decode_any(body)
    except msgspec.DecodeError:
        raise InvalidRequest("We could not parse the JSON body of your request. "
                             "(HINT: send a JSON object with Content-Type: application/json.)",
                             code="invalid_json") from None
    if not isinstance(raw, dict):
        raise InvalidRequest("The request body must be a JSON object.", code="invalid_json")
    return raw


def _common(wire: ChatCompletionRequest | CompletionRequest, raw: dict[str, Any],
            known: frozenset[str], rid: str) -> dict[str, Any]:
    if wire.n not in (None, 1):
        raise InvalidRequest("Only n=1 is supported.", param="n")
    if wire.stream_options is not None and not wire.stream:
        raise InvalidRequest("stream_options is only allowed when stream is true.",
                             param="stream_options")
    stop = [wire.stop] if isinstance(wire.stop, str) else wire.stop
    extra = {k: v for k, v in raw.items() if k not in known}
    top_k = extra.pop("top_k", None)
    if top_k is not None and not isinstance(top_k, int):
        raise InvalidRequest("Invalid value for 'top_k': expected an integer.", param="top_k")
    return {"model": wire.model, "temperature": wire.temperature, "top_p": wire.top_p,
            "top_k": top_k, "presence_penalty": wire.presence_penalty,
            "frequency_penalty": wire.frequency_penalty, "seed": wire.seed, "stop": stop or None,
            "stream": bool(wire.stream), "request_id": rid, "extra": extra}


def decode_chat(body: bytes, rid: str) -> tuple[ChatRequest, bool]:
    """-> (request, include_usage)."""
    raw = _decode_object(body)
    try:
        wire = msgspec.convert(raw, ChatCompletionRequest)
    except msgspec.ValidationError as exc:
        raise _validation_error(exc) from None
    fields = _common(wire, raw, CHAT_FIELDS, rid)
    messages = [Message(m.role, m.content, m.name, m.tool_calls, m.tool_call_id) for m in wire.messages]
    req = ChatRequest(messages=messages, max_tokens=wire.max_completion_tokens or wire.max_tokens,
                      **fields)
    return req, bool(wire.stream_options and wire.stream_options.include_usage)


def decode_completion(body: bytes, rid: str) -> tuple[ChatRequest, bool]:
    raw = _decode_object(body)
    try:
        wire = msgspec.convert(raw, CompletionRequest)
    except msgspec.ValidationError as exc:
        raise _validation_error(exc) from None
    fields = _common(wire, raw, COMPLETION_FIELDS, rid)
    prompt = wire.prompt if isinstance(wire.prompt, str) else wire.prompt[0]
    req = ChatRequest(prompt=prompt, max_tokens=wire.max_tokens, **fields)
    return req, bool(wire.stream_options and wire.stream_options.include_usage)


# --- encoding -------------------------------------------------------------------------------


def _usage(u: Usage | None) -> CompletionUsage | None:
    if u is None:
        return None
    return CompletionUsage(u.prompt_tokens, u.completion_tokens, u.total_tokens)


def encode_result(req: ChatRequest, result: ChatResult, rid: str) -> bytes:
    created = int(time.time())
    if req.is_chat:
        return _encode(ChatCompletion(
            id=rid, created=created, model=req.model,
            choices=[Choice(0, _message(result), result.finish_reason)],
            usage=_usage(result.usage)))
    return _encode(TextCompletion(
        id=rid, created=created, model=req.model,
        choices=[TextChoice(0, result.text, result.finish_reason)], usage=_usage(result.usage)))


def _message(result: ChatResult) -> ResponseMessage:
    if result.tool_calls:  # as OpenAI answers a function call: no text is null, not ""
        return ResponseMessage(result.text or None, tool_calls=result.tool_calls)
    return ResponseMessage(result.text)


def error_body(err: GatewayError) -> bytes:
    return _encode(ErrorBody(ErrorDetail(err.message, err.type, err.param, err.code)))


def error_headers(err: GatewayError, rid: str, explain: bool = False) -> Headers:
    headers = [JSON, (b"x-request-id", rid.encode())]
    if err.meta is not None:
        headers += meta_headers(err.meta, rid, explain)[1:]
    if err.retry_after is not None:
        headers.append((b"retry-after", str(max(1, math.ceil(err.retry_after))).encode()))
    if err.status == 429 and err.code == "insufficient_quota":
        headers.append((b"x-should-retry", b"false"))
    headers += encode_headers(err.headers)
    return headers


def meta_headers(meta: CallMeta, echo_id: str, explain: bool = False) -> Headers:
    headers = [(b"x-request-id", echo_id.encode()),
               (b"x-gateway-backend", meta.backend.encode()),
               (b"x-gateway-attempts", str(meta.attempts).encode()),
               (b"x-gateway-cache", meta.cache.encode())]
    if meta.headers:
        headers += encode_headers(meta.headers)
    if explain:
        headers.append((b"x-gateway-explain", explain_json(meta)))
    return headers


async def encode_stream(req: ChatRequest, chunks: AsyncIterator[ChatChunk], rid: str,
                        include_usage: bool) -> AsyncIterator[bytes]:
    created = int(time.time())
    usage: Usage | None = None
    if req.is_chat:
        yield _sse(ChatCompletionChunk(rid, created, req.model,
                                       [ChunkChoice(0, Delta(role="assistant", content=""))]))
    # A content chunk is the same bytes around the JSON-encoded text: build the two halves once.
    head, tail = _text_chunk_halves(req, rid, created)
    try:
        async for chunk in chunks:
            if chunk.usage is not None:
                usage = chunk.usage
            if chunk.tool_calls and req.is_chat:
                delta = Delta(content=chunk.text or None, tool_calls=chunk.tool_calls)
                yield _sse(ChatCompletionChunk(rid, created, req.model, [ChunkChoice(0, delta)]))
                if chunk.finish_reason:
                    yield _sse(_chunk(req, rid, created, "", chunk.finish_reason))
            elif chunk.finish_reason:
                yield _sse(_chunk(req, rid, created, chunk.text, chunk.finish_reason))
            elif chunk.text:
                yield head + _encode(chunk.text) + tail
    except GatewayError as err:
        # Headers are gone: the error travels as an event the SDK raises on, then [DONE].
        yield b"data: " + error_body(err) + b"\n\n"
        yield b"data: [DONE]\n\n"
        return
    if include_usage and usage is not None:
        cls = ChatCompletionChunk if req.is_chat else TextCompletion
        yield _sse(cls(rid, created, req.model, [], usage=_usage(usage)))
    yield b"data: [DONE]\n\n"


def _chunk(req: ChatRequest, rid: str, created: int, text: str, finish: str | None) -> Any:
    if req.is_chat:
        delta = Delta(content=text) if text else Delta()
        return ChatCompletionChunk(rid, created, req.model, [ChunkChoice(0, delta, finish)])
    return TextCompletion(rid, created, req.model, [TextChoice(0, text, finish)])


def _text_chunk_halves(req: ChatRequest, rid: str, created: int) -> tuple[bytes, bytes]:
    marker = "\x00text\x00"
    whole = _sse(_chunk(req, rid, created, marker, None))
    head, _, tail = whole.partition(_encode(marker))
    return head, tail


def _sse(obj: Any) -> bytes:
    return b"data: " + _encode(obj) + b"\n\n"


# --- routes ---------------------------------------------------------------------------------


class OpenAIDoor:
    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline

    async def chat_completions(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._handle(scope, receive, send, decode_chat)

    async def completions(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._handle(scope, receive, send, decode_completion)

    async def _handle(self, scope: Scope, receive: Receive, send: Send, decode: Any) -> None:
        rid, echo = request_ids(scope)
        explain = header(scope, b"x-gateway-explain") == "1"
        try:
            if scope["method"] != "POST":
                raise GatewayError(f"Method {scope['method']} not allowed; use POST.", status=405,
                                   code="method_not_allowed")
            principal = self.pipeline.keyring.by_secret(bearer(scope))
            try:
                body = await read_body(receive)
            except BodyTooLarge:
                raise GatewayError("Request body too large.", status=413, code="body_too_large") from None
            req, include_usage = decode(body, rid)
            cid = completion_id(req.is_chat)
            if req.stream:
                call = await self.pipeline.open_stream(principal, req, header(scope, b"cache-control"))
                try:
                    events = encode_stream(req, call.__aiter__(), cid, include_usage)
                    await stream_response(send, receive, 200, [*SSE, *meta_headers(call.meta, echo, explain)],
                                          events)
                finally:
                    await call.settled()
                return

            def deliver(result: ChatResult, meta: CallMeta) -> Awaitable[None]:
                return send_response(send, 200, encode_result(req, result, cid),
                                     [JSON, *meta_headers(meta, echo, explain)])

            await self.pipeline.complete(principal, req, header(scope, b"cache-control"), deliver)
        except GatewayError as err:
            await send_response(send, err.status, error_body(err), error_headers(err, echo, explain))

    def models(self, secret: str | None) -> bytes:
        principal = self.pipeline.keyring.by_secret(secret)
        return _encode(ModelList([ModelCard(alias, 0, "llm-gateway")
                                  for alias in self.pipeline.keyring.visible_aliases(principal)]))


def completion_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + new_id()

