"""Fault injection and pytest fixtures for testing code built on elasticep.

Enable the fixtures (``tiny_model``, ``oracle``, ``launcher``, ``fault_injector``, ``tcp_store``)
with ``pytest_plugins = ["elasticep.testing.fixtures"]`` in a ``conftest.py``.
"""

from elasticep.testing.faults import FaultInjector, InjectedFault

__all__ = ["FaultInjector", "InjectedFault"]
