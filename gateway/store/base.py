"""The store interface: what the gateway keeps in Redis (or in-process, for one process).

Both engines implement `Store`; everything shared between gateway processes goes through it.
Keys are built by the callers with a hash tag per principal (`gw:{user}:...`) so that every
multi-key script touches one Redis Cluster slot.
"""

from __future__ import annotations

from typing import Protocol


class StoreUnavailable(Exception):
    """The store did not answer in time or refused the connection."""


class Store(Protocol):
    engine: str

    async def ping(self) -> bool: ...

    async def get(self, key: str) -> bytes | None: ...

    async def set(self, key: str, value: bytes, ttl: float) -> None: ...

    async def delete(self, key: str) -> None: ...

    async def acquire_lock(self, key: str, ttl: float) -> str | None: ...

    async def release_lock(self, key: str, token: str) -> None: ...

    async def aclose(self) -> None: ...
