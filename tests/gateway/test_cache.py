"""The response cache at the library level: what makes two requests the same entry, who may
see an entry, replay as a stream, single flight in one process and across two."""

from __future__ import annotations

import asyncio
import time

from adapters.types import ChatRequest, ChatResult, Message, Usage
from gateway.cache import CacheFill, ResponseCache, cache_use, replay
from gateway.config import CacheConfig
from gateway.store.redis import RedisStore
from tests.gateway.engines import EngineFactory, run
from tests.support import free_port


def request(text: str = "What is 2+2?", **kw: object) -> ChatRequest:
    fields: dict[str, object] = {"temperature": 0.0, **kw}
    return ChatRequest(model="m", messages=[Message("user", text)], **fields)  # type: ignore[arg-type]


ANSWER = ChatResult(text="4", finish_reason="stop", usage=Usage(7, 1), id="r1", model="llama")


def test_an_entry_is_the_whole_request_and_the_user_unless_shared() -> None:
    c = ResponseCache(store=None)  # type: ignore[arg-type]  # key() does not touch the store
    base = c.key("alice", "m", request(), shared=False)
    assert base == c.key("alice", "m", request(stream=True, request_id="other", user="x"), shared=False)
    assert base != c.key("bob", "m", request(), shared=False)
    assert c.key("alice", "m", request(), shared=True) == c.key("bob", "m", request(), shared=True)
    assert c.key("alice", "m", request(), shared=True) != base
    for different in (request("What is 2+3?"), request(max_tokens=5), request(top_p=0.5), request(seed=1),
                      request(stop=["\n"]), request(extra={"repetition_penalty": 1.1})):
        assert c.key("alice", "m", different, shared=False) != base
    assert c.key("alice", "other-alias", request(), shared=False) != base
    assert c.key("alice", "m", request(extra={"a": 1, "b": 2}), False) == \
        c.key("alice", "m", request(extra={"b": 2, "a": 1}), False)


def test_only_deterministic_requests_are_cached_unless_the_alias_says_always() -> None:
    cfg = CacheConfig(ttl=60)
    assert cache_use(None, request()) == "bypass"
    assert cache_use(cfg, request()) == "use"
    assert cache_use(cfg, request(temperature=0.7)) == "bypass"
    assert cache_use(cfg, ChatRequest(model="m", messages=[Message("user", "x")])) == "bypass"
    assert cache_use(CacheConfig(ttl=60, mode="always"), request(temperature=0.7)) == "use"
    assert cache_use(cfg, request(), "no-store") == "bypass"
    assert cache_use(cfg, request(), "max-age=0, No-Cache") == "refresh"


def test_a_cached_answer_replays_as_a_stream() -> None:
    async def go() -> None:
        chunks = [c async for c in replay(ANSWER)]
        assert "".join(c.text for c in chunks) == "4"
        assert chunks[-1].finish_reason == "stop" and chunks[-1].usage == Usage(7, 1)

    run(go())


CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'}}


def test_a_cached_function_call_keeps_its_calls_and_replays_them(engine: EngineFactory) -> None:
    answer = ChatResult(text="", finish_reason="tool_calls", usage=Usage(9, 4), tool_calls=[CALL])

    async def go() -> None:
        cache = ResponseCache(engine())
        key = cache.key("alice", "m", request("weather?"), False)
        await cache.put(key, answer, ttl=10)
        assert await ResponseCache(engine()).get(key) == answer
        chunks = [c async for c in replay(answer)]
        assert chunks[0].tool_calls == [{"index": 0, **CALL}]  # the streaming shape: with an index
        assert chunks[-1].finish_reason == "tool_calls" and chunks[-1].usage == Usage(9, 4)

    run(go())


def test_entries_round_trip_and_expire(engine: EngineFactory) -> None:
    async def go() -> None:
        cache = ResponseCache(engine())
        key = cache.key("alice", "m", request(), False)
        assert await cache.get(key) is None
        await cache.put(key, ANSWER, ttl=0.3)
        assert await ResponseCache(engine()).get(key) == ANSWER
        await asyncio.sleep(0.4)
        assert await cache.get(key) is None
        await cache.put(key, ChatResult(text="", finish_reason="error"), ttl=10)
        assert await cache.get(key) is None  # failed answers are not cached

    run(go())


async def _serve(caches: list[ResponseCache], key: str, n: int, calls: list[int],
                 fail_first: bool = False) -> list[ChatResult]:
    async def one(i: int) -> ChatResult:
        got = await caches[i % len(caches)].lookup(key)
        if isinstance(got, ChatResult):
            return got
        async with got:
            calls.append(i)
            await asyncio.sleep(0.2)  # the upstream call
            if fail_first and len(calls) == 1:
                raise RuntimeError("upstream failed")
            await got.put(ANSWER, ttl=60)
            return ANSWER

    out = await asyncio.gather(*(one(i) for i in range(n)), return_exceptions=True)
    return [o for o in out if isinstance(o, ChatResult)]


def test_twenty_identical_concurrent_misses_make_one_upstream_call(engine: EngineFactory) -> None:
    async def go() -> None:
        cache = ResponseCache(engine())
        calls: list[int] = []
        out = await _serve([cache], cache.key("alice", "m", request(), False), 20, calls)
        assert len(calls) == 1 and len(out) == 20 and all(o == ANSWER for o in out)

    run(go())


def test_single_flight_holds_across_two_processes(redis_url: str) -> None:
    async def go() -> None:
        a = ResponseCache(RedisStore(redis_url))
        b = ResponseCache(RedisStore(redis_url))
        calls: list[int] = []
        out = await _serve([a, b], a.key("alice", "m", request(), False), 20, calls)
        assert len(calls) == 1 and len(out) == 20

    run(go())


def test_when_the_leader_fails_a_waiter_takes_over(engine: EngineFactory) -> None:
    async def go() -> None:
        caches = [ResponseCache(engine()), ResponseCache(engine())]
        calls: list[int] = []
        out = await _serve(caches, caches[0].key("alice", "m", request(), False), 10, calls, fail_first=True)
        assert len(calls) == 2 and len(out) == 9

    run(go())


def test_no_cache_skips_the_read_but_stores_the_fresh_answer(engine: EngineFactory) -> None:
    async def go() -> None:
        cache = ResponseCache(engine())
        key = cache.key("alice", "m", request(), False)
        await cache.put(key, ChatResult(text="old"), ttl=60)
        fill = await cache.lookup(key, read=False)
        assert isinstance(fill, CacheFill)
        async with fill:
            await fill.put(ANSWER, ttl=60)
        assert await cache.get(key) == ANSWER

    run(go())


def test_a_dead_store_is_skipped_quickly() -> None:
    async def go() -> None:
        cache = ResponseCache(RedisStore(f"redis://127.0.0.1:{free_port()}/0", timeout_ms=100))
        key = cache.key("alice", "m", request(), False)
        start = time.monotonic()
        fill = await cache.lookup(key)
        assert isinstance(fill, CacheFill)
        await fill.put(ANSWER, ttl=60)
        assert await cache.get(key) is None
        assert time.monotonic() - start < 1 and cache.store_errors >= 2
        await cache.store.aclose()

    run(go())
