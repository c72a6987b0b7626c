"""Config refuses a field of the wrong type, a NaN or an unknown name with InvalidArgument, not a
TypeError from a comparison deep in validate() (or a NaN that every comparison lets through)."""

from __future__ import annotations

import math

import pytest

from elasticep.config import Config, UnknownConfigField
from elasticep.errors import InvalidArgument


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(heartbeat_interval_ms="fast"), "heartbeat_interval_ms must be a float"),
        (dict(grace_ms=None), "grace_ms"),
        (dict(grace_ms=math.nan), "grace_ms"),
        (dict(monitors_per_rank=5.5, detection_topology="ring"), "monitors_per_rank must be an int"),
        (dict(history_size=True), "history_size"),
        (dict(operator_token=5, operator_port=3), "operator_token must be a str"),
        (dict(view_store="zookeeper"), "view_store"),
        (dict(kernel_timeout_us=150_000), "kernel_timeout_us .* must be >= grace_ms"),
        (dict(kernel_timeout_us=0), "kernel_timeout_us"),
    ],
)
def test_bad_values_are_invalid_arguments(overrides, match) -> None:
    with pytest.raises(InvalidArgument, match=match):
        Config.local(**overrides)
    with pytest.raises(InvalidArgument, match=match):
        Config.local().replace(**overrides)


def test_unknown_field_is_typed_and_still_a_type_error() -> None:
    for build in (lambda: Config.local(nope=1), lambda: Config.cluster().replace(nope=1)):
        with pytest.raises(UnknownConfigField) as err:
            build()
        assert isinstance(err.value, InvalidArgument) and isinstance(err.value, TypeError)


def test_good_values_still_work() -> None:
    cfg = Config.local(grace_ms=300, heartbeat_interval_ms=20.0)  # an int for a float field is fine
    assert cfg.grace_ms == 300 and Config.cluster().replace(monitors_per_rank=6).monitors_per_rank == 6


def test_bad_environment_value_is_typed(monkeypatch) -> None:
    monkeypatch.setenv("ELASTICEP_GRACE_MS", "soon")
    with pytest.raises(InvalidArgument, match="ELASTICEP_GRACE_MS"):
        Config.local()


def test_the_kernel_bound_comes_from_config_and_never_undercuts_grace() -> None:
    assert Config.local().kernel_timeout_us == 1_000_000 and Config.cluster().kernel_timeout_us == 2_000_000
    assert Config.local(grace_ms=300, kernel_timeout_us=300_000).kernel_timeout_us == 300_000
    with pytest.raises(InvalidArgument, match="grace_ms"):
        Config.cluster(kernel_timeout_us=1_000_000)  # cluster grace is 1.5 s


def test_the_launcher_refuses_an_impossible_rank_config_before_starting_ranks(tiny_model) -> None:
    from elasticep.engine.launcher import Launcher

    slow_grace = {"grace_ms": 500.0, "single_observer_evict_ms": 600.0, "kernel_timeout_us": 400_000}
    for kwargs in (dict(kernel_timeout_us=50_000), dict(rank_config=slow_grace)):
        with pytest.raises(InvalidArgument, match="kernel_timeout_us"):
            Launcher(tiny_model, 2, backend="kernel", **kwargs)
