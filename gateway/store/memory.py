"""The in-process store engine: the embedded default for a single gateway process.

It keeps the same semantics as the Redis engine's Lua scripts (lua/*.lua), in Python: each
method below runs without awaiting, so on one event loop it is as atomic as a script.
"""

from __future__ import annotations

import math
import secrets
import time
from collections import deque
from collections.abc import Sequence

from gateway.store.base import AdmitPlan, Admitted, Lease, Refused, SettlePlan


def _now_ms() -> int:
    return int(time.time() * 1000)


class MemoryStore:
    engine = "memory"

    def __init__(self) -> None:
        self._data: dict[str, tuple[bytes, float]] = {}
        self._zsets: dict[str, dict[str, float]] = {}  # member -> score
        self._hashes: dict[str, dict[str, int]] = {}
        self._buckets: dict[str, tuple[float, int]] = {}  # tpm: (tokens, ts ms)
        self._sets: dict[str, set[str]] = {}
        self._streams: dict[str, deque[tuple[str, dict[str, str]]]] = {}
        self._seq = 0

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

    # -- key/value and locks --
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

    # -- limits, quotas, usage (the semantics of admit.lua / settle.lua / refresh.lua) --
    def _zset(self, key: str, drop_upto: float | None = None) -> dict[str, float]:
        """A sorted set as a dict kept in score order: every member is appended with a score
        no lower than those already there (now, or now + a fixed ttl; a refresh moves the
        member to the end), so dropping the expired ones only looks at the front."""
        z = self._zsets.setdefault(key, {})
        if drop_upto is not None:
            while z:
                first = next(iter(z))
                if z[first] > drop_upto:
                    break
                del z[first]
        return z

    def _bucket(self, key: str, tpm: int, now: int, window: int) -> float:
        b = self._buckets.get(key)
        if b is None:
            return float(tpm)
        tokens, ts = b
        return min(tpm, tokens + (now - ts) * tpm / window)

    async def admit(self, plan: AdmitPlan) -> Admitted | Refused:
        lim = plan.limits
        now, est, window = _now_ms(), plan.est_tokens, lim.window_ms
        req_rem = req_lim = tok_rem = tok_lim = -1
        buckets: dict[int, float] = {}
        for i, s in enumerate(lim.scopes):
            if s.rpm >= 0:
                log = self._zset(s.rpm_key, now - window)
                if len(log) >= s.rpm:
                    retry = min(log.values()) + window - now if log else window
                    return Refused("rpm", max(1, int(retry)), i)
                if req_rem < 0 or s.rpm - len(log) - 1 < req_rem:
                    req_rem, req_lim = s.rpm - len(log) - 1, s.rpm
            if s.tpm >= 0:
                if s.tpm == 0:
                    return Refused("tpm", window, i)
                tokens = self._bucket(s.tpm_key, s.tpm, now, window)
                need = max(1, min(est, s.tpm))
                if tokens < need:
                    return Refused("tpm", max(1, math.ceil((need - tokens) * window / s.tpm)), i)
                buckets[i] = tokens
                left = max(0, math.floor(tokens - est))
                if tok_rem < 0 or left < tok_rem:
                    tok_rem, tok_lim = left, s.tpm
            if s.concurrency >= 0 and len(self._zset(s.slots_key, now)) >= s.concurrency:
                return Refused("concurrency", 1000, i)
        q = lim.quota
        if q is not None:
            reserved = sum(int(m.rsplit("|", 1)[1]) for m in self._zset(q.reservations_key, now))
            day = self._hashes.get(q.day_key, {})
            if q.requests_per_day >= 0 and day.get("requests", 0) + 1 > q.requests_per_day:
                return Refused("requests_per_day", 0, -1)
            if q.tokens_per_day >= 0 and day.get("tokens", 0) + reserved + est > q.tokens_per_day:
                return Refused("tokens_per_day", 0, -1)
            month = self._hashes.get(q.month_key, {})
            if q.tokens_per_month >= 0 and month.get("tokens", 0) + reserved + est > q.tokens_per_month:
                return Refused("tokens_per_month", 0, -1)
        for i, s in enumerate(lim.scopes):
            if s.rpm >= 0:
                self._zset(s.rpm_key)[plan.request_id] = now
            if s.tpm >= 0:
                self._buckets[s.tpm_key] = (buckets[i] - est, now)
            if s.concurrency >= 0:
                self._zset(s.slots_key)[plan.request_id] = now + lim.slot_ttl_ms
        if q is not None:
            day = self._hashes.setdefault(q.day_key, {})
            day["requests"] = day.get("requests", 0) + 1
            if est > 0 and (q.tokens_per_day >= 0 or q.tokens_per_month >= 0):
                self._zset(q.reservations_key)[f"{plan.request_id}|{est}"] = now + lim.slot_ttl_ms
        return Admitted(req_rem, req_lim, tok_rem, tok_lim)

    async def settle(self, plan: SettlePlan) -> bool:
        lim = plan.limits
        now, est, actual = _now_ms(), plan.est_tokens, plan.actual_tokens
        done = self._zset(lim.settled_key, now - lim.dedupe_ms)
        if plan.request_id in done:
            return False
        done[plan.request_id] = now
        for s in lim.scopes:
            if s.tpm > 0 and actual != est:
                tokens = self._bucket(s.tpm_key, s.tpm, now, lim.window_ms)
                self._buckets[s.tpm_key] = (min(s.tpm, tokens + est - actual), now)
            if s.concurrency >= 0:
                self._zset(s.slots_key).pop(plan.request_id, None)
        q = lim.quota
        if q is not None:
            if est > 0:
                self._zset(q.reservations_key).pop(f"{plan.request_id}|{est}", None)
            if actual > 0:
                for key in (q.day_key, q.month_key):
                    h = self._hashes.setdefault(key, {})
                    h["tokens"] = h.get("tokens", 0) + actual
        u = plan.usage
        counters = self._hashes.setdefault(u.counters_key, {})
        for field, inc in u.increments.items():
            counters[field] = counters.get(field, 0) + inc
        self._sets.setdefault(u.index_key, set()).add(u.user)
        stream = self._streams.setdefault(u.stream_key, deque(maxlen=u.stream_maxlen))
        self._seq += 1
        stream.append((f"{now}-{self._seq}", dict(u.event)))
        return True

    async def refresh(self, leases: Sequence[Lease], ttl_ms: int) -> None:
        expiry = _now_ms() + ttl_ms
        for lease in leases:
            for key, member in zip(lease.keys, lease.members, strict=True):
                z = self._zsets.get(key)
                if member and z is not None and member in z:
                    del z[member]  # to the end: the set stays in score order
                    z[member] = expiry

    async def set_members(self, keys: Sequence[str]) -> list[set[str]]:
        return [set(self._sets.get(k, ())) for k in keys]

    async def read_hashes(self, keys: Sequence[str]) -> list[dict[str, str]]:
        return [{f: str(v) for f, v in self._hashes.get(k, {}).items()} for k in keys]

    async def read_events(self, stream_key: str, after: str, count: int) -> list[tuple[str, dict[str, str]]]:
        def seq(i: str) -> tuple[int, int]:
            a, b = i.split("-")
            return int(a), int(b)

        rows = list(self._streams.get(stream_key, ()))
        if after != "-":
            rows = [r for r in rows if seq(r[0]) > seq(after)]
        return rows[:count]

    async def aclose(self) -> None:
        self._data.clear()
