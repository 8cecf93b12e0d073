"""The store engines: shared key/value state and locks on both engines, limits shared by two
OS processes, and what happens when Redis stops or hangs mid-run (a private redis-server)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid

import pytest

from adapters.types import Usage
from gateway.auth import Principal
from gateway.config import Limits, Quota, StoreErrorPolicy
from gateway.errors import StoreUnavailableError
from gateway.limits import Limiter
from gateway.store import open_store
from gateway.store.base import StoreUnavailable
from gateway.store.redis import RedisStore
from gateway.usage import UsageLedger, UsageRecord
from tests.gateway.engines import EngineFactory, run
from tests.support import ROOT, RedisServer


def principal(limits: Limits | None = None, quota: Quota | None = None) -> Principal:
    return Principal(key_name="app", user="alice", models=None, limits=limits, quota=quota)


def test_values_expire_and_locks_exclude_each_other(engine: EngineFactory) -> None:
    async def go() -> None:
        a, b = engine(), engine()
        await a.set("gw:t:v", b"1", 0.3)
        assert await b.get("gw:t:v") == b"1"
        token = await a.acquire_lock("gw:t:lock", 5)
        assert token and await b.acquire_lock("gw:t:lock", 5) is None
        await b.release_lock("gw:t:lock", "not-the-token")
        assert await b.acquire_lock("gw:t:lock", 5) is None
        await a.release_lock("gw:t:lock", token)
        assert await b.acquire_lock("gw:t:lock", 5)
        await asyncio.sleep(0.4)
        assert await b.get("gw:t:v") is None

    run(go())


def test_open_store_refuses_an_unknown_scheme() -> None:
    with pytest.raises(ValueError, match="memory://"):
        open_store("mongodb://x")


_BURST = textwrap.dedent("""
    import asyncio, sys, uuid
    from gateway.auth import Principal
    from gateway.config import Limits
    from gateway.errors import RateLimited
    from gateway.limits import Limiter
    from gateway.store.redis import RedisStore

    async def main():
        store = RedisStore(sys.argv[1], timeout_ms=3000)
        lim = Limiter(store)
        p = Principal(key_name="app", user="alice", models=None, limits=Limits(rpm=100))
        async def one():
            try:
                await lim.admit(p, "m", uuid.uuid4().hex, 0)
                return 1
            except RateLimited:
                return 0
        print(sum(await asyncio.gather(*(one() for _ in range(150)))))
        await store.aclose()

    asyncio.run(main())
""")


def test_two_processes_share_one_rpm_limit(redis_url: str) -> None:
    procs = [subprocess.Popen([sys.executable, "-c", _BURST, redis_url], cwd=ROOT, stdout=subprocess.PIPE,
                              text=True) for _ in range(2)]
    counts = [int(p.communicate(timeout=60)[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert sum(counts) == 100


@pytest.fixture
def private_redis() -> RedisServer:
    server = RedisServer().start()
    yield server
    if server.proc is not None:
        server.proc.send_signal(signal.SIGCONT)
    server.stop()


def _record() -> UsageRecord:
    return UsageRecord(user="alice", key="app", alias="m", backend="b", prompt_tokens=10, completion_tokens=5)


def test_a_stopped_redis_applies_each_policy_quickly_and_is_recovered_from(private_redis: RedisServer) -> None:
    async def go() -> None:
        store = RedisStore(private_redis.url, timeout_ms=200)
        open_limits = Limiter(store, StoreErrorPolicy(limits="open"))  # quota: closed by default
        closed_limits = Limiter(store, StoreErrorPolicy(limits="closed", quota="open"))
        limited, quoted = principal(Limits(rpm=1000)), principal(quota=Quota(tokens_per_day=10**6))
        held = await open_limits.admit(limited, "m", uuid.uuid4().hex, 10)
        assert held.taken

        private_redis.stop()
        start = time.monotonic()
        degraded = await open_limits.admit(limited, "m", uuid.uuid4().hex, 10)
        assert not degraded.taken
        with pytest.raises(StoreUnavailableError) as refused:
            await closed_limits.admit(limited, "m", uuid.uuid4().hex, 10)
        assert refused.value.status == 503 and refused.value.retry_after == 1
        with pytest.raises(StoreUnavailableError):
            await open_limits.admit(quoted, "m", uuid.uuid4().hex, 10)
        assert not (await closed_limits.admit(quoted, "m", uuid.uuid4().hex, 10)).taken  # quota: open
        await open_limits.settle(held, Usage(10, 5), _record())  # kept for later, not lost
        assert open_limits.pending == 1
        assert await store.ping() is False
        assert time.monotonic() - start < 1.5  # five store calls, each bounded by 200 ms

        private_redis.start()  # same port, empty data: the gateway reconnects by itself
        assert await store.ping() is True
        assert await open_limits.drain() and open_limits.pending == 0
        report = await UsageLedger(store).query(user="alice")
        assert report["totals"]["requests"] == 1 and report["totals"]["prompt_tokens"] == 10
        assert (await open_limits.admit(limited, "m", uuid.uuid4().hex, 10)).taken
        await open_limits.aclose()
        await closed_limits.aclose()
        await store.aclose()

    run(go())


def test_a_hung_redis_costs_at_most_the_timeout(private_redis: RedisServer) -> None:
    async def go() -> None:
        store = RedisStore(private_redis.url, timeout_ms=200)
        lim = Limiter(store, StoreErrorPolicy(limits="open"))
        p = principal(Limits(rpm=1000))
        assert (await lim.admit(p, "m", uuid.uuid4().hex, 0)).taken
        assert private_redis.proc is not None
        os.kill(private_redis.proc.pid, signal.SIGSTOP)  # accepts connections, never answers
        try:
            start = time.monotonic()
            out = await asyncio.gather(*(lim.admit(p, "m", uuid.uuid4().hex, 0) for _ in range(50)))
            assert not any(a.taken for a in out)
            with pytest.raises(StoreUnavailable):
                await store.get("gw:x")
            assert time.monotonic() - start < 1.0
        finally:
            os.kill(private_redis.proc.pid, signal.SIGCONT)
        deadline = time.monotonic() + 5
        while not await store.ping():
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        assert (await lim.admit(p, "m", uuid.uuid4().hex, 0)).taken
        await store.aclose()

    run(go())
