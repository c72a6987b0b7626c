"""Timeline: membership changes computed from real events, JSON, PNG plot and the rich table."""

from __future__ import annotations

import json

from rich.console import Console

from elasticep.engine.timeline import PHASE_ORDER, LiveDisplay, Timeline, summarize
from elasticep.events import ProcessExit, ReconfigPhase, ViewInstalled, envelope

MS = 1_000_000


def _kill_and_recover(t0: int) -> Timeline:
    tl = Timeline(start_ns=t0)
    for r in range(4):
        tl.record(ViewInstalled(epoch=1, members=(0, 1, 2, 3), leader=0, rank=r), t_ns=t0 + MS)
    for i in range(10):
        tl.request_done(8, t_ns=t0 + i * 100 * MS)
    kill = t0 + 1000 * MS
    tl.signal("kill", 2, t_ns=kill)
    tl.record(envelope(ProcessExit(rank=2, pid=99, signal=9), sender=0, epoch=1, seq=1), t_ns=None)
    # the envelope carries its own wall time; rebuild one at a known instant instead
    tl._events[-1] = (kill + 20 * MS, 0, ProcessExit(rank=2, pid=99, signal=9))
    for i, r in enumerate((0, 1, 3)):
        tl.record(ViewInstalled(epoch=2, members=(0, 1, 3), leader=0, rank=r, reason="rank 2 exited"),
                  t_ns=kill + (30 + i) * MS)
        t = kill + 40 * MS
        for phase, dur in zip(PHASE_ORDER, (2, 5, 30 + i, 3, 1)):
            tl.record(ReconfigPhase(epoch=2, rank=r, phase=phase, status="start", t_ns=t))
            tl.record(ReconfigPhase(epoch=2, rank=r, phase=phase, status="end", t_ns=t + dur * MS))
            t += dur * MS
    for i in range(10):
        tl.request_done(6, ok=i != 3, t_ns=kill + (100 + i * 100) * MS)
    return tl


def test_changes_measure_each_step_after_the_signal(tmp_path) -> None:
    t0 = 1_700_000_000_000_000_000
    tl = _kill_and_recover(t0)
    (change,) = tl.changes()
    assert change.epoch == 2 and change.members == (0, 1, 3)
    assert change.signal == "kill rank 2"
    assert change.detected_ms == 20.0 and change.detected_by == "process exit of rank 2"
    assert change.view_ms == 32.0  # the last member's install is agreement
    assert change.phases_ms == {"plan": 2.0, "groups": 5.0, "weights": 32.0, "commit": 3.0, "resume": 1.0}
    assert change.resumed_ms == 40 + 2 + 5 + 32 + 3 + 1
    assert "resumed +83.0 ms" in summarize([change])[0]

    data = json.loads(tl.to_json(tmp_path / "t.json").read_text())
    assert data["requests"] == {"total": 20, "wrong": 1, "tokens": 140}
    assert data["changes"][0]["phases_ms"]["weights"] == 32.0
    assert {e["type"] for e in data["events"]} == {"view_installed", "process_exit", "reconfig_phase"}

    png = tl.plot(tmp_path / "t.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    xs, ys = tl.throughput(1.0)
    assert xs[0] == 0.0 and ys[0] == 80.0  # ten 8-token requests in the first second


def test_table_and_live_display_render() -> None:
    tl = _kill_and_recover(1_700_000_000_000_000_000)
    console = Console(record=True, width=200)
    console.print(tl.table())
    text = console.export_text()
    assert "kill rank 2" in text and "83.0" in text
    display = LiveDisplay(tl, lambda: {"requests_done": 20, "requests_total": 20, "epoch": 2, "members": [0, 1, 3]},
                          enabled=False)
    with display:
        console.print(display._render())
    assert "epoch 2 members [0, 1, 3]" in console.export_text()


def test_no_change_without_a_second_view() -> None:
    tl = Timeline()
    tl.record(ViewInstalled(epoch=1, members=(0, 1), leader=0, rank=0))
    assert tl.changes() == []
    assert tl.throughput() == ([], [])
