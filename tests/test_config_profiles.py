"""Which :class:`Config` profile is the default: ``Config.for_hosts`` and the name ``"auto"`` pick
the local profile for ranks on one host and the cluster profile for ranks across hosts, with the
usual precedence (argument > ``ELASTICEP_*`` > profile); ``HostCluster`` and ``HostLauncher``
resolve ``"auto"`` from their placement."""

from __future__ import annotations

import pytest

from elasticep.config import PROFILES, Config, resolve_profile
from elasticep.errors import InvalidArgument
from elasticep.testing.hosts import placement_profile


def test_one_host_is_local_and_several_are_cluster() -> None:
    assert Config.for_hosts(1) == Config.local()
    assert Config.for_hosts(0) == Config.local()  # 0: every rank on the caller's host
    three = Config.for_hosts(3)
    assert three == Config.cluster() and three != Config.local()
    assert (three.grace_ms, three.heartbeat_interval_ms, three.store_timeout_s) == (1500.0, 100.0, 10.0)
    assert Config.for_hosts(1).grace_ms == 200.0
    assert Config.named("auto", hosts=2) == Config.cluster()
    assert Config.named("local", hosts=5) == Config.local()  # a named profile wins over the placement
    assert Config.named("cluster") == Config.cluster()


def test_overrides_beat_the_environment_which_beats_the_profile(monkeypatch) -> None:
    monkeypatch.setenv("ELASTICEP_GRACE_MS", "1800")
    assert Config.for_hosts(3).grace_ms == 1800.0
    assert Config.for_hosts(3).min_suspect_ms == 600.0  # the rest stays the cluster profile's
    assert Config.for_hosts(3, grace_ms=1600.0).grace_ms == 1600.0
    assert Config.for_hosts(1, grace_ms=250.0).grace_ms == 250.0
    assert Config.named("auto", hosts=4, store_poll_ms=100.0).store_poll_ms == 100.0
    with pytest.raises(InvalidArgument, match="grace_ms"):
        Config.for_hosts(1, grace_ms=50.0)  # below min_suspect_ms: validated as for local()


def test_bad_profile_names_and_host_counts_are_refused() -> None:
    assert PROFILES == ("auto", "local", "cluster")
    with pytest.raises(InvalidArgument, match="profile must be one of auto, local, cluster"):
        Config.named("fast")
    for hosts in (-1, 1.5, True):
        with pytest.raises(InvalidArgument, match="hosts"):
            Config.for_hosts(hosts)
    with pytest.raises(InvalidArgument, match="unknown Config fields"):
        Config.for_hosts(3, no_such_field=1)


def test_resolve_and_placement_profile() -> None:
    assert [resolve_profile("auto", n) for n in (0, 1, 2, 8)] == ["local", "local", "cluster", "cluster"]
    assert resolve_profile("cluster", 1) == "cluster" and resolve_profile("local", 3) == "local"
    # HostCluster's default: by how many distinct hosts the ranks are placed on
    assert placement_profile([0, 0, 1, 1, 2, 2]) == "cluster"
    assert placement_profile([2, 2, 2]) == "local"
    assert placement_profile([0, 0, 1, 1], "local") == "local"
    assert placement_profile([1, 1], "cluster") == "cluster"
    with pytest.raises(InvalidArgument):
        placement_profile([0, 1], "fast")
