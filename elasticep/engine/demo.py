"""``elasticep demo``: a tiny DeepSeek-V3 that keeps answering correctly while a rank dies and returns.

What it does, with no options (4 ranks, about a minute on a two-core machine):

1. writes a tiny DeepSeek-V3 (seeded weights, safetensors) and starts 4 expert-parallel rank
   processes (:class:`~elasticep.engine.launcher.Launcher` with ``backend="kernel"``): each holds
   only its own expert slots, all step in lockstep through the CPU kernel;
2. serves a stream of greedy requests through the front router;
3. kills one rank mid-stream (``--fault kill``; or ``hang``, ``mask``, ``leave``); the survivors
   agree on a view without it, re-plan the placement, rebuild their gloo group, copy the lost
   experts from live replicas, commit at a step boundary and replay the interrupted step;
4. brings a replacement back (a restart that rejoins: its slots are filled from live replicas);
5. finishes the stream, prints the timeline of each membership change, checks every output
   against transformers' own greedy output on the same weights, and writes ``timeline.json``
   and ``timeline.png`` in ``--out``.

Exit status: 0 if every request finished with the oracle's output; 1 on any mismatch or lost
request. :class:`ClusterRecorder` and :class:`Workload` are reused by ``elasticep bench recovery``
and the end-to-end tests.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

__all__ = ["ClusterRecorder", "Workload", "DemoResult", "run_demo", "main"]


class ClusterRecorder:
    """Watches a kernel-backend launcher's cluster and feeds a :class:`Timeline`.

    A read-only bus monitor (the cluster's monitor CURVE key) records every event the ranks
    publish (views installed, reconfiguration phases, kernel timeouts, suspicions, join and
    leave requests); the launcher's exit callbacks record each ``ProcessExit``. Runs its own
    thread with an asyncio loop; :meth:`close` stops it.
    """

    def __init__(self, launcher, timeline) -> None:
        self.launcher = launcher
        self.timeline = timeline
        self.views: dict[int, tuple[int, ...]] = {}
        self.phase = "serving"
        self._cond = threading.Condition()
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._unlisten = launcher.on_exit(lambda ev: timeline.record(ev, t_ns=time.time_ns()))
        self._thread = threading.Thread(target=self._main, name="elasticep-recorder", daemon=True)
        self._thread.start()
        if not self._ready.wait(30.0):
            raise RuntimeError("the bus monitor did not start")
        if self._error is not None:
            raise RuntimeError(f"the bus monitor failed: {self._error!r}")

    def _main(self) -> None:
        from elasticep.bus import new_event_loop

        loop = new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._run())
        except BaseException as exc:
            self._error = exc
            self._ready.set()
        finally:
            loop.close()

    async def _run(self) -> None:
        from elasticep.bus import EventBus, ZmqTransport, connect_store
        from elasticep.bus.zmq_transport import MONITOR_RANK
        from elasticep.events import ReconfigPhase, ViewInstalled

        host, port = self.launcher.store_address
        store = connect_store(f"{host}:{port}")
        transport = ZmqTransport.monitor(self.launcher.keys.for_monitor(), store, poll_interval_s=0.05)
        self._stop = asyncio.Event()
        async with EventBus(transport, MONITOR_RANK) as bus:
            sub = bus.subscribe(maxsize=100_000, name="recorder")
            # the view the cluster started in was installed before this monitor subscribed
            members = tuple(self.launcher.alive_ranks())
            start = ViewInstalled(epoch=1, members=members, leader=members[0], rank=-1, reason="bootstrap")
            self.timeline.record(start, t_ns=time.time_ns())
            with self._cond:
                self.views.setdefault(1, members)
            self._ready.set()

            async def pump() -> None:
                async for env in sub:
                    self.timeline.record(env)
                    ev = env.event
                    if isinstance(ev, ViewInstalled):
                        with self._cond:
                            self.views[ev.epoch] = tuple(ev.members)
                            self._cond.notify_all()
                    elif isinstance(ev, ReconfigPhase):
                        self.phase = "serving" if (ev.phase == "resume" and ev.status == "end") else \
                            f"epoch {ev.epoch}: {ev.phase} {ev.status}"

            task = asyncio.ensure_future(pump())
            await self._stop.wait()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    @property
    def view(self) -> tuple[int, tuple[int, ...]]:
        """``(epoch, members)`` of the newest view any rank installed."""
        with self._cond:
            if not self.views:
                return 0, ()
            e = max(self.views)
            return e, self.views[e]

    def wait_view(self, predicate, timeout_s: float) -> tuple[int, tuple[int, ...]] | None:
        """Wait until the newest view satisfies ``predicate(epoch, members)``."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                if self.views:
                    e = max(self.views)
                    if predicate(e, self.views[e]):
                        return e, self.views[e]
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(min(left, 0.1))

    def close(self) -> None:
        self._unlisten()
        if self._loop is not None and self._stop is not None and not self._loop.is_closed():
            try:
                self._loop.call_soon_threadsafe(self._stop.set)
            except RuntimeError:
                pass
        self._thread.join(timeout=5.0)


@dataclass
class _Outcome:
    index: int
    prompt: list[int]
    tokens: list[int] | None = None
    error: str | None = None
    t_ns: int = 0


class Workload:
    """A steady stream of greedy requests: keeps ``concurrency`` in flight until ``total`` are done.

    Each completion is recorded in the timeline (its tokens, and whether it equals the oracle's
    output, checked at the end by :meth:`verify`). Requests that fail (rejected, or the router
    gave up) are counted as lost; they are never retried here: the router already retries
    requests caught by a failure.
    """

    def __init__(self, launcher, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, concurrency: int,
                 timeline=None) -> None:
        self.launcher = launcher
        self.prompts = [list(p) for p in prompts]
        self.max_new_tokens = max_new_tokens
        self.concurrency = concurrency
        self.timeline = timeline
        self.outcomes: list[_Outcome] = []
        self._next = 0
        self._inflight = 0
        self._lock = threading.Condition()
        self._stopped = False
        self.started_ns = 0

    @property
    def done(self) -> int:
        with self._lock:
            return len(self.outcomes)

    @property
    def total(self) -> int:
        return len(self.prompts)

    def start(self) -> "Workload":
        self.started_ns = time.time_ns()
        with self._lock:
            self._fill()
        return self

    def stop(self) -> None:
        """Submit nothing more; :meth:`wait` then waits for the requests already submitted."""
        with self._lock:
            self._stopped = True
            self._lock.notify_all()

    def _fill(self) -> None:
        while not self._stopped and self._inflight < self.concurrency and self._next < len(self.prompts):
            i = self._next
            self._next += 1
            self._inflight += 1
            fut = self.launcher.submit(self.prompts[i], self.max_new_tokens)
            fut.add_done_callback(lambda f, i=i: self._done(i, f))

    def _done(self, i: int, fut: Future) -> None:
        out = _Outcome(i, self.prompts[i], t_ns=time.time_ns())
        try:
            out.tokens = list(fut.result().tokens)
        except BaseException as exc:  # rejected, router closed, ...: a lost request, loudly
            out.error = f"{type(exc).__name__}: {exc}"
        with self._lock:
            self.outcomes.append(out)
            self._inflight -= 1
            if self.timeline is not None:
                self.timeline.request_done(len(out.tokens or []), ok=out.error is None, t_ns=out.t_ns)
            try:
                self._fill()
            except Exception as exc:  # the launcher is closing
                print(f"workload: submit failed: {exc!r}", file=sys.stderr)
            self._lock.notify_all()

    def wait(self, timeout_s: float) -> bool:
        """Wait until every request finished (or failed); False on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while len(self.outcomes) < (self._next if self._stopped else len(self.prompts)):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._lock.wait(min(left, 0.2))
            return True

    def wait_done(self, n: int, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while len(self.outcomes) < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._lock.wait(min(left, 0.2))
            return True

    def verify(self, oracle) -> dict[str, Any]:
        """Compare every finished output with the oracle: ``{"total", "lost", "wrong", "errors"}``."""
        with self._lock:
            outcomes = list(self.outcomes)
            submitted = self._next if self._stopped else len(self.prompts)
        expected = oracle.generate_many(self.prompts[:submitted], self.max_new_tokens)
        finished = {o.index: o for o in outcomes}
        lost = [i for i in range(submitted) if i not in finished or finished[i].error is not None]
        wrong = [o.index for o in outcomes if o.error is None and o.tokens != expected[o.index]]
        errors = sorted({finished[i].error for i in lost if i in finished and finished[i].error})
        return {"total": submitted, "lost": len(lost), "wrong": len(wrong), "errors": errors[:5],
                "wrong_indices": wrong[:10]}

    def throughput(self, since_ns: int, until_ns: int) -> float:
        """Generated tokens per second finished in ``[since_ns, until_ns)``."""
        with self._lock:
            toks = sum(len(o.tokens or []) for o in self.outcomes if since_ns <= o.t_ns < until_ns)
        return toks / max(1e-9, (until_ns - since_ns) / 1e9)


def make_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rnd = random.Random(seed)
    return [[rnd.randrange(vocab) for _ in range(length)] for _ in range(n)]


@dataclass
class DemoResult:
    ok: bool
    verdict: dict[str, Any]
    changes: list = field(default_factory=list)
    json_path: Path | None = None
    png_path: Path | None = None
    seconds: float = 0.0


def _inject(launcher, fault: str, rank: int, timeline) -> None:
    timeline.signal(fault, rank)
    if fault == "kill":
        launcher.kill(rank, wait=False)
    elif fault == "hang":
        launcher.hang(rank)
    elif fault == "mask":
        launcher.mask(rank)
    elif fault == "leave":
        launcher.retire(rank, wait=False)
    else:
        raise ValueError(f"unknown fault {fault!r}")


def run_demo(
    *,
    ranks: int = 4,
    fault: str = "kill",
    fail_rank: int = 2,
    fail_at: str = "40%",
    requests: int = 160,
    max_new_tokens: int = 12,
    prompt_len: int = 8,
    concurrency: int | None = None,
    out: str | Path | None = None,
    live: bool = True,
    rejoin: bool = True,
    seed: int = 0,
    timeout_s: float = 150.0,
) -> DemoResult:
    """Run the demo scenario; see the module docs. ``fail_at``: ``"3s"`` (seconds after the
    stream starts), ``"60"`` (after that many requests finished) or ``"40%"`` of the requests."""
    import torch

    from elasticep.engine.launcher import Launcher, prewarm
    from elasticep.engine.model import make_tiny_model
    from elasticep.engine.oracle import Oracle
    from elasticep.engine.timeline import LiveDisplay, Timeline, summarize

    t_start = time.monotonic()
    torch.set_num_threads(1)
    prewarm()
    out_dir = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="elasticep-demo-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    model_path = make_tiny_model(out_dir / "model", seed=seed)
    oracle = Oracle(model_path)
    prompts = make_prompts(requests, prompt_len, oracle.config.vocab_size, seed)
    oracle.generate_many(prompts, max_new_tokens)  # before the cluster takes the cores
    if not 0 <= fail_rank < ranks:
        raise ValueError(f"--fail-rank {fail_rank} is not one of the {ranks} ranks")
    timeline = Timeline()
    concurrency = concurrency or 2 * ranks
    state = {"note": "starting ranks"}
    with Launcher(model_path, ranks, backend="kernel", attempt_timeout_s=30.0) as launcher:
        recorder = ClusterRecorder(launcher, timeline)
        work = Workload(launcher, prompts, max_new_tokens, concurrency=concurrency, timeline=timeline)

        def status() -> dict[str, Any]:
            epoch, members = recorder.view
            return {"requests_done": work.done, "requests_total": work.total, "epoch": epoch,
                    "members": list(members), "phase": recorder.phase, "note": state["note"]}

        try:
            with LiveDisplay(timeline, status, enabled=live):
                state["note"] = "serving"
                work.start()
                _wait_fail_point(work, fail_at, timeout_s)
                state["note"] = f"{fault} rank {fail_rank}"
                _inject(launcher, fault, fail_rank, timeline)
                if not live:
                    print(f"injected {fault} on rank {fail_rank} after {work.done} requests", flush=True)
                if recorder.wait_view(lambda e, m: fail_rank not in m and e > 1, 30.0) is None:
                    raise RuntimeError(f"no view without rank {fail_rank} within 30 s")
                state["note"] = f"rank {fail_rank} evicted; serving on {len(recorder.view[1])} ranks"
                if fault == "hang":
                    time.sleep(0.5)
                    launcher.resume(fail_rank)  # it wakes up outside the view: it fences itself
                if rejoin:
                    if fault != "kill":
                        launcher.wait_exit(fail_rank, timeout_s=30.0)
                    time.sleep(0.5)
                    timeline.signal("restart", fail_rank)
                    state["note"] = f"restarting rank {fail_rank}"
                    launcher.restart(fail_rank)
                    recorder.wait_view(lambda e, m: fail_rank in m, 30.0)
                    state["note"] = f"rank {fail_rank} rejoined"
                if not work.wait(max(5.0, timeout_s - (time.monotonic() - t_start))):
                    state["note"] = "timed out"
                time.sleep(0.3)  # the last phase events on the bus
        finally:
            recorder.close()
    verdict = work.verify(oracle)
    changes = timeline.changes()
    json_path = timeline.to_json(out_dir / "timeline.json")
    png_path = timeline.plot(out_dir / "timeline.png")
    ok = verdict["lost"] == 0 and verdict["wrong"] == 0
    from rich.console import Console

    console = Console(width=None if sys.stdout.isatty() else 150)
    console.print(timeline.table())
    for line in summarize(changes):
        console.print(line)
    console.print(
        f"requests: {verdict['total']}  lost: {verdict['lost']}  wrong: {verdict['wrong']}  "
        f"(every output compared with transformers' greedy output)"
    )
    if verdict["errors"]:
        console.print(f"errors: {verdict['errors']}")
    console.print(f"timeline: {json_path}\nplot: {png_path}")
    console.print("[bold green]OK[/]" if ok else "[bold red]FAILED[/]")
    return DemoResult(ok, verdict, changes, json_path, png_path, time.monotonic() - t_start)


def _wait_fail_point(work: Workload, fail_at: str, timeout_s: float) -> None:
    spec = fail_at.strip()
    if spec.endswith("s"):
        time.sleep(float(spec[:-1]))
    elif spec.endswith("%"):
        work.wait_done(int(work.total * float(spec[:-1]) / 100), timeout_s)
    else:
        work.wait_done(int(spec), timeout_s)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="elasticep demo", description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--fail-rank", type=int, default=2)
    parser.add_argument("--fault", choices=("kill", "hang", "mask", "leave"), default="kill")
    parser.add_argument("--fail-at", default="40%",
                        help="when: '3s' after the stream starts, '60' requests done, or '40%%' of them")
    parser.add_argument("--requests", type=int, default=160)
    parser.add_argument("--max-new-tokens", type=int, default=12)
    parser.add_argument("--no-rejoin", action="store_true", help="do not bring a replacement back")
    parser.add_argument("--out", default=None, help="directory for the model, timeline.json and timeline.png")
    parser.add_argument("--no-live", action="store_true", help="no live display (logs and CI)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    result = run_demo(ranks=args.ranks, fault=args.fault, fail_rank=args.fail_rank, fail_at=args.fail_at,
                      requests=args.requests, max_new_tokens=args.max_new_tokens, out=args.out,
                      live=not args.no_live, rejoin=not args.no_rejoin, seed=args.seed)
    print(f"demo finished in {result.seconds:.1f} s")
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
