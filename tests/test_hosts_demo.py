"""``elasticep demo --store etcd`` and ``--hosts N``: options refused before set-up, and the demo
run with its views on a real etcd cluster and its ranks on network-namespace hosts, every output
checked against the oracle and the newest installed view read back from etcd."""

from __future__ import annotations

import pytest

from elasticep import metrics
from elasticep.engine.demo import run_demo
from elasticep.engine.demo import main as demo_main
from elasticep.testing.etcd import etcd_available
from elasticep.testing.hosts import netns_available

ETCD = etcd_available()
NETNS = netns_available()

def _refused(option: str) -> float:
    return metrics.sample("elasticep_demo_options_refused_total", {"option": option})


@pytest.mark.parametrize(
    "argv, option, words",
    [
        (["--store", "zookeeper"], "--store", "one of tcpstore, etcd"),
        (["--hosts", "1"], "--hosts", "0 (every rank on this host) or 2 to 4"),
        (["--hosts", "9"], "--hosts", "2 to 4"),
        (["--store", "etcd", "--hosts", "2"], "--hosts", "3 or more hosts"),
        (["--profile", "fast"], "--profile", "one of auto, local, cluster"),
    ],
)
def test_bad_store_or_hosts_exits_2_before_set_up(argv, option, words, capsys, tmp_path) -> None:
    before = _refused(option)
    assert demo_main([*argv, "--no-live", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"elasticep demo: {option}:") and words in err, err
    assert _refused(option) == before + 1
    assert not (tmp_path / "out").exists()  # nothing was set up


@pytest.mark.multiproc
@pytest.mark.timeout(240)
@pytest.mark.skipif(ETCD is not None, reason=ETCD or "")
def test_demo_on_etcd(tmp_path) -> None:
    pytest.importorskip("aetcd", reason="the etcd extra (aetcd) is not installed")
    result = run_demo(store="etcd", requests=24, live=False, out=tmp_path, timeout_s=150.0)
    assert result.verdict["lost"] == 0 and result.verdict["wrong"] == 0
    assert result.ok  # includes: etcd holds the newest view the ranks installed


@pytest.mark.multiproc
@pytest.mark.timeout(300)
@pytest.mark.skipif(ETCD is not None or NETNS is not None, reason=ETCD or NETNS or "")
def test_demo_on_three_hosts_with_etcd(tmp_path) -> None:
    pytest.importorskip("aetcd", reason="the etcd extra (aetcd) is not installed")
    result = run_demo(store="etcd", hosts=3, requests=24, live=False, out=tmp_path, timeout_s=150.0)
    assert result.verdict["lost"] == 0 and result.verdict["wrong"] == 0
    assert result.ok
