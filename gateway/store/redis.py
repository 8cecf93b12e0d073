"""The Redis store engine: admit and settle (every request) on a few pipelined connections of
our own (resp.py), everything else on one blocking redis-py connection pool per process.

The pool blocks when all connections are busy rather than raising `MaxConnectionsError`: a
limit must never open because the pool ran dry; the pipelined lane never waits for a
connection at all. Nothing is retried, by redis-py or by us (a retried admission could take a
limit twice), except a script Redis lost (NOSCRIPT: it did not run), which is loaded and run
again. The Lua scripts in lua/ are loaded once, run by SHA.

How long a call may take: a call fails once Redis itself has been silent for `timeout_ms`
(no reply, handshakes included, on any connection of this process) or refuses the connection,
so a dead or hung Redis costs each request about `timeout_ms`, and a later call simply
reconnects when Redis is back. A call that is only slow because this process is busy (a
burst queued on the pool, an event loop running behind) keeps waiting while Redis keeps
answering, up to a hard cap of ten timeouts: a spurious timeout would apply the failure
policy, and opening a limit because our own queue was long is exactly the overshoot this
store exists to prevent. Before Redis has answered this process at all, only a refused
connection or the hard cap fails a call (a cold start's burst of handshakes is slow, not dead).
On the pipelined lane (resp.py) the watchdog is per connection: the silence counts from when
the connection last became busy, the hard cap from its oldest pending call, and giving up
fails every call pending on it (one sent while Redis was already silent goes with the rest).
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from itertools import chain
from pathlib import Path
from typing import Any, TypeVar

import hiredis
import redis.asyncio as aioredis
from redis.asyncio.connection import parse_url
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisError

from gateway.store.base import (
    AdmitPlan,
    Admitted,
    Lease,
    LimitSet,
    Refused,
    SettlePlan,
    StoreUnavailable,
    UsageWrite,
)
from gateway.store.resp import Endpoint, Heard, ReplyError, RespLane

_LUA = Path(__file__).with_name("lua")
T = TypeVar("T")


class _Script:
    """A Lua script loaded once; re-loaded only when Redis answers NOSCRIPT (a restart)."""

    def __init__(self, name: str) -> None:
        self.source = (_LUA / f"{name}.lua").read_text()
        self.sha = hashlib.sha1(self.source.encode()).hexdigest()


def _listening(base: type[aioredis.Connection], heard: Heard) -> type[aioredis.Connection]:
    class ListeningConnection(base):  # type: ignore[valid-type, misc]
        async def read_response(self, *args: Any, **kwargs: Any) -> Any:
            response = await super().read_response(*args, **kwargs)
            heard.at = time.monotonic()
            return response

    return ListeningConnection


def _consume(task: asyncio.Future[Any]) -> None:
    """Retrieve an abandoned call's outcome, so that it is not reported as never retrieved."""
    if not task.cancelled():
        task.exception()


class RedisStore:
    engine = "redis"

    def __init__(self, url: str, timeout_ms: int = 250, max_connections: int = 16, lane_connections: int = 2) -> None:
        self.timeout = timeout_ms / 1000
        self.hard_timeout = max(1.0, 10 * self.timeout)
        self._heard = Heard()
        options = parse_url(url)
        base = options.pop("connection_class", aioredis.Connection)
        # redis-py's own timeouts are only the hard cap; the watchdog in _call decides sooner
        self.pool = aioredis.BlockingConnectionPool(
            connection_class=_listening(base, self._heard),
            max_connections=max_connections,
            timeout=self.hard_timeout,
            socket_timeout=self.hard_timeout,
            socket_connect_timeout=self.hard_timeout,
            retry=Retry(NoBackoff(), 0),
            **options,
        )
        self.client = aioredis.Redis(connection_pool=self.pool)
        # admit and settle: pipelined, so a couple of connections carry any burst; TLS options
        # (rediss://) are read by redis-py into the context that asyncio's TLS transport takes
        kwargs = self.pool.connection_kwargs
        tls = base(**kwargs).ssl_context.get() if issubclass(base, aioredis.SSLConnection) else None
        self._lane = RespLane(Endpoint(kwargs, tls), self._heard, self.timeout, self.hard_timeout,
                              max(1, min(lane_connections, max_connections)))
        self._admit = _Script("admit")
        self._settle = _Script("settle")
        self._refresh = _Script("refresh")
        self._release = _Script("release_lock")
        self._indexed: set[tuple[str, str]] = set()  # (day index, user) pairs written by this process

    async def _call(self, fn: Callable[[], Awaitable[T]]) -> T:
        loop = asyncio.get_running_loop()
        started = loop.time()
        # The call runs in its own task, so giving up returns at once whatever redis-py does
        # while it unwinds a cancelled command (it may wait for its own, longer timeouts).
        task = loop.create_task(fn())
        woken = loop.create_future()

        def wake(_: object = None) -> None:
            if not woken.done():
                woken.set_result(None)

        def watch() -> None:
            at = self._heard.at
            silent = at is not None and time.monotonic() - at >= self.timeout
            if silent or loop.time() - started >= self.hard_timeout:
                # replies that arrived while the loop was busy are read by callbacks queued
                # ahead of this one: look once more after them before giving up
                timer[0] = loop.call_soon(confirm)
            else:
                timer[0] = loop.call_later(self.timeout, watch)

        def confirm() -> None:
            at = self._heard.at
            if (at is not None and time.monotonic() - at >= self.timeout) or \
                    loop.time() - started >= self.hard_timeout:
                wake()
            else:
                timer[0] = loop.call_later(self.timeout, watch)

        task.add_done_callback(wake)
        timer = [loop.call_later(self.timeout, watch)]
        try:
            await woken
        except asyncio.CancelledError:
            task.cancel()
            task.add_done_callback(_consume)
            raise
        finally:
            timer[0].cancel()
        if not task.done():
            task.cancel()
            task.add_done_callback(_consume)
            raise StoreUnavailable("redis: no reply in time")
        try:
            return task.result()
        except (RedisError, OSError, TimeoutError) as exc:
            raise StoreUnavailable(f"redis: {type(exc).__name__}: {exc}") from exc

    async def _eval(self, script: _Script, keys: Sequence[str], args: Sequence[Any]) -> Any:
        try:
            return await self.client.evalsha(script.sha, len(keys), *keys, *args)
        except NoScriptError:
            await self.client.script_load(script.source)
            return await self.client.evalsha(script.sha, len(keys), *keys, *args)

    async def ping(self) -> bool:
        try:
            return bool(await self._call(self.client.ping))
        except StoreUnavailable:
            return False

    # -- key/value and locks --
    async def get(self, key: str) -> bytes | None:
        return await self._call(lambda: self.client.get(key))

    async def set(self, key: str, value: bytes, ttl: float) -> None:
        await self._call(lambda: self.client.set(key, value, px=max(1, int(ttl * 1000))))

    async def delete(self, key: str) -> None:
        await self._call(lambda: self.client.delete(key))

    async def acquire_lock(self, key: str, ttl: float) -> str | None:
        token = secrets.token_hex(8)
        ok = await self._call(lambda: self.client.set(key, token, px=max(1, int(ttl * 1000)), nx=True))
        return token if ok else None

    async def release_lock(self, key: str, token: str) -> None:
        await self._call(lambda: self._eval(self._release, [key], [token]))

    # -- limits, quotas, usage --
    async def _load(self, script: _Script) -> None:
        await self._call(lambda: self.client.script_load(script.source))

    async def _script(self, script: _Script, packed: bytes) -> Any:
        """Run a packed EVALSHA alone; load the script first if Redis lost it."""
        out = await self._lane.call(packed)
        if isinstance(out, ReplyError) and out.noscript:
            await self._load(script)
            out = await self._lane.call(packed)
        return _ok(out)

    def _wire(self, limits: LimitSet) -> _Wire:
        w = limits.wire
        if w is None or w.store is not self:
            w = limits.wire = _Wire(self, limits)
        return w  # type: ignore[no-any-return]

    async def admit(self, plan: AdmitPlan) -> Admitted | Refused:
        w = self._wire(plan.limits)
        packed = b"".join((w.admit_head, _arg(plan.request_id), _int(plan.est_tokens), w.admit_tail))
        out = await self._script(self._admit, packed)
        if out[0] == 1:
            return Admitted(out[1], out[2], out[3], out[4])
        limit = out[1].decode() if isinstance(out[1], bytes) else str(out[1])
        return Refused(limit, int(out[2]), int(out[3]))

    def settle(self, plan: SettlePlan) -> Awaitable[bool]:
        """Written to Redis before this returns (the pipeline answers the client after it:
        Limiter.settle); the awaitable is the outcome."""
        w = self._wire(plan.limits)
        u = plan.usage
        script = b"".join((w.settle_head, _arg(u.counters_key), _arg(plan.request_id), _int(plan.est_tokens),
                           _int(plan.actual_tokens), _arg(u.field_prefix), *map(_int, u.counts), w.settle_tail))
        # The event stream is at-least-once: a retried settlement may append twice; every
        # event carries its request id. The day's user index and the stream are outside the
        # user's hash slot, so they are plain commands in the same pipeline, not in the script;
        # the index is written once per process, user and day (and again whenever the script
        # says it created the user's counters for that day, e.g. after Redis lost its data).
        event = self._xadd(u)
        member = (u.index_key, u.user)
        ttl = plan.limits.counters_ttl_ms
        index = b"" if member in self._indexed else _index(u, ttl)
        replies = 4 if index else 2  # the script, XADD (, SADD, EXPIRE)
        sent = self._lane.call(b"".join((script, event, index)), replies, at_once=True)
        return self._settled(sent, script, index, u, ttl)

    async def _settled(self, sent: Awaitable[list[Any]], script: bytes, index: bytes, u: UsageWrite,
                       ttl: int) -> bool:
        res = await sent
        if isinstance(res[0], ReplyError) and res[0].noscript:
            await self._load(self._settle)
            res[0] = await self._lane.call(script)
        for r in res:
            _ok(r)
        if index:
            if len(self._indexed) >= 100_000:
                self._indexed.clear()
            self._indexed.add((u.index_key, u.user))
        elif res[0] == 2:
            for r in await self._lane.call(_index(u, ttl), 2):
                _ok(r)
        return bool(res[0])

    @staticmethod
    def _xadd(u: UsageWrite) -> bytes:
        return hiredis.pack_command(  # type: ignore[no-any-return]
            ("XADD", u.stream_key, "MAXLEN", "~", u.stream_maxlen, "*", *chain.from_iterable(u.event)))

    async def refresh(self, leases: Sequence[Lease], ttl_ms: int) -> None:
        if not leases:
            return

        async def run() -> None:
            pipe = self.client.pipeline(transaction=False)
            for lease in leases:
                pipe.evalsha(self._refresh.sha, len(lease.keys), *lease.keys, ttl_ms, *lease.members)
            res = await pipe.execute(raise_on_error=False)
            for lease, r in zip(leases, res, strict=True):
                if isinstance(r, NoScriptError):
                    await self._eval(self._refresh, lease.keys, [ttl_ms, *lease.members])
                elif isinstance(r, Exception):
                    raise r

        await self._call(run)

    async def set_members(self, keys: Sequence[str]) -> list[set[str]]:
        async def run() -> list[set[str]]:
            pipe = self.client.pipeline(transaction=False)
            for k in keys:
                pipe.smembers(k)
            return [{m.decode() for m in r} for r in await pipe.execute()]

        return await self._call(run)

    async def read_hashes(self, keys: Sequence[str]) -> list[dict[str, str]]:
        async def run() -> list[dict[str, str]]:
            pipe = self.client.pipeline(transaction=False)
            for k in keys:
                pipe.hgetall(k)
            return [{f.decode(): v.decode() for f, v in r.items()} for r in await pipe.execute()]

        return await self._call(run)

    async def read_events(self, stream_key: str, after: str, count: int) -> list[tuple[str, dict[str, str]]]:
        rows = await self._call(lambda: self.client.xrange(stream_key, min=f"({after}" if after != "-" else "-",
                                                            count=count))
        return [(i.decode(), {k.decode(): v.decode() for k, v in f.items()}) for i, f in rows]

    async def aclose(self) -> None:
        self._lane.close()
        await self.client.aclose()
        await self.pool.disconnect()


def _ok(reply: Any) -> Any:
    """The reply, or StoreUnavailable for an error reply (a script that failed)."""
    if isinstance(reply, ReplyError):
        raise StoreUnavailable(f"redis: {reply}")
    return reply


def _arg(v: str) -> bytes:
    b = v.encode()
    return b"$%d\r\n%b\r\n" % (len(b), b)


def _int(v: int) -> bytes:
    b = b"%d" % v
    return b"$%d\r\n%b\r\n" % (len(b), b)


def _index(u: UsageWrite, ttl_ms: int) -> bytes:
    """SADD the user to the day's index and EXPIRE the index: two commands."""
    return b"".join((b"*3\r\n", _arg("SADD"), _arg(u.index_key), _arg(u.user),
                     b"*3\r\n", _arg("EXPIRE"), _arg(u.index_key), _int(max(1, ttl_ms // 1000))))


class _Wire:
    """The parts of one LimitSet's admit and settle commands that do not change per request,
    packed once (RESP): every key, every limit and setting. Only the request id, the token
    counts and the usage counters are packed per request."""

    __slots__ = ("admit_head", "admit_tail", "settle_head", "settle_tail", "store")

    def __init__(self, store: RedisStore, lim: LimitSet) -> None:
        self.store = store
        keys: list[str] = []
        static: list[int] = [lim.slot_ttl_ms, lim.window_ms, len(lim.scopes)]
        for s in lim.scopes:
            keys += [s.rpm_key, s.tpm_key, s.slots_key]
            static += [s.rpm, s.tpm, s.concurrency]
        q = lim.quota
        if q is not None:
            keys += [q.day_key, q.month_key, q.reservations_key, q.reserved_key]
            static += [q.tokens_per_day, q.tokens_per_month, q.requests_per_day, q.day_ttl_ms, q.month_ttl_ms]
        # EVALSHA sha numkeys KEYS... | request id, est | static ARGV...
        self.admit_head = b"".join((b"*%d\r\n" % (3 + len(keys) + 2 + len(static)), _arg("EVALSHA"),
                                    _arg(store._admit.sha), _int(len(keys)), *map(_arg, keys)))
        self.admit_tail = b"".join(map(_int, static))

        keys = [lim.settled_key]
        static = [lim.window_ms, lim.dedupe_ms, lim.counters_ttl_ms, len(lim.scopes)]
        for s in lim.scopes:
            keys += [s.tpm_key, s.slots_key]
            static += [s.tpm, s.concurrency]
        if q is not None:
            keys += [q.day_key, q.month_key, q.reservations_key, q.reserved_key]
            static += [1, q.day_ttl_ms, q.month_ttl_ms]
        else:
            static.append(0)
        # EVALSHA sha numkeys KEYS... counters key | rid, est, actual, prefix, 7 counts | static ARGV...
        self.settle_head = b"".join((
            b"*%d\r\n" % (3 + len(keys) + 1 + 4 + 7 + len(static)), _arg("EVALSHA"),
            _arg(store._settle.sha), _int(len(keys) + 1), *map(_arg, keys)))
        self.settle_tail = b"".join(map(_int, static))
