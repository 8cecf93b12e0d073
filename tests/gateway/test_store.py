"""The store engines: shared key/value state and locks on both engines, limits shared by two
OS processes, and what happens when Redis stops or hangs mid-run (a private redis-server)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from redis.asyncio.connection import parse_url

from adapters.types import Usage
from gateway.auth import Principal
from gateway.config import Limits, Quota, StoreErrorPolicy
from gateway.errors import StoreUnavailableError
from gateway.limits import Limiter
from gateway.store import open_store
from gateway.store.base import StoreUnavailable
from gateway.store.redis import RedisStore
from gateway.store.resp import Endpoint, Heard, ReplyError, RespLane, command
from gateway.usage import UsageLedger, UsageRecord
from tests.gateway.engines import EngineFactory, run
from tests.support import ROOT, RedisServer, free_port


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


# --- the pipelined lane of admit and settle (gateway/store/resp.py) ------------------------------


def _lane(url: str, timeout_ms: int = 250, size: int = 1) -> RespLane:
    timeout = timeout_ms / 1000
    return RespLane(Endpoint(parse_url(url)), Heard(), timeout, max(1.0, 10 * timeout), size)


@contextmanager
def _redis_with(*args: str) -> Iterator[int]:
    """A private redis-server with extra options (a password, a unix socket); yields its port."""
    port = free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(64)[:1] in (b"+", b"-"):  # PONG, or NOAUTH: up either way
                        break
            except OSError:
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_pipelined_calls_on_one_connection_each_get_their_own_reply(redis_url: str) -> None:
    async def go() -> None:
        lane = _lane(redis_url)
        await lane.call(command("SET", "gw:t:text", "not a number"))
        calls = []
        for i in range(300):
            if i == 100:
                calls.append(lane.call(command("INCR", "gw:t:text")))  # an error reply, in its place
            if i == 200:
                calls.append(lane.call(command("INCR", "gw:t:n") + command("ECHO", "two"), 2))
            calls.append(lane.call(command("ECHO", f"m{i}")))
        calls += [lane.call(command("CLIENT", "ID")) for _ in range(20)]
        out = await asyncio.gather(*calls)
        assert isinstance(out[100], ReplyError) and "not an integer" in str(out[100])
        assert out[201] == [1, b"two"]
        echoed = out[:100] + out[101:201] + out[202:302]
        assert echoed == [f"m{i}".encode() for i in range(300)]
        assert len(set(out[302:])) == 1  # one connection carried them all
        lane.close()

    run(go())


def test_a_caller_cancelled_while_waiting_does_not_shift_the_replies_after_it(redis_url: str) -> None:
    async def go() -> None:
        store = RedisStore(redis_url, timeout_ms=2000, lane_connections=1)
        lim = Limiter(store)
        p = principal(Limits(rpm=10))
        assert (await lim.admit(p, "m", uuid.uuid4().hex, 0)).result.remaining_requests == 9
        # a blocking command holds the connection, so the next admission waits behind it
        blocker = store._lane.call(command("BLPOP", "gw:t:nothing", "0.3"))
        cancelled = asyncio.ensure_future(lim.admit(p, "m", uuid.uuid4().hex, 0))
        await asyncio.sleep(0.1)
        cancelled.cancel()
        nxt = await lim.admit(p, "m", uuid.uuid4().hex, 0)
        assert await blocker is None
        assert cancelled.cancelled()
        # Redis ran the abandoned admission (its reply was dropped); this is the next one's reply
        assert nxt.result.remaining_requests == 7
        assert await store.get("gw:t:nothing") is None and await store.ping()
        await lim.aclose()
        await store.aclose()

    run(go())


def test_a_frozen_redis_fails_every_pipelined_call_within_the_timeout_then_the_lane_reconnects(
        private_redis: RedisServer) -> None:
    async def go() -> None:
        lane = _lane(private_redis.url, timeout_ms=200)
        assert await lane.call(command("PING")) == b"PONG"
        assert private_redis.proc is not None
        os.kill(private_redis.proc.pid, signal.SIGSTOP)
        try:
            start = time.monotonic()
            out = await asyncio.gather(*(lane.call(command("ECHO", str(i))) for i in range(20)),
                                       return_exceptions=True)
            elapsed = time.monotonic() - start
            assert all(isinstance(o, StoreUnavailable) for o in out)
            assert 0.15 < elapsed < 0.6
        finally:
            os.kill(private_redis.proc.pid, signal.SIGCONT)
        assert await lane.call(command("ECHO", "back")) == b"back"  # a new connection
        lane.close()

    run(go())


def test_a_slow_reply_waits_while_redis_answers_other_connections_up_to_the_hard_cap(redis_url: str) -> None:
    async def go() -> None:
        lane = _lane(redis_url, timeout_ms=100, size=2)  # hard cap: 1 s

        async def blocked(seconds: str) -> object:
            return await lane.call(command("BLPOP", "gw:t:nothing", seconds))

        async def chatter(until: asyncio.Future[object]) -> None:
            pings = []  # every other one answered at once, every other one queued behind `until`
            while not until.done():
                pings.append(lane.call(command("PING")))
                await asyncio.sleep(0.02)
            await asyncio.gather(*pings, return_exceptions=True)

        for seconds, outcome in (("0.5", None), ("3", StoreUnavailable)):
            start = time.monotonic()
            slow = asyncio.ensure_future(blocked(seconds))
            await asyncio.gather(chatter(slow), slow, return_exceptions=True)
            elapsed = time.monotonic() - start
            if outcome is None:
                assert slow.result() is None and elapsed > 0.45  # five timeouts: Redis kept answering
            else:
                assert isinstance(slow.exception(), StoreUnavailable) and 0.95 < elapsed < 2
        lane.close()

    run(go())


def test_the_lane_authenticates_selects_the_database_and_reaches_a_unix_socket(tmp_path: Path) -> None:
    sock = tmp_path / "redis.sock"
    with _redis_with("--requirepass", "s3cret", "--unixsocket", str(sock)) as port:
        async def go() -> None:
            for url in (f"redis://:s3cret@127.0.0.1:{port}/3", f"redis://default:s3cret@127.0.0.1:{port}/3",
                        f"unix://:s3cret@{sock}?db=3"):
                lane = _lane(url)
                assert await lane.call(command("SET", "gw:t:db", url)) == b"OK"
                lane.close()
            check = _lane(f"redis://:s3cret@127.0.0.1:{port}/3")
            assert await check.call(command("GET", "gw:t:db")) == f"unix://:s3cret@{sock}?db=3".encode()
            wrong = _lane(f"redis://:wrong@127.0.0.1:{port}/3")
            with pytest.raises(StoreUnavailable, match="WRONGPASS"):
                await wrong.call(command("PING"))
            out_of_range = _lane(f"redis://:s3cret@127.0.0.1:{port}/99")
            with pytest.raises(StoreUnavailable, match="out of range"):
                await out_of_range.call(command("SET", "gw:t:db", "db 0?"))
            assert await check.call(command("SELECT", "0") + command("GET", "gw:t:db"), 2) == [b"OK", None]
            for lane in (check, wrong, out_of_range):
                lane.close()

        run(go())
