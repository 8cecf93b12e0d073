"""The Replicate emulator's fake Llama 3: deterministic output, prediction state, knobs, records.

The "model" answers `control.reply`, or `You said: <last user turn>`, split into pieces of at
most four non-blank characters (each piece one output token). Like cog-triton it formats
`prompt_template` (failing with E1001/E1003/E1004 as the runtime does); by default it ignores
`stop_sequences`, like the seed's base model babbling past `<|end|>`, so that the gateway's own
stop handling is what the tests see.
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

from adapters.replicate.prompt import END_HEADER, EOT
from adapters.replicate.wire import Metrics, Prediction, PredictionURLs

DEFAULT_MODELS = ("meta/meta-llama-3-8b", "meta/meta-llama-3-8b-instruct")
DEFAULT_TOKEN = "r8_emulator_token"
INSTRUCT_TEMPLATE = (
    "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n{system_prompt}<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\n{prompt}<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n"
)
_PIECE = re.compile(r"\s*\S{1,4}|\s+")
_USER_HEADER = f"user{END_HEADER}\n\n"


def tokenize(text: str) -> list[str]:
    """The emulator's deterministic tokenizer: pieces that join back to `text`."""
    return _PIECE.findall(text)


def version_id(model: str) -> str:
    """The emulator's (stable, 64-hex) version id of `model`."""
    return hashlib.sha256(model.encode()).hexdigest()


def now_iso() -> str:
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
        p.completed_at = now_iso()
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
        self.deployments: dict[str, str] = dict(o.get("deployments", {}))  # owner/name -> model it runs
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


def new_job(c: EmulatorControl, model: str, inp: dict[str, Any], max_tokens: int, base: str) -> Job:
    """A prediction in `starting`, with the output the fake model will produce for `inp`."""
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
                      input=inp, created_at=now_iso(), urls=urls, logs="", source="api")
    input_tokens = len(tokenize(formatted))
    return Job(pred, tokenize(text)[:max_tokens], input_tokens, error, c.report_token_counts)


async def run_job(c: EmulatorControl, job: Job) -> None:
    """Cold boot, then one output token every `token_delay`, then a terminal status."""
    p = job.pred
    await asyncio.sleep(c.cold_boot)
    job.started = time.monotonic()
    p.status, p.started_at, p.output = "processing", now_iso(), []
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


def _last_user_turn(prompt: str) -> str:
    at = prompt.rfind(_USER_HEADER)
    if at < 0:
        return prompt.strip()
    turn = prompt[at + len(_USER_HEADER):]
    return turn.split(EOT, 1)[0].strip()
