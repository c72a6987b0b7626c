"""A masked rank (up, heartbeating, taking no part in steps) is evicted on the kernel-wait
evidence its peers report while their calls still wait, not after the calls' hard timeout.

No speed assertion: the view's reason records the silence the evidence vouched for, which must
be below the kernel's hard bound (the launcher's ``kernel_timeout_us``) for the eviction to have
come from the wait watch rather than from timed-out calls.
"""

from __future__ import annotations

import re

import pytest

from elasticep.engine.demo import ClusterRecorder, Workload, make_prompts
from elasticep.engine.launcher import Launcher, prewarm
from elasticep.engine.timeline import Timeline
from elasticep.events import ViewInstalled

pytestmark = [pytest.mark.multiproc]
MAX_NEW = 8


@pytest.fixture(scope="module", autouse=True)
def _warm():
    prewarm()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("victim", [0, 2])
def test_masked_rank_is_evicted_on_kernel_waits_before_the_hard_bound(tiny_model, oracle, victim):
    hard_us = 2_000_000
    with Launcher(tiny_model, 4, backend="kernel", attempt_timeout_s=30.0, kernel_timeout_us=hard_us) as launcher:
        timeline = Timeline()
        recorder = ClusterRecorder(launcher, timeline)
        prompts = make_prompts(60, 6, oracle.config.vocab_size, 3)
        oracle.generate_many(prompts, MAX_NEW)
        work = Workload(launcher, prompts, MAX_NEW, concurrency=8, timeline=timeline).start()
        try:
            assert work.wait_done(10, 30.0)
            launcher.mask(victim)
            got = recorder.wait_view(lambda e, m: e > 1 and victim not in m, 30.0)
            assert got is not None, f"no view without rank {victim}; newest {recorder.view}"
            assert work.wait(60.0)
        finally:
            recorder.close()
        verdict = work.verify(oracle)
        assert verdict["lost"] == 0 and verdict["wrong"] == 0, verdict
    reasons = [ev.reason for _t, s, ev in timeline.events() if isinstance(ev, ViewInstalled) and s >= 0
               and victim not in ev.members and ev.epoch == got[0]]
    assert reasons, "the view without the victim was not seen on the bus"
    m = re.search(rf"-{victim} \(kernel: silent >= (\d+) ms", reasons[0])
    assert m, reasons[0]  # evicted on kernel evidence
    assert int(m.group(1)) < hard_us / 1000, reasons[0]  # ... reported while the calls still waited
