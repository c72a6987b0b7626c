"""``LocalCluster``: a launcher for membership-only rank processes on one host.

It hosts the ``TCPStore`` (so the store outlives every rank), generates the bus keys, starts one
:mod:`elasticep.membership.worker` process per rank (forked from a forkserver that has torch
imported already), reads their JSON reports over a socket pair, and plays the
launcher: when a child exits it tells every other child over its channel (``exit RANK SIG PID``),
which the child feeds to its membership core as a certain :class:`~elasticep.events.ProcessExit`.
Used by the multi-process tests and ``elasticep bench detect``.

Example::

    with LocalCluster(4) as cluster:
        cluster.wait_ready(timeout=60)
        cluster.kill(2)                               # SIGKILL
        cluster.wait_view(lambda v: 2 not in v["members"], timeout=5)
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from elasticep.testing.fixtures import free_port


_PRELOAD = ["torch.distributed", "elasticep.bus", "elasticep.membership", "elasticep.membership.worker"]
_context = None


def _forkserver():
    """A forkserver context with torch preloaded: a rank process then starts in milliseconds
    instead of importing torch again (seconds on a loaded two-core machine)."""
    global _context
    if _context is None:
        import multiprocessing

        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(_PRELOAD)
        _context = ctx
    return _context


def _child_main(argv: list[str], env: dict[str, str], channel: socket.socket) -> None:
    """Entry of a rank process: its stdin and stdout become ``channel``, then the worker runs."""
    os.environ.update(env)
    os.environ.pop("PYTHONASYNCIODEBUG", None)  # ranks run as in production
    fd = channel.fileno()
    os.dup2(fd, 0)
    os.dup2(fd, 1)
    channel.close()
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    from elasticep.membership.worker import main

    main(argv)


class _Child:
    """A rank process started from the forkserver, with a ``subprocess.Popen``-like surface."""

    def __init__(self, process, channel: socket.socket) -> None:
        self._process = process
        self.channel = channel
        self.pid: int = process.pid
        self.lines = channel.makefile("r", encoding="utf-8", errors="replace")
        self._closed = False
        self._exitcode: int | None = None
        self._close_lock = threading.Lock()

    def poll(self) -> int | None:
        if self._closed:
            return self._exitcode
        return self._process.exitcode

    def kill(self) -> None:
        if not self._closed:
            self._process.kill()

    def wait(self, timeout: float | None = None) -> int:
        with self._close_lock:
            if self._closed:
                assert self._exitcode is not None
                return self._exitcode
        self._process.join(timeout)
        code = self.poll()
        if code is None:
            raise subprocess.TimeoutExpired("rank process", timeout or 0.0)
        return code

    def write(self, line: str) -> None:
        self.channel.sendall(line.encode())

    def close_input(self) -> None:
        try:
            self.channel.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self) -> None:
        """Release the channel and the process handle (once the process has exited)."""
        with self._close_lock:
            code = self._process.exitcode if not self._closed else self._exitcode
            if self._closed or code is None:
                return
            self._exitcode = code
            self._closed = True
            self.lines.close()
            self.channel.close()
            self._process.close()


@dataclass
class RankProcess:
    rank: int
    proc: _Child
    incarnation: int
    reports: list[dict] = field(default_factory=list)
    stopped: bool = False
    reader: threading.Thread | None = None

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None


class LocalCluster:
    """``world`` membership worker processes on loopback around a launcher-hosted ``TCPStore``.

    Args:
        world: ranks of the bootstrap view.
        config: ``FIELD=VALUE`` overrides passed to every worker (``Config.local`` profile).
        report_exits: tell the survivors when a child exits (the launcher's certain signal).
        log_level: the workers' stderr log level.
    """

    def __init__(self, world: int, *, config: dict[str, object] | None = None, report_exits: bool = True,
                 log_level: str = "WARNING") -> None:
        from torch.distributed import TCPStore

        from elasticep.bus import ClusterKeys

        self.world = world
        self.config = dict(config or {})
        self.report_exits = report_exits
        self.log_level = log_level
        self.port = free_port()
        self.store = TCPStore("127.0.0.1", self.port, is_master=True, wait_for_workers=False, use_libuv=True)
        self.keys = ClusterKeys.generate(world)
        self.ranks: dict[int, RankProcess] = {}
        self.exits: list[tuple[int, int, int]] = []  # (rank, returncode, wall_ns)
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._incarnations: dict[int, int] = {}
        self._all: list[RankProcess] = []
        self._closed = False
        for rank in range(world):
            self.spawn(rank)

    # --- processes --------------------------------------------------------------------------

    def spawn(self, rank: int, *, join: bool = False) -> RankProcess:
        """Start a process for ``rank`` (``join=True`` for a restart or a new rank)."""
        incarnation = self._incarnations.get(rank, 0) + 1
        self._incarnations[rank] = incarnation
        argv = self._argv(rank)
        if join:
            argv.append("--join")
        for name, value in self.config.items():
            argv += ["--config", f"{name}={value}"]
        env = {"ELASTICEP_BUS_KEYS": self.keys.for_rank(rank).to_json(), "PYTHONUNBUFFERED": "1"}
        ours, theirs = socket.socketpair()
        process = self._process(rank, argv, env, theirs)
        process.start()
        theirs.close()
        rp = RankProcess(rank, _Child(process, ours), incarnation)
        with self._lock:
            self.ranks[rank] = rp
            self._all.append(rp)
        rp.reader = threading.Thread(target=self._read, args=(rp,), daemon=True, name=f"rank{rank}-reader")
        rp.reader.start()
        return rp

    def _argv(self, rank: int) -> list[str]:
        """The worker's command line for ``rank`` (before ``--join`` and the config overrides)."""
        return ["--rank", str(rank), "--world", str(self.world), "--store", f"127.0.0.1:{self.port}",
                "--incarnation", str(time.time_ns()), "--log-level", self.log_level]

    def _process(self, rank: int, argv: list[str], env: dict[str, str], sock: socket.socket):
        """The (not yet started) worker process of ``rank``, reporting on ``sock``."""
        return _forkserver().Process(target=_child_main, args=(argv, env, sock), name=f"elasticep-rank{rank}")

    def _read(self, rp: RankProcess) -> None:
        try:
            for line in rp.proc.lines:
                try:
                    report = json.loads(line)
                except json.JSONDecodeError:
                    continue
                with self._cond:
                    rp.reports.append(report)
                    self._cond.notify_all()
        except (ConnectionResetError, ValueError, OSError):
            # A child killed with commands still unread in its buffer resets the channel
            # instead of closing it: the same news, the child is gone.
            pass
        # End of file on the control channel: the child's last descriptor closed, which happens
        # only when its process is gone (it never closes the channel itself). Report at once;
        # the exit status, which comes through the forkserver, follows.
        wall_ns = time.time_ns()
        with self._cond:
            survivors = sorted((p for p in self.ranks.values() if p is not rp and p.alive), key=lambda p: p.rank)
        if self.report_exits and not self._closed and self.ranks.get(rp.rank) is rp:
            for other in survivors:
                self.send(other.rank, f"exit {rp.rank} 0 {rp.proc.pid}")
        code = rp.proc.wait()
        with self._cond:
            self.exits.append((rp.rank, code, wall_ns))
            self._cond.notify_all()

    def send(self, rank: int, line: str) -> None:
        """Write one command line to ``rank``'s stdin (ignored if it is gone)."""
        rp = self.ranks.get(rank)
        if rp is None:
            return
        try:
            rp.proc.write(line + "\n")
        except OSError:
            pass

    def kill(self, rank: int) -> int:
        """SIGKILL ``rank``'s process; returns the wall-clock ns just before the signal."""
        t = time.time_ns()
        os.kill(self.ranks[rank].proc.pid, signal.SIGKILL)
        return t

    def stop(self, rank: int) -> int:
        """SIGSTOP (hang) ``rank``; returns the wall-clock ns just before the signal."""
        t = time.time_ns()
        os.kill(self.ranks[rank].proc.pid, signal.SIGSTOP)
        self.ranks[rank].stopped = True
        return t

    def cont(self, rank: int) -> None:
        os.kill(self.ranks[rank].proc.pid, signal.SIGCONT)
        self.ranks[rank].stopped = False

    def restart(self, rank: int) -> RankProcess:
        """Kill ``rank`` if it still runs, wait for it, and start a joining process for it."""
        old = self.ranks[rank]
        if old.alive:
            if old.stopped:
                self.cont(rank)
            old.proc.kill()
        old.proc.wait(timeout=10)
        old.proc.close_input()
        if old.reader is not None:
            old.reader.join(timeout=2.0)
        return self.spawn(rank, join=True)

    # --- reports ----------------------------------------------------------------------------

    def installs(self, rank: int) -> list[dict]:
        with self._lock:
            return [r for r in self.ranks[rank].reports if r["kind"] == "install"]

    def live(self) -> list[int]:
        """Ranks whose process runs, is not stopped and has not fenced or left."""
        with self._lock:
            return sorted(r for r, p in self.ranks.items()
                          if p.alive and not p.stopped and not any(x["kind"] in ("fenced", "left") for x in p.reports))

    def wait(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
                self._cond.wait(min(left, 0.1))

    def _unlocked_latest(self, rank: int) -> dict | None:
        installs = [r for r in self.ranks[rank].reports if r["kind"] == "install"]
        return installs[-1] if installs else None

    def wait_ready(self, timeout: float, ranks: list[int] | None = None) -> None:
        """Wait until ``ranks`` (default: all) reported ready."""
        wanted = list(self.ranks) if ranks is None else ranks
        self.wait(lambda: all(any(x["kind"] == "ready" for x in self.ranks[r].reports) for r in wanted),
                  timeout, f"ranks {wanted} to be ready")

    def wait_view(self, predicate: Callable[[dict], bool], timeout: float, ranks: list[int] | None = None) -> dict[int, dict]:
        """Wait until every rank in ``ranks`` (default: the live ones) installed a view matching
        ``predicate``; returns each rank's first matching install report."""
        def matched() -> dict[int, dict] | None:
            wanted = ranks if ranks is not None else [
                r for r, p in self.ranks.items()
                if p.alive and not p.stopped and not any(x["kind"] in ("fenced", "left") for x in p.reports)
            ]
            found: dict[int, dict] = {}
            for r in wanted:
                hit = next((x for x in self.ranks[r].reports if x["kind"] == "install" and predicate(x)), None)
                if hit is None:
                    return None
                found[r] = hit
            return found
        try:
            self.wait(lambda: matched() is not None, timeout, "a view")
        except TimeoutError as exc:
            with self._lock:
                latest = {r: self._unlocked_latest(r) for r in (ranks or self.ranks)}
            raise TimeoutError(f"{exc}; latest installs: {latest}") from None
        with self._lock:
            result = matched()
        assert result is not None
        return result

    def wait_report(self, rank: int, kind: str, timeout: float) -> dict:
        self.wait(lambda: any(x["kind"] == kind for x in self.ranks[rank].reports), timeout, f"rank {rank} {kind}")
        with self._lock:
            return next(x for x in self.ranks[rank].reports if x["kind"] == kind)

    def sequences(self, ranks: list[int]) -> dict[int, list[tuple[int, tuple[int, ...]]]]:
        """Each rank's installed ``(epoch, members)`` sequence."""
        with self._lock:
            return {r: [(x["epoch"], tuple(x["members"])) for x in self.ranks[r].reports if x["kind"] == "install"]
                    for r in ranks}

    # --- teardown ---------------------------------------------------------------------------

    def close(self) -> None:
        """Stop every process (SIGCONT, then end of stdin, then SIGKILL after 2 s) and the store."""
        self._closed = True
        procs = [p for p in self.ranks.values()]
        for p in procs:
            if p.alive and p.stopped:
                try:
                    os.kill(p.proc.pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass
            p.proc.close_input()
        deadline = time.monotonic() + 2.0
        for p in procs:
            try:
                p.proc.wait(timeout=max(0.05, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.proc.kill()
                p.proc.wait()
        # The reader threads finish at end of file; then the channels can go.
        for p in self._all:
            if p.reader is not None:
                p.reader.join(timeout=5.0)
            p.proc.close()
        del self.store

    def __enter__(self) -> "LocalCluster":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
