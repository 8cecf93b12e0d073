"""Token estimates, used only when a backend does not report usage (marked `estimated`)."""

from __future__ import annotations

from adapters.types import ChatRequest


def estimate_tokens(text: str) -> int:
    """About four characters a token for Latin text (Llama 3's tokenizer averages ~4.2)."""
    if not text:
        return 0
    return max(1, (len(text) + 3) // 4)


def estimate_prompt_tokens(req: ChatRequest) -> int:
    if req.prompt is not None:
        return estimate_tokens(req.prompt)
    # Chat templates add a few tokens of framing per turn.
    return sum(estimate_tokens(m.text()) + 4 for m in req.messages or ())
