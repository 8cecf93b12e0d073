"""Helpers for library-level store tests (the `engine` fixture is in conftest.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from gateway.store.base import Store

T = TypeVar("T")

EngineFactory = Callable[[], Store]


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)
