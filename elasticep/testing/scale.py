"""A simulated cluster for scale: N pure membership cores on a virtual clock (1024 to 4096 ranks).

No sockets, no threads, no sleeps. Each rank is a :class:`~elasticep.membership.MembershipCore`;
a frame a rank publishes reaches the ranks whose topology subscribes to it
(:meth:`MembershipCore.hears`: everyone with ``"all"``, the ring neighbours with ``"ring"``)
after a modeled one-way delay (``delay_ms`` plus uniform ``jitter_ms``), each copy lost with
probability ``loss``; view-store operations take ``store_ms``, and with ``pushes`` (the default,
as the TCPStore and etcd stores do) a commit reaches every rank's wait ``store_ms`` after it.
Every random draw comes from one ``random.Random(seed)``. Ticks follow
:meth:`MembershipCore.tick_interval`, phases spread.

Example::

    sim = SimCluster(256, Config.local(detection_topology="ring"), seed=1)
    sim.run_for(0.5)
    t0 = sim.now
    sim.hang(17)
    sim.run_until(lambda: sim.all_exclude(17), limit_s=3.0)
    print(max(sim.installed_without(17).values()) - t0)
"""

from __future__ import annotations

import heapq
import itertools
import random
from typing import Callable

from elasticep.bus.zmq_transport import HEADER_BYTES
from elasticep.config import Config
from elasticep.events import SCHEMA_VERSION, Codec, Envelope, ProcessExit
from elasticep.membership.core import (
    CasDone,
    Committed,
    CompareAndSet,
    Install,
    MembershipCore,
    Publish,
    ReadView,
    Tick,
    ViewRead,
)
from elasticep.membership.view import View


class SimCluster:
    """``n`` ranks bootstrapping together at virtual time 0 (every one starts *joining*)."""

    def __init__(self, n: int, config: Config, *, seed: int = 0, delay_ms: float = 0.1, jitter_ms: float = 0.1,
                 loss: float = 0.0, store_ms: float = 0.5, pushes: bool = True) -> None:
        self.config = config
        self.now = 0.0
        self.rng = random.Random(seed)
        self.delay_s, self.jitter_s, self.loss, self.store_s = delay_ms / 1e3, jitter_ms / 1e3, loss, store_ms / 1e3
        self.store: dict[int, View] = {}
        self._head = 0  # the store's newest epoch
        self._candidates: dict[tuple[int, int, int], tuple[int, ...]] = {}
        self.cores = {r: MembershipCore(r, config, initial_members=tuple(range(n))) for r in range(n)}
        self.pushes = pushes
        for core in self.cores.values():
            core.store_pushes = pushes
        self.state = {r: "up" for r in range(n)}
        self.seq = {r: itertools.count(1) for r in range(n)}
        self.installs: dict[int, list[tuple[float, View]]] = {r: [] for r in range(n)}
        self.delivered = 0
        self.delivered_bytes = 0
        self._size: dict[type, int] = {}
        self._codec = Codec()
        self._heap: list[tuple[float, int, int, object]] = []
        self._order = itertools.count()
        for r, core in self.cores.items():
            self._push(r * 1e-5, r, "start")

    # --- plumbing ---------------------------------------------------------------------------

    def _push(self, at: float, rank: int, item: object) -> None:
        heapq.heappush(self._heap, (at, next(self._order), rank, item))

    def _subscribers(self, src: int) -> list[int]:
        core = self.cores[src]
        if core.topology.everyone:
            return [r for r in self.cores if r != src]
        # The ranks that subscribe to src: its ring neighbours in its own view and in the
        # store's head view, confirmed by each receiver's own predicate (its own view).
        head = self.store.get(self._head)
        key = (src, core.view.epoch if core.view is not None else 0, self._head)
        cand = self._candidates.get(key)
        if cand is None:
            found: set[int] = set()
            for view in (core.view, head):
                if view is not None:
                    found.update(core.topology.neighbors(view.members, src))
            cand = self._candidates[key] = tuple(r for r in found if r in self.cores)
            if len(self._candidates) > 4 * len(self.cores):
                self._candidates.clear()
                self._candidates[key] = cand
        return [r for r in cand if self.cores[r].hears(src)]

    def _size_of(self, env: Envelope) -> int:
        t = type(env.event)
        if t not in self._size:
            self._size[t] = len(self._codec.encode(env)) + HEADER_BYTES  # + the transport's framing
        return self._size[t]

    def _apply(self, rank: int, actions: list) -> None:
        core = self.cores[rank]
        for a in actions:
            if isinstance(a, Publish):
                env = Envelope(SCHEMA_VERSION, rank, core.view.epoch if core.view else 0, next(self.seq[rank]),
                               0, int(self.now * 1e9), a.event)
                for dst in self._subscribers(rank):
                    if self.loss and self.rng.random() < self.loss:
                        continue
                    self._push(self.now + self.delay_s + self.rng.random() * self.jitter_s, dst, env)
            elif isinstance(a, (CompareAndSet, ReadView)):
                self._push(self.now + self.store_s, rank, a)
            elif isinstance(a, Install):
                self.installs[rank].append((self.now, a.view))

    def _handle(self, rank: int, item: object) -> None:
        if self.state[rank] != "up":
            return
        core = self.cores[rank]
        if item == "start":
            self._apply(rank, core.start(self.now))
            self._push(self.now + core.tick_interval(), rank, "tick")
        elif item == "tick":
            self._apply(rank, core.step(Tick(), self.now))
            if not core.stopped:
                self._push(self.now + core.tick_interval(), rank, "tick")
        elif isinstance(item, CompareAndSet):
            new = item.view.epoch not in self.store
            committed = self.store.setdefault(item.view.epoch, item.view)
            self._head = max(self._head, item.view.epoch)
            self._push(self.now + self.store_s, rank, CasDone(item.view, committed))
            if new and self.pushes:  # the store's push to every rank's wait on that epoch
                for dst in self.cores:
                    if dst != rank and self.state[dst] == "up":
                        self._push(self.now + self.store_s, dst, Committed(item.view.epoch))
        elif isinstance(item, ReadView):
            self._push(self.now + self.store_s, rank, ViewRead(item.epoch, self.store.get(item.epoch)))
        else:
            if isinstance(item, Envelope):
                self.delivered += 1
                self.delivered_bytes += self._size_of(item)
            self._apply(rank, core.step(item, self.now))

    # --- driving ----------------------------------------------------------------------------

    def run_until(self, done: Callable[[], bool], *, limit_s: float, check_every_s: float = 0.005) -> bool:
        """Run events until ``done()`` (checked every ``check_every_s``) or ``limit_s`` passed."""
        end = self.now + limit_s
        next_check = self.now
        while self._heap and self._heap[0][0] <= end:
            at, _, rank, item = heapq.heappop(self._heap)
            self.now = at
            self._handle(rank, item)
            if at >= next_check:
                next_check = at + check_every_s
                if done():
                    return True
        self.now = end
        return done()

    def run_for(self, seconds: float) -> None:
        self.run_until(lambda: False, limit_s=seconds)

    def kill(self, rank: int) -> None:
        """The process dies; its launcher reports the exit to every rank (as the real one does)."""
        self.state[rank] = "dead"
        event = ProcessExit(rank=rank, pid=1000 + rank, signal=9, incarnation=self.cores[rank].incarnation)
        for dst in self.cores:
            if dst != rank and self.state[dst] == "up":
                self._push(self.now + self.delay_s, dst, event)

    def hang(self, rank: int) -> None:
        """The process stops (SIGSTOP, a lost host): silence, no report."""
        self.state[rank] = "dead"

    def live(self) -> list[int]:
        return [r for r, s in self.state.items() if s == "up" and not self.cores[r].stopped]

    def all_members(self, n: int) -> bool:
        return all(self.cores[r].view is not None and len(self.cores[r].view.members) == n
                   and self.cores[r].status == "member" for r in self.live())

    def all_exclude(self, rank: int) -> bool:
        return all(self.cores[r].view is not None and rank not in self.cores[r].view.members for r in self.live())

    def installed_without(self, rank: int) -> dict[int, float]:
        """Per live rank, when it first installed a view without ``rank``."""
        out: dict[int, float] = {}
        for r in self.live():
            for at, view in self.installs[r]:
                if rank not in view.members:
                    out[r] = at
                    break
        return out

    def evicted(self) -> set[int]:
        """Ranks missing from the store's newest view."""
        if not self.store:
            return set()
        return set(self.cores) - set(self.store[self._head].members)


# --- real sockets: many ranks per process ---------------------------------------------------------


class _LossyTransport:
    """Receive-side wrapper a worker installs on each rank's :class:`ZmqTransport`: counts what
    arrives (envelopes and bytes, the framing counted as in :class:`SimCluster`) and drops each
    envelope with probability ``loss`` before the bus sees it (modeled loss on real sockets:
    these machines have no ``netem``)."""

    def __init__(self, transport, seed: int) -> None:
        self.transport = transport
        self.loss = 0.0
        self.frames = 0
        self.bytes = 0
        self.rng = random.Random(seed)
        self._receiver = None
        inner = transport.set_receiver

        def set_receiver(receiver):
            self._receiver = receiver
            return inner(self._deliver)

        transport.set_receiver = set_receiver

    def _deliver(self, frames: list) -> None:
        self.frames += len(frames)
        self.bytes += sum(len(f[2]) for f in frames) + HEADER_BYTES * len(frames)
        if self.loss:
            rnd = self.rng.random
            frames = [f for f in frames if rnd() >= self.loss]
            if not frames:
                return
        self._receiver(frames)


def _fd_count() -> int:
    import os

    return len(os.listdir("/proc/self/fd"))


def _thread_count() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("Threads:"):
                return int(line.split()[1])
    return 0


def _worker(conn, ranks: list[int], n: int, config: Config, keys_json: str, store_addr: str, seed: int,
            shared: bool, ranks_per_host: int = 0) -> None:
    """One harness process: ``ranks``' buses, detectors and membership services on one loop."""
    import asyncio
    import logging
    import time

    logging.getLogger("elasticep").setLevel(logging.ERROR)  # 1 % loss logs a gap per lost frame
    from elasticep.bus import ClusterKeys, EventBus, ZmqTransport, connect_store
    from elasticep.bus.store_wait import WaitHub
    from elasticep.bus.zmq_transport import SharedContext
    from elasticep.bus.loop import new_event_loop
    from elasticep.detect.board import HostBoard
    from elasticep.membership.service import MembershipService
    from elasticep.membership.store import SharedViews, TCPStoreViewStore

    async def main() -> None:
        loop = asyncio.get_running_loop()
        # Store calls run on worker threads; a rank process has the default pool to itself,
        # here ranks share one, so give it room for several calls per rank in flight.
        from concurrent.futures import ThreadPoolExecutor

        loop.set_default_executor(ThreadPoolExecutor(max_workers=max(8, len(ranks) // 2),
                                                     thread_name_prefix="elasticep-scale-store"))
        keys = ClusterKeys.from_json(keys_json)
        store = connect_store(store_addr, timeout_s=60.0)
        fds0, threads0 = _fd_count(), _thread_count()
        context = SharedContext(keys, io_threads=1) if shared else None
        # The ranks' commit watches and bus watchers wait for the same next keys: one request
        # per key for the whole process (a connection per waiter is a name lookup per
        # connection at the store's server, hundreds of them at start-up).
        waits = WaitHub.for_store(store) if shared else None
        views = SharedViews() if shared else None  # a committed view read once per process
        installs: dict[int, list[tuple[float, int, tuple[int, ...]]]] = {r: [] for r in ranks}
        services, wrappers, state = {}, {}, {r: "new" for r in ranks}
        reasons: dict[int, str] = {}  # epoch -> why that view changed the members

        removed: set[int] = set()  # every rank some rank here saw left out of a view

        def record(rank: int, view) -> None:  # O(N) per install: nothing here may stall the loop
            members = frozenset(view.members)
            installs[rank].append((time.monotonic(), view.epoch, members))
            if view.epoch not in reasons:
                reasons[view.epoch] = view.reason
                removed.update(r for r in range(n) if r not in members)

        for r in ranks:
            t = ZmqTransport(r, keys.for_rank(r), store, poll_interval_s=0.2, context=context, waits=waits)
            wrappers[r] = _LossyTransport(t, seed * 100_003 + r)
            bus = EventBus(t, r)
            vs = TCPStoreViewStore(store=store, timeout_s=config.store_timeout_s, waits=waits, shared=views)
            # ranks_per_host: ranks r // ranks_per_host share a host and heartbeat each other on its board
            board = (HostBoard(f"scale@{store_addr}/host{r // ranks_per_host}", r, t.incarnation)
                     if ranks_per_host else None)
            services[r] = MembershipService(
                r, bus, vs, config, initial_members=tuple(range(n)),
                on_install=lambda view, _ns, r=r: record(r, view), board=board)
        done = asyncio.Event()

        def live() -> list[int]:
            return [r for r in ranks if state[r] == "up" and not services[r].core.stopped]

        async def handle(cmd: tuple):
            op = cmd[0]
            if op == "start":
                await asyncio.gather(*(services[r].start(ready_timeout=120.0) for r in ranks))
                for r in ranks:
                    state[r] = "up"
                return {"fds": _fd_count() - fds0, "threads": _thread_count() - threads0}
            if op == "members":  # first time each live rank installed a view of exactly cmd[1] members
                out = {}
                for r in live():
                    out[r] = next((at for at, _, m in installs[r] if len(m) == cmd[1]), None)
                return out
            if op == "excluded":  # first time each live rank installed a view without cmd[1]
                return {r: next((at for at, _, m in installs[r] if cmd[1] not in m), None) for r in live()}
            if op in ("kill", "hang"):
                r = cmd[1]
                svc = services[r]
                t0 = time.monotonic()
                state[r] = "dead"
                if op == "kill":  # the process is gone: its sockets close at once, as the kernel closes them
                    svc.bus.transport.sever()
                    await svc.close()
                    await svc.bus.close()
                else:  # SIGSTOP: silent, its connections stay open
                    svc.bus.transport.pause_receiving()
                    await svc.close()
                return t0
            if op == "coverage":  # per live rank, the watched neighbours it has no handshake with
                out = {}
                for r in live():
                    missing = set(services[r].core.watched()) - services[r].bus.transport.connected()
                    if missing:
                        out[r] = sorted(missing)
                return out
            if op == "loss":
                for w in wrappers.values():
                    w.loss = cmd[1]
                return None
            if op == "stats":
                up = live()
                t = [services[r].bus.transport for r in up]
                return {
                    "time": time.monotonic(), "cpu": time.process_time(), "loop_cpu": time.thread_time(), "ranks": len(up),
                    "frames": sum(wrappers[r].frames for r in up), "bytes": sum(wrappers[r].bytes for r in up),
                    "fds": _fd_count() - fds0, "threads": _thread_count() - threads0,
                    "sockets": sum(x.socket_count() for x in t),
                    "peers_max": max((len(x.peers()) for x in t), default=0),
                    "fenced": sum(1 for r in ranks if services[r].fenced is not None),
                    "removed": sorted(removed), "lag_max_ms": lag["max_ms"], "lag_over_100ms": lag["over_100ms"],
                    "reasons": reasons,
                }
            if op == "stop":
                for r in ranks:
                    await services[r].close()
                    await services[r].bus.close()
                if waits is not None:
                    waits.close()
                if context is not None:
                    context.close()
                done.set()
                return None
            raise ValueError(f"unknown harness command {op!r}")

        async def serve(cmd):
            try:
                reply = ("ok", await handle(cmd))
            except Exception as exc:  # reported to the parent, which raises it
                reply = ("error", f"{type(exc).__name__}: {exc}")
            conn.send(reply)

        def readable() -> None:
            while conn.poll():
                loop.create_task(serve(conn.recv()))

        lag = {"max_ms": 0.0, "over_100ms": 0}

        async def watch_lag() -> None:  # how late this process's loop runs a 10 ms timer
            while True:
                t = loop.time()
                await asyncio.sleep(0.01)
                late = (loop.time() - t - 0.01) * 1e3
                lag["max_ms"] = max(lag["max_ms"], late)
                lag["over_100ms"] += late > 100

        lag_task = loop.create_task(watch_lag())
        loop.add_reader(conn.fileno(), readable)
        conn.send(("ok", "ready"))
        await done.wait()
        loop.remove_reader(conn.fileno())
        rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in rest:  # e.g. a hung rank's store read, started by its still-open sockets
            t.cancel()
        await asyncio.gather(*rest, return_exceptions=True)

    loop = new_event_loop()
    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
        conn.close()


class RealCluster:
    """``n`` ranks with real CURVE ZeroMQ buses, detectors and membership services, spread over
    ``procs`` processes (each process one event loop, its ranks as tasks), a real ``TCPStore``
    hosted here for the rendezvous and the views, and the real clock.

    Per rank what a rank process runs (a :class:`~elasticep.bus.ZmqTransport` with its CURVE
    PUB socket and one SUB socket per peer it hears, an :class:`~elasticep.bus.EventBus`, a
    :class:`~elasticep.membership.MembershipService`); the processes are shared and, with
    ``shared_context`` (the default), so is each process's ZeroMQ context and ZAP handler
    (:class:`~elasticep.bus.zmq_transport.SharedContext`): one I/O thread per process instead
    of two threads per rank. A *kill*
    closes the rank's publishing socket at once (as the kernel does for a killed process; no
    launcher report), then stops its service and the rest of its transport; a
    *hang* stops its service and its reading with its connections left open (SIGSTOP).
    Loss (:meth:`set_loss`) is modeled at the receiver, each envelope dropped independently.
    With ``ranks_per_host`` H, ranks ``r // H`` form a host: each host's ranks heartbeat each
    other on a :class:`~elasticep.detect.board.HostBoard` of their own, and over the bus only to
    watchers on other hosts (a killed or hung rank's slot goes quiet with it).

    Example::

        with RealCluster(64, Config.local(detection_topology="ring"), procs=2) as c:
            c.start()
            t0 = c.kill(17)
            print(max(c.wait_excluded(17, 5.0).values()) - t0)
    """

    def __init__(self, n: int, config: Config, *, procs: int = 2, seed: int = 0, shared_context: bool = True,
                 ranks_per_host: int = 0) -> None:
        import multiprocessing as mp

        from torch.distributed import TCPStore

        from elasticep.bus import ClusterKeys
        from elasticep.testing.fixtures import free_port

        self.n, self.config = n, config
        port = free_port()
        self._store = TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False, use_libuv=True)
        keys = ClusterKeys.generate(n).to_json()
        ctx = mp.get_context("spawn")
        self.owner: dict[int, int] = {}
        self._conns, self._procs = [], []
        procs = max(1, min(procs, n))
        for p in range(procs):
            ranks = list(range(p, n, procs))
            for r in ranks:
                self.owner[r] = p
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker, args=(child, ranks, n, config, keys, f"127.0.0.1:{port}", seed, shared_context,
                                                     ranks_per_host),
                               daemon=True, name=f"elasticep-scale-{p}")
            proc.start()
            child.close()
            self._conns.append(parent)
            self._procs.append(proc)
        for c in self._conns:
            self._reply(c, 120.0)
        self.start_info: list[dict] = []

    @staticmethod
    def _reply(conn, timeout: float):
        if not conn.poll(timeout):
            raise TimeoutError(f"a scale harness process did not answer within {timeout:g} s")
        status, value = conn.recv()
        if status != "ok":
            raise RuntimeError(f"scale harness process failed: {value}")
        return value

    def _all(self, cmd: tuple, timeout: float = 60.0) -> list:
        for c in self._conns:
            c.send(cmd)
        return [self._reply(c, timeout) for c in self._conns]

    def _one(self, rank: int, cmd: tuple, timeout: float = 30.0):
        c = self._conns[self.owner[rank]]
        c.send(cmd)
        return self._reply(c, timeout)

    def start(self, limit_s: float = 120.0) -> float:
        """Start every rank together; returns the seconds until every rank installed the
        ``n``-member view (all of them admitted)."""
        import time

        t0 = time.monotonic()
        self.start_info = self._all(("start",), limit_s)
        at = self.wait_all(lambda: ("members", self.n), limit_s)
        return max(at.values()) - t0

    def wait_all(self, cmd, limit_s: float, poll_s: float = 0.02) -> dict[int, float]:
        """Poll until every live rank answers ``cmd()`` with a time; {rank: time}."""
        import time

        end = time.monotonic() + limit_s
        while True:
            merged: dict[int, float | None] = {}
            for part in self._all(cmd()):
                merged.update(part)
            if merged and all(v is not None for v in merged.values()):
                return merged  # type: ignore[return-value]
            if time.monotonic() > end:
                missing = sorted(r for r, v in merged.items() if v is None)
                raise TimeoutError(f"{len(missing)} ranks not there within {limit_s:g} s: {missing[:10]}")
            time.sleep(poll_s)

    def kill(self, rank: int) -> float:
        """Close ``rank``'s sockets (a killed process); returns the monotonic time it happened."""
        return self._one(rank, ("kill", rank))

    def hang(self, rank: int) -> float:
        """Stop ``rank`` with its connections open (SIGSTOP); returns when."""
        return self._one(rank, ("hang", rank))

    def wait_excluded(self, rank: int, limit_s: float) -> dict[int, float]:
        """Per live rank, when it first installed a view without ``rank`` (monotonic seconds)."""
        return self.wait_all(lambda: ("excluded", rank), limit_s)

    def coverage(self) -> dict[int, list[int]]:
        """Per live rank, the neighbours its detector watches that its bus has no completed
        handshake with (empty when every watched stream is connected)."""
        out: dict[int, list[int]] = {}
        for part in self._all(("coverage",)):
            out.update(part)
        return out

    def set_loss(self, p: float) -> None:
        self._all(("loss", p))

    def stats(self) -> dict:
        """Summed over the processes: live ranks, envelopes and bytes received, CPU seconds,
        fds and threads opened for the ranks, ZeroMQ sockets, the most peers one rank holds,
        and every rank some live rank saw removed from a view."""
        parts = self._all(("stats",))
        out = {k: sum(p[k] for p in parts) for k in ("ranks", "frames", "bytes", "cpu", "loop_cpu", "fds", "threads", "sockets",
                                                    "fenced")}
        out["peers_max"] = max(p["peers_max"] for p in parts)
        out["lag_max_ms"] = max(p["lag_max_ms"] for p in parts)
        out["lag_over_100ms"] = sum(p["lag_over_100ms"] for p in parts)
        out["time"] = max(p["time"] for p in parts)
        out["removed"] = sorted({r for p in parts for r in p["removed"]})
        out["reasons"] = {e: why for p in parts for e, why in p["reasons"].items()}
        return out

    def close(self) -> None:
        try:
            self._all(("stop",), 30.0)
        except Exception:
            pass
        for p in self._procs:
            p.join(10.0)
            if p.is_alive():
                p.kill()
                p.join(5.0)
        for c in self._conns:
            c.close()
        del self._store

    def __enter__(self) -> "RealCluster":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
