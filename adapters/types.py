"""The normalised model every adapter speaks, whatever the vendor or the inbound dialect.

A `ChatRequest` is what the gateway asks of a backend; a `ChatResult` (non-streaming) or a
sequence of `ChatChunk`s (streaming) is what comes back. Failures are `UpstreamError`s that
say whether another attempt could succeed (`retryable`) and how long to wait (`retry_after`).
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

UsageSource = Literal["reported", "estimated"]
FinishReason = Literal["stop", "length", "content_filter", "tool_calls", "error"]


class Message(msgspec.Struct, omit_defaults=True):
    """One chat turn. `content` is text, or the OpenAI parts list kept as given."""

    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        """The turn's text: string content, or its text parts joined."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.get("text", "") for p in self.content if p.get("type") == "text")


class ChatRequest(msgspec.Struct, omit_defaults=True):
    """A normalised request: chat (`messages`) or plain completion (`prompt`).

    `model` is the backend's model id once routed (the alias until then). `extra` carries
    vendor inputs the client sent beyond the known fields; adapters pass them through.
    """

    model: str
    messages: list[Message] | None = None
    prompt: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    stop: list[str] | None = None
    stream: bool = False
    user: str | None = None  # the calling principal's user (set by the gateway, not the client)
    request_id: str = ""
    trim_history: bool = False  # the route allows dropping the oldest turns to fit a backend's limit
    extra: dict[str, Any] = {}

    @property
    def is_chat(self) -> bool:
        return self.prompt is None

    @property
    def wants_function_calls(self) -> bool:
        """The client offered tools (OpenAI `tools`, in `extra`) and did not rule calls out."""
        return bool(self.extra.get("tools")) and self.extra.get("tool_choice") != "none"


class Usage(msgspec.Struct):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    source: UsageSource = "reported"

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class ChatResult(msgspec.Struct):
    """A whole answer. `tool_calls` are the model's function calls in OpenAI's shape
    (`{"id", "type": "function", "function": {"name", "arguments"}}`), kept as the backend sent them."""

    text: str
    finish_reason: str = "stop"
    usage: Usage = msgspec.field(default_factory=Usage)
    id: str = ""
    model: str = ""
    tool_calls: list[dict[str, Any]] | None = None


class ChatChunk(msgspec.Struct, omit_defaults=True):
    """A piece of a streamed answer. The last chunk of a stream carries `finish_reason`
    and, where the adapter knows it, `usage`. `tool_calls` are function-call deltas in OpenAI's
    streaming shape (`{"index", "id"?, "type"?, "function": {"name"?, "arguments"}}`)."""

    text: str = ""
    finish_reason: str | None = None
    usage: Usage | None = None
    tool_calls: list[dict[str, Any]] | None = None


class UpstreamError(Exception):
    """A backend failed. `status` is the HTTP status the gateway should answer with."""

    status: int = 502
    code: str = "upstream_error"
    retryable: bool = False

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        retryable: bool | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        if code is not None:
            self.code = code
        if retryable is not None:
            self.retryable = retryable
        self.retry_after = retry_after

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.status}, {self.code!r}, {self.message!r})"


class UpstreamRateLimited(UpstreamError):
    status = 429
    code = "rate_limit_exceeded"
    retryable = True


class UpstreamQuotaExhausted(UpstreamError):
    """The backend account's own quota is spent: retrying here will not help."""

    status = 429
    code = "upstream_quota_exhausted"
    retryable = False


class UpstreamUnavailable(UpstreamError):
    """5xx, connection refused, reset: another attempt or backend may succeed."""

    status = 502
    code = "upstream_unavailable"
    retryable = True


class UpstreamTimeout(UpstreamError):
    status = 504
    code = "upstream_timeout"
    retryable = True


class UpstreamBadRequest(UpstreamError):
    """The backend rejected the request's content: the client's to fix."""

    status = 400
    code = "invalid_request"
    retryable = False


class UpstreamAuthError(UpstreamError):
    """The gateway's own credentials for the backend were refused (not the client's fault)."""

    status = 502
    code = "upstream_auth_error"
    retryable = False


class UpstreamProtocolError(UpstreamError):
    """The backend answered something we cannot read (bad JSON, stream cut short)."""

    status = 502
    code = "upstream_protocol_error"
    retryable = True
