"""``elasticep bench bus``: the event bus against raw pyzmq, between two processes on loopback.

In one run, for each of

* **elasticep**: :class:`~elasticep.bus.EventBus` over :class:`~elasticep.bus.ZmqTransport`
  (CURVE on, endpoints from a ``TCPStore`` rendezvous), events read by the subscriber through
  ``async for env in bus.subscribe(Heartbeat)``;
* **raw_zmq**: a plain pyzmq PUB socket and a SUB socket reading with blocking ``recv`` (no
  CURVE, no asyncio, no decoding), frames of the same size as elasticep's;

it measures

* one-way latency: the publisher sends one frame, then sleeps ``--interval-us`` (both publishers
  with the same blocking ``time.sleep``: an event loop's timers round to a millisecond, and a
  longer idle gap alone makes a wake-up slower, so equal gaps keep the comparison fair); the
  subscriber takes
  ``time.monotonic_ns()`` when the event reaches it and subtracts the send time carried in the
  frame (one host, one monotonic clock), p50 and p99 in microseconds;
* sustained throughput: the publisher sends ``--events`` frames as fast as it can; the subscriber
  counts what arrives between the first and the last, events per second.

elasticep's publisher and subscriber run on the event loop ``--loop`` picks (``auto``: uvloop
where installed, as rank processes do; see :mod:`elasticep.bus.loop`). Two explanatory rows
follow: raw pyzmq read from a reader callback on that same loop (the loop's own share of the
difference), and raw pyzmq with CURVE, read by such a callback and handed to a task waiting on
it (``curve_task_floor``: what any bus with CURVE and an ``async for`` API pays before doing any
work of its own). The latency samples of all four are taken in ``--rounds`` alternating rounds.

The publisher is this process; each subscriber is a child process. ``--json PATH`` writes the
figures with the keys ``elasticep_p50_us``, ``elasticep_p99_us``, ``raw_zmq_p50_us``,
``raw_zmq_p99_us``, ``elasticep_events_per_s``, ``raw_zmq_events_per_s`` (plus details).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import struct
import subprocess
import sys
import time
from typing import Any

from elasticep.bus.loop import EVENT_LOOP_KINDS, event_loop_kind
from elasticep.bus.loop import run as run_loop

_PROBE, _LATENCY, _THROUGHPUT = 0, 1, 2
_RAW_HEAD = struct.Struct("<Bq")
_READY_KEY = "elasticep/bench/bus/ready/"
_RESULT_KEY = "elasticep/bench/bus/result/"


def _percentile(samples: list[float], q: float) -> float:
    if not samples:
        return float("nan")
    ordered = sorted(samples)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def _summary(latencies_ns: list[int], count: int, span_ns: int, sent: int) -> dict[str, Any]:
    us = [x / 1e3 for x in latencies_ns]
    return {
        "p50_us": _percentile(us, 50),
        "p99_us": _percentile(us, 99),
        "latency_samples": len(us),
        "events_per_s": (count - 1) / (span_ns / 1e9) if count > 1 and span_ns > 0 else 0.0,
        "throughput_received": count,
        "throughput_sent": sent,
    }


# --- subscriber processes ------------------------------------------------------------------------


async def _elasticep_subscriber(args: argparse.Namespace) -> dict[str, Any]:
    from elasticep.bus import ClusterKeys, EventBus, ZmqTransport, connect_store
    from elasticep.events import Heartbeat

    store = connect_store(args.store)
    keys = ClusterKeys.from_env()
    transport = ZmqTransport(1, keys, store, hwm=args.hwm, endpoint=args.endpoint)
    latencies: list[int] = []
    count = 0
    first = last = 0
    loop = asyncio.get_running_loop()
    async with EventBus(transport, 1) as bus:
        sub = bus.subscribe(Heartbeat, maxsize=1 << 20)

        async def consume() -> None:
            nonlocal count, first, last
            ready = False
            async for env in sub:
                now = time.monotonic_ns()
                step = env.event.step
                if step == _LATENCY:
                    latencies.append(now - env.mono_ns)
                elif step == _THROUGHPUT:
                    if count == 0:
                        first = now
                    count += 1
                    last = now
                    if count >= args.events:
                        return
                elif not ready:
                    ready = True
                    await loop.run_in_executor(None, store.set, _READY_KEY + "elasticep", "1")

        consumer = loop.create_task(consume())
        deadline = time.monotonic() + args.timeout
        # A watchdog, not a per-event timeout: the hot loop stays a plain ``async for``.
        while not consumer.done():
            await asyncio.sleep(0.2)
            quiet = count and time.monotonic_ns() - last > 1e9
            if quiet or time.monotonic() > deadline:
                sub.close()
                break
        await consumer
        lost = bus.statistics().lost
    result = _summary(latencies, count, last - first, args.events)
    result["lost_in_gaps"] = lost
    return result


class _RawRecorder:
    """A raw subscriber's socket and what it has seen (both raw baselines share it)."""

    def __init__(self, args: argparse.Namespace) -> None:
        import zmq

        self.events = args.events
        self.ctx = zmq.Context(io_threads=1)
        self.sock = self.ctx.socket(zmq.SUB)
        if args.server_key:  # the floor: a CURVE client, as elasticep's subscribers are
            self.sock.curve_serverkey = args.server_key.encode()
            self.sock.curve_publickey, self.sock.curve_secretkey = zmq.curve_keypair()
        self.sock.rcvhwm = args.hwm
        self.sock.linger = 0
        self.sock.setsockopt(zmq.SUBSCRIBE, b"")
        self.sock.connect(args.connect)
        self.latencies: list[int] = []
        self.count = 0
        self.first = self.last = 0
        self.ready = False

    def handle(self, data: bytes, now: int) -> bool:
        """Record one frame received at ``now``; ``True`` once the whole burst has arrived."""
        phase, sent = _RAW_HEAD.unpack_from(data)
        if phase == _LATENCY:
            self.latencies.append(now - sent)
        elif phase == _THROUGHPUT:
            if self.count == 0:
                self.first = now
            self.count += 1
            self.last = now
            return self.count >= self.events
        elif not self.ready:
            self.ready = True
            print("ready", flush=True)
        return False

    def close(self) -> dict[str, Any]:
        self.sock.close(linger=0)
        self.ctx.term()
        return _summary(self.latencies, self.count, self.last - self.first, self.events)


def _raw_subscriber(args: argparse.Namespace) -> dict[str, Any]:
    import zmq

    rec = _RawRecorder(args)
    sock = rec.sock
    deadline = time.monotonic() + args.timeout
    sock.rcvtimeo = 200
    try:
        while time.monotonic() < deadline:
            try:
                data = sock.recv()
            except zmq.Again:
                if rec.count:
                    break  # the throughput burst is over
                continue
            if rec.handle(data, time.monotonic_ns()):
                break
            if rec.count == 1:
                sock.rcvtimeo = 1000
    finally:
        result = rec.close()
    return result


async def _raw_asyncio_subscriber(args: argparse.Namespace) -> dict[str, Any]:
    """The raw pyzmq subscriber again, woken by an event-loop reader callback: the cost of the
    event loop alone, with no elasticep code on the path (an explanatory baseline).

    As ``floor-sub`` (``--server-key`` given) the socket is a CURVE client, and the callback hands
    each frame to a task waiting on it, which takes the time: what any bus with CURVE and an
    ``async for`` API pays before it does any work of its own.
    """
    import collections

    import zmq

    rec = _RawRecorder(args)
    sock = rec.sock
    floor = bool(args.server_key)
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    queue: collections.deque[bytes] = collections.deque()
    waiters: list[asyncio.Future[None]] = []

    def handle(data: bytes) -> None:
        if rec.handle(data, time.monotonic_ns()) and not done.done():
            done.set_result(None)

    def on_readable() -> None:
        while sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            data = sock.recv(zmq.NOBLOCK)
            if not floor:
                handle(data)
                continue
            queue.append(data)
            if waiters and not waiters[0].done():
                waiters[0].set_result(None)

    async def consume() -> None:
        while True:
            while not queue:
                waiter = loop.create_future()
                waiters[:] = [waiter]
                await waiter
            handle(queue.popleft())

    consumer = loop.create_task(consume()) if floor else None
    fd = sock.getsockopt(zmq.FD)
    loop.add_reader(fd, on_readable)
    loop.call_soon(on_readable)
    deadline = time.monotonic() + args.timeout
    try:
        while not done.done():
            await asyncio.sleep(0.2)
            if (rec.count and time.monotonic_ns() - rec.last > 1e9) or time.monotonic() > deadline:
                break
    finally:
        loop.remove_reader(fd)
        if consumer is not None:
            consumer.cancel()
        result = rec.close()
    return result


def _subscriber_main(args: argparse.Namespace) -> int:
    if args.role == "elasticep-sub":
        from elasticep.bus import connect_store

        result = run_loop(_elasticep_subscriber(args), kind=args.loop)
        connect_store(args.store).set(_RESULT_KEY + args.role, json.dumps(result))
        return 0
    # The raw subscribers talk to the publisher over stdout ("ready", then one JSON line), so
    # they never import torch for a store client and start in a fraction of a second.
    if args.role in ("raw-asyncio-sub", "floor-sub"):
        result = run_loop(_raw_asyncio_subscriber(args), kind=args.loop)
    else:
        result = _raw_subscriber(args)
    print(json.dumps(result), flush=True)
    return 0


# --- publisher (this process) --------------------------------------------------------------------


def _spawn(
    role: str, args: argparse.Namespace, *, store_addr: str = "", connect: str = "", server_key: str = "",
    env: dict[str, str] | None = None,
) -> subprocess.Popen:
    cmd = [
        sys.executable, "-m", "elasticep.bench.bus", "--role", role, "--loop", args.loop,
        "--events", str(args.events), "--hwm", str(args.hwm), "--timeout", str(args.timeout),
    ]
    if store_addr:
        cmd += ["--store", store_addr]
    if connect:
        cmd += ["--connect", connect]
    if server_key:
        cmd.append(f"--server-key={server_key}")  # a Z85 key may begin with "-"
    if args.endpoint:
        cmd += ["--endpoint", args.endpoint]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE if connect else None, text=True)


def _wait_ready_line(proc: subprocess.Popen, timeout: float, probe: Any) -> None:
    """Call ``probe()`` every 10 ms until the subscriber prints ``ready``."""
    import select

    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    while True:
        probe()
        readable, _, _ = select.select([proc.stdout], [], [], 0.01)
        if readable:
            line = proc.stdout.readline()
            if line.strip() == "ready":
                return
            if not line:
                raise RuntimeError(f"raw subscriber exited with {proc.wait()}")
        if time.monotonic() > deadline:
            raise TimeoutError("raw subscriber did not become ready")


def _result(store: Any, role: str, proc: subprocess.Popen, timeout: float) -> dict[str, Any]:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise
    if proc.returncode != 0:
        raise RuntimeError(f"{role} subscriber exited with {proc.returncode}")
    return json.loads(store.get(_RESULT_KEY + role))


_RAW_ROLES = {"raw_zmq": "raw-sub", "raw_zmq_asyncio": "raw-asyncio-sub", "curve_task_floor": "floor-sub"}
"""The baselines: result name -> subscriber role."""


class _RawPublisher:
    """A plain pyzmq PUB socket and the subscriber process reading it (no bus; CURVE only for
    the ``floor-sub`` role)."""

    def __init__(self, ctx: Any, args: argparse.Namespace, role: str) -> None:
        import zmq

        self.role = role
        self.sock = ctx.socket(zmq.PUB)
        server_key = ""
        if role == "floor-sub":
            public, secret = zmq.curve_keypair()
            self.sock.curve_server = True
            self.sock.curve_publickey, self.sock.curve_secretkey = public, secret
            server_key = public.decode()
        self.sock.sndhwm = args.hwm
        self.sock.linger = 0
        if args.endpoint and args.endpoint.startswith("ipc"):
            self._ipc = f"/tmp/elasticep-bench-{role}-{os.getpid()}.sock"
            self.sock.bind("ipc://" + self._ipc)
        else:
            self._ipc = ""
            self.sock.bind("tcp://127.0.0.1:*")
        self.proc = _spawn(role, args, connect=self.sock.last_endpoint.decode(), server_key=server_key)

    def result(self, timeout: float) -> dict[str, Any]:
        out, _ = self.proc.communicate(timeout=timeout)
        if self.proc.returncode != 0:
            raise RuntimeError(f"{self.role} subscriber exited with {self.proc.returncode}")
        return json.loads(out.strip().splitlines()[-1])

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.sock.close(linger=0)
        if self._ipc and os.path.exists(self._ipc):
            os.unlink(self._ipc)


async def _session(args: argparse.Namespace, store: Any, store_addr: str) -> dict[str, Any]:
    """Every publisher in this one process and loop; every subscriber its own process, all alive
    together, so the latency rounds can alternate between the systems (see :func:`run`)."""
    import zmq

    from elasticep.bus import ClusterKeys, EventBus, ZmqTransport
    from elasticep.events import Heartbeat, envelope

    keys = ClusterKeys.generate(2)
    ctx = zmq.Context(io_threads=1)
    raws: list[_RawPublisher] = []
    proc = _spawn("elasticep-sub", args, store_addr=store_addr, env=keys.for_rank(1).to_env())
    try:
        raws = [_RawPublisher(ctx, args, role) for role in _RAW_ROLES.values()]
        transport = ZmqTransport(0, keys.for_rank(0), store, hwm=args.hwm, endpoint=args.endpoint)
        async with EventBus(transport, 0) as bus:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + args.timeout
            probe = Heartbeat(rank=0, step=_PROBE)
            while not await loop.run_in_executor(None, store.check, [_READY_KEY + "elasticep"]):
                if loop.time() > deadline or proc.poll() is not None:
                    raise TimeoutError("elasticep subscriber did not become ready")
                await bus.publish(probe)
                await asyncio.sleep(0.01)
            frame_bytes = 8 + 4 + len(bus.codec.encode(envelope(probe, sender=0, epoch=0, seq=1)))
            pad = b"\0" * max(0, frame_bytes - _RAW_HEAD.size)
            for raw in raws:
                _wait_ready_line(raw.proc, args.timeout, lambda: raw.sock.send(_RAW_HEAD.pack(_PROBE, 0) + pad))
            await asyncio.sleep(0.05)

            interval = args.interval_us / 1e6
            latency_event = Heartbeat(rank=0, step=_LATENCY)

            async def elasticep_round(n: int) -> None:
                for _ in range(n):
                    await bus.publish(latency_event)
                    await asyncio.sleep(0)  # run the loop's own callbacks (the flush)
                    time.sleep(interval)

            def raw_round(raw: _RawPublisher, n: int) -> None:
                send = raw.sock.send
                for _ in range(n):
                    send(_RAW_HEAD.pack(_LATENCY, time.monotonic_ns()) + pad)
                    time.sleep(interval)

            systems = ["elasticep", *range(len(raws))]
            per_round = [args.samples // args.rounds + (1 if i < args.samples % args.rounds else 0)
                         for i in range(args.rounds)]
            for i, n in enumerate(per_round):
                # Rotate which system goes first, so none always follows the same neighbour.
                for system in systems[i % len(systems):] + systems[: i % len(systems)]:
                    if system == "elasticep":
                        await elasticep_round(n)
                    else:
                        raw_round(raws[system], n)
                    await asyncio.sleep(0.02)

            burst = Heartbeat(rank=0, step=_THROUGHPUT)
            publish = bus.publish
            t0 = time.perf_counter()
            for i in range(args.events):
                await publish(burst)
                if i % 4096 == 4095:
                    await asyncio.sleep(0)  # let the loop breathe (watcher, monitors)
            send_s = time.perf_counter() - t0
            ours = await loop.run_in_executor(None, _result, store, "elasticep-sub", proc, args.timeout + 30)
        ours["publisher_events_per_s"] = args.events / send_s
        results = {"elasticep": ours}
        frame = _RAW_HEAD.pack(_THROUGHPUT, 0) + pad
        for raw, name in zip(raws, _RAW_ROLES):
            await asyncio.sleep(0.2)
            send = raw.sock.send
            t0 = time.perf_counter()
            for _ in range(args.events):
                send(frame)
            send_s = time.perf_counter() - t0
            results[name] = await loop.run_in_executor(None, raw.result, args.timeout + 30)
            results[name]["publisher_events_per_s"] = args.events / send_s
        results["frame_bytes"] = frame_bytes
        return results
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for raw in raws:
            raw.close()
        ctx.term()


def run(args: argparse.Namespace) -> dict[str, Any]:
    """One session: the latency samples of elasticep, raw pyzmq and raw pyzmq on the event loop
    are taken in ``--rounds`` alternating rounds (a load that comes and goes on a shared machine
    then lands on all three alike), then each system's throughput burst."""
    from torch.distributed import TCPStore

    from elasticep.testing.fixtures import free_port

    port = free_port()
    store = TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False, use_libuv=True)
    store_addr = f"127.0.0.1:{port}"
    results = run_loop(_session(args, store, store_addr), kind=args.loop)
    ours, raw, raw_asyncio = results["elasticep"], results["raw_zmq"], results["raw_zmq_asyncio"]
    floor = results["curve_task_floor"]
    out: dict[str, Any] = {
        "elasticep_p50_us": ours["p50_us"],
        "elasticep_p99_us": ours["p99_us"],
        "raw_zmq_p50_us": raw["p50_us"],
        "raw_zmq_p99_us": raw["p99_us"],
        "elasticep_events_per_s": ours["events_per_s"],
        "raw_zmq_events_per_s": raw["events_per_s"],
        "raw_zmq_asyncio_p50_us": raw_asyncio["p50_us"],
        "raw_zmq_asyncio_p99_us": raw_asyncio["p99_us"],
        "curve_task_floor_p50_us": floor["p50_us"],
        "curve_task_floor_p99_us": floor["p99_us"],
        "event_loop": event_loop_kind(args.loop),
        "frame_bytes": results["frame_bytes"],
        "transport": args.endpoint or "tcp://127.0.0.1",
        "latency_samples": args.samples,
        "rounds": args.rounds,
        "interval_us": args.interval_us,
        "events": args.events,
        "elasticep": ours,
        "raw_zmq": raw,
        "raw_zmq_asyncio": raw_asyncio,
        "curve_task_floor": floor,
    }
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="elasticep bench bus", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", metavar="PATH", help="write the figures as JSON to PATH")
    p.add_argument("--samples", type=int, default=3000, help="latency samples per system (default 3000)")
    p.add_argument("--rounds", type=int, default=10, help="alternating latency rounds (default 10)")
    p.add_argument("--interval-us", type=float, default=500.0, help="gap between latency samples, us")
    p.add_argument("--events", type=int, default=300_000, help="events in the throughput burst")
    p.add_argument("--hwm", type=int, default=1_000_000, help="ZeroMQ high-water mark for the run")
    p.add_argument("--endpoint", default=None, help="elasticep PUB bind endpoint (default tcp://127.0.0.1:*; 'ipc')")
    p.add_argument("--loop", choices=EVENT_LOOP_KINDS, default="auto",
                   help="event loop for elasticep and the asyncio baseline (default auto: uvloop if installed)")
    p.add_argument("--tiny", action="store_true", help="a few hundred events only (for tests)")
    p.add_argument("--timeout", type=float, default=60.0, help="bound on each phase, s")
    p.add_argument("--role", choices=["elasticep-sub", "raw-sub", "raw-asyncio-sub", "floor-sub"], help=argparse.SUPPRESS)
    p.add_argument("--server-key", default="", help=argparse.SUPPRESS)
    p.add_argument("--store", help=argparse.SUPPRESS)
    p.add_argument("--connect", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.role:
        return _subscriber_main(args)
    if args.tiny:
        args.samples, args.events, args.timeout, args.rounds = 60, 2000, 20.0, 3
    out = run(args)
    print(f"frame {out['frame_bytes']} B over {out['transport']}, {args.samples} latency samples each "
          f"in {args.rounds} alternating rounds, "
          f"{args.events} events burst, {out['event_loop']} event loop")
    print(f"{'':12}{'p50 us':>10}{'p99 us':>10}{'events/s':>12}")
    for name in ("elasticep", "raw_zmq"):
        print(f"{name:12}{out[name + '_p50_us']:>10.1f}{out[name + '_p99_us']:>10.1f}{out[name + '_events_per_s']:>12,.0f}")
    print(f"{'(raw_zmq read from an event-loop callback)':48} p50 {out['raw_zmq_asyncio_p50_us']:7.1f} us, "
          f"p99 {out['raw_zmq_asyncio_p99_us']:.1f} us")
    print(f"{'(... with CURVE, handed to a waiting task)':48} p50 {out['curve_task_floor_p50_us']:7.1f} us, "
          f"p99 {out['curve_task_floor_p99_us']:.1f} us  (the floor for a CURVE bus with async for: "
          f"{out['curve_task_floor_p50_us'] / out['raw_zmq_p50_us']:.2f}x raw)")
    print(f"p50 ratio elasticep/raw: {out['elasticep_p50_us'] / out['raw_zmq_p50_us']:.2f} (target <= 1.5); "
          f"elasticep lost {out['elasticep']['lost_in_gaps']} events in gaps")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
