"""``elasticep bench store`` at a small size: both stores measured in one run, the TCPStore's
death a typed error, etcd's leader death followed by a commit."""

from __future__ import annotations

import json

import pytest

from elasticep.cli import main as cli_main
from elasticep.testing.etcd import etcd_available

pytestmark = [
    pytest.mark.multiproc,
    pytest.mark.skipif(etcd_available() is not None, reason=etcd_available() or ""),
]
pytest.importorskip("aetcd", reason="the etcd extra (aetcd) is not installed")


def _records(capsys, argv: list[str]) -> dict[str, dict]:
    assert cli_main(["bench", "store", *argv, "--json"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [r["store"] for r in records] == ["tcpstore", "etcd"]
    return {r["store"]: r for r in records}


@pytest.mark.timeout(120)
def test_bench_store_small(capsys) -> None:
    by = _records(capsys, ["--commits", "20", "--kills", "1"])
    tcp, etcd = by["tcpstore"], by["etcd"]
    for r in (tcp, etcd):
        assert r["where"] == "loopback" and r["commits"] == 20
        assert 0 < r["commit_p50_ms"] <= r["commit_p99_ms"]
    assert tcp["kill_outcome"] == "StoreUnavailable" and tcp["kill_to_commit_p99_ms"] is None
    assert 0 < tcp["kill_to_error_ms"]
    assert etcd["kill_outcome"] == "committed" and etcd["kills"] == 1
    assert etcd["kill_to_commit_p50_ms"] == etcd["kill_to_commit_p99_ms"] > 0
    assert etcd["failovers"] >= 1  # the client's endpoint was the one killed


@pytest.mark.timeout(150)
def test_bench_store_on_hosts(capsys) -> None:
    from elasticep.testing.hosts import netns_available

    reason = netns_available()
    if reason is not None:
        pytest.skip(reason)
    by = _records(capsys, ["--commits", "10", "--kills", "1", "--hosts", "3"])
    tcp, etcd = by["tcpstore"], by["etcd"]
    assert tcp["where"] == etcd["where"] == "hosts"
    # A silent store host: the TCPStore's operation runs out its bound, etcd commits elsewhere.
    assert tcp["host_down_outcome"] == "StoreUnavailable"
    assert tcp["host_down_to_error_ms"] >= tcp["store_timeout_s"] * 1e3 * 0.9
    assert etcd["host_down_outcome"] == "committed" and etcd["host_down_to_commit_ms"] > 0


def test_bench_store_refuses_bad_arguments(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        cli_main(["bench", "store", "--commits", "0"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        cli_main(["bench", "store", "--hosts", "2"])
    assert exc.value.code == 2
