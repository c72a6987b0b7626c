"""Fault injection and pytest fixtures for testing code built on elasticep.

:class:`EtcdCluster` starts a real etcd cluster for tests of the replicated view store;
:class:`elasticep.testing.hosts.HostNet` makes several "hosts" out of network namespaces (links
cut, packets dropped, hosts killed), and :class:`~elasticep.testing.hosts.HostCluster` places
membership ranks on them (import them from ``elasticep.testing.hosts``: they need root).

Enable the fixtures (``tiny_model``, ``oracle``, ``launcher``, ``fault_injector``, ``tcp_store``,
``etcd_cluster``)
with ``pytest_plugins = ["elasticep.testing.fixtures"]`` in a ``conftest.py``.
"""

from elasticep.testing.etcd import EtcdCluster, etcd_available
from elasticep.testing.faults import FaultInjector, InjectedFault

__all__ = ["EtcdCluster", "FaultInjector", "InjectedFault", "etcd_available"]
