"""The OpenAI chat/completions wire format, as msgspec Structs.

Used in both directions: the OpenAI-compatible adapter sends and reads these, and the
OpenAI inbound door decodes client requests and encodes answers with the same Structs.
Response Structs keep every field (no omit_defaults) so `logprobs: null`, `refusal: null`
and friends are present, as strict SDK typings expect.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

Role = Literal["system", "developer", "user", "assistant", "tool", "function"]
Temperature = Annotated[float, Meta(ge=0, le=2)]
Probability = Annotated[float, Meta(ge=0, le=1)]
Penalty = Annotated[float, Meta(ge=-2, le=2)]
PositiveInt = Annotated[int, Meta(ge=1)]


class WireMessage(msgspec.Struct, omit_defaults=True):
    role: Role
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class StreamOptions(msgspec.Struct, omit_defaults=True):
    include_usage: bool = False


class _SamplingFields(msgspec.Struct, omit_defaults=True, kw_only=True):
    model: str
    temperature: Temperature | None = None
    top_p: Probability | None = None
    n: Annotated[int, Meta(ge=1, le=128)] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    stop: str | Annotated[list[str], Meta(max_length=4)] | None = None
    max_tokens: PositiveInt | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    seed: int | None = None
    user: str | None = None


class ChatCompletionRequest(_SamplingFields, kw_only=True):
    messages: Annotated[list[WireMessage], Meta(min_length=1)]
    max_completion_tokens: PositiveInt | None = None


class CompletionRequest(_SamplingFields, kw_only=True):
    prompt: str | Annotated[list[str], Meta(min_length=1, max_length=1)]


CHAT_FIELDS = frozenset(ChatCompletionRequest.__struct_fields__)
COMPLETION_FIELDS = frozenset(CompletionRequest.__struct_fields__)


class CompletionUsage(msgspec.Struct):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class ResponseMessage(msgspec.Struct):
    content: str | None
    role: str = "assistant"
    refusal: str | None = None
    tool_calls: list[dict[str, Any]] | msgspec.UnsetType = msgspec.UNSET  # left out when unset


class Choice(msgspec.Struct):
    index: int
    message: ResponseMessage
    finish_reason: str | None
    logprobs: Any = None


class ChatCompletion(msgspec.Struct):
    id: str
    created: int
    model: str
    choices: list[Choice]
    usage: CompletionUsage | None = None
    object: str = "chat.completion"


class Delta(msgspec.Struct, omit_defaults=True):
    role: str | None = None
    content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None


class ChunkChoice(msgspec.Struct):
    index: int
    delta: Delta
    finish_reason: str | None = None
    logprobs: Any = None


class ChatCompletionChunk(msgspec.Struct):
    id: str
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: CompletionUsage | None = None
    object: str = "chat.completion.chunk"


class TextChoice(msgspec.Struct):
    index: int
    text: str
    finish_reason: str | None = None
    logprobs: Any = None


class TextCompletion(msgspec.Struct):
    """A `/v1/completions` answer or stream chunk (both use `object: text_completion`)."""

    id: str
    created: int
    model: str
    choices: list[TextChoice]
    usage: CompletionUsage | None = None
    object: str = "text_completion"


class ErrorDetail(msgspec.Struct):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorBody(msgspec.Struct):
    error: ErrorDetail


class ModelCard(msgspec.Struct):
    id: str
    created: int
    owned_by: str
    object: str = "model"


class ModelList(msgspec.Struct):
    data: list[ModelCard]
    object: str = "list"


# --- loose Structs for reading upstream answers (tolerant of vLLM/OpenAI variations) ---


class UpstreamMessage(msgspec.Struct):
    content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None


class UpstreamChoice(msgspec.Struct):
    message: UpstreamMessage | None = None
    delta: UpstreamMessage | None = None
    text: str | None = None
    finish_reason: str | None = None


class UpstreamUsage(msgspec.Struct):
    prompt_tokens: int = 0
    completion_tokens: int = 0


class UpstreamErrorDetail(msgspec.Struct):
    message: str = ""
    type: str | None = None
    code: str | int | None = None


class UpstreamResponse(msgspec.Struct):
    """A chat/completions answer, a stream chunk, or an error body, read leniently."""

    id: str = ""
    model: str = ""
    choices: list[UpstreamChoice] = []
    usage: UpstreamUsage | None = None
    error: UpstreamErrorDetail | str | None = None
    message: str | None = None  # old vLLM flat error body
