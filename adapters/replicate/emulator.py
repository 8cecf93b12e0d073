"""A fake Replicate predictions API for tests, `llm-gateway demo` and benchmarks.

`create_emulator(**options)` returns a raw ASGI app (serve it with `LoopbackServer`) whose
`control` attribute sets its behaviour, injects faults and records what it received. It
speaks the wire format of ../shared/specs/replicate.md: bearer auth, the three create paths
(model, version, deployment), `Prefer: wait` (answering `starting`/`processing` when the job
outlasts the wait), the status progression `starting` -> `processing` -> `succeeded`,
`urls.get`/`urls.cancel`/`urls.stream`, SSE with `id:` lines, `metrics` with token counts, and
RFC 7807 problem bodies.
The fake model behind it (deterministic output, knobs, records) is in emulated_model.py.
"""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

import msgspec

from adapters.replicate.emulated_model import (
    DEFAULT_MODELS,
    DEFAULT_TOKEN,
    CreateRecord,
    EmulatorControl,
    Job,
    new_job,
    run_job,
    tokenize,
    version_id,
)
from adapters.replicate.wire import LLAMA3_INPUTS, Prediction, Problem

_PREFER_WAIT = re.compile(r"\bwait(?:=(\d+))?\b")
_json = msgspec.json.Encoder()


class _HTTPError(Exception):
    def __init__(self, status: int, detail: str, title: str | None = None,
                 headers: dict[str, str] | None = None, **extra: Any) -> None:
        self.status, self.headers = status, headers or {}
        self.problem = Problem(detail=detail, title=title, status=status, **extra)


class ReplicateEmulator:
    def __init__(self, **options: Any) -> None:
        self.control = EmulatorControl(**options)
        self._tasks: set[asyncio.Task[Any]] = set()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        body = b""
        more = True
        while more:
            msg = await receive()
            body += msg.get("body", b"")
            more = msg.get("more_body", False)
        base = f"{scope.get('scheme', 'http')}://{headers.get('host', 'localhost')}"
        try:
            await self._route(scope["method"], scope["path"], headers, body, base, receive, send)
        except _HTTPError as exc:
            await _respond(send, exc.status, _json.encode(exc.problem), exc.headers,
                           content_type="application/problem+json")

    async def _lifespan(self, receive: Any, send: Any) -> None:
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                for task in list(self._tasks):
                    task.cancel()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _route(self, method: str, path: str, headers: dict[str, str], body: bytes, base: str,
                     receive: Any, send: Any) -> None:
        parts = path.strip("/").split("/")
        if method == "GET" and len(parts) == 3 and parts[:2] == ["v1", "streams"]:
            await self._stream(parts[2], headers, receive, send)
            return
        self._authenticate(headers)
        if method == "POST" and len(parts) == 5 and parts[:2] == ["v1", "models"] \
                and parts[4] == "predictions":
            await self._create(path, f"{parts[2]}/{parts[3]}", headers, body, base, send)
        elif method == "POST" and len(parts) == 5 and parts[:2] == ["v1", "deployments"] \
                and parts[4] == "predictions":
            name = f"{parts[2]}/{parts[3]}"
            model = self.control.deployments.get(name)
            if model is None:
                raise _HTTPError(404, f"Deployment {name} not found", "Not found")
            await self._create(path, model, headers, body, base, send)
        elif method == "POST" and parts == ["v1", "predictions"]:
            await self._create(path, None, headers, body, base, send)
        elif method == "GET" and len(parts) == 3 and parts[:2] == ["v1", "predictions"]:
            job = self._job(parts[2])
            job.gets += 1
            await _respond(send, 200, _json.encode(job.pred))
        elif method == "POST" and len(parts) == 4 and parts[:2] == ["v1", "predictions"] \
                and parts[3] == "cancel":
            await _respond(send, 200, _json.encode(self._cancel(parts[2])))
        else:
            raise _HTTPError(404, "The requested resource could not be found.", "Not found")

    def _authenticate(self, headers: dict[str, str]) -> None:
        if headers.get("authorization") != f"Bearer {self.control.api_token}":
            raise _HTTPError(401, "You did not pass a valid authentication token", "Unauthenticated")

    def _job(self, pid: str) -> Job:
        job = self.control.jobs.get(pid)
        if job is None:
            raise _HTTPError(404, "The requested prediction does not exist.", "Not found")
        return job

    def _cancel(self, pid: str) -> Prediction:
        job = self._job(pid)
        self.control.cancellations.append((pid, time.monotonic()))
        if not job.pred.terminal:
            if job.task is not None:
                job.task.cancel()
            job.finish("canceled")
        return job.pred

    async def _create(self, path: str, model: str | None, headers: dict[str, str], body: bytes,
                      base: str, send: Any) -> None:
        c = self.control
        if c.create_faults:
            fault = c.create_faults.pop(0)
            extra = {"Retry-After": fault.retry_after} if fault.retry_after is not None else {}
            raise _HTTPError(fault.status, fault.detail, headers=extra)
        try:
            raw = msgspec.json.decode(body)
        except msgspec.DecodeError as exc:
            raise _HTTPError(400, "Request body is not valid JSON", "Bad request") from exc
        if not isinstance(raw, dict):
            raise _HTTPError(422, "- Invalid type. Expected: object, given: other\n", "Invalid input")
        allowed = {"input", "stream", "webhook", "webhook_events_filter"} | (
            set() if model else {"version"})
        _reject_unknown(raw, allowed, "")
        if not isinstance(raw.get("input"), dict):
            raise _HTTPError(422, "- input is required\n", "Input validation failed")
        c.creates.append(CreateRecord(path, raw, headers.get("prefer"), headers.get("cancel-after")))
        if model is None:
            model = self._model_of_version(str(raw.get("version", "")))
        elif model not in c.models:
            raise _HTTPError(404, f"Model {model} does not exist", "Not found")
        inp: dict[str, Any] = raw["input"]
        _reject_unknown(inp, LLAMA3_INPUTS, "input.")
        max_tokens = inp.get("max_tokens", inp.get("max_new_tokens", 512))
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise _HTTPError(422, "- input.max_tokens: Must be greater than or equal to 1\n",
                             "Input validation failed")
        job = new_job(c, model, inp, max_tokens, base)
        c.jobs[job.pred.id] = job
        job.task = asyncio.get_running_loop().create_task(run_job(c, job))
        self._tasks.add(job.task)
        job.task.add_done_callback(self._tasks.discard)
        extra_headers = {"Location": job.pred.urls.get or "", "ratelimit-remaining": "599",
                         "ratelimit-reset": "1"}
        prefer = _PREFER_WAIT.search(headers.get("prefer", ""))
        if prefer:
            wait = min(60, max(1, int(prefer.group(1) or 60)))
            hold = wait if c.sync_hold is None else min(wait, c.sync_hold)
            deadline = time.monotonic() + hold
            while not job.pred.terminal and (left := deadline - time.monotonic()) > 0:
                try:
                    await asyncio.wait_for(job.changed.wait(), left)
                except TimeoutError:
                    break
            extra_headers["Preference-Applied"] = f"wait={wait}"
        await _respond(send, 201, _json.encode(job.pred), extra_headers)

    def _model_of_version(self, version: str) -> str:
        for m in self.control.models:
            if version in (version_id(m), f"{m}:{version_id(m)}", m):
                return m
        raise _HTTPError(422, "The specified version does not exist (or perhaps you don't have "
                         "permission to use it?)", "Invalid version or not permitted")

    async def _stream(self, pid: str, headers: dict[str, str], receive: Any, send: Any) -> None:
        job = self._job(pid)
        self.control.stream_requests.append(headers)
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"text/event-stream"), (b"cache-control", b"no-store")]})
        gone = asyncio.Event()

        async def watch_disconnect() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()

        watcher = asyncio.get_running_loop().create_task(watch_disconnect())
        try:
            await _send_body(send, b": hi\n\n")
            sent = 0
            while not gone.is_set():
                changed = job.changed
                output = job.pred.output or []
                cut = self.control.cut_stream_after
                while sent < len(output):
                    if cut is not None and sent >= cut:
                        return  # the connection drops without a `done` event
                    await _send_body(send, _output_event(output[sent], sent))
                    sent += 1
                if job.pred.terminal:
                    await _send_body(send, _end_events(job.pred))
                    return
                waiter = asyncio.ensure_future(changed.wait())
                stop = asyncio.ensure_future(gone.wait())
                await asyncio.wait({waiter, stop}, return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                stop.cancel()
        finally:
            watcher.cancel()
            if not gone.is_set():
                await send({"type": "http.response.body", "body": b"", "more_body": False})


def _reject_unknown(obj: dict[str, Any], allowed: frozenset[str] | set[str], prefix: str) -> None:
    unknown = [k for k in obj if k not in allowed]
    if unknown:
        detail = "".join(f"- {prefix}Additional property {k} is not allowed\n" for k in unknown)
        fields = [{"type": "additional_property_not_allowed", "field": prefix.rstrip("."),
                   "description": f"Additional property {k} is not allowed"} for k in unknown]
        raise _HTTPError(422, detail, "Input validation failed", invalid_fields=fields)


def _output_event(piece: str, n: int) -> bytes:
    data = "".join(f"data: {line}\n" for line in piece.split("\n"))
    return f"event: output\nid: {int(time.time())}:{n}\n{data}\n".encode()


def _end_events(pred: Prediction) -> bytes:
    if pred.status == "succeeded":
        return b"event: done\ndata: {}\n\n"
    if pred.status == "failed":
        err = _json.encode({"detail": pred.error or "prediction failed"})
        return b"event: error\ndata: " + err + b"\n\nevent: done\ndata: {\"reason\": \"error\"}\n\n"
    return b"event: done\ndata: {\"reason\": \"canceled\"}\n\n"


async def _send_body(send: Any, data: bytes) -> None:
    await send({"type": "http.response.body", "body": data, "more_body": True})


async def _respond(send: Any, status: int, body: bytes, headers: dict[str, str] | None = None,
                   content_type: str = "application/json") -> None:
    raw = [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def create_emulator(**options: Any) -> ReplicateEmulator:
    """Options are `EmulatorControl` attributes: api_token, models, deployments (owner/name ->
    the model it runs), cold_boot, token_delay, sync_hold, reply, honour_stop_sequences,
    report_token_counts."""
    return ReplicateEmulator(**options)


def demo_backend() -> list[tuple[Any, str, dict[str, Any]]]:
    """For `llm-gateway demo`: one emulator serving both Llama 3 models, and a backend for each."""
    from adapters.loopback import LoopbackServer

    server = LoopbackServer(create_emulator(token_delay=0.03)).start()
    return [(server, f"replicate-{model.split('/')[1].removeprefix('meta-')}",
             {"kind": "replicate", "api_token": DEFAULT_TOKEN, "model": model, "base_url": server.url})
            for model in DEFAULT_MODELS]


__all__ = [
    "DEFAULT_TOKEN",
    "EmulatorControl",
    "ReplicateEmulator",
    "create_emulator",
    "demo_backend",
    "tokenize",
    "version_id",
]
