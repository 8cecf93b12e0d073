"""Usage accounting at the library level: counters per user x alias x backend x day, the
query shape of /admin/usage, and the event stream for export."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from adapters.types import Usage
from gateway.auth import Principal
from gateway.limits import Limiter
from gateway.usage import COUNTERS, UsageLedger, UsageRecord
from tests.gateway.engines import EngineFactory, run

DAY = 86400.0


async def settle(lim: Limiter, user: str, alias: str, backend: str, prompt: int, completion: int,
                 ts: float | None = None, **kw: object) -> None:
    p = Principal(key_name=f"{user}-app", user=user, models=None)
    adm = await lim.admit(p, alias, uuid.uuid4().hex, 0)
    rec = UsageRecord(user=user, key=p.key_name, alias=alias, backend=backend, prompt_tokens=prompt,
                      completion_tokens=completion, ts=ts or time.time(), **kw)  # type: ignore[arg-type]
    await lim.settle(adm, Usage(prompt, completion), rec)


def test_usage_is_counted_per_user_alias_backend_and_day(engine: EngineFactory) -> None:
    async def go() -> None:
        lim = Limiter(engine())
        now = time.time()
        today = datetime.fromtimestamp(now, UTC).date()
        await settle(lim, "alice", "llama", "vllm", 10, 5, now)
        await settle(lim, "alice", "llama", "vllm", 20, 7, now, source="estimated")
        await settle(lim, "alice", "llama", "replicate", 3, 0, now, error="upstream_timeout")
        await settle(lim, "alice", "llama", "vllm", 0, 0, now, cache_hit=True)
        await settle(lim, "bob", "ernie", "baidu", 8, 8, now - DAY)
        await settle(lim, "bob", "ernie", "baidu", 1, 1, now - 40 * DAY)  # outside the default range

        ledger = UsageLedger(engine())
        report = await ledger.query()
        rows = {(r["user"], r["backend"], r["day"]): r for r in report["data"]}
        assert set(rows) == {("alice", "vllm", today.isoformat()), ("alice", "replicate", today.isoformat()),
                             ("bob", "baidu", (today - timedelta(days=1)).isoformat())}
        vllm = rows[("alice", "vllm", today.isoformat())]
        assert vllm == {"user": "alice", "alias": "llama", "backend": "vllm", "day": today.isoformat(),
                        "requests": 3, "prompt_tokens": 30, "completion_tokens": 12, "reported_tokens": 15,
                        "estimated_tokens": 27, "cache_hits": 1, "errors": 0}
        assert rows[("alice", "replicate", today.isoformat())]["errors"] == 1
        assert report["totals"] == {c: sum(r[c] for r in report["data"]) for c in COUNTERS}
        assert report["totals"]["requests"] == 5

        only_bob = await ledger.query(user="bob", day_from=today - timedelta(days=60), day_to=today)
        assert only_bob["totals"]["requests"] == 2 and {r["user"] for r in only_bob["data"]} == {"bob"}
        only_llama = await ledger.query(alias="llama", day_from=today.isoformat(), day_to=today.isoformat())
        assert only_llama["totals"]["requests"] == 4
        assert (await ledger.query(user="nobody"))["data"] == []
        with pytest.raises(ValueError):
            await ledger.query(day_from=today, day_to=today - timedelta(days=1))

    run(go())


def test_every_settled_request_appends_one_event(engine: EngineFactory) -> None:
    async def go() -> None:
        lim = Limiter(engine())
        for i in range(5):
            await settle(lim, "alice", "llama", "vllm", i, 1)
        ledger = UsageLedger(engine())
        events = await ledger.events()
        assert [e["prompt_tokens"] for e in events] == ["0", "1", "2", "3", "4"]
        assert {e["user"] for e in events} == {"alice"} and all(e["request_id"] for e in events)
        after = await ledger.events(after=events[2]["id"])
        assert [e["prompt_tokens"] for e in after] == ["3", "4"]

    run(go())
