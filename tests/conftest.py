"""Shared fixtures: one torch thread, an empty model repository, a real redis-server per test
session flushed between tests, the real controller app served on loopback."""
from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import pytest
import redis

import models
from runtime.gpu_server.repository import Repository
from runtime.redis_server import RedisServer


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op torch thread for the module's tests: served and native runs then give
    bitwise-equal outputs, and two cores are not oversubscribed (tests/models.py)."""
    with models.torch_threads(1):
        yield


@pytest.fixture
def repo(tmp_path) -> Repository:
    """An empty model repository under the test's temporary folder."""
    return Repository(tmp_path / "models")


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


@contextlib.contextmanager
def controller_app(redis_url: str) -> Iterator[str]:
    """The real controller app (in-process, threaded HTTP on 127.0.0.1, no re-queueing
    thread) on ``redis_url``; yields its base URL."""
    from werkzeug.serving import make_server

    from controller_plugin.api import create_app
    from controller_plugin.config import ControllerSettings

    app = create_app(ControllerSettings(redis_url=redis_url, requeue_interval_ms=0))
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join(5)
        app.extensions["torpor"].stop()
