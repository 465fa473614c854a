"""Shared fixtures: a real redis-server per test session, flushed between tests."""
from __future__ import annotations

import pytest
import redis

from runtime.redis_server import RedisServer


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture
def redis_url(redis_server):
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    yield redis_server.url
    client.close()
