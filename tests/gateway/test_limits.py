"""Rate limits and quotas at the library level: one atomic admission, real concurrency,
on both store engines (and across two Redis clients, as two gateway processes would be)."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from adapters.types import Usage
from gateway.auth import Principal
from gateway.config import Limits, Quota, StoreErrorPolicy
from gateway.errors import QuotaExceeded, RateLimited
from gateway.limits import Admission, Limiter
from gateway.store.memory import MemoryStore
from gateway.store.redis import RedisStore
from gateway.usage import UsageLedger, UsageRecord
from tests.gateway.engines import EngineFactory, run


def principal(limits: Limits | None = None, quota: Quota | None = None, user: str = "alice",
              model_limits: dict[str, Limits] | None = None, key: str = "alice-app") -> Principal:
    return Principal(key_name=key, user=user, models=None, limits=limits,
                     model_limits=model_limits or {}, quota=quota)


def rid() -> str:
    return uuid.uuid4().hex


def record(p: Principal, prompt: int = 0, completion: int = 0, alias: str = "m", **kw: object) -> UsageRecord:
    return UsageRecord(user=p.user, key=p.key_name, alias=alias, backend="b", prompt_tokens=prompt,
                       completion_tokens=completion, **kw)  # type: ignore[arg-type]


async def try_admit(lim: Limiter, p: Principal, alias: str = "m", est: int = 0) -> Admission | Exception:
    try:
        return await lim.admit(p, alias, rid(), est)
    except (RateLimited, QuotaExceeded) as exc:
        return exc


def test_a_burst_of_three_n_admits_exactly_n(engine: EngineFactory) -> None:
    async def go() -> None:
        lim = Limiter(engine())
        p = principal(Limits(rpm=100))
        out = await asyncio.gather(*(try_admit(lim, p) for _ in range(300)))
        admitted = [o for o in out if isinstance(o, Admission)]
        refused = [o for o in out if isinstance(o, RateLimited)]
        assert len(admitted) == 100 and len(refused) == 200
        assert all(r.limit == "rpm" and 0 < r.retry_after <= 60 for r in refused)
        assert isinstance(refused[0].retry_after, int)
        assert "rpm" in refused[0].message and "100 requests per minute" in refused[0].message
        await lim.aclose()

    run(go())


def test_two_redis_clients_share_one_rpm_limit_under_concurrency(redis_url: str) -> None:
    async def go() -> None:
        a, b = RedisStore(redis_url), RedisStore(redis_url)
        la, lb = Limiter(a), Limiter(b)
        p = principal(Limits(rpm=100))
        out = await asyncio.gather(*(try_admit(la if i % 2 else lb, p) for i in range(300)))
        assert sum(isinstance(o, Admission) for o in out) == 100
        assert sum(isinstance(o, RateLimited) for o in out) == 200
        await a.aclose()
        await b.aclose()

    run(go())


def test_a_pool_smaller_than_the_burst_waits_instead_of_opening_the_limit(redis_url: str) -> None:
    async def go() -> None:
        store = RedisStore(redis_url, max_connections=2)  # the default 250 ms timeout
        lim = Limiter(store, StoreErrorPolicy(limits="open"))
        p = principal(Limits(rpm=50))
        out = await asyncio.gather(*(try_admit(lim, p) for _ in range(300)))
        assert sum(isinstance(o, Admission) and o.taken for o in out) == 50
        assert lim.store_errors == 0
        await store.aclose()

    run(go())


def test_rpm_is_a_rolling_window_not_a_fixed_one(engine: EngineFactory) -> None:
    async def go() -> None:
        lim = Limiter(engine(), window=1.0)
        p = principal(Limits(rpm=5))
        for _ in range(3):
            assert isinstance(await try_admit(lim, p), Admission)
        await asyncio.sleep(0.5)
        for _ in range(2):
            assert isinstance(await try_admit(lim, p), Admission)
        refused = await try_admit(lim, p)
        assert isinstance(refused, RateLimited)
        await asyncio.sleep(0.6)  # the first three left the window, the last two did not
        out = [await try_admit(lim, p) for _ in range(4)]
        assert [isinstance(o, Admission) for o in out] == [True, True, True, False]

    run(go())


def test_tpm_reserves_the_estimate_and_settles_to_real_usage(engine: EngineFactory) -> None:
    async def go() -> None:
        lim = Limiter(engine())
        p = principal(Limits(tpm=1000))
        first = await lim.admit(p, "m", rid(), 600)
        assert first.headers()["x-ratelimit-remaining-tokens"] == "400"
        refused = await try_admit(lim, p, est=600)
        assert isinstance(refused, RateLimited) and refused.limit == "tpm"
        assert refused.retry_after >= 1
        await lim.settle(first, Usage(50, 50), record(p, 50, 50))  # 500 of the 600 come back
        second = await lim.admit(p, "m", rid(), 600)
        remaining = int(second.headers()["x-ratelimit-remaining-tokens"])
        assert 300 <= remaining <= 310  # 1000 - 100 - 600, plus a few tokens of refill

    run(go())


def test_a_refused_request_takes_nothing_from_the_other_limits(engine: EngineFactory) -> None:
    async def go() -> None:
        lim = Limiter(engine())
        p = principal(Limits(rpm=2), model_limits={"small": Limits(rpm=1)})
        assert isinstance(await try_admit(lim, p, "small"), Admission)
        refused = await try_admit(lim, p, "small")
        assert isinstance(refused, RateLimited) and "on model 'small'" in refused.message
        # had the refused request taken the key's rpm, this one would be refused too
        assert isinstance(await try_admit(lim, p, "big"), Admission)
        refused = await try_admit(lim, p, "big")
        assert isinstance(refused, RateLimited) and "on model" not in refused.message

    run(go())


def test_concurrency_slots_are_taken_and_released(engine: EngineFactory) -> None:
    async def go() -> None:
        lim = Limiter(engine())
        p = principal(Limits(concurrency=3))
        out = await asyncio.gather(*(try_admit(lim, p) for _ in range(20)))
        admitted = [o for o in out if isinstance(o, Admission)]
        assert len(admitted) == 3
        assert all(o.limit == "concurrency" for o in out if isinstance(o, RateLimited))
        await lim.settle(admitted[0], None, record(p, error="upstream_unavailable"))
        assert isinstance(await try_admit(lim, p), Admission)
        assert isinstance(await try_admit(lim, p), RateLimited)
        await lim.aclose()

    run(go())


def test_slots_of_a_dead_process_expire_but_live_ones_are_kept(engine: EngineFactory) -> None:
    async def go() -> None:
        store = engine()
        p = principal(Limits(concurrency=2))
        live = Limiter(store, slot_ttl=0.6)
        assert isinstance(await try_admit(live, p), Admission)
        dead = Limiter(store, slot_ttl=0.6)
        assert isinstance(await try_admit(dead, p), Admission)
        await dead.aclose()  # stops refreshing, as a killed process would
        assert isinstance(await try_admit(live, p), RateLimited)
        await asyncio.sleep(1.5)  # > ttl: the dead slot is gone, the live one was refreshed
        assert isinstance(await try_admit(live, p), Admission)
        assert isinstance(await try_admit(live, p), RateLimited)
        await live.aclose()

    run(go())


def test_quota_is_never_exceeded_under_concurrency(engine: EngineFactory) -> None:
    async def go() -> None:
        stores = [engine(), engine()]
        lims = [Limiter(s) for s in stores]
        p = principal(quota=Quota(tokens_per_day=1000))

        async def one(i: int) -> int:
            lim = lims[i % 2]
            try:
                adm = await lim.admit(p, "m", rid(), 100)
            except QuotaExceeded:
                return 0
            await asyncio.sleep(0.01)
            used = 40 + i % 61  # real usage never above the reservation
            await lim.settle(adm, Usage(used // 2, used - used // 2), record(p, used // 2, used - used // 2))
            return used

        spent, rounds = 0, 0
        while rounds < 50:  # until a round with nothing in flight at its start admits nobody
            rounds += 1
            got = sum(await asyncio.gather(*(one(i) for i in range(60))))
            if not got:
                break
            spent += got
        assert 900 < spent <= 1000
        report = await UsageLedger(stores[0]).query(user="alice")
        assert report["totals"]["prompt_tokens"] + report["totals"]["completion_tokens"] == spent
        refused = await try_admit(lims[0], p, est=100)
        assert isinstance(refused, QuotaExceeded) and refused.code == "insufficient_quota"
        assert 0 < refused.retry_after <= 86400 and "tokens per day" in refused.message

    run(go())


def test_requests_per_day_counts_admitted_requests(engine: EngineFactory) -> None:
    async def go() -> None:
        lim = Limiter(engine())
        p = principal(quota=Quota(requests_per_day=5))
        out = await asyncio.gather(*(try_admit(lim, p) for _ in range(12)))
        assert sum(isinstance(o, Admission) for o in out) == 5
        assert all(isinstance(o, QuotaExceeded) for o in out if not isinstance(o, Admission))

    run(go())


def test_reservations_of_dead_requests_expire(engine: EngineFactory) -> None:
    async def go() -> None:
        store = engine()
        p = principal(quota=Quota(tokens_per_month=1000))
        dead = Limiter(store, slot_ttl=0.5)
        await dead.admit(p, "m", rid(), 900)
        await dead.aclose()
        live = Limiter(store, slot_ttl=0.5)
        assert isinstance(await try_admit(live, p, est=200), QuotaExceeded)
        await asyncio.sleep(0.8)
        assert isinstance(await try_admit(live, p, est=200), Admission)
        await live.aclose()

    run(go())


def test_settling_twice_counts_once(engine: EngineFactory) -> None:
    async def go() -> None:
        p = principal(Limits(tpm=1000), quota=Quota(tokens_per_day=10_000))
        a, b = Limiter(engine()), Limiter(engine())
        adm = await a.admit(p, "m", rid(), 300)
        await a.settle(adm, Usage(100, 100), record(p, 100, 100))
        adm.settled = False  # the same settlement again, as a retry after a lost reply would be
        await b.settle(adm, Usage(100, 100), record(p, 100, 100))
        report = await UsageLedger(engine()).query(user="alice")
        assert report["totals"]["requests"] == 1
        assert report["totals"]["prompt_tokens"] == 100 and report["totals"]["completion_tokens"] == 100
        # the quota was charged once: 10000 - 200 left, so a 9800 reservation fits, 9801 does not
        same_user = principal(quota=Quota(tokens_per_day=10_000), key="another-key")
        assert isinstance(await try_admit(a, same_user, est=9801), QuotaExceeded)
        assert isinstance(await try_admit(a, same_user, est=9800), Admission)

    run(go())


def test_headers_report_the_tightest_limits(engine: EngineFactory) -> None:
    async def go() -> None:
        lim = Limiter(engine())
        p = principal(Limits(rpm=10, tpm=5000), model_limits={"m": Limits(rpm=3)})
        adm = await lim.admit(p, "m", rid(), 100)
        assert adm.headers() == {
            "x-ratelimit-limit-requests": "3",
            "x-ratelimit-remaining-requests": "2",
            "x-ratelimit-limit-tokens": "5000",
            "x-ratelimit-remaining-tokens": "4900",
        }

    run(go())


def test_a_request_without_limits_never_touches_the_store() -> None:
    async def go() -> None:
        # nothing listens on this port: any store call would fail, and the closed policy refuse
        from tests.support import free_port

        store = RedisStore(f"redis://127.0.0.1:{free_port()}/0", timeout_ms=100)
        lim = Limiter(store, StoreErrorPolicy(limits="closed", quota="closed"))
        adm = await lim.admit(principal(), "m", rid(), 100)
        assert not adm.taken and adm.headers() == {}
        await store.aclose()

    run(go())


def test_memory_engine_admits_in_process() -> None:
    async def go() -> None:
        lim = Limiter(MemoryStore())
        p = principal(Limits(rpm=1))
        await lim.admit(p, "m", rid(), 0)
        with pytest.raises(RateLimited):
            await lim.admit(p, "m", rid(), 0)

    run(go())


def test_users_do_not_share_limits_or_quotas(engine: EngineFactory) -> None:
    async def go() -> None:
        lim = Limiter(engine())
        alice = principal(Limits(rpm=1), Quota(requests_per_day=1))
        bob = principal(Limits(rpm=1), Quota(requests_per_day=1), user="bob", key="bob-app")
        weird = principal(Limits(rpm=1), user="a}b{c", key="k")
        for p in (alice, bob, weird):
            assert isinstance(await try_admit(lim, p), Admission)
        start = time.monotonic()
        assert isinstance(await try_admit(lim, alice), RateLimited)
        assert time.monotonic() - start < 1

    run(go())
