"""Rate limits (rpm, tpm, concurrency per key and per key x alias) and per-user quotas.

`Limiter.admit` checks and takes every applicable limit in ONE store call (one Lua script on
Redis): the rpm log, the tpm bucket (reserving an estimate), a concurrency slot and the
user's quota reservation, all or nothing. `Limiter.settle` replaces the estimate with the
real usage, frees the slot and records the usage (one pipelined call), idempotent by request
id. Slots and reservations carry an expiry that this process keeps pushing forward while the
request runs; if the process dies they free themselves within `slot_ttl`.

Every key carries the principal's hash tag (`gw:{user}:...`), so one script touches one
Redis Cluster slot. When the store fails, `on_error` decides: limits `open` admits (nothing
is counted), `closed` refuses with 503; the quota likewise (closed by default). A settlement
that cannot reach the store is kept and retried in the background until it lands.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from adapters.tokens import estimate_prompt_tokens
from adapters.types import ChatRequest, Usage
from gateway.config import Limits, Quota, StoreErrorPolicy
from gateway.errors import QuotaExceeded, RateLimited, StoreUnavailableError
from gateway.store.base import (
    UNLIMITED,
    AdmitPlan,
    Lease,
    LimitSet,
    QuotaScope,
    RateScope,
    Refused,
    SettlePlan,
    Store,
    StoreUnavailable,
    hash_tag,
)
from gateway.usage import UsageRecord, usage_write, utc_periods

log = logging.getLogger("llm_gateway.limits")


class PrincipalLike(Protocol):
    key_name: str
    user: str
    limits: Limits | None
    model_limits: dict[str, Limits]
    quota: Quota | None


def reservation_estimate(req: ChatRequest, default_max_tokens: int) -> int:
    """What a request may cost at most: its prompt estimate plus the completion cap."""
    cap = req.max_tokens if req.max_tokens is not None else default_max_tokens
    return estimate_prompt_tokens(req) + max(0, cap)


def _limit(v: int | None) -> int:
    return UNLIMITED if v is None else max(0, v)


def _rate_scope(tag: str, name: str, lim: Limits) -> RateScope | None:
    if lim.rpm is None and lim.tpm is None and lim.concurrency is None:
        return None
    base = f"gw:{tag}:rl:{name}"
    return RateScope(f"{base}:rpm", f"{base}:tpm", f"{base}:slots",
                     _limit(lim.rpm), _limit(lim.tpm), _limit(lim.concurrency))


class Admission:
    """What one request was admitted with; hand it back to `Limiter.settle`."""

    __slots__ = ("alias", "est_tokens", "limits", "request_id", "result", "settled", "tag", "taken", "user")

    def __init__(self, request_id: str, user: str, alias: str, tag: str, est_tokens: int,
                 limits: LimitSet | None) -> None:
        self.request_id = request_id
        self.alias = alias
        self.user = user
        self.tag = tag
        self.est_tokens = est_tokens
        self.limits = limits  # None: no limits nor quota apply
        self.taken = False  # True once the store took the limits (False: no limits, or store down)
        self.result: Any = None
        self.settled = False

    @property
    def scopes(self) -> tuple[RateScope, ...]:
        return self.limits.scopes if self.limits is not None else ()

    @property
    def quota(self) -> QuotaScope | None:
        return self.limits.quota if self.limits is not None else None

    @property
    def lease(self) -> Lease | None:
        lim = self.limits
        if lim is None:
            return None
        keys: list[str] = []
        members: list[str] = []
        for s in lim.scopes:
            if s.concurrency >= 0:
                keys.append(s.slots_key)
                members.append(self.request_id)
        q = lim.quota
        if q is not None and self.est_tokens > 0 and lim.reserves:
            keys += [q.reservations_key, q.reserved_key]
            members += [f"{self.request_id}|{self.est_tokens}", ""]
        return Lease(tuple(keys), tuple(members)) if keys else None

    def _holds(self) -> bool:
        """Whether this admission holds a slot or a reservation to keep alive (see `lease`)."""
        lim = self.limits
        if lim is None:
            return False
        return any(s.concurrency >= 0 for s in lim.scopes) or (self.est_tokens > 0 and lim.reserves)

    def headers(self) -> dict[str, str]:
        r = self.result
        if r is None:
            return {}
        out: dict[str, str] = {}
        if r.limit_requests >= 0:
            out["x-ratelimit-limit-requests"] = str(r.limit_requests)
            out["x-ratelimit-remaining-requests"] = str(max(0, r.remaining_requests))
        if r.limit_tokens >= 0:
            out["x-ratelimit-limit-tokens"] = str(r.limit_tokens)
            out["x-ratelimit-remaining-tokens"] = str(max(0, r.remaining_tokens))
        return out


_QUOTA_WORDS = {
    "requests_per_day": "requests per day",
    "tokens_per_day": "tokens per day",
    "tokens_per_month": "tokens per month",
}


class Limiter:
    def __init__(self, store: Store, on_error: StoreErrorPolicy | None = None, *,
                 slot_ttl: float = 30.0, window: float = 60.0, dedupe_window: float = 300.0,
                 counters_ttl_days: int = 400, stream_maxlen: int = 100_000,
                 max_pending: int = 100_000) -> None:
        self.store = store
        self.on_error = on_error or StoreErrorPolicy()
        self.slot_ttl_ms = int(slot_ttl * 1000)
        self.window_ms = int(window * 1000)
        self.dedupe_ms = int(dedupe_window * 1000)
        self.counters_ttl_ms = counters_ttl_days * 86_400_000
        self.stream_maxlen = stream_maxlen
        self._live: dict[str, Admission] = {}
        self._keeper: asyncio.Task[None] | None = None
        self._pending: deque[SettlePlan] = deque(maxlen=max_pending)
        self._drainer: asyncio.Task[None] | None = None
        self.store_errors = 0  # a counter for metrics
        # (key name, alias) -> (principal, day, its LimitSet); user -> hash tag
        self._sets: dict[tuple[str, str], tuple[PrincipalLike, str, LimitSet | None]] = {}
        self._tags: dict[str, str] = {}
        self._bare: dict[str, LimitSet] = {}  # hash tag -> the LimitSet of a user without limits

    # -- admission --
    def _limit_set(self, principal: PrincipalLike, alias: str, tag: str, day: str, month: str) -> LimitSet | None:
        """The principal x alias's limits for that day (None: nothing applies), built once per
        principal object, alias and day: principals are rebuilt when the config changes."""
        cache_key = (principal.key_name, alias)
        hit = self._sets.get(cache_key)
        if hit is not None and hit[0] is principal and hit[1] == day:
            return hit[2]
        scopes: list[RateScope] = []
        if principal.limits is not None:
            s = _rate_scope(tag, principal.key_name, principal.limits)
            if s is not None:
                scopes.append(s)
        alias_limits = principal.model_limits.get(alias)
        if alias_limits is not None:
            s = _rate_scope(tag, f"{principal.key_name}@{alias}", alias_limits)
            if s is not None:
                scopes.append(s)
        quota = None
        q = principal.quota
        if q is not None and not (q.tokens_per_day is None and q.tokens_per_month is None
                                  and q.requests_per_day is None):
            quota = QuotaScope(f"gw:{tag}:q:{day}", f"gw:{tag}:q:{month}", f"gw:{tag}:q:res",
                               f"gw:{tag}:q:reserved", _limit(q.tokens_per_day),
                               _limit(q.tokens_per_month), _limit(q.requests_per_day))
        limits = None
        if scopes or quota is not None:
            limits = LimitSet(tuple(scopes), quota, f"gw:{tag}:settled", self.slot_ttl_ms, self.window_ms,
                              self.dedupe_ms, self.counters_ttl_ms)
        if len(self._sets) >= 10_000:
            self._sets.clear()
        self._sets[cache_key] = (principal, day, limits)
        return limits

    async def admit(self, principal: PrincipalLike, alias: str, request_id: str,
                    est_tokens: int) -> Admission:
        tag = self._tags.get(principal.user)
        if tag is None:
            if len(self._tags) >= 10_000:
                self._tags.clear()
            tag = self._tags[principal.user] = hash_tag(principal.user)
        day, month = utc_periods(time.time())
        limits = self._limit_set(principal, alias, tag, day, month)
        adm = Admission(request_id, principal.user, alias, tag, max(0, est_tokens), limits)
        if limits is None:
            return adm  # nothing to check: no store round trip
        try:
            out = await self.store.admit(AdmitPlan(request_id, adm.est_tokens, limits))
        except StoreUnavailable as exc:
            self.store_errors += 1
            if limits.quota is not None and self.on_error.quota == "closed":
                raise StoreUnavailableError("Usage quotas cannot be checked right now (store unavailable).",
                                            retry_after=1) from None
            if limits.scopes and self.on_error.limits == "closed":
                raise StoreUnavailableError("Rate limits cannot be checked right now (store unavailable).",
                                            retry_after=1) from None
            log.warning("store unavailable at admission, admitting (policy open): %s", exc)
            return adm
        if isinstance(out, Refused):
            raise self._refusal(out, principal, adm, datetime.now(UTC))
        adm.taken = True
        adm.result = out
        if adm._holds():
            self._live[request_id] = adm
            self._ensure_keeper()
        return adm

    def _refusal(self, out: Refused, principal: PrincipalLike, adm: Admission,
                 now: datetime) -> RateLimited | QuotaExceeded:
        if out.scope < 0:
            if out.limit == "tokens_per_month":
                nxt = (now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
                       + timedelta(days=32)).replace(day=1)
            else:
                nxt = now.replace(hour=0, minute=0, second=0, microsecond=0) + timedelta(days=1)
            retry = max(1, math.ceil((nxt - now).total_seconds()))
            q = principal.quota
            value = getattr(q, out.limit, None)
            return QuotaExceeded(
                f"You exceeded your quota of {value} {_QUOTA_WORDS.get(out.limit, out.limit)} "
                f"(user {principal.user!r}).", retry_after=retry)
        scope = adm.scopes[out.scope]
        value = {"rpm": scope.rpm, "tpm": scope.tpm, "concurrency": scope.concurrency}[out.limit]
        where = f"key {principal.key_name!r}"
        if scope.rpm_key.endswith(f"@{adm.alias}:rpm"):
            where += f" on model {adm.alias!r}"
        what = {
            "rpm": f"{value} requests per minute",
            "tpm": f"{value} tokens per minute",
            "concurrency": f"{value} concurrent requests",
        }[out.limit]
        retry = max(1, math.ceil(out.retry_after_ms / 1000))
        return RateLimited(f"Rate limit reached ({out.limit}): {what} for {where}. Retry in {retry}s.",
                           limit=out.limit, retry_after=retry)

    # -- settlement --
    def settle(self, admission: Admission, usage: Usage | None, record: UsageRecord) -> Awaitable[None]:
        """Settle tokens and quota to `usage` (None: nothing was produced), free the slot and
        record `record`. Never raises for store trouble: the settlement is retried later.

        The settlement is sent to the store when this is called (a store whose `settle` sends
        eagerly, as the Redis store does); await the result for it to be done. So a response
        sent after calling this, and before awaiting it, reaches the client after the
        settlement reached Redis."""
        if admission.settled:
            return nothing_to_await()
        admission.settled = True
        self._live.pop(admission.request_id, None)
        actual = usage.total_tokens if usage is not None else 0
        limits = admission.limits
        if limits is None:  # no limits nor quota: only the usage is recorded
            limits = self._bare.get(admission.tag)
            if limits is None:
                if len(self._bare) >= 10_000:
                    self._bare.clear()
                limits = self._bare[admission.tag] = LimitSet(
                    (), None, f"gw:{admission.tag}:settled", self.slot_ttl_ms, self.window_ms, self.dedupe_ms,
                    self.counters_ttl_ms)
        plan = SettlePlan(
            request_id=admission.request_id,
            est_tokens=admission.est_tokens if admission.taken else 0,
            actual_tokens=actual,
            usage=usage_write(record, admission.tag, self.stream_maxlen, admission.request_id),
            limits=limits,
        )
        return self._settled(plan, self.store.settle(plan))

    async def _settled(self, plan: SettlePlan, sent: Awaitable[bool]) -> None:
        try:
            await sent
        except StoreUnavailable as exc:
            self.store_errors += 1
            log.warning("store unavailable at settlement, will retry: %s", exc)
            self._pending.append(plan)
            self._ensure_drainer()

    @property
    def pending(self) -> int:
        """Settlements waiting for the store."""
        return len(self._pending)

    def _ensure_drainer(self) -> None:
        if self._drainer is None or self._drainer.done():
            self._drainer = asyncio.get_running_loop().create_task(self._drain_loop())

    async def _drain_loop(self) -> None:
        while self._pending:
            await asyncio.sleep(0.5)
            await self.drain()

    async def drain(self) -> bool:
        """Try to land every pending settlement; True when none is left."""
        while self._pending:
            plan = self._pending[0]
            try:
                await self.store.settle(plan)
            except StoreUnavailable:
                return False
            self._pending.popleft()
        return True

    # -- keeping live slots and reservations alive --
    def _ensure_keeper(self) -> None:
        if self._keeper is None or self._keeper.done():
            self._keeper = asyncio.get_running_loop().create_task(self._keep_loop())

    async def _keep_loop(self) -> None:
        period = self.slot_ttl_ms / 3000
        while self._live:
            await asyncio.sleep(period)
            await self.refresh()

    async def refresh(self) -> None:
        leases = [le for a in list(self._live.values()) if (le := a.lease) is not None]
        if not leases:
            return
        try:
            await self.store.refresh(leases, self.slot_ttl_ms)
        except StoreUnavailable as exc:
            self.store_errors += 1
            log.warning("store unavailable while refreshing slots: %s", exc)

    async def aclose(self, drain_timeout: float = 5.0) -> None:
        """Stop the background tasks; try to land pending settlements first (SIGTERM drain)."""
        deadline = time.monotonic() + drain_timeout
        while self._pending and time.monotonic() < deadline:
            if await self.drain():
                break
            await asyncio.sleep(0.2)
        for task in (self._keeper, self._drainer):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        if self._pending:
            log.error("%d usage settlements could not be written to the store", len(self._pending))


async def nothing_to_await() -> None:
    """An awaitable that does nothing (a settlement with nothing to send)."""
