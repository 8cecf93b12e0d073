from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support import RedisServer


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A private redis-server on a free port for the whole session."""
    try:
        server = RedisServer().start()
    except RuntimeError as exc:
        pytest.exit(str(exc), returncode=3)
    yield server
    server.stop()
