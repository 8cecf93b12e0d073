"""The store interface: what the gateway keeps in Redis (or in-process, for one process).

Both engines implement `Store`; everything shared between gateway processes goes through it.
Keys are built by the callers (limits.py, usage.py, cache.py) with a hash tag per principal
(`gw:{user}:...`) so that every script touches one Redis Cluster slot; the engines only
execute the plans below, they do not know what the keys mean.

The plans carry limits as integers where -1 means "not limited" (0 is a real limit: nothing).
Times inside `admit`/`settle`/`refresh` are the store's own clock (Redis `TIME`), so N
gateway processes with skewed clocks still share one window.
"""

from __future__ import annotations

from collections.abc import Awaitable, Sequence
from typing import Any, Protocol

import msgspec

UNLIMITED = -1


def hash_tag(user: str) -> str:
    """A principal's Redis Cluster hash tag, `{user}`; braces and % are escaped so that two
    users never share a tag by accident."""
    return "{" + user.replace("%", "%25").replace("{", "%7B").replace("}", "%7D") + "}"


class StoreUnavailable(Exception):
    """The store did not answer in time or refused the connection."""


class RateScope(msgspec.Struct, frozen=True):
    """The rate limits of one scope (a key, or a key x model alias) and where they live."""

    rpm_key: str  # sorted set: request id -> admission time (ms), the rolling window's log
    tpm_key: str  # hash {tokens, ts}: a token bucket refilled at tpm per window
    slots_key: str  # sorted set: request id -> slot expiry (ms)
    rpm: int = UNLIMITED
    tpm: int = UNLIMITED
    concurrency: int = UNLIMITED


class QuotaScope(msgspec.Struct, frozen=True):
    """A user's quota for the current day and month, and its in-flight reservations."""

    day_key: str  # hash {tokens, requests}
    month_key: str  # hash {tokens}
    reservations_key: str  # sorted set: "<request id>|<tokens>" -> reservation expiry (ms)
    reserved_key: str  # string: sum of the live reservations' tokens
    tokens_per_day: int = UNLIMITED
    tokens_per_month: int = UNLIMITED
    requests_per_day: int = UNLIMITED
    day_ttl_ms: int = 2 * 86_400_000
    month_ttl_ms: int = 32 * 86_400_000


class LimitSet(msgspec.Struct):
    """Everything about one principal x alias x UTC day that does not change per request: its
    rate scopes, its quota (day and month keys of that day) and the settings. The Limiter
    builds one per principal x alias x day and reuses it, so an engine may cache an encoded
    form of it in `wire` (engine-private; the Redis engine keeps pre-packed command pieces)."""

    scopes: tuple[RateScope, ...]
    quota: QuotaScope | None
    settled_key: str  # sorted set: settled request id -> settle time (ms), kept dedupe_ms
    slot_ttl_ms: int = 30_000
    window_ms: int = 60_000
    dedupe_ms: int = 300_000
    counters_ttl_ms: int = 400 * 86_400_000
    wire: Any = None

    @property
    def reserves(self) -> bool:
        """Whether admitting reserves quota tokens (a token quota applies)."""
        q = self.quota
        return q is not None and (q.tokens_per_day >= 0 or q.tokens_per_month >= 0)


class AdmitPlan(msgspec.Struct, frozen=True):
    request_id: str
    est_tokens: int
    limits: LimitSet


class Admitted(msgspec.Struct, frozen=True):
    """What is left after the request took its share (-1: no such limit)."""

    remaining_requests: int = UNLIMITED
    limit_requests: int = UNLIMITED
    remaining_tokens: int = UNLIMITED
    limit_tokens: int = UNLIMITED


class Refused(msgspec.Struct, frozen=True):
    """`limit` is rpm | tpm | concurrency | requests_per_day | tokens_per_day | tokens_per_month;
    `scope` is the index of the refusing RateScope (-1 for the quota)."""

    limit: str
    retry_after_ms: int
    scope: int


COUNTERS = ("requests", "prompt_tokens", "completion_tokens", "reported_tokens", "estimated_tokens",
            "cache_hits", "errors")


class UsageWrite(msgspec.Struct, frozen=True):
    """Usage counters to add, the day index to join and the event to append.

    The counters are `counts` (in COUNTERS order) added to the fields `field_prefix + counter`
    (`"<alias>|<backend>|"`) of the hash `counters_key`; zero counts are not written."""

    counters_key: str  # hash: "<alias>|<backend>|<counter>" -> int
    field_prefix: str
    counts: tuple[int, ...]
    index_key: str  # set of users with usage on that day
    user: str
    stream_key: str
    stream_maxlen: int
    event: tuple[tuple[str, str], ...]  # field, value

    @property
    def increments(self) -> dict[str, int]:
        return {self.field_prefix + c: n for c, n in zip(COUNTERS, self.counts, strict=True) if n}


class SettlePlan(msgspec.Struct, frozen=True):
    """Settle one request: tokens and quota to real usage, free its slots, record its usage.

    `est_tokens` is what the admission actually took (0 when it was admitted without the
    store); applying a plan twice is a no-op thanks to `limits.settled_key` (ids kept
    `limits.dedupe_ms`)."""

    request_id: str
    est_tokens: int
    actual_tokens: int
    usage: UsageWrite
    limits: LimitSet


class Lease(msgspec.Struct, frozen=True):
    """A slot or reservation held by a live request: members of sorted sets whose scores
    are expiry times, pushed forward while the request runs (all keys in one hash slot)."""

    keys: tuple[str, ...]
    members: tuple[str, ...]


class Store(Protocol):
    engine: str

    async def ping(self) -> bool: ...

    # -- small key/value state (adapters.base.SharedState) and the response cache --
    async def get(self, key: str) -> bytes | None: ...

    async def set(self, key: str, value: bytes, ttl: float) -> None: ...

    async def delete(self, key: str) -> None: ...

    async def acquire_lock(self, key: str, ttl: float) -> str | None: ...

    async def release_lock(self, key: str, token: str) -> None: ...

    # -- limits, quotas and usage --
    async def admit(self, plan: AdmitPlan) -> Admitted | Refused:
        """Check every limit of the plan and take them all, or take nothing (one round trip)."""
        ...

    def settle(self, plan: SettlePlan) -> Awaitable[bool]:
        """Apply a settlement (one round trip); False when this request was already settled.
        A store that talks to a server sends it before returning; awaiting gives the outcome."""
        ...

    async def refresh(self, leases: Sequence[Lease], ttl_ms: int) -> None:
        """Push the expiry of live slots and reservations to now + ttl_ms (one round trip)."""
        ...

    async def set_members(self, keys: Sequence[str]) -> list[set[str]]:
        """The members of each set (one round trip)."""
        ...

    async def read_hashes(self, keys: Sequence[str]) -> list[dict[str, str]]:
        """The fields of each hash (one round trip)."""
        ...

    async def read_events(self, stream_key: str, after: str, count: int) -> list[tuple[str, dict[str, str]]]:
        ...

    async def aclose(self) -> None: ...
