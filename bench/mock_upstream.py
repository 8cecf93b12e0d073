#!/usr/bin/env python3
"""Fast OpenAI-compatible mock upstream for gateway benchmarks.

POST /v1/chat/completions (or /chat/completions):
  stream=false -> one fixed chat.completion with usage
  stream=true  -> --chunks content chunks, a finish chunk, a usage chunk,
                  then `data: [DONE]` (SSE over chunked transfer encoding)
GET /health -> {"status":"ok"};  GET /stats -> {"requests": N}
GET /v1/models -> a one-model list

Hand-rolled HTTP/1.1 keep-alive server: asyncio Protocol + httptools parser,
uvloop when installed. No framework, so the upstream costs a few tens of
microseconds per request and stays far below any gateway's cost.

Copied unchanged (but for this note) from ../shared/bench/mock_upstream.py, the project's
reference harness.
"""
import argparse
import asyncio
import json
import signal
import time

import httptools

CREATED = int(time.time())
PROMPT_TOKENS = 12


def _json(obj):
    return json.dumps(obj, separators=(",", ":")).encode()


class Responses:
    """Builds (and caches per model name) the response bytes."""

    def __init__(self, chunks):
        self.chunks = chunks
        self._cache = {}

    def get(self, model, stream):
        key = (model, stream)
        if key not in self._cache:
            self._cache[key] = self._stream(model) if stream else self._full(model)
        return self._cache[key]

    def _usage(self, n):
        return {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": n,
                "total_tokens": PROMPT_TOKENS + n}

    def _full(self, model):
        content = " ".join(["tok"] * self.chunks)
        body = _json({
            "id": "chatcmpl-mock", "object": "chat.completion", "created": CREATED,
            "model": model, "system_fingerprint": None,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                         "logprobs": None, "finish_reason": "stop"}],
            "usage": self._usage(self.chunks),
        })
        head = (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                b"content-length: %d\r\n\r\n" % len(body))
        return head + body

    def _stream(self, model):
        """Returns a list of wire pieces: headers, then one HTTP chunk per SSE event."""
        base = {"id": "chatcmpl-mock", "object": "chat.completion.chunk",
                "created": CREATED, "model": model, "system_fingerprint": None}
        events = []
        for i in range(self.chunks):
            delta = {"content": "tok" if i == 0 else " tok"}
            if i == 0:
                delta["role"] = "assistant"
            events.append(dict(base, choices=[{"index": 0, "delta": delta,
                                               "logprobs": None, "finish_reason": None}]))
        events.append(dict(base, choices=[{"index": 0, "delta": {}, "logprobs": None,
                                           "finish_reason": "stop"}]))
        events.append(dict(base, choices=[], usage=self._usage(self.chunks)))
        sse = [b"data: " + _json(e) + b"\n\n" for e in events] + [b"data: [DONE]\n\n"]
        pieces = [b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                  b"cache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n"]
        pieces += [b"%x\r\n%s\r\n" % (len(s), s) for s in sse]
        pieces[-1] += b"0\r\n\r\n"
        return pieces


def simple(status, body, ctype=b"application/json"):
    return (b"HTTP/1.1 %s\r\ncontent-type: %s\r\ncontent-length: %d\r\n\r\n"
            % (status, ctype, len(body)) + body)


class MockProtocol(asyncio.Protocol):
    def __init__(self, app):
        self.app = app
        self.parser = httptools.HttpRequestParser(self)
        self.transport = None
        self.tail = None  # last delayed response task, keeps responses in order

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.write(simple(b"400 Bad Request", b'{"error":"bad http"}'))
            self.transport.close()

    # httptools callbacks
    def on_message_begin(self):
        self.url = b""
        self.body = []

    def on_url(self, url):
        self.url += url

    def on_body(self, body):
        self.body.append(body)

    def on_message_complete(self):
        keep_alive = self.parser.should_keep_alive()
        resp = self.app.handle(self.parser.get_method(), self.url.split(b"?")[0],
                               b"".join(self.body))
        if (self.tail is None or self.tail.done()) and not self.app.delayed(resp):
            self.write(resp, keep_alive)
        else:
            self.tail = asyncio.ensure_future(self.write_later(self.tail, resp, keep_alive))

    def write(self, resp, keep_alive):
        if self.transport.is_closing():
            return
        self.transport.write(resp if isinstance(resp, bytes) else b"".join(resp))
        if not keep_alive:
            self.transport.close()

    async def write_later(self, prev, resp, keep_alive):
        if prev is not None:
            await prev
        if self.app.delay:
            await asyncio.sleep(self.app.delay)
        if isinstance(resp, bytes) or not self.app.chunk_delay:
            self.write(resp, keep_alive)
            return
        for i, piece in enumerate(resp):
            if self.transport.is_closing():
                return
            if i > 1:  # headers and first event go out together, then pace
                await asyncio.sleep(self.app.chunk_delay)
            self.transport.write(piece)
        if not keep_alive:
            self.transport.close()


class App:
    def __init__(self, args):
        self.delay = args.delay_ms / 1000.0
        self.chunk_delay = args.chunk_delay_ms / 1000.0
        self.responses = Responses(args.chunks)
        self.requests = 0
        self.health = simple(b"200 OK", b'{"status":"ok"}')
        self.models = simple(b"200 OK", _json({"object": "list", "data": [
            {"id": "mock-gpt", "object": "model", "created": CREATED, "owned_by": "mock"}]}))

    def delayed(self, resp):
        return bool(self.delay or (self.chunk_delay and isinstance(resp, list)))

    def handle(self, method, path, body):
        if method == b"POST" and path in (b"/v1/chat/completions", b"/chat/completions"):
            self.requests += 1
            try:
                req = json.loads(body)
                model = str(req.get("model", "mock-gpt"))
                stream = bool(req.get("stream", False))
            except (ValueError, AttributeError):
                return simple(b"400 Bad Request", b'{"error":"invalid json"}')
            return self.responses.get(model, stream)
        if method == b"GET" and path == b"/health":
            return self.health
        if method == b"GET" and path == b"/stats":
            return simple(b"200 OK", _json({"requests": self.requests}))
        if method == b"GET" and path in (b"/v1/models", b"/models"):
            return self.models
        return simple(b"404 Not Found", b'{"error":"not found"}')


async def main(args):
    loop = asyncio.get_running_loop()
    app = App(args)
    server = await loop.create_server(lambda: MockProtocol(app), args.host, args.port,
                                      backlog=2048, reuse_address=True)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"mock upstream listening on http://{args.host}:{args.port} "
          f"(chunks={args.chunks}, delay_ms={args.delay_ms}, "
          f"chunk_delay_ms={args.chunk_delay_ms})", flush=True)
    await stop.wait()
    server.close()
    print(f"mock upstream served {app.requests} chat requests", flush=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9000)
    p.add_argument("--chunks", type=int, default=20, help="content chunks per streamed response")
    p.add_argument("--delay-ms", type=float, default=0.0, help="delay before each response")
    p.add_argument("--chunk-delay-ms", type=float, default=0.0, help="delay between SSE chunks")
    p.add_argument("--no-uvloop", action="store_true")
    a = p.parse_args()
    run = asyncio.run
    if not a.no_uvloop:
        try:
            import uvloop
            run = uvloop.run
        except ImportError:
            pass
    run(main(a))
