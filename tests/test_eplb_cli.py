"""``elasticep plan`` and ``elasticep bench plan`` from the command line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from elasticep import cli
from elasticep.eplb import Placement


def _load(tmp_path, layers=3, experts=16):
    g = torch.Generator().manual_seed(0)
    load = torch.rand(layers, experts, generator=g, dtype=torch.float64) * 10
    pt = tmp_path / "load.pt"
    torch.save(load, pt)
    js = tmp_path / "load.json"
    # SGLang's dump: logical_count with a leading dimension, summed by the reader
    js.write_text(json.dumps({"logical_count": [load.tolist(), load.tolist()]}))
    return load, pt, js


def test_initial_then_replan_round_trip(tmp_path, capsys):
    load, pt, js = _load(tmp_path)
    out = tmp_path / "placement.json"
    assert cli.main(["plan", str(pt), "--ranks", "5", "--slots-per-rank", "4", "--out", str(out)]) == 0
    assert "balance" in capsys.readouterr().out
    start = Placement.from_dict(json.loads(out.read_text()))
    assert start.num_ranks == 5 and bool((start.logcnt >= 1).all())

    nxt = tmp_path / "next.json"
    rc = cli.main(["plan", str(js), "--current", str(out), "--dead", "2", "--json", "--moves", "--out", str(nxt)])
    assert rc == 0
    result = json.loads(capsys.readouterr().out)
    assert result["mode"] == "replan" and result["alive_ranks"] == 4
    assert result["moves"] == len(result["move_list"]) >= result["lower_bound"] > 0
    new = Placement.from_dict(json.loads(nxt.read_text()))
    assert bool((new.phy2log[:, 8:12] == -1).all())
    assert result["lower_bound"] == int((start.masked(torch.tensor([1, 1, 0, 1, 1]).bool()).logcnt == 0).sum())
    for m in result["move_list"]:
        assert new.phy2log[m["layer"], m["slot"]] == m["expert"]


def test_exhausted_and_bad_files(tmp_path, capsys):
    _, pt, _ = _load(tmp_path)
    out = tmp_path / "placement.json"
    assert cli.main(["plan", str(pt), "--ranks", "4", "--slots-per-rank", "4", "--out", str(out)]) == 0
    capsys.readouterr()
    assert cli.main(["plan", str(pt), "--current", str(out), "--dead", "0"]) == 3
    assert "redundancy exhausted" in capsys.readouterr().err
    bad = tmp_path / "load.txt"
    bad.write_text("1 2 3")
    assert cli.main(["plan", str(bad), "--ranks", "2", "--slots-per-rank", "8"]) == 2
    assert ".pt or .json" in capsys.readouterr().err


@pytest.mark.timeout(60)
def test_console_script_runs(tmp_path):
    _, pt, _ = _load(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "elasticep", "plan", str(pt), "--ranks", "4", "--slots-per-rank", "5", "--json"],
        capture_output=True, text=True, timeout=50,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["mode"] == "initial"


@pytest.mark.timeout(120)
def test_bench_plan_writes_the_issue_keys(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert cli.main(["bench", "plan", "--layers", "2", "--repeat", "1", "--json", str(out)]) == 0
    assert "one_dead" in capsys.readouterr().out
    report = json.loads(out.read_text())
    keys = {"name", "budget", "elasticep_ms", "elasticep_moved_slots", "elasticep_balance",
            "lower_bound_moves", "sglang_ms", "sglang_moved_slots", "sglang_balance"}
    names = set()
    for case in report["cases"]:
        assert keys <= set(case)
        names.add(case["name"])
        if case.get("error"):
            assert "redundancy exhausted" in case["error"]
            continue
        # elasticep never exceeds its budget and always covers at least the lower bound
        if case["budget_moves"] is not None:
            assert case["elasticep_moved_slots"] <= case["budget_moves"]
        assert case["elasticep_moved_slots"] >= case["lower_bound_moves"]
    assert {"one_dead", "four_dead", "rejoin", "four_dead_9_slots"} <= names
    assert set(report["targets"]) >= {"balance_2x_max_1.15", "balance_4x_max_1.05"}
