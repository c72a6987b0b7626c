"""pytest fixtures shipped with elasticep; enable with ``pytest_plugins = ["elasticep.testing.fixtures"]``.

``tiny_model``, ``oracle``, ``launcher`` (2 ranks, every slot in each rank), ``ep_launcher`` (3
expert-parallel kernel ranks with membership and reconfiguration), ``fault_injector``, ``tcp_store``,
``etcd_cluster`` (3 etcd members on loopback).
"""

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


@pytest.fixture
def etcd_cluster():
    """A real 3-member etcd cluster on loopback (:class:`~elasticep.testing.etcd.EtcdCluster`),
    healthy when the test starts, every member killed and its data removed at teardown. Skips,
    saying so, where the ``etcd`` binaries are not installed."""
    from elasticep.testing.etcd import EtcdCluster, etcd_available

    reason = etcd_available()
    if reason is not None:
        pytest.skip(reason)
    with EtcdCluster(3) as cluster:
        cluster.wait_healthy(30)
        yield cluster


# --- reference engine ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory):
    """Path of a tiny DeepSeek-V3 (seed 0, :data:`elasticep.engine.TINY_DEFAULTS`), written once
    per session as ``config.json`` + ``model.safetensors``."""
    from elasticep.engine.model import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-deepseek-v3"), seed=0)


@pytest.fixture(scope="session")
def oracle(tiny_model):
    """transformers' own ``DeepseekV3ForCausalLM`` on ``tiny_model``'s weights (memoised greedy)."""
    from elasticep.engine.oracle import Oracle

    return Oracle(tiny_model)


@pytest.fixture
def launcher(tiny_model):
    """A started :class:`~elasticep.engine.launcher.Launcher` with 2 ranks on ``tiny_model``;
    every rank is killed at teardown. For other shapes, build one in the test with ``with``."""
    from elasticep.engine.launcher import Launcher

    with Launcher(tiny_model, 2, attempt_timeout_s=5.0) as launched:
        yield launched


@pytest.fixture
def ep_launcher(tiny_model):
    """A started expert-parallel :class:`~elasticep.engine.launcher.Launcher` (``backend="kernel"``)
    with 3 ranks on ``tiny_model``: each rank holds only its own expert slots, membership runs over
    the bus, and a failure is absorbed by the reconfiguration pipeline. Killed at teardown."""
    from elasticep.engine.launcher import Launcher

    with Launcher(tiny_model, 3, backend="kernel", attempt_timeout_s=30.0) as launched:
        yield launched


@pytest.fixture
def fault_injector(launcher):
    """A :class:`~elasticep.testing.FaultInjector` on the ``launcher`` fixture."""
    from elasticep.testing.faults import FaultInjector

    injector = FaultInjector(launcher)
    yield injector
    injector.cancel()
