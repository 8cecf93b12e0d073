"""A faithful fake of an OpenAI-compatible server (vLLM's wire format), as a raw ASGI app.

Deterministic: the answer is "You said: " followed by the last user message (or the prompt),
one token per whitespace-separated word, cut at `max_tokens` (finish_reason `length`). A chat
request with `tools` and a `tool_choice` of "required" or a named function is answered, as
vLLM does, with one call of that function (the first tool for "required") whose arguments are
`{"text": <the last user message>}`, finish_reason `tool_calls`; streamed, the call's id and
name come first and its arguments follow in pieces.
Usage counts follow the same tokenizer: prompt tokens are the words of every message plus
4 per message of chat framing. Faults are injected through the `EmulatorControl` object.
"""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from typing import Any

import msgspec

from adapters.sse import encode_event

_json = msgspec.json.Encoder()
_decode = msgspec.json.decode


def count_tokens(text: str) -> int:
    return len(text.split())


def prompt_tokens(body: dict[str, Any]) -> int:
    if "messages" in body:
        total = 0
        for m in body["messages"]:
            content = m.get("content") or ""
            if isinstance(content, list):
                content = "".join(p.get("text", "") for p in content)
            total += count_tokens(content) + 4
        return total
    prompt = body.get("prompt", "")
    return count_tokens(prompt if isinstance(prompt, str) else " ".join(prompt))


def forced_tool(body: dict[str, Any]) -> str | None:
    """The function a chat request makes the model call, if it makes it call one."""
    tools = body.get("tools") or []
    choice = body.get("tool_choice")
    if not tools or "messages" not in body:
        return None
    if isinstance(choice, dict):
        return str((choice.get("function") or {}).get("name") or "") or None
    if choice == "required":
        return str(tools[0].get("function", {}).get("name", "")) or None
    return None


def _last_user(body: dict[str, Any]) -> str:
    users = [m for m in body.get("messages", []) if m.get("role") == "user"]
    content = users[-1].get("content") if users else ""
    if isinstance(content, list):
        content = "".join(p.get("text", "") for p in content)
    return str(content or "")


def reply_tokens(body: dict[str, Any], filler: int = 0) -> list[str]:
    """The answer's tokens: each word with its leading space (the first without)."""
    content = _last_user(body) if "messages" in body else body.get("prompt", "")
    words = ["You", "said:", *str(content or "").split()]
    words += [f"w{i}" for i in range(filler)]
    return [w if i == 0 else " " + w for i, w in enumerate(words)]


class EmulatorControl:
    """Knobs and counters a test (or the demo) holds on to."""

    def __init__(self) -> None:
        self.api_key: str | None = None  # when set, Bearer auth is required
        self.fail_status: int | None = None  # answer every chat request with this status
        self.fail_times: int | None = None  # ...only this many times, then recover
        self.retry_after: str | None = None
        self.latency: float = 0.0  # seconds before the response starts
        self.chunk_delay: float = 0.0  # seconds between streamed chunks
        self.filler_tokens: int = 0  # extra tokens appended to every answer
        self.drop_after: int | None = None  # cut the stream after N content chunks, no [DONE]
        self.malformed: bool = False  # answer 200 with a body that is not JSON
        self.omit_usage: bool = False
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.active = 0
        self.max_active = 0
        self.disconnects = 0
        self.completed_streams = 0

    def reset(self) -> None:
        self.__init__()  # type: ignore[misc]


async def _read_body(receive: Any) -> bytes:
    body = b""
    while True:
        msg = await receive()
        body += msg.get("body", b"")
        if not msg.get("more_body"):
            return body


async def _respond(send: Any, status: int, body: bytes, headers: list[tuple[bytes, bytes]] = ()) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), *headers]})
    await send({"type": "http.response.body", "body": body})


def _error(message: str, status: int) -> bytes:
    # vLLM's newer error shape: code is the HTTP status as an integer.
    return _json.encode({"error": {"message": message, "type": "BadRequestError" if status < 500
                                   else "InternalServerError", "param": None, "code": status}})


def create_emulator(control: EmulatorControl | None = None, model: str = "emulated-model") -> Any:
    ctl = control or EmulatorControl()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        path, method = scope["path"], scope["method"]
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        if ctl.api_key and headers.get("authorization") != f"Bearer {ctl.api_key}":
            await _respond(send, 401, _error("invalid api key", 401))
            return
        if method == "GET" and path in ("/v1/models", "/models"):
            await _respond(send, 200, _json.encode(
                {"object": "list", "data": [{"id": model, "object": "model", "created": 0,
                                             "owned_by": "vllm"}]}))
            return
        if method != "POST" or path not in ("/v1/chat/completions", "/v1/completions"):
            await _respond(send, 404, _error(f"no route {method} {path}", 404))
            return
        raw = await _read_body(receive)
        try:
            body = _decode(raw)
        except msgspec.DecodeError:
            await _respond(send, 400, _error("body is not JSON", 400))
            return
        ctl.requests.append(body)
        ctl.headers.append(headers)
        ctl.active += 1
        ctl.max_active = max(ctl.max_active, ctl.active)
        try:
            await _serve(ctl, body, path.endswith("chat/completions"), receive, send)
        finally:
            ctl.active -= 1

    return app


async def _serve(ctl: EmulatorControl, body: dict[str, Any], chat: bool, receive: Any, send: Any) -> None:
    if ctl.latency:
        await asyncio.sleep(ctl.latency)
    if ctl.fail_status is not None and (ctl.fail_times is None or ctl.fail_times > 0):
        if ctl.fail_times is not None:
            ctl.fail_times -= 1
        extra = [(b"retry-after", ctl.retry_after.encode())] if ctl.retry_after else []
        await _respond(send, ctl.fail_status, _error("injected failure", ctl.fail_status), extra)
        return
    if ctl.malformed:
        await _respond(send, 200, b"{not json")
        return
    if "messages" in body and not body["messages"]:
        await _respond(send, 400, _error("messages must not be empty", 400))
        return
    tool = forced_tool(body) if chat else None
    tokens = reply_tokens(body, ctl.filler_tokens)
    max_tokens = body.get("max_tokens") or body.get("max_completion_tokens")
    finish = "stop"
    call: dict[str, Any] | None = None
    if tool is not None:
        args = _json.encode({"text": _last_user(body)}).decode()
        call = {"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
                "function": {"name": tool, "arguments": args}}
        tokens, finish = [args], "tool_calls"  # counted as one token per word of the arguments
    elif max_tokens is not None and len(tokens) > max_tokens:
        tokens, finish = tokens[:max_tokens], "length"
    produced = count_tokens(tokens[0]) if call else len(tokens)
    usage = {"prompt_tokens": prompt_tokens(body), "completion_tokens": produced,
             "total_tokens": prompt_tokens(body) + produced}
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    model, created = body.get("model", "emulated-model"), int(time.time())
    if not body.get("stream"):
        text = "".join(tokens)
        if chat:
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if call is not None:
                message = {"role": "assistant", "content": None, "tool_calls": [call]}
            choice = {"index": 0, "message": message,
                      "logprobs": None, "finish_reason": finish, "stop_reason": None}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            obj = "text_completion"
        out = {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice]}
        if not ctl.omit_usage:
            out["usage"] = usage
        await _respond(send, 200, _json.encode(out))
        return
    await _stream(ctl, body, chat, tokens, finish, usage, rid, model, created, receive, send, call)


async def _stream(ctl: EmulatorControl, body: dict[str, Any], chat: bool, tokens: list[str], finish: str,
                  usage: dict[str, int], rid: str, model: str, created: int, receive: Any,
                  send: Any, call: dict[str, Any] | None = None) -> None:
    disconnected = asyncio.Event()

    async def watch() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        disconnected.set()

    watcher = asyncio.ensure_future(watch())
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(piece: str | None, reason: str | None, role: bool = False,
              calls: list[dict[str, Any]] | None = None) -> bytes:
        if chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else (
                {"content": piece} if piece is not None else {})
            if calls is not None:
                delta = {"tool_calls": calls}
            choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
        else:
            choice = {"index": 0, "text": piece or "", "logprobs": None, "finish_reason": reason}
        return encode_event(_json.encode({"id": rid, "object": obj, "created": created, "model": model,
                                          "choices": [choice]}))

    try:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]})
        events = [chunk(None, None, role=True)] if chat else []
        if call is None:
            events += [chunk(t, None) for t in tokens]
        else:  # the call's id and name, then its arguments in three pieces
            fn, args = call["function"], call["function"]["arguments"]
            head = {"index": 0, "id": call["id"], "type": "function",
                    "function": {"name": fn["name"], "arguments": ""}}
            events.append(chunk(None, None, calls=[head]))
            cut = [0, len(args) // 3, 2 * len(args) // 3, len(args)]
            events += [chunk(None, None, calls=[{"index": 0, "function": {"arguments": args[a:b]}}])
                       for a, b in itertools.pairwise(cut)]
        events.append(chunk(None, finish))
        opts = body.get("stream_options") or {}
        if opts.get("include_usage") and not ctl.omit_usage:
            events.append(encode_event(_json.encode({"id": rid, "object": obj, "created": created,
                                                     "model": model, "choices": [], "usage": usage})))
        events.append(b"data: [DONE]\n\n")
        sent_content = 0
        for i, ev in enumerate(events):
            if disconnected.is_set():
                ctl.disconnects += 1
                return
            if ctl.drop_after is not None and sent_content >= ctl.drop_after:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                return
            await send({"type": "http.response.body", "body": ev, "more_body": True})
            if chat and i == 0:
                continue
            sent_content += 1
            if ctl.chunk_delay:
                try:
                    await asyncio.wait_for(disconnected.wait(), ctl.chunk_delay)
                except TimeoutError:
                    pass
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        ctl.completed_streams += 1
    except OSError:
        ctl.disconnects += 1
    finally:
        watcher.cancel()
