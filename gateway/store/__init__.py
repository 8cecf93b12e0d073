"""Store engines: `memory://` (in-process) and `redis://` (shared by every gateway process)."""

from __future__ import annotations

from gateway.store.base import Store, StoreUnavailable


def open_store(url: str, timeout_ms: int = 250) -> Store:
    if url.startswith("memory://"):
        from gateway.store.memory import MemoryStore

        return MemoryStore()
    if url.startswith(("redis://", "rediss://", "unix://")):
        from gateway.store.redis import RedisStore

        return RedisStore(url, timeout_ms=timeout_ms)
    raise ValueError(f"store.url: expected memory:// or redis://host:port/db, got {url!r}")


__all__ = ["Store", "StoreUnavailable", "open_store"]
