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
import json
import math
import random
import re
import sys
import tempfile
import threading
import time
import tomllib
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from elasticep.errors import InvalidArgument

__all__ = [
    "ClusterRecorder", "Workload", "DemoResult", "DemoOptionError", "ScheduledFault", "FAULT_KINDS",
    "parse_fault", "load_schedule", "check_schedule", "run_demo", "main",
]


class ClusterRecorder:
    """Watches a kernel-backend launcher's cluster and feeds a :class:`Timeline`.

    A read-only bus monitor (the cluster's monitor CURVE key) records every event the ranks
    publish (views installed, reconfiguration phases, kernel timeouts, suspicions, join and
    leave requests); the launcher's exit callbacks record each ``ProcessExit``. Runs its own
    thread with an asyncio loop; :meth:`close` stops it.

    ``on_view(previous_members, members)``, if given, is called on that thread for every view
    newer than any seen before (e.g. to stop routing to evicted ranks); it must not block.
    """

    def __init__(self, launcher, timeline,
                 on_view: Callable[[tuple[int, ...], tuple[int, ...]], None] | None = None) -> None:
        self.launcher = launcher
        self.timeline = timeline
        self._on_view = on_view
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
                            newest = max(self.views)
                            self.views[ev.epoch] = tuple(ev.members)
                            self._cond.notify_all()
                        if self._on_view is not None and ev.epoch > newest:
                            try:
                                self._on_view(self.views[newest], tuple(ev.members))
                            except Exception as exc:  # the recorder must keep recording
                                print(f"recorder: on_view failed: {exc!r}", file=sys.stderr)
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


FAULT_KINDS: tuple[str, ...] = ("kill", "hang", "mask", "leave", "restart")
"""What a fault schedule may do to a rank. ``kill``: SIGKILL. ``hang``: SIGSTOP (it stays
stopped until a ``restart``). ``mask``: it stays up and connected but takes no part in steps.
``leave``: graceful scale-down. ``restart``: a new incarnation that rejoins (an old process still
running is killed first)."""

_TAKES_OUT = frozenset({"kill", "hang", "mask", "leave"})
_MAX_RANKS = 64
_FAULT_SPEC = re.compile(r"^\s*([A-Za-z_]+)\s*:\s*([+-]?\d+)\s*@\s*([^\s]+?)\s*s?\s*$")


class DemoOptionError(InvalidArgument):
    """An ``elasticep demo`` option or fault schedule that cannot work, refused before any set-up.

    ``option`` names the option (``"--fail-at"``, ``"--schedule"``, ...); the message says why and,
    where there is one, what would work. :func:`main` prints it as one line and exits with status 2.
    Each refusal is counted in ``elasticep_demo_options_refused_total{option}``.
    """

    def __init__(self, option: str, message: str) -> None:
        super().__init__(f"{option}: {message}")
        self.option = option
        self.detail = message

    def __reduce__(self):
        return (type(self), (self.option, self.detail))


def _refuse(option: str, message: str) -> DemoOptionError:
    from elasticep import metrics

    metrics.DEMO_OPTIONS_REFUSED.labels(option).inc()
    return DemoOptionError(option, message)


@dataclass(frozen=True)
class ScheduledFault:
    """One fault of a demo schedule: ``kind`` (one of :data:`FAULT_KINDS`) on ``rank``, ``at_s``
    seconds after the request stream starts. Written ``KIND:RANK@SECONDS`` (``kill:1@2.5``)."""

    at_s: float
    kind: str
    rank: int

    def __str__(self) -> str:
        return f"{self.kind}:{self.rank}@{self.at_s:g}s"


def parse_fault(spec: str, option: str = "--fault") -> ScheduledFault:
    """``"kill:1@2.5"`` (or ``"kill:1@2.5s"``) -> ``ScheduledFault(2.5, "kill", 1)``.

    Only the form is checked here; :func:`check_schedule` checks kinds, ranks and times.
    """
    m = _FAULT_SPEC.match(spec)
    at_s = None
    if m is not None:
        try:
            at_s = float(m.group(3))
        except ValueError:
            at_s = None
    if m is None or at_s is None:
        raise _refuse(option, f"{spec!r} is not KIND:RANK@SECONDS (e.g. kill:1@2.5); "
                              f"KIND is one of {', '.join(FAULT_KINDS)}")
    return ScheduledFault(at_s, m.group(1).lower(), int(m.group(2)))


def load_schedule(path: str | Path) -> list[ScheduledFault]:
    """Read a fault schedule file: TOML (``[[fault]]`` tables) or, for a ``.json`` file, a JSON
    list of objects (or ``{"fault": [...]}``); each fault has exactly ``at_s`` (seconds after the
    stream starts, a number), ``kind`` (a string of :data:`FAULT_KINDS`) and ``rank`` (an
    integer). Raises :class:`DemoOptionError` naming the file and the fault at fault."""
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise _refuse("--schedule", f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None
    try:
        data: Any = json.loads(text) if path.suffix.lower() == ".json" else tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        kind = "JSON" if path.suffix.lower() == ".json" else "TOML"
        raise _refuse("--schedule", f"{path} is not valid {kind}: {exc}") from None
    if isinstance(data, dict):
        extra = sorted(set(data) - {"fault"})
        if extra:
            raise _refuse("--schedule", f"{path}: unknown top-level keys {extra}; a schedule holds only "
                                        "[[fault]] entries")
        data = data.get("fault", [])
    if not isinstance(data, list):
        raise _refuse("--schedule", f"{path}: expected a list of faults, got {type(data).__name__}")
    faults = []
    for n, entry in enumerate(data, 1):
        where = f"{path}: fault {n}"
        if not isinstance(entry, dict):
            raise _refuse("--schedule", f"{where} is a {type(entry).__name__}, not a table of at_s, kind, rank")
        keys = set(entry)
        if keys != {"at_s", "kind", "rank"}:
            missing, unknown = sorted({"at_s", "kind", "rank"} - keys), sorted(keys - {"at_s", "kind", "rank"})
            raise _refuse("--schedule", f"{where}: " + "; ".join(
                ([f"missing {missing}"] if missing else []) + ([f"unknown keys {unknown}"] if unknown else [])))
        at_s, kind, rank = entry["at_s"], entry["kind"], entry["rank"]
        if isinstance(at_s, bool) or not isinstance(at_s, (int, float)):
            raise _refuse("--schedule", f"{where}: at_s must be a number of seconds, got {at_s!r}")
        if not isinstance(kind, str):
            raise _refuse("--schedule", f"{where}: kind must be a string, got {kind!r}")
        if isinstance(rank, bool) or not isinstance(rank, int):
            raise _refuse("--schedule", f"{where}: rank must be an integer, got {rank!r}")
        faults.append(ScheduledFault(float(at_s), kind.lower(), rank))
    return faults


def check_schedule(faults: Sequence[ScheduledFault], *, ranks: int, slots_per_rank: int, experts: int,
                   timeout_s: float, option: str = "schedule") -> tuple[ScheduledFault, ...]:
    """The schedule in the order it runs (by ``at_s``, ties in the order given), or
    :class:`DemoOptionError` if it cannot work: an unknown kind, a rank outside ``[0, ranks)``, a
    time that is negative or past ``timeout_s``, a fault on a rank already out, a moment with no
    rank left, or one where the ranks left hold fewer slots than there are experts (redundancy
    exhausted: every request would be refused until a restart)."""
    if not faults:
        raise _refuse(option, "the schedule has no faults")
    order = sorted(faults, key=lambda f: f.at_s)
    out: dict[int, str] = {}
    for f in order:
        if f.kind not in FAULT_KINDS:
            raise _refuse(option, f"{f}: unknown kind {f.kind!r}; use one of {', '.join(FAULT_KINDS)}")
        if not 0 <= f.rank < ranks:
            raise _refuse(option, f"{f}: rank {f.rank} is not one of the {ranks} ranks (0-{ranks - 1})")
        if not math.isfinite(f.at_s) or f.at_s < 0:
            raise _refuse(option, f"{f}: the time must be a finite number of seconds >= 0")
        if f.at_s >= timeout_s:
            raise _refuse(option, f"{f}: {f.at_s:g} s is past the demo's {timeout_s:g} s time limit")
        if f.kind == "restart":
            out.pop(f.rank, None)
            continue
        if f.rank in out:
            raise _refuse(option, f"{f}: rank {f.rank} is already out then ({out[f.rank]}); restart it first")
        out[f.rank] = f"{f.kind} at {f.at_s:g} s"
        left = ranks - len(out)
        if left == 0:
            raise _refuse(option, f"{f}: leaves no rank serving")
        if left * slots_per_rank < experts:
            need = math.ceil(experts / left)
            raise _refuse(option, f"{f}: ranks {','.join(map(str, sorted(out)))} are out at once and the {left} "
                                  f"left hold {left * slots_per_rank} expert slots for {experts} experts "
                                  f"(redundancy exhausted); give --slots-per-rank {need} or more, or more --ranks")
    return tuple(order)


@dataclass(frozen=True)
class _FailPoint:
    """When the single fault fires: ``seconds`` after the stream starts, or once ``requests`` finished."""

    seconds: float | None = None
    requests: int | None = None


def _parse_fail_at(spec: str, requests: int, timeout_s: float) -> _FailPoint:
    text = str(spec).strip()
    unit = "%" if text.endswith("%") else "s" if text.endswith("s") else ""
    try:
        value = float(text[:-1]) if unit else int(text)
    except ValueError:
        value = None
    if value is None or not math.isfinite(value):
        raise _refuse("--fail-at", f"{spec!r} is not '3s' (seconds), '60' (requests done) or '40%' "
                                   "(of the requests)")
    if unit == "%":
        if not 0 <= value < 100:
            raise _refuse("--fail-at", f"{spec!r}: a share of the requests must be at least 0 % and below "
                                       "100 % (the fault must land while requests are in flight)")
        return _FailPoint(requests=int(requests * value / 100))
    if unit == "s":
        if not 0 <= value < timeout_s:
            raise _refuse("--fail-at", f"{spec!r}: seconds must be >= 0 and below the demo's {timeout_s:g} s "
                                       "time limit")
        return _FailPoint(seconds=value)
    if not 0 <= value < requests:
        raise _refuse("--fail-at", f"{spec!r}: requests done must be >= 0 and below --requests {requests} "
                                   "(the fault must land while requests are in flight)")
    return _FailPoint(requests=int(value))


@dataclass(frozen=True)
class _DemoPlan:
    slots_per_rank: int
    fail_point: _FailPoint | None
    schedule: tuple[ScheduledFault, ...] | None


def _check_options(*, ranks: int, fault: str, fail_rank: int, fail_at: str, requests: int, max_new_tokens: int,
                   prompt_len: int, concurrency: int | None, out: str | Path | None, rejoin: bool,
                   timeout_s: float, schedule: Sequence[ScheduledFault] | None,
                   slots_per_rank: int | None) -> _DemoPlan:
    """Every option checked before anything is set up; raises :class:`DemoOptionError`."""
    from elasticep.engine.model import TINY_DEFAULTS

    experts = int(TINY_DEFAULTS["n_routed_experts"])
    positions = int(TINY_DEFAULTS["max_position_embeddings"])
    if not 2 <= ranks <= _MAX_RANKS:
        raise _refuse("--ranks", f"{ranks}: the demo needs 2 to {_MAX_RANKS} ranks (a fault on one of them "
                                 "must leave another serving)")
    if requests < 1:
        raise _refuse("--requests", f"{requests}: must be at least 1")
    if max_new_tokens < 1:
        raise _refuse("--max-new-tokens", f"{max_new_tokens}: must be at least 1")
    if not 1 <= prompt_len <= 64:  # a rank prefills at most 64 tokens in one step
        raise _refuse("prompt_len", f"{prompt_len}: must be 1 to 64")
    if prompt_len + max_new_tokens > positions:
        raise _refuse("--max-new-tokens", f"{max_new_tokens}: prompt and output must fit the model's "
                                          f"{positions} positions (at most {positions - prompt_len})")
    if concurrency is not None and concurrency < 1:
        raise _refuse("concurrency", f"{concurrency}: must be at least 1")
    if not (isinstance(timeout_s, (int, float)) and math.isfinite(timeout_s) and timeout_s > 0):
        raise _refuse("timeout_s", f"{timeout_s!r}: must be a positive number of seconds")
    if out is not None and Path(out).exists() and not Path(out).is_dir():
        raise _refuse("--out", f"{out} exists and is not a directory")
    default_spr = math.ceil(experts / (ranks - 1))  # the launcher's default: survives any one loss
    spr = default_spr if slots_per_rank is None else slots_per_rank
    if spr < 1 or ranks * spr < experts:
        raise _refuse("--slots-per-rank", f"{slots_per_rank}: {ranks} ranks need at least "
                                          f"{math.ceil(experts / ranks)} slots each to hold {experts} experts")
    if schedule is not None:
        plan = check_schedule(schedule, ranks=ranks, slots_per_rank=spr, experts=experts, timeout_s=timeout_s)
        return _DemoPlan(spr, None, plan)
    if fault not in _TAKES_OUT:
        raise _refuse("--fault", f"{fault!r}: a single fault is one of {', '.join(sorted(_TAKES_OUT))} "
                                 "(a schedule can also restart)")
    if not 0 <= fail_rank < ranks:
        raise _refuse("--fail-rank", f"{fail_rank} is not one of the {ranks} ranks (0-{ranks - 1})")
    if (ranks - 1) * spr < experts:
        raise _refuse("--slots-per-rank", f"{spr}: after losing rank {fail_rank} the {ranks - 1} ranks left hold "
                                          f"{(ranks - 1) * spr} slots for {experts} experts (redundancy "
                                          f"exhausted); give {math.ceil(experts / (ranks - 1))} or more")
    return _DemoPlan(spr, _parse_fail_at(fail_at, requests, timeout_s), None)


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
    elif fault == "restart":
        launcher.restart(rank, wait=False)
    else:
        raise ValueError(f"unknown fault {fault!r}")


def _run_schedule(launcher, recorder: ClusterRecorder, work: Workload, timeline, state: dict[str, Any],
                  schedule: Sequence[ScheduledFault], ranks: int, live: bool) -> list[str]:
    """Inject each fault at its time after the stream started; returns the problems seen (a fault
    after the stream ended, a final view that is not the one the schedule leads to)."""
    problems: list[str] = []
    t0 = time.monotonic()
    out: set[int] = set()
    for f in schedule:
        delay = t0 + f.at_s - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        done = work.done
        if done >= work.total:
            problems.append(f"{f} came after the last request finished: give more --requests or an earlier time")
        state["note"] = f"{f.kind} rank {f.rank}"
        _inject(launcher, f.kind, f.rank, timeline)
        if not live:
            print(f"t+{time.monotonic() - t0:.2f} s: {f.kind} rank {f.rank} ({done}/{work.total} requests done)",
                  flush=True)
        if f.kind == "restart":
            out.discard(f.rank)
        else:
            out.add(f.rank)
    expected = tuple(r for r in range(ranks) if r not in out)
    state["note"] = f"waiting for the view {list(expected)}"
    if recorder.wait_view(lambda e, m: tuple(sorted(m)) == expected, 30.0) is None:
        epoch, members = recorder.view
        problems.append(f"the cluster did not reach the view {list(expected)} within 30 s "
                        f"(newest: epoch {epoch}, members {list(members)})")
    else:
        state["note"] = f"serving on {list(expected)}"
    return problems


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
    schedule: Sequence[ScheduledFault] | None = None,
    slots_per_rank: int | None = None,
    store: str = "tcpstore",
    hosts: int = 0,
    profile: str = "auto",
) -> DemoResult:
    """Run the demo scenario; see the module docs. ``fail_at``: ``"3s"`` (seconds after the
    stream starts), ``"60"`` (after that many requests finished) or ``"40%"`` of the requests.

    ``schedule``: instead of the one ``fault`` on ``fail_rank`` (and its rejoin), these faults at
    their times (:func:`load_schedule`, :func:`parse_fault`); ranks come back only where the
    schedule says ``restart``. ``slots_per_rank``: expert slots per rank (default
    ``ceil(experts / (ranks - 1))``, enough to lose any one rank). Every option is checked before
    anything is set up: :class:`DemoOptionError`.

    ``store``: where views are committed, ``"tcpstore"`` (the launcher's) or ``"etcd"`` (a
    3-member etcd cluster started for the run; at the end the demo checks that the newest view
    is committed there). ``hosts``: run the ranks on that many network-namespace hosts (root
    only; :class:`elasticep.testing.hosts.ControlPlane`), rank ``r`` on host ``r % hosts``, each
    etcd member on a host of its own. ``profile``: the ranks' :class:`~elasticep.config.Config`
    profile, ``"local"``, ``"cluster"`` or ``"auto"`` (the default: ``"cluster"`` with ``hosts``,
    ``"local"`` without, :meth:`~elasticep.config.Config.for_hosts`)."""
    _check_control_plane(store, hosts, ranks, profile)
    plan = _check_options(ranks=ranks, fault=fault, fail_rank=fail_rank, fail_at=fail_at, requests=requests,
                          max_new_tokens=max_new_tokens, prompt_len=prompt_len, concurrency=concurrency, out=out,
                          rejoin=rejoin, timeout_s=timeout_s, schedule=schedule, slots_per_rank=slots_per_rank)
    import torch

    from elasticep.engine.launcher import prewarm
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
    timeline = Timeline()
    concurrency = concurrency or 2 * ranks
    state = {"note": "starting ranks"}
    problems: list[str] = []
    from elasticep.testing.hosts import ControlPlane

    store_problems: list[str] = []
    with ControlPlane(store=store, hosts=hosts) as plane, \
            plane.launcher(model_path, ranks, backend="kernel", attempt_timeout_s=30.0,
                           slots_per_rank=plan.slots_per_rank, rank_profile=profile) as launcher:
        router = launcher.router

        def follow_view(previous: tuple[int, ...], members: tuple[int, ...]) -> None:
            # a rank out of the view gets no requests and its attempts go elsewhere at once (a
            # stopped rank would otherwise hold them until the attempt timeout)
            for r in set(previous) - set(members):
                router.evict(r)
            for r in set(members) - set(previous):
                router.readmit(r)

        recorder = ClusterRecorder(launcher, timeline, on_view=follow_view)
        work = Workload(launcher, prompts, max_new_tokens, concurrency=concurrency, timeline=timeline)

        def status() -> dict[str, Any]:
            epoch, members = recorder.view
            return {"requests_done": work.done, "requests_total": work.total, "epoch": epoch,
                    "members": list(members), "phase": recorder.phase, "note": state["note"]}

        try:
            with LiveDisplay(timeline, status, enabled=live):
                state["note"] = "serving"
                work.start()
                if plan.schedule is not None:
                    problems = _run_schedule(launcher, recorder, work, timeline, state, plan.schedule, ranks, live)
                else:
                    _single_fault(launcher, recorder, work, timeline, state, plan.fail_point, fault=fault,
                                  fail_rank=fail_rank, rejoin=rejoin, live=live, timeout_s=timeout_s)
                if not work.wait(max(5.0, timeout_s - (time.monotonic() - t_start))):
                    state["note"] = "timed out"
                time.sleep(0.3)  # the last phase events on the bus
        finally:
            recorder.close()
        if plane.etcd is not None:
            head, newest = plane.committed_head(launcher.cluster), recorder.view[0]
            if head < newest:
                store_problems.append(f"the ranks installed epoch {newest} but etcd holds views up to "
                                      f"epoch {head} only: they committed them elsewhere")
    verdict = work.verify(oracle)
    changes = timeline.changes()
    json_path = timeline.to_json(out_dir / "timeline.json")
    png_path = timeline.plot(out_dir / "timeline.png")
    ok = verdict["lost"] == 0 and verdict["wrong"] == 0 and not problems and not store_problems
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
    for problem in problems:
        console.print(f"schedule: {problem}", markup=False)
    for problem in store_problems:
        console.print(f"store: {problem}", markup=False)
    console.print(f"timeline: {json_path}\nplot: {png_path}")
    console.print("[bold green]OK[/]" if ok else "[bold red]FAILED[/]")
    return DemoResult(ok, verdict, changes, json_path, png_path, time.monotonic() - t_start)


def _check_control_plane(store: str, hosts: int, ranks: int, profile: str = "auto") -> None:
    """``--store``, ``--hosts`` and ``--profile``, and what they need on this machine; raises
    :class:`DemoOptionError`."""
    from elasticep.config import PROFILES

    if profile not in PROFILES:
        raise _refuse("--profile", f"{profile!r}: one of {', '.join(PROFILES)}")
    if store not in ("tcpstore", "etcd"):
        raise _refuse("--store", f"{store!r}: one of tcpstore, etcd")
    if hosts < 0 or hosts == 1 or hosts > ranks:
        raise _refuse("--hosts", f"{hosts}: 0 (every rank on this host) or 2 to {ranks} (the ranks)")
    if store == "etcd":
        from elasticep.testing.etcd import etcd_available

        if hosts and hosts < 3:
            raise _refuse("--hosts", f"{hosts}: etcd needs 3 or more hosts (one member each, a majority "
                                     "outlives any one host)")
        reason = etcd_available()
        if reason is None:
            try:
                import aetcd  # noqa: F401
            except ImportError:
                reason = "the etcd extra is not installed (pip install 'elasticep[etcd]')"
        if reason is not None:
            raise _refuse("--store", f"etcd: {reason}")
    if hosts:
        from elasticep.testing.hosts import netns_available

        reason = netns_available()
        if reason is not None:
            raise _refuse("--hosts", reason)


def _single_fault(launcher, recorder: ClusterRecorder, work: Workload, timeline, state: dict[str, Any],
                  point: _FailPoint, *, fault: str, fail_rank: int, rejoin: bool, live: bool,
                  timeout_s: float) -> None:
    """The default scenario: one fault on ``fail_rank`` at ``point``, then (``rejoin``) a restart."""
    _wait_fail_point(work, point, timeout_s)
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


def _wait_fail_point(work: Workload, point: _FailPoint, timeout_s: float) -> None:
    if point.seconds is not None:
        time.sleep(point.seconds)
    else:
        work.wait_done(int(point.requests or 0), timeout_s)


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line and status 2, like every other refused option."""

    def error(self, message: str) -> None:  # type: ignore[override]
        from elasticep import metrics

        metrics.DEMO_OPTIONS_REFUSED.labels("usage").inc()
        self.exit(2, f"{self.prog}: {message} (see --help)\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _Parser(prog="elasticep demo", description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--fail-rank", type=int, default=None, help="the rank of the single --fault (default 2)")
    parser.add_argument("--fault", action="append", default=None, metavar="KIND | KIND:RANK@SECONDS",
                        help="one fault: kill, hang, mask or leave on --fail-rank at --fail-at (default kill); "
                             "or, repeated, a schedule: KIND:RANK@SECONDS with KIND one of "
                             f"{', '.join(FAULT_KINDS)} (e.g. --fault kill:1@2 --fault restart:1@4)")
    parser.add_argument("--fail-at", default=None,
                        help="when the single fault lands: '3s' after the stream starts, '60' requests done, "
                             "or '40%%' of them (default 40%%)")
    parser.add_argument("--schedule", default=None, metavar="FILE",
                        help="a fault schedule (TOML [[fault]] tables of at_s, kind, rank; or a .json list)")
    parser.add_argument("--slots-per-rank", type=int, default=None,
                        help="expert slots per rank (default: enough to lose any one rank)")
    parser.add_argument("--requests", type=int, default=160)
    parser.add_argument("--max-new-tokens", type=int, default=12)
    parser.add_argument("--no-rejoin", action="store_true", help="do not bring a replacement back")
    parser.add_argument("--out", default=None, help="directory for the model, timeline.json and timeline.png")
    parser.add_argument("--no-live", action="store_true", help="no live display (logs and CI)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--store", default="tcpstore", help="where views are committed: tcpstore (the launcher's) "
                        "or etcd (a 3-member etcd cluster started for the run)")
    parser.add_argument("--hosts", type=int, default=0, help="run the ranks on this many network-namespace hosts "
                        "(root only; with --store etcd, 3 or more, one etcd member each)")
    parser.add_argument("--profile", default="auto", help="the ranks' Config profile: local, cluster, or auto "
                        "(the default: cluster with --hosts, local without)")
    args = parser.parse_args(argv)
    try:
        schedule, fault = _schedule_from_args(args)
        # run_demo checks every option before it sets anything up
        result = run_demo(ranks=args.ranks, fault=fault, fail_rank=2 if args.fail_rank is None else args.fail_rank,
                          fail_at="40%" if args.fail_at is None else args.fail_at, requests=args.requests,
                          max_new_tokens=args.max_new_tokens, out=args.out, live=not args.no_live,
                          rejoin=not args.no_rejoin, seed=args.seed, schedule=schedule,
                          slots_per_rank=args.slots_per_rank, store=args.store, hosts=args.hosts,
                          profile=args.profile)
    except DemoOptionError as exc:
        print(f"elasticep demo: {exc}", file=sys.stderr)
        return 2
    print(f"demo finished in {result.seconds:.1f} s")
    return 0 if result.ok else 1


def _schedule_from_args(args: argparse.Namespace) -> tuple[list[ScheduledFault] | None, str]:
    """``(schedule or None, single fault kind)`` from ``--schedule`` and the ``--fault`` options."""
    specs = args.fault or []
    timed = [s for s in specs if ":" in s or "@" in s]
    if timed and len(timed) != len(specs):
        raise _refuse("--fault", "give either one KIND (with --fail-rank and --fail-at) or only "
                                 "KIND:RANK@SECONDS faults, not both")
    if not timed and len(specs) > 1:
        raise _refuse("--fault", f"{len(specs)} bare kinds {specs}: a schedule of several faults is written "
                                 "KIND:RANK@SECONDS (e.g. --fault kill:1@2 --fault kill:3@2)")
    if args.schedule is None and not timed:
        return None, specs[0].strip().lower() if specs else "kill"
    if args.schedule is not None and timed:
        raise _refuse("--schedule", "give the faults in a --schedule file or as --fault options, not both")
    for given, name in ((args.fail_rank, "--fail-rank"), (args.fail_at, "--fail-at")):
        if given is not None:
            raise _refuse(name, "applies to a single --fault KIND; in a schedule each fault has its own rank and time")
    if args.no_rejoin:
        raise _refuse("--no-rejoin", "applies to a single fault; a schedule brings a rank back only where it "
                                     "says restart")
    if args.schedule is not None:
        return load_schedule(args.schedule), "kill"
    return [parse_fault(s) for s in timed], "kill"


if __name__ == "__main__":
    sys.exit(main())
