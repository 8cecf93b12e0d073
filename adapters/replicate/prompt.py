"""From a `ChatRequest` to a Llama 3 model's `input` object on Replicate.

Chat turns are rendered into the Llama 3 chat format here and sent with
`prompt_template: "{prompt}"`, so Replicate's runtime does not wrap them a second time (its
template is `str.format`ed, but the prompt itself is not, so braces in user text are safe).
Plain completions (`req.prompt`) are sent as given. Ops' `input_defaults` go first, then the
OpenAI parameters the client set, then the client's vendor extras, unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from adapters.types import ChatRequest, Message, UpstreamBadRequest

BEGIN_OF_TEXT = "<|begin_of_text|>"
END_OF_TEXT = "<|end_of_text|>"
START_HEADER = "<|start_header_id|>"
END_HEADER = "<|end_header_id|>"
EOT = "<|eot_id|>"
CHAT_STOPS = (EOT, END_OF_TEXT)
RAW_TEMPLATE = "{prompt}"

# OpenAI request fields whose Replicate Llama 3 input has the same name and meaning.
_SAME_NAME = ("max_tokens", "temperature", "top_p", "top_k", "presence_penalty", "frequency_penalty", "seed")
_ROLE_ALIASES = {"developer": "system"}


def llama3_chat_prompt(messages: Iterable[Message]) -> str:
    """Meta's ChatFormat: BOS once, one header + stripped content + `<|eot_id|>` per turn, then
    the assistant header left open for the model to complete."""
    parts = [BEGIN_OF_TEXT]
    for m in messages:
        role = _ROLE_ALIASES.get(m.role, m.role)
        parts.append(f"{START_HEADER}{role}{END_HEADER}\n\n{m.text().strip()}{EOT}")
    parts.append(f"{START_HEADER}assistant{END_HEADER}\n\n")
    return "".join(parts)


def sendable_stops(stops: Sequence[str]) -> list[str]:
    """`stop_sequences` is one comma-separated string, so a stop containing a comma cannot be
    sent; the adapter still cuts on it locally."""
    return [s for s in stops if s and "," not in s]


def _merge_stops(*groups: Iterable[str]) -> str | None:
    seen: dict[str, None] = {}
    for group in groups:
        for s in group:
            if s:
                seen.setdefault(s, None)
    return ",".join(seen) if seen else None


_FUNCTION_CALLING = ("tools", "tool_choice", "parallel_tool_calls")


def to_replicate(req: ChatRequest, input_defaults: dict[str, Any]) -> dict[str, Any]:
    """The `input` object for a create-prediction request."""
    if req.wants_function_calls:  # Replicate would drop the tools and answer in text
        raise UpstreamBadRequest("tools: this Replicate backend (Llama 3 8B) has no function calling; "
                                 "send no tools (or tool_choice \"none\"), or use a model routed to vLLM")
    inp: dict[str, Any] = dict(input_defaults)
    pinned = inp.get("stop_sequences")
    pinned_stops = pinned.split(",") if isinstance(pinned, str) else []
    client_stops = sendable_stops(req.stop or ())
    if req.is_chat:
        inp["prompt"] = llama3_chat_prompt(req.messages or ())
        inp["prompt_template"] = RAW_TEMPLATE
        stops = _merge_stops(CHAT_STOPS, pinned_stops, client_stops)
    else:
        inp["prompt"] = req.prompt
        stops = _merge_stops(pinned_stops, client_stops) if client_stops else None
    if stops is not None:
        inp["stop_sequences"] = stops
    for name in _SAME_NAME:
        value = getattr(req, name)
        if value is not None:
            inp[name] = value
    inp.update(req.extra)
    for name in _FUNCTION_CALLING:  # tools ruled out by tool_choice "none" mean nothing here
        inp.pop(name, None)
    return inp
