"""``elasticep demo``: options refused before set-up (status 2, one line, counted), fault
schedules parsed and checked, and the two example schedules of docs/demo.md run end to end."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from elasticep import metrics
from elasticep.engine.demo import (
    DemoOptionError,
    ScheduledFault,
    check_schedule,
    load_schedule,
    main,
    parse_fault,
)
from elasticep.errors import InvalidArgument

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "demo.md"
TOML_BLOCK = re.compile(r"^```toml\n# ([\w.-]+\.toml):.*?\n(.*?)^```", re.S | re.M)


def _refused(option: str) -> float:
    return metrics.sample("elasticep_demo_options_refused_total", {"option": option})


@pytest.mark.parametrize(
    "argv, option, words",
    [
        (["--fail-at", "150%"], "--fail-at", "below 100 %"),
        (["--fail-at", "500s"], "--fail-at", "time limit"),
        (["--fail-at", "160"], "--fail-at", "below --requests 160"),
        (["--fail-at", "soon"], "--fail-at", "is not '3s'"),
        (["--fail-rank", "4"], "--fail-rank", "not one of the 4 ranks"),
        (["--ranks", "1"], "--ranks", "2 to 64 ranks"),
        (["--requests", "0"], "--requests", "at least 1"),
        (["--max-new-tokens", "600"], "--max-new-tokens", "512 positions"),
        (["--fault", "explode"], "--fault", "a single fault is one of"),
        (["--fault", "kill", "--fault", "hang"], "--fault", "KIND:RANK@SECONDS"),
        (["--fault", "kill:1@x"], "--fault", "is not KIND:RANK@SECONDS"),
        (["--fault", "kill:9@1"], "schedule", "rank 9 is not one of the 4 ranks"),
        (["--fault", "kill:1@1", "--fault", "kill:2@1"], "schedule", "--slots-per-rank 8 or more"),
        (["--fault", "kill:1@1", "--fault", "hang:1@2"], "schedule", "already out"),
        (["--fault", "kill:1@1", "--fail-rank", "1"], "--fail-rank", "in a schedule"),
        (["--fault", "kill:1@1", "--no-rejoin"], "--no-rejoin", "restart"),
        (["--slots-per-rank", "3"], "--slots-per-rank", "at least 4 slots"),
        (["--ranks", "3", "--slots-per-rank", "7"], "--slots-per-rank", "redundancy exhausted"),
        (["--schedule", "/nonexistent/schedule.toml"], "--schedule", "cannot read"),
    ],
)
def test_bad_option_exits_2_with_one_counted_line(argv, option, words, capsys, tmp_path) -> None:
    before = _refused(option)
    started = time.monotonic()
    code = main([*argv, "--no-live", "--out", str(tmp_path / "out")])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("elasticep demo: "), err
    assert words in err, err
    assert _refused(option) == before + 1
    assert time.monotonic() - started < 10.0  # refused before any set-up
    assert not (tmp_path / "out").exists()


def test_malformed_command_line_is_one_line_and_status_2(capsys) -> None:
    before = _refused("usage")
    with pytest.raises(SystemExit) as exc:
        main(["--ranks", "four"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--ranks" in err, err
    assert _refused("usage") == before + 1


def test_cli_refuses_before_set_up(tmp_path) -> None:
    proc = subprocess.run([sys.executable, "-m", "elasticep", "demo", "--fail-at", "150%", "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "elasticep demo: --fail-at: '150%': a share of the requests must be at least 0 % and below 100 % "
        "(the fault must land while requests are in flight)"
    ]
    assert not (tmp_path / "o").exists()


def test_parse_fault_forms() -> None:
    assert parse_fault("kill:1@2.5") == ScheduledFault(2.5, "kill", 1)
    assert parse_fault(" Restart : 3 @ 4s ") == ScheduledFault(4.0, "restart", 3)
    for bad in ("kill", "kill:1", "kill@1", "kill:a@1", "kill:1@", "kill:1@1x"):
        with pytest.raises(DemoOptionError):
            parse_fault(bad)


def test_check_schedule_orders_and_refuses() -> None:
    kw = dict(ranks=4, slots_per_rank=8, experts=16, timeout_s=150.0)
    faults = [ScheduledFault(2.0, "restart", 1), ScheduledFault(1.0, "kill", 1), ScheduledFault(1.0, "mask", 3),
              ScheduledFault(2.0, "kill", 1)]
    assert [str(f) for f in check_schedule(faults, **kw)] == ["kill:1@1s", "mask:3@1s", "restart:1@2s", "kill:1@2s"]
    cases = [
        ([], "no faults"),
        ([ScheduledFault(1.0, "explode", 1)], "unknown kind"),
        ([ScheduledFault(-1.0, "kill", 1)], ">= 0"),
        ([ScheduledFault(float("nan"), "kill", 1)], "finite"),
        ([ScheduledFault(200.0, "kill", 1)], "time limit"),
        ([ScheduledFault(1.0, "kill", -1)], "not one of the 4 ranks"),
        ([ScheduledFault(1.0, "leave", 2), ScheduledFault(1.5, "kill", 2)], "already out"),
        ([ScheduledFault(1.0, "kill", r) for r in range(3)], "redundancy exhausted"),
    ]
    for faults, words in cases:
        with pytest.raises(DemoOptionError, match=re.escape(words)):
            check_schedule(faults, **kw)
    with pytest.raises(DemoOptionError, match="no rank serving"):
        check_schedule([ScheduledFault(1.0, "kill", 0), ScheduledFault(1.0, "kill", 1)],
                       ranks=2, slots_per_rank=16, experts=16, timeout_s=150.0)
    assert issubclass(DemoOptionError, InvalidArgument) and issubclass(DemoOptionError, ValueError)


def test_load_schedule_toml_json_and_refusals(tmp_path) -> None:
    toml = tmp_path / "s.toml"
    toml.write_text('[[fault]]\nat_s = 1\nkind = "kill"\nrank = 2\n\n[[fault]]\nat_s = 2.5\nkind = "RESTART"\nrank = 2\n')
    assert load_schedule(toml) == [ScheduledFault(1.0, "kill", 2), ScheduledFault(2.5, "restart", 2)]
    js = tmp_path / "s.json"
    js.write_text(json.dumps([{"at_s": 0.5, "kind": "hang", "rank": 0}]))
    assert load_schedule(js) == [ScheduledFault(0.5, "hang", 0)]
    js.write_text(json.dumps({"fault": [{"at_s": 0.5, "kind": "leave", "rank": 1}]}))
    assert load_schedule(js) == [ScheduledFault(0.5, "leave", 1)]
    bad = {
        "not toml [[": "not valid TOML",
        'ranks = 4\n[[fault]]\nat_s = 1\nkind = "kill"\nrank = 1\n': "unknown top-level keys ['ranks']",
        '[[fault]]\nat_s = 1\nkind = "kill"\n': "missing ['rank']",
        '[[fault]]\nat_s = 1\nkind = "kill"\nrank = 1\nwhen = 3\n': "unknown keys ['when']",
        '[[fault]]\nat_s = "soon"\nkind = "kill"\nrank = 1\n': "at_s must be a number",
        '[[fault]]\nat_s = 1\nkind = 3\nrank = 1\n': "kind must be a string",
        '[[fault]]\nat_s = 1\nkind = "kill"\nrank = 1.5\n': "rank must be an integer",
        '[[fault]]\nat_s = true\nkind = "kill"\nrank = 1\n': "at_s must be a number",
    }
    for text, words in bad.items():
        toml.write_text(text)
        with pytest.raises(DemoOptionError, match=re.escape(words)):
            load_schedule(toml)
    js.write_text("{oops")
    with pytest.raises(DemoOptionError, match="not valid JSON"):
        load_schedule(js)
    js.write_text("[1, 2]")
    with pytest.raises(DemoOptionError, match="fault 1 is a int"):
        load_schedule(js)


def _doc_schedules() -> dict[str, str]:
    return {name: body for name, body in TOML_BLOCK.findall(DOC.read_text())}


def test_docs_ship_two_example_schedules() -> None:
    schedules = _doc_schedules()
    assert set(schedules) == {"two-at-once.toml", "during-recovery.toml"}


@pytest.mark.timeout(180)
@pytest.mark.parametrize("name, requests", [("two-at-once.toml", 400), ("during-recovery.toml", 600)])
def test_doc_schedule_runs(name, requests, tmp_path) -> None:
    path = tmp_path / name
    path.write_text(_doc_schedules()[name])
    faults = check_schedule(load_schedule(path), ranks=4, slots_per_rank=8, experts=16, timeout_s=150.0)
    cmd = [sys.executable, "-m", "elasticep", "demo", "--no-live", "--schedule", str(path), "--ranks", "4",
           "--slots-per-rank", "8", "--requests", str(requests), "--max-new-tokens", "8", "--out", str(tmp_path / "out")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=170)
    out = proc.stdout
    assert proc.returncode == 0, out[-4000:] + proc.stderr[-3000:]
    assert "lost: 0  wrong: 0" in out
    injected = re.findall(r"^t\+[\d.]+ s: (\w+) rank (\d+) \((\d+)/(\d+) requests done\)", out, re.M)
    assert [(k, int(r)) for k, r, _, _ in injected] == [(f.kind, f.rank) for f in faults]
    assert all(int(done) < int(total) for _, _, done, total in injected), injected  # during the stream
    assert "schedule:" not in out  # no fault after the stream, the final view reached
    timeline = json.loads((tmp_path / "out" / "timeline.json").read_text())
    views = [c["members"] for c in timeline["changes"]]
    out_at_end: set[int] = set()
    for f in faults:
        (out_at_end.discard if f.kind == "restart" else out_at_end.add)(f.rank)
    assert views and sorted(views[-1]) == [r for r in range(4) if r not in out_at_end]
