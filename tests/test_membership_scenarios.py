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


def _random_script(seed: int, n: int = 6, steps: int = 25) -> list[str]:
    import random

    rng = random.Random(seed)
    lines = [f"cluster {n}", "tick 100ms"]
    crashed: set[int] = set()
    hung: set[int] = set()
    for _ in range(steps):
        up = [r for r in range(n) if r not in crashed and r not in hung]
        choice = rng.random()
        if choice < 0.15 and len(up) > 2:
            r = rng.choice(up)
            lines.append(f"fail {r}")
            crashed.add(r)
        elif choice < 0.25 and len(up) > 2:
            r = rng.choice(up)
            lines.append(f"hang {r}")
            hung.add(r)
        elif choice < 0.35 and hung:
            r = rng.choice(sorted(hung))
            lines.append(f"resume {r}")
            hung.discard(r)
        elif choice < 0.45 and crashed:
            r = rng.choice(sorted(crashed))
            lines.append(f"restart {r}")
            crashed.discard(r)
        elif choice < 0.55:
            cut = rng.sample(range(n), rng.randint(1, n // 2))
            rest = [r for r in range(n) if r not in cut]
            lines.append(f"partition {','.join(map(str, cut))} | {','.join(map(str, rest))}")
        elif choice < 0.62:
            a, b = rng.sample(range(n), 2)
            lines.append(f"deliver drop=({a},{b})")
        elif choice < 0.67:
            lines.append(f"store down ranks={rng.randrange(n)}")
        elif choice < 0.72 and len(up) > 2:
            lines.append(f"leave {rng.choice(up)}")
        elif choice < 0.8:
            lines += ["heal", "deliver all", "store up ranks=" + ",".join(map(str, range(n)))]
        else:
            lines.append(f"pause {rng.randrange(n)} {rng.randint(20, 180)}ms")
        lines.append(f"tick {rng.randint(10, 300)}ms")
    lines += ["heal", "deliver all", "store up ranks=" + ",".join(map(str, range(n)))]
    lines += [f"resume {r}" for r in sorted(hung)]
    lines.append("tick 1500ms")
    return lines


@pytest.mark.timeout(60)
@pytest.mark.parametrize("seed", range(12))
def test_random_faults_keep_one_view_per_epoch_and_converge(seed: int) -> None:
    sim = driver.Sim()
    script = _random_script(seed)
    sim.run(script)  # checks invariant 1 after every command
    head = sim.store.read_nowait(sim.store.head())
    assert head is not None
    for rank, r in sim.ranks.items():
        core = r.core
        if r.state == "up" and core.is_member and not core.stopped:
            assert core.view == head, f"seed {seed}: r{rank} at {core.view.describe()}, store at {head.describe()}"
    # Every epoch of the chain is installed identically wherever it was installed.
    for epoch in range(1, sim.store.head() + 1):
        committed = sim.store.read_nowait(epoch).members
        for r in sim.ranks.values():
            if epoch in r.installed:
                assert r.installed[epoch] == committed
