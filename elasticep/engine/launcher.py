"""The launcher: hosts the store, starts and stops rank processes, injects faults, routes requests.

A :class:`Launcher` owns

* a ``torch.distributed.TCPStore`` it hosts itself, so the store outlives any rank; every rank's
  :class:`~elasticep.engine.protocol.RankSpec` is written there (and, once wired, bus keys);
* the rank processes. By default they fork from a :class:`~elasticep.engine.zygote.Zygote` that
  has already imported torch and transformers, so starting or restarting a rank takes
  milliseconds instead of the seconds a fresh interpreter spends importing;
  ``start_method="subprocess"`` runs ``python -m elasticep.engine.rank`` instead;
* exit reporting: the zygote (the ranks' parent) reaps each exit and tells the launcher at once
  (a reaper thread blocked on pidfds does it for subprocess ranks); each exit becomes an
  :class:`elasticep.events.ProcessExit` within milliseconds, for callbacks (:meth:`Launcher.on_exit`)
  and async iterators (:meth:`Launcher.exits`), and the router re-routes the dead rank's requests;
* the front :class:`~elasticep.engine.router.Router`.

Faults: :meth:`kill` (SIGKILL), :meth:`hang` (SIGSTOP) and :meth:`resume` (SIGCONT) act at once
from outside; :meth:`slow`, :meth:`mask` and the ``at_step`` forms act inside the rank at a step
boundary (a :class:`~elasticep.engine.protocol.FaultPlan` sent to it). Membership changes:
:meth:`restart` (a new incarnation of the same rank), :meth:`add_rank` (scale up),
:meth:`retire` (graceful scale down). :class:`elasticep.testing.FaultInjector` is the fluent
front end for tests.
"""

from __future__ import annotations

import asyncio
import datetime
import math
import multiprocessing.connection
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Sequence

from elasticep import metrics
from elasticep.engine import protocol as P
from elasticep.engine.router import RequestResult, Router
from elasticep.engine.zygote import Zygote
from elasticep.events import ProcessExit

__all__ = ["Launcher", "RankInfo", "RankNotRunning", "LauncherError", "prewarm"]

def prewarm() -> None:
    """Start this process's rank zygote now, in the background.

    Its imports (seconds of CPU) then overlap with the caller's own work, e.g. building the model
    and the oracle, instead of delaying the first :meth:`Launcher.start`. Returns at once.
    """
    Zygote.shared()


class LauncherError(RuntimeError):
    """A launcher operation could not complete (a rank did not start or stop in time)."""


class RankNotRunning(LauncherError):
    """The operation needs a running process for the rank and there is none."""


@dataclass(frozen=True)
class RankInfo:
    """A snapshot of one rank as the launcher knows it.

    ``state``: ``starting`` (process started, no hello yet), ``serving``, ``stopped`` (SIGSTOP),
    ``leaving`` (graceful leave under way), ``exited``. ``exit`` is set once the process is gone.
    """

    rank: int
    incarnation: int
    pid: int
    state: str
    started_at: float
    exit: ProcessExit | None = None


class _Proc:
    """One rank process (a zygote child or a subprocess) with a pollable exit sentinel.

    ``sentinel`` is a file descriptor that becomes readable when the process has exited and
    :meth:`returncode` knows its status: a pidfd for a subprocess, a pipe the zygote's exit
    report writes to for a zygote child.
    """

    def __init__(self, pid: int, kind: str, popen: subprocess.Popen | None = None):
        self.pid = pid
        self.kind = kind
        self._popen = popen
        self._code: int | None = None
        if kind == "subprocess":
            self.sentinel = os.pidfd_open(pid)
            self._w = -1
        else:
            self.sentinel, self._w = os.pipe()

    def exited(self, code: int) -> None:
        """The zygote reported this child's exit status."""
        self._code = code
        try:
            os.write(self._w, b"x")
        except OSError:
            pass

    def returncode(self) -> int | None:
        if self._popen is not None:
            return self._popen.poll()
        return self._code

    def release(self) -> None:
        for fd in (self.sentinel, self._w):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.sentinel = self._w = -1


@dataclass
class _Slot:
    rank: int
    incarnation: int
    proc: _Proc
    state: str
    started_at: float
    exit: ProcessExit | None = None

    def info(self) -> RankInfo:
        return RankInfo(self.rank, self.incarnation, self.proc.pid, self.state, self.started_at, self.exit)


class Launcher:
    """Starts and supervises the rank processes of one reference-engine instance.

    Args:
        model_path: directory written by :func:`~elasticep.engine.model.make_tiny_model`.
        num_ranks: ranks started by :meth:`start`.
        slots_per_rank: physical expert slots per rank; default ``ceil(E / num_ranks) + 1`` (one
            redundant slot per rank), ignored when ``placement`` is given.
        placement: the first :class:`~elasticep.eplb.placement.Placement` (one row per MoE
            layer); default :func:`~elasticep.engine.model.round_robin_placement`.
        backend: the ranks' EP backend name (``"local"``).
        start_method: ``"zygote"`` (default: forked from a warm :class:`~elasticep.engine.zygote.Zygote`,
            milliseconds) or ``"subprocess"`` (a fresh ``python -m elasticep.engine.rank``, seconds).
        attempt_timeout_s: the router re-routes an attempt after this long without an answer.
        max_inflight_per_rank: requests a rank works on at once.
        torch_threads: intra-op threads per rank (1: ranks share the host's cores).
        start_timeout_s: how long :meth:`start`, :meth:`restart` and :meth:`add_rank` wait for
            a rank's hello.
        host: loopback address for the store and the router.
        cluster: names this launch (store keys, shared-memory segments); random by default.
        rank_extra: ``(rank, incarnation) -> {key: value}`` merged into each rank's
            ``RankSpec.extra`` (bus endpoints, CURVE keys: whatever a subsystem hands out).
        max_ranks: ``backend="kernel"``: the most ranks the cluster may grow to (bus keys are
            generated for that many); default ``2 * num_ranks``.
        rank_config: ``backend="kernel"``: :class:`~elasticep.config.Config` overrides for the
            ranks' membership (e.g. ``{"heartbeat_interval_ms": 50.0}``).
        rank_profile: ``backend="kernel"``: the profile ``rank_config`` overrides, ``"local"``,
            ``"cluster"`` or ``"auto"`` (the default: ``"local"``, as this launcher starts every
            rank on its own host; a launcher that places ranks on several hosts resolves it to
            ``"cluster"``, see :meth:`~elasticep.config.Config.for_hosts`).
        kernel_timeout_us: ``backend="kernel"``: the hard bound on each kernel wait for a peer, us;
            a shorthand for ``rank_config={"kernel_timeout_us": ...}``. Default: the ranks'
            ``Config.kernel_timeout_us`` (1 s in
            ``Config.local()``, 2 s in ``Config.cluster()``, or ``$ELASTICEP_KERNEL_TIMEOUT_US``).

    With ``backend="kernel"`` the ranks serve with expert parallelism through the CPU kernel
    (:mod:`elasticep.engine.ep_rank`): the launcher hands out CURVE keys for the bus, publishes
    every rank exit on a control socket the ranks subscribe to (the certain signal), records the
    first placement in the store, and restarted or added ranks ask to join the membership.

    Use as a context manager, or call :meth:`start` and :meth:`close`. Methods are thread-safe.
    """

    def __init__(
        self,
        model_path: str | Path,
        num_ranks: int,
        *,
        slots_per_rank: int | None = None,
        placement: Any | None = None,
        backend: str = "local",
        start_method: str = "zygote",
        attempt_timeout_s: float | None = 30.0,
        max_inflight_per_rank: int = 4,
        torch_threads: int = 1,
        start_timeout_s: float = 60.0,
        host: str = "127.0.0.1",
        cluster: str | None = None,
        rank_extra: Callable[[int, int], dict[str, str]] | None = None,
        max_ranks: int | None = None,
        rank_config: dict[str, Any] | None = None,
        kernel_timeout_us: int | None = None,
        rank_profile: str = "auto",
    ):
        from elasticep.engine.model import load_config, moe_layer_ids, round_robin_placement

        if num_ranks < 1:
            raise ValueError("num_ranks must be >= 1")
        if start_method not in ("zygote", "subprocess"):
            raise ValueError(f"start_method must be 'zygote' or 'subprocess', not {start_method!r}")
        self.model_path = str(Path(model_path).resolve())
        config = load_config(self.model_path)
        experts = config.n_routed_experts
        if backend not in ("local", "kernel"):
            raise ValueError(f"backend must be 'local' or 'kernel', not {backend!r}")
        if placement is None:
            if slots_per_rank is None and backend == "kernel":
                # enough slots that the cluster survives the loss of any one rank
                slots_per_rank = math.ceil(experts / max(1, num_ranks - 1))
            spr = slots_per_rank or (math.ceil(experts / num_ranks) + 1)
            placement = round_robin_placement(len(moe_layer_ids(config)), experts, num_ranks, spr)
        elif placement.num_ranks != num_ranks:
            raise ValueError(f"placement has {placement.num_ranks} ranks, num_ranks={num_ranks}")
        self.placement = placement
        self.num_ranks = num_ranks
        self.backend = backend
        self.start_method = start_method
        self.torch_threads = torch_threads
        self.start_timeout_s = start_timeout_s
        self.host = host
        self.cluster = cluster or uuid.uuid4().hex[:12]
        self._rank_extra = rank_extra
        self._attempt_timeout_s = attempt_timeout_s
        self._max_inflight = max_inflight_per_rank
        self._lock = threading.RLock()
        self._slots: dict[int, _Slot] = {}
        self._next_incarnation: dict[int, int] = {}
        self._callbacks: list[Callable[[ProcessExit], None]] = []
        self._queues: list[tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = []
        self._exit_cond = threading.Condition(self._lock)
        self._callback_queue: queue.SimpleQueue = queue.SimpleQueue()
        self._spawn_lock = threading.Lock()
        self._retired: list[_Proc] = []
        self._exit_history: dict[tuple[int, int], ProcessExit] = {}
        self._callback_thread: threading.Thread | None = None
        self.store = None
        self.router: Router | None = None
        self._reaper: threading.Thread | None = None
        self._wake_r = self._wake_w = -1
        self._started = False
        self._closed = False
        self._zygote_client: Zygote | None = None
        self._unlisten: Callable[[], None] | None = None
        self._by_pid: dict[int, _Proc] = {}
        self.max_ranks = max_ranks or 2 * num_ranks
        self.rank_config = dict(rank_config or {})
        if kernel_timeout_us is not None:
            self.rank_config["kernel_timeout_us"] = int(kernel_timeout_us)
        from elasticep.config import Config, resolve_profile

        self.rank_profile = resolve_profile(rank_profile, 1)
        if backend == "kernel":
            # an impossible rank config fails here, not in every rank
            Config.named(self.rank_profile, **self.rank_config)
        self.keys = None
        self._control = None
        self._control_lock = threading.Lock()
        self.control_endpoint = ""
        self.control_public_key = ""
        """Z85 CURVE public key of the exit-report socket; each rank pins it (kernel backend)."""
        self.bus_incarnations: dict[tuple[int, int], int] = {}

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> "Launcher":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def store_address(self) -> tuple[str, int]:
        """``(host, port)`` of the hosted TCPStore."""
        if self.store is None:
            raise LauncherError("launcher not started")
        return self.host, self.store.port

    def start(self) -> "Launcher":
        """Host the store, start the router and reaper, start every rank and wait for each hello."""
        from torch.distributed import TCPStore

        if self._started:
            return self
        self._started = True
        self.store = TCPStore(
            self.host, 0, is_master=True, wait_for_workers=False, use_libuv=True,
            timeout=datetime.timedelta(seconds=30),
        )
        self.router = Router(
            self.host,
            attempt_timeout_s=self._attempt_timeout_s,
            max_inflight_per_rank=self._max_inflight,
            on_message=self._on_rank_message,
        )
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._reaper = threading.Thread(target=self._reap, name="elasticep-reaper", daemon=True)
        self._reaper.start()
        self._callback_thread = threading.Thread(
            target=self._run_callbacks, name="elasticep-exit-callbacks", daemon=True
        )
        self._callback_thread.start()
        if self.backend == "kernel":
            self._start_kernel_control()
        try:
            everyone = [True] * self.num_ranks
            started = [self._spawn(r, alive=everyone) for r in range(self.num_ranks)]
            for rank, inc in started:
                self._wait_serving(rank, inc)
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """SIGKILL every rank still running, wait for their exits, stop the router and the store."""
        if self._closed:
            return
        self._closed = True
        with self._lock:
            slots = [s for s in self._slots.values() if s.exit is None]
        for s in slots:
            _signal(s.proc.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10.0
        with self._exit_cond:
            while any(s.exit is None for s in slots) and time.monotonic() < deadline:
                self._exit_cond.wait(0.05)
        if self._reaper is not None:
            self._wake()
            self._reaper.join(timeout=5.0)
            os.close(self._wake_r)
            os.close(self._wake_w)
        with self._lock:
            for s in self._slots.values():
                s.proc.release()
            for proc in self._retired:
                proc.release()
        if self._unlisten is not None:
            self._unlisten()
        if self._callback_thread is not None:
            self._callback_queue.put(None)
            if self._callback_thread is not threading.current_thread():
                self._callback_thread.join(timeout=5.0)
        if self.router is not None:
            self.router.close()
        if self._control is not None:
            self._cleanup_kernel()
        self.store = None

    # ------------------------------------------------------------------ ranks

    def ranks(self) -> dict[int, RankInfo]:
        """A snapshot of every rank the launcher ever started (latest incarnation)."""
        with self._lock:
            return {r: s.info() for r, s in sorted(self._slots.items())}

    def alive_ranks(self) -> list[int]:
        """Ranks whose current process has not exited (stopped and masked ranks included)."""
        with self._lock:
            return sorted(r for r, s in self._slots.items() if s.exit is None)

    def alive_mask(self) -> list[bool]:
        """``[placement.num_ranks]`` bool: which ranks have a process that has not exited."""
        alive = set(self.alive_ranks())
        return [r in alive for r in range(self.placement.num_ranks)]

    def pid(self, rank: int) -> int:
        return self._running(rank).proc.pid

    def _running(self, rank: int) -> _Slot:
        with self._lock:
            s = self._slots.get(rank)
            if s is None or s.exit is not None:
                raise RankNotRunning(f"rank {rank} has no running process")
            return s

    def _spawn(
        self, rank: int, faults: P.FaultPlan | None = None, alive: list[bool] | None = None, join: bool = False
    ) -> tuple[int, int]:
        """Start a new incarnation of ``rank``; returns ``(rank, incarnation)`` (no wait).

        ``alive`` is the live mask the rank starts with (default: ranks with a running process,
        and this one)."""
        if self._closed:
            raise LauncherError("launcher is closed")
        # spawns are serialised by their own lock: forking waits on the zygote's reader thread,
        # which takes self._lock to report exits, so self._lock must not be held across a fork
        with self._spawn_lock:
            with self._lock:
                old = self._slots.get(rank)
                if old is not None and old.exit is None:
                    raise LauncherError(f"rank {rank} is still running (pid {old.proc.pid})")
                inc = self._next_incarnation.get(rank, 0)
                self._next_incarnation[rank] = inc + 1
                spec = P.RankSpec(
                    cluster=self.cluster,
                    rank=rank,
                    incarnation=inc,
                    model_path=self.model_path,
                    placement=self.placement.to_dict(),
                    alive=alive if alive is not None else self._alive_for_spec(rank),
                    frontend=self.router.endpoint,
                    backend=self.backend,
                    torch_threads=self.torch_threads,
                    faults=faults or P.FaultPlan(),
                    extra=self._extra(rank, inc, join),
                )
            self.store.set(P.spec_key(self.cluster, rank, inc), P.encode(spec))
            proc = self._start_process(rank, inc)
            with self._lock:
                if old is not None:
                    # its sentinel may still sit in the reaper's wait list: close it at close()
                    self._retired.append(old.proc)
                self._slots[rank] = _Slot(rank, inc, proc, "starting", time.time())
        self._wake()
        return rank, inc

    # ------------------------------------------------------------------ kernel backend

    def _extra(self, rank: int, inc: int, join: bool) -> dict[str, str]:
        extra = dict(self._rank_extra(rank, inc)) if self._rank_extra is not None else {}
        if self.backend != "kernel":
            return extra
        import json

        if rank >= self.max_ranks:
            raise LauncherError(f"rank {rank} is past max_ranks={self.max_ranks}")
        bus_inc = time.time_ns()
        self.bus_incarnations[(rank, inc)] = bus_inc
        host, port = self.store_address
        extra.update(
            bus_keys=self.keys.for_rank(rank).to_json(),
            bus_incarnation=str(bus_inc),
            join="1" if join else "0",
            control=self.control_endpoint,
            control_key=self.control_public_key,
            store=f"{host}:{port}",
            config=json.dumps(self.rank_config),
            profile=self.rank_profile,
        )
        return extra

    def _start_kernel_control(self) -> None:
        """Bus keys, the exit-report socket, and the first placement in the store (epoch 1)."""
        import json

        import zmq

        from elasticep.bus import ClusterKeys
        from elasticep.engine.ep_rank import placement_key

        self.keys = ClusterKeys.generate(self.max_ranks)
        sock = zmq.Context.instance().socket(zmq.PUB)
        sock.setsockopt(zmq.LINGER, 0)
        # A process exit evicts at once, so who may say one matters: the socket is a CURVE server
        # whose key only this launcher holds, and each rank pins that key when it connects
        # (elasticep.engine.ep_rank.exit_report_socket). A forged exit report cannot get in.
        public, secret = zmq.curve_keypair()
        sock.curve_server = True
        sock.curve_publickey = public
        sock.curve_secretkey = secret
        self.control_public_key = public.decode()
        port = sock.bind_to_random_port(f"tcp://{self.host}")
        self._control = sock
        self.control_endpoint = f"tcp://{self.host}:{port}"
        self.store.set(placement_key(self.cluster, 1), json.dumps(self.placement.to_dict()))
        self.store.add(f"elasticep/{self.cluster}/placement_latest", 1)

    def _publish_exit(self, ev: ProcessExit) -> None:
        """Tell every rank that a process exited (the certain signal; evicts at once)."""
        if self._control is None:
            return
        import msgspec

        bus_inc = self.bus_incarnations.get((ev.rank, ev.incarnation), 0)
        frame = msgspec.msgpack.encode(msgspec.structs.replace(ev, incarnation=bus_inc))
        with self._control_lock:
            try:
                self._control.send(frame)
            except Exception as exc:  # a closed socket at shutdown
                print(f"elasticep launcher: exit report not sent: {exc!r}", file=sys.stderr)

    def _cleanup_kernel(self) -> None:
        """Close the exit socket; remove shared-memory segments that killed ranks left."""
        from elasticep.engine.ep_rank import work_flags_path
        from elasticep.kernel.buffer import unlink_segment

        with self._control_lock:
            self._control.close(0)
            self._control = None
        try:
            latest = int(self.store.add(f"elasticep/{self.cluster}/placement_latest", 0)) if self.store else 64
        except Exception:
            latest = 64
        for epoch in range(0, latest + 64):
            unlink_segment(self.cluster, epoch)
        try:
            os.unlink(work_flags_path(self.cluster))
        except FileNotFoundError:
            pass

    def _alive_for_spec(self, starting: int) -> list[bool]:
        alive = set(r for r, s in self._slots.items() if s.exit is None) | {starting}
        return [r in alive for r in range(self.placement.num_ranks)]

    def _start_process(self, rank: int, inc: int) -> _Proc:
        host, port = self.store_address
        args = [host, port, self.cluster, rank, inc]
        if self.start_method == "subprocess":
            cmd = [
                sys.executable, "-m", "elasticep.engine.rank",
                "--store", f"{host}:{port}", "--cluster", self.cluster,
                "--rank", str(rank), "--incarnation", str(inc),
            ]
            popen = subprocess.Popen(cmd, close_fds=True)
            return _Proc(popen.pid, "subprocess", popen)
        zygote = self._zygote()
        pid = zygote.fork("elasticep.engine.rank:run_rank", args)
        proc = _Proc(pid, "zygote")
        with self._lock:
            self._by_pid[pid] = proc
        code = zygote.exit_code(pid)
        if code is not None:  # it died before we registered it
            proc.exited(code)
        return proc

    def _zygote(self) -> Zygote:
        with self._lock:
            if self._zygote_client is None:
                self._zygote_client = Zygote.shared()
                self._unlisten = self._zygote_client.add_exit_listener(self._on_zygote_exit)
            return self._zygote_client

    def _on_zygote_exit(self, pid: int, code: int) -> None:
        """Zygote reader thread: report the exit straight away (no hop through the reaper)."""
        with self._lock:
            proc = self._by_pid.pop(pid, None)
            slot = next((s for s in self._slots.values() if s.proc is proc), None) if proc else None
        if proc is None:
            return
        proc.exited(code)  # the reaper's sentinel too, for a child that died before its slot existed
        if slot is not None:
            self._report_exit(slot, code)

    def _wait_serving(self, rank: int, inc: int, timeout_s: float | None = None) -> None:
        """Wait for ``(rank, inc)``'s hello; fail at once if its process exits first."""
        timeout_s = self.start_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        while not self.router.wait_hello(rank, inc, 0.05):
            with self._lock:
                s = self._slots.get(rank)
                gone = s is None or s.incarnation != inc or s.exit is not None
                ev = s.exit if s is not None else None
            if gone:
                raise LauncherError(f"rank {rank} incarnation {inc} exited before serving: {ev}")
            if time.monotonic() > deadline:
                raise LauncherError(f"rank {rank} incarnation {inc} did not say hello within {timeout_s} s")

    def _on_rank_message(self, msg: P.FromRank) -> None:
        """Router-thread callback: keep rank states in step with what ranks say."""
        with self._lock:
            s = self._slots.get(getattr(msg, "rank", -1))
            if s is None or s.incarnation != getattr(msg, "incarnation", -2) or s.exit is not None:
                return
            if isinstance(msg, P.Hello) and s.state == "starting":
                s.state = "serving"
            elif isinstance(msg, P.Leaving):
                s.state = "leaving"

    # ------------------------------------------------------------------ faults, from outside

    def kill(self, rank: int, *, wait: bool = True) -> ProcessExit | None:
        """SIGKILL ``rank``'s process; with ``wait``, return its :class:`ProcessExit`."""
        s = self._running(rank)
        _signal(s.proc.pid, signal.SIGKILL)
        return self.wait_exit(rank, s.incarnation) if wait else None

    def hang(self, rank: int) -> None:
        """SIGSTOP ``rank``: the process stays, its sockets stay open, it answers nothing."""
        s = self._running(rank)
        _signal(s.proc.pid, signal.SIGSTOP)
        with self._lock:
            if s.exit is None:
                s.state = "stopped"

    def resume(self, rank: int) -> None:
        """SIGCONT ``rank`` after :meth:`hang` (or an ``at_step`` hang)."""
        s = self._running(rank)
        _signal(s.proc.pid, signal.SIGCONT)
        with self._lock:
            if s.exit is None and s.state == "stopped":
                s.state = "serving"

    def set_faults(self, rank: int, plan: P.FaultPlan, *, clear: bool = False) -> None:
        """Merge ``plan`` into ``rank``'s fault plan (``clear``: reset it first, and unmask)."""
        self._running(rank)
        self.router.send(rank, P.SetFaults(plan=plan, clear=clear))

    def slow(self, rank: int, ms_per_step: float, *, from_step: int = 0) -> None:
        """Make ``rank`` sleep ``ms_per_step`` before each step from ``from_step`` on (0 ms undoes)."""
        self.set_faults(rank, P.FaultPlan(slow_ms=float(ms_per_step), slow_from_step=from_step))

    def mask(self, rank: int, *, at_step: int = 0) -> None:
        """From step ``at_step`` (0: the next step), ``rank`` takes no further part but stays up."""
        self.set_faults(rank, P.FaultPlan(mask_at_step=at_step))

    def unmask(self, rank: int) -> None:
        """Clear ``rank``'s fault plan; a masked rank takes part again."""
        self.set_faults(rank, P.FaultPlan(), clear=True)

    # ------------------------------------------------------------------ membership changes

    def restart(self, rank: int, *, wait: bool = True, faults: P.FaultPlan | None = None) -> RankInfo:
        """Start a new incarnation of ``rank`` (SIGKILLing the old one if it still runs).

        The new process rejoins with the launcher's current placement; its requests channel is
        a new peer (``rank:incarnation``), so nothing from the old incarnation is mistaken for it.
        """
        with self._lock:
            s = self._slots.get(rank)
        if s is not None and s.exit is None:
            _signal(s.proc.pid, signal.SIGKILL)
            self.wait_exit(rank, s.incarnation)
        rank, inc = self._spawn(rank, faults, join=self.backend == "kernel")
        if wait:
            self._wait_serving(rank, inc)
        return self.ranks()[rank]

    def add_rank(self, *, wait: bool = True, faults: P.FaultPlan | None = None) -> int:
        """Scale up by one rank; returns its id. The placement grows by ``slots_per_rank`` empty
        slots (filled when the reconfiguration pipeline plans for the new rank)."""
        with self._lock:
            rank = self.placement.num_ranks
            self.placement = self.placement.with_ranks(rank + 1)
            self.num_ranks = self.placement.num_ranks
        _, inc = self._spawn(rank, faults, join=self.backend == "kernel")
        if wait:
            self._wait_serving(rank, inc)
        return rank

    def retire(self, rank: int, *, wait: bool = True, timeout_s: float = 30.0) -> ProcessExit | None:
        """Scale down gracefully: ``rank`` takes no new requests, finishes its own, exits 0."""
        s = self._running(rank)
        self.router.retire(rank, "retired by launcher")
        with self._lock:
            if s.exit is None:
                s.state = "leaving"
        return self.wait_exit(rank, s.incarnation, timeout_s=timeout_s) if wait else None

    # ------------------------------------------------------------------ exits

    def on_exit(self, callback: Callable[[ProcessExit], None]) -> Callable[[], None]:
        """Call ``callback(ProcessExit)`` for every rank exit; returns a function that unsubscribes.

        Callbacks run on the launcher's callback thread, one exit at a time (never concurrently),
        in the order exits were seen. They may call the launcher (e.g. :meth:`restart`); while one
        runs, later exits wait for it. An exception in one is printed and does not stop the others.
        """
        with self._lock:
            self._callbacks.append(callback)

        def unsubscribe() -> None:
            with self._lock:
                if callback in self._callbacks:
                    self._callbacks.remove(callback)

        return unsubscribe

    async def exits(self, maxsize: int = 1024) -> AsyncIterator[ProcessExit]:
        """Async iterator of :class:`ProcessExit` events from the moment of the call.

        The buffer holds ``maxsize`` events; past it the oldest is dropped (exits are rare).
        """
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue(maxsize)
        entry = (loop, q)
        with self._lock:
            self._queues.append(entry)
        try:
            while True:
                yield await q.get()
        finally:
            with self._lock:
                if entry in self._queues:
                    self._queues.remove(entry)

    def wait_exit(self, rank: int, incarnation: int | None = None, *, timeout_s: float = 10.0) -> ProcessExit:
        """Block until the process of ``rank`` (that ``incarnation``, default the current one)
        has exited and been reported; returns its :class:`ProcessExit`."""
        deadline = time.monotonic() + timeout_s
        with self._exit_cond:
            while True:
                s = self._slots.get(rank)
                if s is None:
                    raise RankNotRunning(f"rank {rank} was never started")
                if incarnation is None:
                    incarnation = s.incarnation
                past = self._exit_history.get((rank, incarnation))
                if past is not None:  # reported, and possibly replaced by a restart since
                    return past
                if s.incarnation != incarnation:
                    raise LauncherError(f"rank {rank} incarnation {incarnation} was never started")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise LauncherError(f"rank {rank} did not exit within {timeout_s} s")
                self._exit_cond.wait(left)

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):
            pass

    def _reap(self) -> None:
        """Reaper thread: block on every running rank's sentinel; report each exit at once."""
        while True:
            with self._lock:
                live = {s.proc.sentinel: s for s in self._slots.values() if s.exit is None}
                done = self._closed and not live
            if done:
                return
            ready = multiprocessing.connection.wait([self._wake_r, *live], timeout=1.0)
            for fd in ready:
                if fd == self._wake_r:
                    try:
                        os.read(self._wake_r, 4096)
                    except BlockingIOError:
                        pass
                    continue
                slot = live[fd]
                code = slot.proc.returncode()
                if code is None:
                    continue
                self._report_exit(slot, code)

    def _report_exit(self, slot: _Slot, code: int) -> None:
        ev = ProcessExit(
            rank=slot.rank,
            pid=slot.proc.pid,
            exitcode=code if code >= 0 else None,
            signal=-code if code < 0 else None,
            incarnation=slot.incarnation,
        )
        kind = "signal" if code < 0 else ("clean" if code == 0 else "error")
        with self._exit_cond:
            if slot.exit is not None:  # already reported by the other thread
                return
            slot.exit = ev
            self._exit_history[(slot.rank, slot.incarnation)] = ev
            slot.state = "exited"
            self._exit_cond.notify_all()
            callbacks = list(self._callbacks)
            queues = list(self._queues)
        metrics.ENGINE_PROCESS_EXITS.labels(kind).inc()
        self._publish_exit(ev)
        self.router.rank_exited(slot.rank, slot.incarnation)
        for loop, q in queues:
            try:
                loop.call_soon_threadsafe(_put_dropping_oldest, q, ev)
            except RuntimeError:
                pass  # that event loop is closed
        if callbacks:
            self._callback_queue.put((ev, callbacks))

    def _run_callbacks(self) -> None:
        """Callback thread: hands each exit to the callbacks, one exit at a time, in order."""
        while True:
            item = self._callback_queue.get()
            if item is None:
                return
            ev, callbacks = item
            for cb in callbacks:
                try:
                    cb(ev)
                except Exception as exc:  # one bad callback must not silence the others
                    print(f"elasticep launcher: exit callback {cb!r} raised {exc!r}", file=sys.stderr)

    # ------------------------------------------------------------------ requests

    def submit(self, prompt: Sequence[int], max_new_tokens: int):
        """Send one greedy request through the router; returns a ``concurrent.futures.Future``
        of :class:`~elasticep.engine.router.RequestResult` (``asyncio.wrap_future`` for async)."""
        if self.router is None:
            raise LauncherError("launcher not started")
        return self.router.submit(prompt, max_new_tokens)

    def generate(
        self, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, timeout_s: float = 60.0
    ) -> list[RequestResult]:
        """Submit every prompt and wait for all results (in prompt order)."""
        futures = [self.submit(p, max_new_tokens) for p in prompts]
        deadline = time.monotonic() + timeout_s
        return [f.result(timeout=max(0.0, deadline - time.monotonic())) for f in futures]


def _put_dropping_oldest(q: asyncio.Queue, item: Any) -> None:
    if q.full():
        q.get_nowait()
    q.put_nowait(item)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass  # already gone; its exit is (or will be) reported by the reaper
