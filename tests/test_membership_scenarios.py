"""Scenario files in tests/scenarios/ run against the pure membership core on a virtual clock.

Each ``<name>.txt`` is a script (see ``tests/scenarios/driver.py`` for the commands); its
``expect`` lines are checked as it runs, invariant 1 (one member set per epoch everywhere) after
every command, and the transcript must equal ``<name>.out``. Regenerate the transcripts with
``ELASTICEP_REWRITE_SCENARIOS=1 pytest tests/test_membership_scenarios.py``.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

SCENARIOS = Path(__file__).parent / "scenarios"
REWRITE = os.environ.get("ELASTICEP_REWRITE_SCENARIOS") == "1"


def _driver():
    spec = importlib.util.spec_from_file_location("elasticep_scenario_driver", SCENARIOS / "driver.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


driver = _driver()
FILES = sorted(SCENARIOS.glob("*.txt"))
REQUIRED = {
    "one_crash", "two_at_once", "leader_crash", "crash_during_view_change", "hang", "slow_below_grace",
    "partition_minority", "rejoin", "graceful_leave", "stale_proposal",
}


def test_every_required_scenario_exists() -> None:
    assert REQUIRED <= {f.stem for f in FILES}


@pytest.mark.timeout(30)
@pytest.mark.parametrize("path", FILES, ids=[f.stem for f in FILES])
def test_scenario(path: Path) -> None:
    transcript = "\n".join(driver.run_file(path)) + "\n"
    expected_path = path.with_suffix(".out")
    if REWRITE or not expected_path.exists():
        expected_path.write_text(transcript)
        if not REWRITE:
            pytest.fail(f"{expected_path.name} did not exist; wrote it, check it in and rerun")
    assert transcript == expected_path.read_text()


def test_driver_catches_a_broken_expectation() -> None:
    with pytest.raises(driver.ScenarioError, match="expected view 2"):
        driver.Sim().run(["cluster 3", "tick 50ms", "expect view 2 members=0,1"])


def test_driver_catches_disagreement() -> None:
    sim = driver.Sim()
    sim.run(["cluster 3", "tick 30ms"])
    sim.ranks[2].installed[7] = (0, 2)
    sim.ranks[1].installed[7] = (0, 1)
    with pytest.raises(driver.ScenarioError, match="invariant 1"):
        sim.check_agreement()
