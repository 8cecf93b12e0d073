"""Replicate's predictions API on the wire: request body, prediction object, problem details.

Shared by the adapter (decoding answers) and the emulator (encoding them). Decoding is lenient
about fields we do not use (Replicate adds fields over time); the create body is strict because
Replicate rejects unknown top-level keys with 422.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

Status = Literal["starting", "processing", "succeeded", "failed", "canceled", "aborted"]
TERMINAL: frozenset[str] = frozenset({"succeeded", "failed", "canceled", "aborted"})

# Inputs the Llama 3 runtimes accept (spec §6); Cog's Input schema is closed.
LLAMA3_INPUTS: frozenset[str] = frozenset({
    "prompt", "system_prompt", "prompt_template", "max_tokens", "min_tokens", "temperature",
    "top_p", "top_k", "presence_penalty", "frequency_penalty", "length_penalty",
    "stop_sequences", "seed", "log_performance_metrics", "max_new_tokens", "min_new_tokens",
})


class CreatePrediction(msgspec.Struct, omit_defaults=True, forbid_unknown_fields=True):
    """Body of `POST /v1/models/{owner}/{name}/predictions` (no `version`) or
    `POST /v1/predictions` (with `version`)."""

    input: dict[str, Any]
    version: str | None = None
    stream: bool = False


class PredictionURLs(msgspec.Struct, omit_defaults=True):
    get: str | None = None
    cancel: str | None = None
    stream: str | None = None
    web: str | None = None


class Metrics(msgspec.Struct, omit_defaults=True):
    predict_time: float | None = None
    total_time: float | None = None
    input_token_count: int | None = None
    output_token_count: int | None = None
    time_to_first_token: float | None = None
    tokens_per_second: float | None = None


class Prediction(msgspec.Struct, omit_defaults=True):
    id: str
    status: Status
    model: str | None = None
    version: str | None = None
    input: dict[str, Any] = {}
    output: Any = None
    logs: str | None = None
    error: str | None = None
    created_at: str | None = None
    started_at: str | None = None
    completed_at: str | None = None
    urls: PredictionURLs = msgspec.field(default_factory=PredictionURLs)
    metrics: Metrics | None = None
    data_removed: bool = False
    source: str | None = None

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    def text(self) -> str:
        """Llama 3 output is an array of token pieces to concatenate (a string, on some models)."""
        if self.output is None:
            return ""
        if isinstance(self.output, str):
            return self.output
        return "".join(str(p) for p in self.output)


class Problem(msgspec.Struct, omit_defaults=True):
    """RFC 7807 problem details, Replicate's error body."""

    detail: str | None = None
    title: str | None = None
    status: int | None = None
    type: str | None = None
    invalid_fields: list[dict[str, Any]] | None = None


class StreamError(msgspec.Struct):
    """`data` of an SSE `error` event."""

    detail: str = "prediction failed"


class StreamDone(msgspec.Struct):
    """`data` of an SSE `done` event: `{}`, `{"reason": "canceled"}` or `{"reason": "error"}`."""

    reason: str | None = None


prediction_decoder = msgspec.json.Decoder(Prediction)
problem_decoder = msgspec.json.Decoder(Problem)
stream_error_decoder = msgspec.json.Decoder(StreamError)
stream_done_decoder = msgspec.json.Decoder(StreamDone)


def stream_error_detail(data: str) -> str:
    """The `detail` of an SSE `error` event (its raw data if it is not the usual JSON)."""
    try:
        return stream_error_decoder.decode(data).detail
    except msgspec.DecodeError:
        return data or "prediction failed"


def done_reason(data: str) -> str:
    """`succeeded`, `canceled` or `error`, from the data of an SSE `done` event."""
    try:
        reason = stream_done_decoder.decode(data or "{}").reason
    except msgspec.DecodeError:
        reason = None
    return reason or "succeeded"
