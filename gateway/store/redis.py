"""The Redis store engine: one blocking connection pool shared by the whole process.

The pool blocks (up to the command timeout) when all connections are busy rather than
raising `MaxConnectionsError`: a limit must never open because the pool ran dry.
"""

from __future__ import annotations

import secrets

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from gateway.store.base import StoreUnavailable

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class RedisStore:
    engine = "redis"

    def __init__(self, url: str, timeout_ms: int = 250, max_connections: int = 64) -> None:
        timeout = timeout_ms / 1000
        self.pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=timeout,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
        )
        self.client = aioredis.Redis(connection_pool=self.pool)
        self._release = self.client.register_script(_RELEASE)

    async def ping(self) -> bool:
        try:
            return bool(await self.client.ping())
        except (RedisError, OSError):
            return False

    async def get(self, key: str) -> bytes | None:
        try:
            return await self.client.get(key)
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(str(exc)) from exc

    async def set(self, key: str, value: bytes, ttl: float) -> None:
        try:
            await self.client.set(key, value, px=max(1, int(ttl * 1000)))
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(str(exc)) from exc

    async def delete(self, key: str) -> None:
        try:
            await self.client.delete(key)
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(str(exc)) from exc

    async def acquire_lock(self, key: str, ttl: float) -> str | None:
        token = secrets.token_hex(8)
        try:
            ok = await self.client.set(key, token, px=max(1, int(ttl * 1000)), nx=True)
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(str(exc)) from exc
        return token if ok else None

    async def release_lock(self, key: str, token: str) -> None:
        try:
            await self._release(keys=[key], args=[token])
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(str(exc)) from exc

    async def aclose(self) -> None:
        await self.client.aclose()
        await self.pool.disconnect()
