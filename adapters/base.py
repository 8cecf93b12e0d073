"""The seam between the gateway and a backend.

An adapter owes the pipeline exactly this:
- normalised in, normalised out: it takes a `ChatRequest` (with `model` already set to the
  backend's model id) and returns a `ChatResult`, or yields `ChatChunk`s when streaming, the
  last of which carries `finish_reason` and, where known, `usage`;
- every failure raised as an `UpstreamError` (never a bare httpx or JSON exception), with
  `retryable` and `retry_after` set truthfully, and no secret in its message;
- resources closed on cancel: when the pipeline stops iterating `stream()` and calls the
  generator's `aclose()` (client gone, timeout, stop sequence), the adapter closes the upstream
  connection and cancels any remote work before returning.

Anything shared between gateway processes (a vendor access token, say) goes through the
`SharedState` the adapter is given, never a module global.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

import msgspec

from adapters.types import ChatChunk, ChatRequest, ChatResult


class Timeouts(msgspec.Struct, forbid_unknown_fields=True):
    """Seconds. `read` bounds any single read; `first_byte`, `idle` and `total` are
    enforced by the pipeline around every adapter (None: not bounded)."""

    connect: float = 5.0
    read: float = 60.0
    first_byte: float | None = None
    idle: float | None = None
    total: float | None = None


class Cooldown(msgspec.Struct, forbid_unknown_fields=True):
    """Skip a backend for `duration` seconds after `failures` retryable failures within
    `window` seconds (enforced by the gateway's router, shared by every process)."""

    failures: int = 5
    window: float = 30.0
    duration: float = 30.0


class BackendConfig(msgspec.Struct, tag_field="kind", forbid_unknown_fields=True, kw_only=True):
    """What every backend's YAML has in common; each vendor subclasses it with its `kind` tag
    (`class OpenAIBackend(BackendConfig, tag="openai")`) and its own fields."""

    timeout: Timeouts = msgspec.field(default_factory=Timeouts)
    cooldown: Cooldown | None = None
    max_connections: int = 256


class SharedState(Protocol):
    """A small key/value store shared by every gateway process (Redis, or in-process)."""

    async def get(self, key: str) -> bytes | None: ...

    async def set(self, key: str, value: bytes, ttl: float) -> None: ...

    async def delete(self, key: str) -> None: ...

    async def acquire_lock(self, key: str, ttl: float) -> str | None:
        """Take a lock for `ttl` seconds; return its token, or None when someone holds it."""
        ...

    async def release_lock(self, key: str, token: str) -> None: ...


class AdapterContext(msgspec.Struct):
    """What the gateway hands an adapter when it builds it."""

    name: str  # the backend's name in the YAML
    state: SharedState


class Adapter(Protocol):
    name: str

    async def complete(self, req: ChatRequest) -> ChatResult: ...

    def stream(self, req: ChatRequest) -> AsyncIterator[ChatChunk]: ...

    async def aclose(self) -> None:
        """Close pooled connections; called once at shutdown."""
        ...
