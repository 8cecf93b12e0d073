"""Token-usage accounting: what each request cost, counted per user x alias x backend x day,
plus an append-only, capped event stream for export; and the queries over both.

The counters live in one hash per user and day (`gw:{user}:usage:<day>`, fields
`<alias>|<backend>|<counter>`), written by the settlement script together with the limits
(gateway/limits.py), so recording usage costs no extra round trip. A per-day set of users
(`gw:usage:users:<day>`) lets a query find every user without scanning keys. Days are UTC.
The stream (`gw:usage:events`) is at-least-once: each event carries its request id.
"""

from __future__ import annotations

import time
from datetime import UTC, date, datetime, timedelta
from typing import Any

import msgspec

from gateway.store.base import COUNTERS, Store, UsageWrite, hash_tag

STREAM_KEY = "gw:usage:events"
MAX_DAYS = 400


_last_day: tuple[int, str, str] = (-1, "", "")


def utc_periods(ts: float) -> tuple[str, str]:
    """The UTC day ("2025-01-31") and month ("2025-01") of a timestamp; cached per day, as
    every request asks."""
    global _last_day
    n = int(ts // 86400)
    if n != _last_day[0]:
        d = datetime.fromtimestamp(n * 86400, UTC)
        _last_day = (n, d.strftime("%Y-%m-%d"), d.strftime("%Y-%m"))
    return _last_day[1], _last_day[2]


class UsageRecord(msgspec.Struct, kw_only=True):
    """One request's usage. `source` is how the tokens are known: reported by the upstream,
    or estimated by the gateway (no usage reported, or a stream cut by the client)."""

    user: str
    key: str
    alias: str
    backend: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    source: str = "reported"
    cache_hit: bool = False
    error: str | None = None
    ts: float = msgspec.field(default_factory=time.time)

    @property
    def day(self) -> str:
        return utc_periods(self.ts)[0]


def counters_key(tag: str, day: str) -> str:
    return f"gw:{tag}:usage:{day}"


def index_key(day: str) -> str:
    return f"gw:usage:users:{day}"


def counts(record: UsageRecord) -> tuple[int, ...]:
    """The counters a record adds, in COUNTERS order."""
    total = record.prompt_tokens + record.completion_tokens
    return (1, record.prompt_tokens, record.completion_tokens,
            total if record.source == "reported" else 0, total if record.source == "estimated" else 0,
            int(record.cache_hit), int(record.error is not None))


def increments(record: UsageRecord) -> dict[str, int]:
    base = f"{record.alias}|{record.backend}|"
    return {base + name: n for name, n in zip(COUNTERS, counts(record), strict=True) if n}


def usage_write(record: UsageRecord, tag: str, stream_maxlen: int, request_id: str) -> UsageWrite:
    day = utc_periods(record.ts)[0]
    event = (
        ("request_id", request_id),
        ("ts", f"{record.ts:.3f}"),
        ("user", record.user),
        ("key", record.key),
        ("alias", record.alias),
        ("backend", record.backend),
        ("prompt_tokens", str(record.prompt_tokens)),
        ("completion_tokens", str(record.completion_tokens)),
        ("source", record.source),
        ("cache_hit", "1" if record.cache_hit else "0"),
        ("error", record.error or ""),
    )
    return UsageWrite(
        counters_key=f"gw:{tag}:usage:{day}",
        field_prefix=f"{record.alias}|{record.backend}|",
        counts=counts(record),
        index_key=f"gw:usage:users:{day}",
        user=record.user,
        stream_key=STREAM_KEY,
        stream_maxlen=stream_maxlen,
        event=event,
    )


def _day(d: date | str) -> date:
    return d if isinstance(d, date) else date.fromisoformat(d)


class UsageLedger:
    """Reads the usage counters and the event stream."""

    def __init__(self, store: Store) -> None:
        self.store = store

    async def query(self, user: str | None = None, alias: str | None = None,
                    day_from: date | str | None = None, day_to: date | str | None = None) -> dict[str, Any]:
        """`{"data": [row...], "totals": {counter: n}}`, one row per user x alias x backend x
        day, in day order; days are inclusive and UTC (default: the last 30 days)."""
        to = _day(day_to) if day_to is not None else datetime.now(UTC).date()
        frm = _day(day_from) if day_from is not None else to - timedelta(days=29)
        if frm > to:
            raise ValueError("from is after to")
        if (to - frm).days >= MAX_DAYS:
            raise ValueError(f"at most {MAX_DAYS} days per query")
        days = [(frm + timedelta(days=i)).isoformat() for i in range((to - frm).days + 1)]
        if user is not None:
            pairs = [(user, d) for d in days]
        else:
            members = await self.store.set_members([index_key(d) for d in days])
            pairs = [(u, d) for d, users in zip(days, members, strict=True) for u in sorted(users)]
        hashes = await self.store.read_hashes([counters_key(hash_tag(u), d) for u, d in pairs]) if pairs else []
        rows: dict[tuple[str, str, str, str], dict[str, Any]] = {}
        for (u, d), fields in zip(pairs, hashes, strict=True):
            for field, value in fields.items():
                a, b, counter = field.rsplit("|", 2)
                if alias is not None and a != alias:
                    continue
                row = rows.get((d, u, a, b))
                if row is None:
                    row = rows[(d, u, a, b)] = {"user": u, "alias": a, "backend": b, "day": d,
                                                **dict.fromkeys(COUNTERS, 0)}
                if counter in COUNTERS:
                    row[counter] += int(value)
        data = [rows[k] for k in sorted(rows)]
        totals = {c: sum(r[c] for r in data) for c in COUNTERS}
        return {"data": data, "totals": totals}

    async def events(self, after: str = "-", count: int = 100) -> list[dict[str, str]]:
        """Events after the stream id `after` (oldest first), each with its `id`."""
        return [{"id": i, **fields} for i, fields in await self.store.read_events(STREAM_KEY, after, count)]
