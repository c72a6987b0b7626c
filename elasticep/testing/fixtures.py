"""pytest fixtures shipped with elasticep; enable with ``pytest_plugins = ["elasticep.testing.fixtures"]``."""

from __future__ import annotations

import socket

import pytest


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def tcp_store():
    """A real ``torch.distributed.TCPStore`` hosted by the test process (as a launcher hosts it)."""
    from torch.distributed import TCPStore

    port = free_port()
    store = TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False, use_libuv=True)
    store.set_timeout(__import__("datetime").timedelta(seconds=10))
    yield store
    del store
