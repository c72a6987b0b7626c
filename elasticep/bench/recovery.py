"""``elasticep bench recovery``: repeated rank failures under steady load, end to end.

Starts ``--ranks`` expert-parallel kernel ranks (:class:`~elasticep.engine.launcher.Launcher`
with ``backend="kernel"``), keeps ``2 * ranks`` greedy requests in flight, and ``--trials`` times:
serves steadily for ``--window`` seconds (throughput before), SIGKILLs a random rank, waits until
every survivor has resumed serving on the new view, serves ``--window`` seconds on the survivors
(throughput after), then restarts the rank (rejoin) before the next trial. The kill-to-resumed
time of each trial and each reconfiguration phase come from the ranks' own events on the bus
(:class:`~elasticep.engine.timeline.Timeline`); every output is compared with transformers'
greedy output at the end.

JSON keys (``--json PATH``): ``ranks``, ``trials``, ``kill_to_resumed_p50_ms``,
``kill_to_resumed_p99_ms``, ``requests_total``, ``requests_lost``, ``outputs_wrong``,
``throughput_before``, ``throughput_after`` (generated tokens/s, the mean over trials), and
``<phase>_p50_ms`` for ``detect``, ``view``, ``plan``, ``groups``, ``weights``, ``commit``.
``throughput_target`` is ``(N-1)/N * before * 0.9``, the bar ``throughput_after`` is held to.

Host backups (``--backup-mb``, default ``auto``: the budget for two copies of every expert,
``Config.backup_budget_mb``; ``0`` turns them off): where the bytes the survivors staged after
each kill came from, summed over the trials, as ``bytes_from_replica`` (live replicas, local
copies included), ``bytes_from_backup`` (host backups) and ``bytes_from_disk`` (the checkpoint),
from the ranks' ``weights`` phase events; ``backup_mb`` is the budget used.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    k = min(len(v) - 1, max(0, int(round(q / 100 * (len(v) - 1)))))
    return round(v[k], 1)


def backup_budget_mb(model_dir: Path, ranks: int, copies: int = 2) -> float:
    """Per-rank budget, MiB, that holds ``copies`` backups of every expert of the model at
    ``model_dir`` spread over ``ranks`` ranks, with one expert per layer of slack."""
    import math

    import torch

    from elasticep.engine.model import load_config, moe_layer_ids
    from elasticep.transfer import ExpertLayout

    cfg = load_config(model_dir)
    per_layer = math.ceil(copies * cfg.n_routed_experts / ranks) + 1
    layout = ExpertLayout.deepseek(num_layers=len(moe_layer_ids(cfg)), slots_per_rank=per_layer,
                                   hidden_size=cfg.hidden_size, moe_intermediate_size=cfg.moe_intermediate_size,
                                   dtype=torch.float32)
    return round(per_layer * layout.num_layers * layout.expert_nbytes / 2**20 + 0.5, 1)


def run(ranks: int, trials: int, window_s: float, seed: int, max_new_tokens: int = 8,
        backup_mb: float | str = "auto") -> dict:
    import torch

    from elasticep.agent.agent import weights_bytes

    from elasticep.engine.demo import ClusterRecorder, Workload, make_prompts
    from elasticep.engine.launcher import Launcher, prewarm
    from elasticep.engine.model import make_tiny_model
    from elasticep.engine.oracle import Oracle
    from elasticep.engine.timeline import Timeline
    from elasticep.events import ReconfigPhase

    torch.set_num_threads(1)
    prewarm()
    rnd = random.Random(seed)
    workdir = Path(tempfile.mkdtemp(prefix="elasticep-bench-recovery-"))
    model = make_tiny_model(workdir / "model", seed=seed)
    oracle = Oracle(model)
    prompts = make_prompts(20_000, 6, oracle.config.vocab_size, seed)
    timeline = Timeline()
    before, after, kill_ms, kill_signals = [], [], [], []
    if backup_mb == "auto":
        backup_mb = backup_budget_mb(model, ranks)
    backup_mb = float(backup_mb)
    rank_config = {"backup_budget_mb": backup_mb} if backup_mb > 0 else {}
    with Launcher(model, ranks, backend="kernel", attempt_timeout_s=30.0, rank_config=rank_config) as launcher:
        recorder = ClusterRecorder(launcher, timeline)
        work = Workload(launcher, prompts, max_new_tokens, concurrency=2 * ranks, timeline=timeline)
        try:
            work.start()
            time.sleep(window_s / 2)  # warm up
            for trial in range(trials):
                t0 = time.time_ns()
                time.sleep(window_s)
                t1 = time.time_ns()
                before.append(work.throughput(t0, t1))
                victim = rnd.choice(launcher.alive_ranks())
                epoch_before = recorder.view[0]
                kill_ns = time.time_ns()
                timeline.signal("kill", victim, t_ns=kill_ns)
                kill_signals.append(kill_ns)
                launcher.kill(victim, wait=False)
                got = recorder.wait_view(lambda e, m, v=victim: e > epoch_before and v not in m, 30.0)
                if got is None:
                    raise RuntimeError(f"trial {trial}: no view without rank {victim}")
                resumed_ns = _wait_resumed(timeline, got[0], len(got[1]), 30.0)
                s0 = max(resumed_ns, time.time_ns())
                time.sleep(window_s)
                after.append(work.throughput(s0, time.time_ns()))
                timeline.signal("restart", victim)
                launcher.restart(victim)
                recorder.wait_view(lambda e, m, v=victim: v in m, 30.0)
                time.sleep(0.3)
            work.stop()
            work.wait(60.0)
            time.sleep(0.3)
        finally:
            recorder.close()
    verdict = work.verify(oracle)
    changes = [c for c in timeline.changes() if c.signal.startswith("kill")]
    kill_ms = [c.resumed_ms for c in changes if c.resumed_ms is not None]
    phases = {p: [c.phases_ms[p] for c in changes if p in c.phases_ms] for p in ("plan", "groups", "weights", "commit")}
    kill_epochs = {c.epoch for c in changes}
    staged: dict[str, int] = {}
    for _t, _s, ev in timeline.events():
        if (isinstance(ev, ReconfigPhase) and ev.epoch in kill_epochs and ev.phase == "weights"
                and ev.status == "end"):
            for kind, n in weights_bytes(ev.detail).items():
                staged[kind] = staged.get(kind, 0) + n
    mean = lambda xs: round(sum(xs) / len(xs), 1) if xs else 0.0  # noqa: E731
    out = {
        "ranks": ranks,
        "trials": trials,
        "kill_to_resumed_p50_ms": _pct(kill_ms, 50),
        "kill_to_resumed_p99_ms": _pct(kill_ms, 99),
        "requests_total": verdict["total"],
        "requests_lost": verdict["lost"],
        "outputs_wrong": verdict["wrong"],
        "throughput_before": mean(before),
        "throughput_after": mean(after),
        "throughput_target": round(mean(before) * (ranks - 1) / ranks * 0.9, 1),
        "detect_p50_ms": _pct([c.detected_ms for c in changes if c.detected_ms is not None], 50),
        "view_p50_ms": _pct([c.view_ms for c in changes if c.view_ms is not None], 50),
        **{f"{p}_p50_ms": _pct(v, 50) for p, v in phases.items()},
        "backup_mb": backup_mb,
        "bytes_from_replica": staged.get("replica", 0) + staged.get("local", 0),
        "bytes_from_backup": staged.get("host", 0),
        "bytes_from_disk": staged.get("disk", 0),
        "kill_to_resumed_ms": kill_ms,
    }
    return out


def _wait_resumed(timeline, epoch: int, members: int, timeout_s: float) -> int:
    """Wall ns at which every member of view ``epoch`` ended its resume phase."""
    from elasticep.events import ReconfigPhase

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ends = [t for t, _s, ev in timeline.events()
                if isinstance(ev, ReconfigPhase) and ev.epoch == epoch and ev.phase == "resume" and ev.status == "end"]
        if len(ends) >= members:
            return max(ends)
        time.sleep(0.02)
    raise RuntimeError(f"view {epoch} did not resume on all {members} members within {timeout_s} s")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="elasticep bench recovery", description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=8)
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--window", type=float, default=3.0, help="seconds of steady load before and after each kill")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backup-mb", default="auto", metavar="MB",
                        help="host-backup budget per rank, MiB: auto (two copies of every expert) or a number, 0 for none")
    parser.add_argument("--json", default=None, metavar="PATH")
    args = parser.parse_args(argv)
    if args.ranks < 2 or args.trials < 1:
        parser.error("need --ranks >= 2 and --trials >= 1")
    if args.backup_mb != "auto":
        try:
            args.backup_mb = float(args.backup_mb)
        except ValueError:
            parser.error(f"--backup-mb must be auto or a number of MiB, not {args.backup_mb!r}")
        if not args.backup_mb >= 0:
            parser.error("--backup-mb must be >= 0")
    result = run(args.ranks, args.trials, args.window, args.seed, backup_mb=args.backup_mb)
    for key, value in result.items():
        print(f"{key:>26}: {value}")
    ok = result["requests_lost"] == 0 and result["outputs_wrong"] == 0
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
