"""The wenxinworkshop v1 wire format (msgspec Structs) and the conversions to and from the
normalised model: `to_baidu(req)` and `from_baidu(resp)`.

The same Structs serve the gateway's Baidu-compatible front door, so field order follows
Baidu's own output (the Go SDK is sensitive to stream lines, not to order, but keeping Baidu's
order makes captured traffic diff cleanly).

Request mapping decisions (../shared/specs/baidu_wenxinworkshop.md §4, §7):
- Llama endpoints take no `system` field: system (and `developer`) text is folded into the
  first user turn as "<system>\\n\\n<user text>". `tool` turns are sent as user turns.
- Consecutive turns of one role are merged (joined by a blank line); leading assistant turns
  are dropped; a conversation that ends with an assistant turn is refused (400). The result
  starts with `user`, alternates, and so has an odd count.
- temperature is clamped into (0, 1] (0 -> 0.01, i.e. near-greedy); top_p into [0, 1];
  top_k <= 0 means "off" and is not sent; penalty_score comes from vLLM's
  `repetition_penalty` (clamped to [1, 2]) or else from the larger OpenAI penalty p in
  [-2, 2] as 1 + p/2 (clamped to [1, 2]: 0 -> 1.0 means no penalty).
- `stop`: more than 4 items, or an item over 20 characters, is refused (400), never trimmed.
- Total content over `max_input_chars` (4800 for Llama 3 8B) is refused (400), or with
  `trim_history` the oldest user/assistant pairs are dropped (the system text is kept).
- `max_tokens` and `seed` have no equivalent on this endpoint and are not sent.
"""

from __future__ import annotations

from typing import Any

import msgspec
from msgspec import UNSET, UnsetType

from adapters.types import ChatRequest, ChatResult, UpstreamBadRequest, Usage

CHAT_PATH_PREFIX = "/rpc/2.0/ai_custom/v1/wenxinworkshop/chat/"
TOKEN_PATH = "/oauth/2.0/token"

MAX_STOP_ITEMS = 4
MAX_STOP_CHARS = 20
MIN_TEMPERATURE = 0.01
_SYSTEM_ROLES = frozenset({"system", "developer"})
_USER_ROLES = frozenset({"user", "tool", "function"})
# Client-supplied vendor inputs (ChatRequest.extra) that this endpoint understands.
_EXTRA_KEYS = frozenset({"penalty_score", "repetition_penalty", "top_k", "extra_parameters"})


class BaiduMessage(msgspec.Struct):
    role: str
    content: str


class BaiduChatRequest(msgspec.Struct, omit_defaults=True):
    messages: list[BaiduMessage]
    stream: bool = False
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    penalty_score: float | None = None
    stop: list[str] | None = None
    user_id: str | None = None
    # Accepted from Baidu clients by the front door (the SDK always sends it); never built here.
    extra_parameters: dict[str, Any] | None = None
    system: str | None = None


class BaiduUsage(msgspec.Struct):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class BaiduChatResponse(msgspec.Struct):
    """A synchronous answer, or (with `error_code` set) an error delivered as HTTP 200."""

    id: str = ""
    object: str = "chat.completion"
    created: int = 0
    result: str = ""
    is_truncated: bool = False
    need_clear_history: bool = False
    ban_round: int | UnsetType = UNSET
    usage: BaiduUsage | UnsetType = UNSET
    finish_reason: str | UnsetType = UNSET
    error_code: int | UnsetType = UNSET
    error_msg: str | UnsetType = UNSET


class BaiduStreamChunk(msgspec.Struct):
    """One `data:` line of a stream (or an error object arriving in its place)."""

    id: str = ""
    object: str = "chat.completion"
    created: int = 0
    sentence_id: int = 0
    is_end: bool = False
    is_truncated: bool = False
    result: str = ""
    need_clear_history: bool = False
    ban_round: int | UnsetType = UNSET
    usage: BaiduUsage | UnsetType = UNSET
    error_code: int | UnsetType = UNSET
    error_msg: str | UnsetType = UNSET


class BaiduError(msgspec.Struct):
    error_code: int
    error_msg: str
    id: str | UnsetType = UNSET


class TokenResponse(msgspec.Struct):
    """`/oauth/2.0/token` answer: success fields, or `error` + `error_description`."""

    access_token: str = ""
    expires_in: int = 2592000
    refresh_token: str = ""
    scope: str = ""
    session_key: str = ""
    session_secret: str = ""
    error: str = ""
    error_description: str = ""


def chat_path(endpoint: str) -> str:
    return CHAT_PATH_PREFIX + endpoint


def _clamp(value: float, low: float, high: float) -> float:
    return min(max(value, low), high)


def _turns(req: ChatRequest) -> tuple[str, list[list[Any]]]:
    """System text, and the non-system turns as [role, text] with same-role runs merged."""
    if req.messages is None:
        return "", [["user", req.prompt or ""]]
    system: list[str] = []
    turns: list[list[Any]] = []
    for m in req.messages:
        text = m.text()
        if m.role in _SYSTEM_ROLES:
            if text:
                system.append(text)
            continue
        if m.role in _USER_ROLES:
            role = "user"
        elif m.role == "assistant":
            role = "assistant"
        else:
            raise UpstreamBadRequest(f"messages: role {m.role!r} is not supported by this Baidu backend")
        if not text:
            continue
        if turns and turns[-1][0] == role:
            turns[-1][1] += "\n\n" + text
        else:
            turns.append([role, text])
    while turns and turns[0][0] == "assistant":
        turns.pop(0)
    return "\n\n".join(system), turns


def _messages(req: ChatRequest, max_chars: int, trim_history: bool) -> list[BaiduMessage]:
    system, turns = _turns(req)
    if not turns:
        if not system:
            raise UpstreamBadRequest("messages: at least one non-empty user message is required")
        turns = [["user", system]]
        system = ""
    if turns[-1][0] != "user":
        raise UpstreamBadRequest(
            "messages: the last message must come from the user (this Baidu endpoint answers "
            "a user turn; a trailing assistant message cannot be continued)"
        )

    def total() -> int:
        return sum(len(t[1]) for t in turns) + (len(system) + 2 if system else 0)

    while trim_history and total() > max_chars and len(turns) > 2:
        del turns[:2]  # the oldest user/assistant pair
    if total() > max_chars:
        raise UpstreamBadRequest(
            f"messages: total content is {total()} characters; this Baidu endpoint accepts at most "
            f"{max_chars}"
        )
    if system:
        turns[0][1] = system + "\n\n" + turns[0][1]
    return [BaiduMessage(role, text) for role, text in turns]


def _stop(stop: list[str] | None) -> list[str] | None:
    items = [s for s in stop or () if s]
    if not items:
        return None
    if len(items) > MAX_STOP_ITEMS:
        raise UpstreamBadRequest(
            f"stop: this Baidu endpoint accepts at most {MAX_STOP_ITEMS} stop sequences, got {len(items)}"
        )
    for s in items:
        if len(s) > MAX_STOP_CHARS:
            raise UpstreamBadRequest(
                f"stop: each stop sequence may be at most {MAX_STOP_CHARS} characters for this Baidu "
                f"endpoint, got one of {len(s)}"
            )
    return items


def _penalty(req: ChatRequest, extra: dict[str, Any]) -> float | None:
    for key in ("penalty_score", "repetition_penalty"):
        value = extra.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return _clamp(float(value), 1.0, 2.0)
    given = [p for p in (req.frequency_penalty, req.presence_penalty) if p is not None]
    if not given:
        return None
    return _clamp(1.0 + max(given) / 2.0, 1.0, 2.0)


def to_baidu(req: ChatRequest, *, max_input_chars: int = 4800, trim_history: bool = False) -> BaiduChatRequest:
    """The Baidu body for a normalised request (raises `UpstreamBadRequest` on what Baidu would
    refuse and we must not silently change)."""
    if req.wants_function_calls:
        raise UpstreamBadRequest("tools: this Baidu backend (llama_3_8b) has no function calling; "
                                 "send no tools (or tool_choice \"none\"), or use a model routed to vLLM")
    extra = {k: v for k, v in req.extra.items() if k in _EXTRA_KEYS}
    top_k = req.top_k if req.top_k is not None else extra.get("top_k")
    return BaiduChatRequest(
        messages=_messages(req, max_input_chars, trim_history),
        stream=req.stream,
        temperature=None if req.temperature is None else _clamp(req.temperature, MIN_TEMPERATURE, 1.0),
        top_k=top_k if isinstance(top_k, int) and top_k > 0 else None,
        top_p=None if req.top_p is None else _clamp(req.top_p, 0.0, 1.0),
        penalty_score=_penalty(req, extra),
        stop=_stop(req.stop),
        user_id=req.user or None,
        extra_parameters=extra.get("extra_parameters") if isinstance(extra.get("extra_parameters"), dict)
        else None,
    )


def finish_reason(is_truncated: bool, need_clear_history: bool) -> str:
    if need_clear_history:
        return "content_filter"
    return "length" if is_truncated else "stop"


def usage_from(u: BaiduUsage | UnsetType) -> Usage | None:
    if isinstance(u, UnsetType) or (u.prompt_tokens == 0 and u.completion_tokens == 0):
        return None
    return Usage(u.prompt_tokens, u.completion_tokens, "reported")


def from_baidu(resp: BaiduChatResponse, model: str = "") -> ChatResult:
    """A successful synchronous answer as a `ChatResult` (usage None -> caller estimates)."""
    usage = usage_from(resp.usage)
    return ChatResult(
        text=resp.result,
        finish_reason=finish_reason(resp.is_truncated, resp.need_clear_history),
        usage=usage if usage is not None else Usage(source="estimated"),
        id=resp.id,
        model=model,
    )


def validate_request(body: BaiduChatRequest, max_input_chars: int = 4800) -> str | None:
    """Baidu's own checks on a chat body (its error_code 336003 cases): the message of the
    first rule broken, or None. Used by the emulator and by the Baidu-compatible front door."""
    msgs = body.messages
    if not msgs:
        return "the messages field is required and must not be empty"
    if len(msgs) % 2 == 0:
        return "the length of messages must be an odd number"
    for i, m in enumerate(msgs):
        want = "user" if i % 2 == 0 else "assistant"
        if m.role != want:
            return f"messages[{i}].role must be {want!r}: roles alternate user, assistant, ... from user"
        if not m.content:
            return f"messages[{i}].content must not be empty"
    total = sum(len(m.content) for m in msgs)
    if total > max_input_chars:
        return f"the total length of messages content is {total}, more than {max_input_chars} characters"
    if body.temperature is not None and not 0 < body.temperature <= 1:
        return "temperature must be in (0, 1.0]"
    if body.top_p is not None and not 0 <= body.top_p <= 1:
        return "top_p must be in [0, 1.0]"
    if body.penalty_score is not None and not 1 <= body.penalty_score <= 2:
        return "penalty_score must be in [1.0, 2.0]"
    if body.top_k is not None and body.top_k < 1:
        return "top_k must be a positive integer"
    if body.stop is not None:
        if len(body.stop) > MAX_STOP_ITEMS:
            return f"stop may contain at most {MAX_STOP_ITEMS} items"
        if any(len(s) > MAX_STOP_CHARS for s in body.stop):
            return f"each stop item may be at most {MAX_STOP_CHARS} characters"
    return None
