"""A fake Replicate predictions API for tests, `llm-gateway demo` and benchmarks.

`create_emulator(**options)` returns a raw ASGI app (serve it with `LoopbackServer`) whose
`control` attribute sets its behaviour, injects faults and records what it received. It
speaks the wire format of ../shared/specs/replicate.md: bearer auth, both create paths,
`Prefer: wait` (answering `starting`/`processing` when the job outlasts the wait), the status
progression `starting` -> `processing` -> `succeeded`, `urls.get`/`urls.cancel`/`urls.stream`,
SSE with `id:` lines, `metrics` with token counts, and RFC 7807 problem bodies.

The "model" is deterministic: it answers `control.reply`, or `You said: <last user turn>`,
split into pieces of at most four non-blank characters (each piece one output token).
By default it ignores `stop_sequences`, like the seed's base model babbling past `<|end|>`,
so that the gateway's own stop handling is what the tests see.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import msgspec

from adapters.replicate.prompt import END_HEADER, EOT
from adapters.replicate.wire import (
    LLAMA3_INPUTS,
    Metrics,
    Prediction,
    PredictionURLs,
    Problem,
)

DEFAULT_MODELS = ("meta/meta-llama-3-8b", "meta/meta-llama-3-8b-instruct")
DEFAULT_TOKEN = "r8_emulator_token"
INSTRUCT_TEMPLATE = (
    "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n{system_prompt}<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\n{prompt}<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n"
)
_PIECE = re.compile(r"\s*\S{1,4}|\s+")
_PREFER_WAIT = re.compile(r"\bwait(?:=(\d+))?\b")
_USER_HEADER = f"user{END_HEADER}\n\n"
_json = msgspec.json.Encoder()


def tokenize(text: str) -> list[str]:
    """The emulator's deterministic tokenizer: pieces that join back to `text`."""
    return _PIECE.findall(text)


def version_id(model: str) -> str:
    """The emulator's (stable, 64-hex) version id of `model`."""
    return hashlib.sha256(model.encode()).hexdigest()


def _now_iso() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


@dataclass
class Fault:
    status: int
    detail: str
    retry_after: str | None = None


@dataclass
class CreateRecord:
    path: str
    body: dict[str, Any]
    prefer: str | None
    cancel_after: str | None


@dataclass
class Job:
    """One prediction's state, advanced by its runner task in the server's event loop."""

    pred: Prediction
    tokens: list[str]
    input_tokens: int
    fail_error: str | None
    report_counts: bool = True
    gets: int = 0  # GET /v1/predictions/{id} polls seen
    created: float = field(default_factory=time.monotonic)
    started: float | None = None
    first_token: float | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None

    def notify(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()

    def finish(self, status: str, error: str | None = None) -> None:
        now = time.monotonic()
        p = self.pred
        p.status = status  # type: ignore[assignment]
        p.error = error
        p.completed_at = _now_iso()
        m = Metrics(total_time=round(now - self.created, 6))
        if self.started is not None:
            m.predict_time = round(now - self.started, 6)
        if status == "succeeded" and self.report_counts:
            m.input_token_count = self.input_tokens
            m.output_token_count = len(p.output or ())
        if status == "succeeded":
            if self.first_token is not None and self.started is not None:
                m.time_to_first_token = round(self.first_token - self.started, 6)
            if m.predict_time:
                m.tokens_per_second = round(len(p.output or ()) / m.predict_time, 3)
        p.metrics = m
        self.notify()


class EmulatorControl:
    """Behaviour knobs, faults and records. Attributes may be changed between requests."""

    def __init__(self, **options: Any) -> None:
        self._options = options
        self.reset()

    def reset(self) -> None:
        """Back to the options given to `create_emulator`; no faults; empty records."""
        o = self._options
        self.api_token: str = o.get("api_token", DEFAULT_TOKEN)
        self.models: tuple[str, ...] = tuple(o.get("models", DEFAULT_MODELS))
        self.cold_boot: float = o.get("cold_boot", 0.0)  # seconds in `starting`
        self.token_delay: float = o.get("token_delay", 0.002)  # seconds per output token
        self.sync_hold: float | None = o.get("sync_hold")  # cap on a `Prefer: wait` hold
        self.reply: str | None = o.get("reply")
        self.honour_stop_sequences: bool = o.get("honour_stop_sequences", False)
        self.report_token_counts: bool = o.get("report_token_counts", True)
        # faults
        self.create_faults: list[Fault] = []
        self.fail_prediction: str | None = None  # error text of a `failed` prediction
        self.fail_after_tokens: int = 0
        self.cut_stream_after: int | None = None  # close the SSE stream after N outputs
        # records
        self.creates: list[CreateRecord] = []
        self.cancellations: list[tuple[str, float]] = []  # (prediction id, time.monotonic())
        self.stream_requests: list[dict[str, str]] = []  # headers of each stream GET
        self.jobs: dict[str, Job] = {}

    def fail_create(self, status: int, detail: str = "", *, retry_after: str | None = None,
                    times: int = 1) -> None:
        """Answer the next `times` create requests with `status` (e.g. 429 + Retry-After)."""
        detail = detail or ("Request was throttled. Expected available in 1 second."
                            if status == 429 else "Internal server error")
        self.create_faults.extend(Fault(status, detail, retry_after) for _ in range(times))

    @property
    def inputs(self) -> list[dict[str, Any]]:
        return [c.body.get("input", {}) for c in self.creates]

    def cancelled(self, prediction_id: str) -> float | None:
        """When (time.monotonic) a cancel for `prediction_id` arrived, or None."""
        return next((t for pid, t in self.cancellations if pid == prediction_id), None)


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
        job = self._new_job(model, inp, max_tokens, base)
        c.jobs[job.pred.id] = job
        job.task = asyncio.get_running_loop().create_task(self._run(job))
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

    def _new_job(self, model: str, inp: dict[str, Any], max_tokens: int, base: str) -> Job:
        c = self.control
        pid = uuid.uuid4().hex[:26]
        template = inp.get("prompt_template") or (
            INSTRUCT_TEMPLATE if model.endswith("instruct") else "{prompt}")
        error: str | None = c.fail_prediction
        formatted = ""
        if "{prompt}" not in template:
            error = "E1003 BadPromptTemplate: You have submitted both a prompt and a prompt " \
                    "template that doesn't include '{prompt}'."
        else:
            try:
                formatted = template.format(prompt=inp.get("prompt", ""),
                                            system_prompt=inp.get("system_prompt", ""))
            except (KeyError, IndexError, ValueError) as exc:
                error = f"E1004 PromptTemplateError: Prompt template is invalid: {exc}"
        if error is None and not formatted.strip():
            error = "E1001 PromptRequired: A prompt is required, but your formatted prompt is blank"
        text = c.reply if c.reply is not None else f"You said: {_last_user_turn(formatted)}"
        stops = inp.get("stop_sequences")
        if c.honour_stop_sequences and isinstance(stops, str):
            cuts = [i for s in stops.split(",") if s and (i := text.find(s)) >= 0]
            text = text[:min(cuts)] if cuts else text
        urls = PredictionURLs(get=f"{base}/v1/predictions/{pid}",
                              cancel=f"{base}/v1/predictions/{pid}/cancel",
                              stream=f"{base}/v1/streams/{pid}", web=f"{base}/p/{pid}")
        pred = Prediction(id=pid, status="starting", model=model, version=version_id(model),
                          input=inp, created_at=_now_iso(), urls=urls, logs="", source="api")
        input_tokens = len(tokenize(formatted))
        return Job(pred, tokenize(text)[:max_tokens], input_tokens, error, c.report_token_counts)

    async def _run(self, job: Job) -> None:
        c, p = self.control, job.pred
        await asyncio.sleep(c.cold_boot)
        job.started = time.monotonic()
        p.status, p.started_at, p.output = "processing", _now_iso(), []
        job.notify()
        for i, token in enumerate(job.tokens):
            if job.fail_error is not None and i >= c.fail_after_tokens:
                break
            await asyncio.sleep(c.token_delay)
            if job.first_token is None:
                job.first_token = time.monotonic()
            p.output.append(token)
            job.notify()
        if job.fail_error is not None:
            p.logs = f"{job.fail_error}\n"
            job.finish("failed", job.fail_error)
        else:
            job.finish("succeeded")

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


def _last_user_turn(prompt: str) -> str:
    at = prompt.rfind(_USER_HEADER)
    if at < 0:
        return prompt.strip()
    turn = prompt[at + len(_USER_HEADER):]
    return turn.split(EOT, 1)[0].strip()


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
    """Options are `EmulatorControl` attributes: api_token, models, cold_boot, token_delay,
    sync_hold, reply, honour_stop_sequences, report_token_counts."""
    return ReplicateEmulator(**options)


def demo_backend() -> list[tuple[Any, str, dict[str, Any]]]:
    """For `llm-gateway demo`: one emulator serving both Llama 3 models, and a backend for each."""
    from adapters.loopback import LoopbackServer

    server = LoopbackServer(create_emulator(token_delay=0.03)).start()
    return [(server, f"replicate-{model.split('/')[1].removeprefix('meta-')}",
             {"kind": "replicate", "api_token": DEFAULT_TOKEN, "model": model, "base_url": server.url})
            for model in DEFAULT_MODELS]


__all__ = ["DEFAULT_TOKEN", "demo_backend", "EmulatorControl", "ReplicateEmulator", "create_emulator",
           "tokenize", "version_id"]
