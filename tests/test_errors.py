"""The error family (``elasticep.errors``): every deliberate error is an ``ElasticEPError`` and
still the built-in a caller catches today; the fields survive pickling (errors cross processes)."""

from __future__ import annotations

import pickle

import pytest

import elasticep
from elasticep import errors
from elasticep.bus import BusClosed
from elasticep.eplb import RedundancyExhausted
from elasticep.membership import RankFenced, StoreUnavailable


@pytest.mark.parametrize(
    "err, builtin",
    [
        (errors.NotStarted("bus"), RuntimeError),
        (errors.Closed("bus"), RuntimeError),
        (errors.WaitTimeout("view 3", 2.5, "members (0, 1)"), TimeoutError),
        (errors.EventTooLarge("custom", 2 << 20, 1 << 20), ValueError),
        (errors.InvalidArgument("alive: bad"), ValueError),
        (errors.RedundancyExhausted(16, 8, [(0, 3)], detail="2 ranks"), RuntimeError),
        (errors.UnsupportedEngineVersion("vllm", "0.1", ">=0.32"), RuntimeError),
        (errors.StaleEpoch("bus", 1, 2), RuntimeError),
    ],
)
def test_each_member_is_in_the_family_and_pickles(err, builtin) -> None:
    assert isinstance(err, errors.ElasticEPError) and isinstance(err, builtin)
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is type(err) and str(back) == str(err) and back.__dict__ == err.__dict__


def test_wait_timeout_says_what_it_waited_for() -> None:
    err = errors.WaitTimeout("a view with rank 3", 1.5)
    assert str(err) == "timed out after 1.5 s waiting for a view with rank 3"
    assert (err.waiting_for, err.timeout_s) == ("a view with rank 3", 1.5)


def test_subsystem_errors_keep_their_names_and_join_the_family() -> None:
    assert RedundancyExhausted is errors.RedundancyExhausted is elasticep.RedundancyExhausted
    assert issubclass(BusClosed, errors.Closed)
    assert issubclass(RankFenced, errors.ElasticEPError) and issubclass(RankFenced, RuntimeError)
    assert issubclass(StoreUnavailable, errors.ElasticEPError) and issubclass(StoreUnavailable, RuntimeError)
    fenced = pickle.loads(pickle.dumps(RankFenced(2, 5, "outside view 5")))
    assert (fenced.rank, fenced.epoch, fenced.reason) == (2, 5, "outside view 5")
    for name in ("ElasticEPError", "NotStarted", "Closed", "WaitTimeout", "EventTooLarge",
                 "UnsupportedEngineVersion", "InvalidArgument"):
        assert getattr(elasticep, name) is getattr(errors, name)


def test_sglang_version_error_is_an_engine_version_error() -> None:
    compat = pytest.importorskip("elasticep_sglang.compat")
    err = compat.UnsupportedSGLangVersion("0.4.0")
    assert isinstance(err, errors.UnsupportedEngineVersion)
    assert (err.engine, err.found, err.supported) == ("sglang", "0.4.0", compat.SUPPORTED_SGLANG)
    assert pickle.loads(pickle.dumps(err)).found == "0.4.0"
