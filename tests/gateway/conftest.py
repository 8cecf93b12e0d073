"""Store engines for library-level tests: the same test runs on `memory://` and on a real
redis-server (the session's `redis_server`, flushed before each test)."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.store.memory import MemoryStore
from gateway.store.redis import RedisStore
from tests.gateway.engines import EngineFactory


@pytest.fixture(params=["memory", "redis"])
def engine(request: pytest.FixtureRequest) -> EngineFactory:
    """A factory of stores sharing one state: call it twice for two "processes" (redis) or
    get the same in-process store twice (memory)."""
    if request.param == "memory":
        store = MemoryStore()
        return lambda: store
    server = request.getfixturevalue("redis_server")
    server.flushall()
    return lambda: RedisStore(server.url)  # the default timeout, as a gateway would run


@pytest.fixture
def redis_url(redis_server: Any) -> str:
    redis_server.flushall()
    return redis_server.url
