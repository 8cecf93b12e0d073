"""The in-process store engine: the embedded default for a single gateway process."""

from __future__ import annotations

import secrets
import time


class MemoryStore:
    engine = "memory"

    def __init__(self) -> None:
        self._data: dict[str, tuple[bytes, float]] = {}

    def _live(self, key: str) -> bytes | None:
        item = self._data.get(key)
        if item is None:
            return None
        value, expires = item
        if expires and expires <= time.monotonic():
            del self._data[key]
            return None
        return value

    async def ping(self) -> bool:
        return True

    async def get(self, key: str) -> bytes | None:
        return self._live(key)

    async def set(self, key: str, value: bytes, ttl: float) -> None:
        self._data[key] = (value, time.monotonic() + ttl if ttl > 0 else 0.0)

    async def delete(self, key: str) -> None:
        self._data.pop(key, None)

    async def acquire_lock(self, key: str, ttl: float) -> str | None:
        if self._live(key) is not None:
            return None
        token = secrets.token_hex(8)
        await self.set(key, token.encode(), ttl)
        return token

    async def release_lock(self, key: str, token: str) -> None:
        if self._live(key) == token.encode():
            del self._data[key]

    async def aclose(self) -> None:
        self._data.clear()
