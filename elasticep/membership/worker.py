"""A rank process that runs only membership: ZeroMQ bus, TCPStore view store, the service.

Used by the multi-process tests and ``elasticep bench detect``, and handy for trying detection
settings on a real cluster without an engine::

    python -m elasticep.membership.worker --rank 0 --world 4 --store 127.0.0.1:29500

The launcher hosts the ``TCPStore`` and hands each rank its bus keys in ``ELASTICEP_BUS_KEYS``
(:meth:`elasticep.bus.ClusterKeys.to_env`). The process reports on stdout, one JSON object per
line: ``{"kind": "ready" | "install" | "fenced" | "left", "rank", "epoch", "members",
"wall_ns", "reason"}``. It reads commands from stdin, one per line: ``leave``, and
``exit RANK [SIGNAL [PID]]`` with which its launcher reports that a process of ``RANK`` exited (the
launcher's certain signal, delivered over the pipe it already has to each child). End of stdin
stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time

from elasticep.bus.loop import new_event_loop
from elasticep.config import Config, _parse
from elasticep.events import ProcessExit

log = logging.getLogger("elasticep.membership.worker")


def _emit(kind: str, **fields: object) -> None:
    sys.stdout.write(json.dumps({"kind": kind, **fields}) + "\n")
    sys.stdout.flush()


def _parse_overrides(items: list[str]) -> dict[str, object]:
    out: dict[str, object] = {}
    for item in items:
        name, _, value = item.partition("=")
        out[name] = _parse(value, type(getattr(Config, name)), name)
    return out


async def run(args: argparse.Namespace) -> int:
    from elasticep.bus import ClusterKeys, EventBus, ZmqTransport, connect_store
    from elasticep.membership.service import MembershipService, RankFenced
    from elasticep.membership.store import open_view_store

    config = Config.named(args.profile, **_parse_overrides(args.config))
    keys = ClusterKeys.from_env()
    bus_store = connect_store(args.store, timeout_s=config.store_timeout_s * 5)
    # The view store is Config.view_store's (the launcher's TCPStore by default, or etcd).
    view_store = open_view_store(config, tcpstore=args.store)
    transport = ZmqTransport(args.rank, keys, bus_store, endpoint=args.bind, incarnation=args.incarnation or None,
                             poll_interval_s=0.05)
    bus = EventBus(transport, args.rank)

    def on_install(view, wall_ns: int) -> None:
        _emit("install", rank=args.rank, epoch=view.epoch, members=list(view.members), wall_ns=wall_ns,
              reason=view.reason)

    initial = None if args.join else tuple(range(args.world))
    board = None
    if config.host_board:
        from elasticep.detect.board import open_board

        board = open_board(f"worker@{args.store}", args.rank, transport.incarnation)  # one cluster per store
    service = MembershipService(args.rank, bus, view_store, config, initial_members=initial, join=args.join,
                                on_install=on_install, board=board)
    await bus.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    pending = bytearray()

    def on_stdin() -> None:
        # Raw reads: a buffered readline could keep a second command in its buffer unseen.
        data = os.read(0, 65536)
        if not data:
            loop.remove_reader(0)  # end of file stays readable: stop watching
            stop.set()
            return
        pending.extend(data)
        while b"\n" in pending:
            line, _, rest = bytes(pending).partition(b"\n")
            pending[:] = rest
            command(line.decode(errors="replace"))

    def command(line: str) -> None:
        words = line.split()
        if not words:
            return
        if words[0] == "leave":
            loop.create_task(_leave())
        elif words[0] == "exit" and len(words) >= 2:
            sig = int(words[2]) if len(words) > 2 and words[2] != "0" else None
            pid = int(words[3]) if len(words) > 3 else 0
            service.report(ProcessExit(rank=int(words[1]), pid=pid, signal=sig))

    async def _leave() -> None:
        try:
            view = await service.leave()
            _emit("left", rank=args.rank, epoch=view.epoch, members=list(view.members), wall_ns=time.time_ns(),
                  reason="left")
        except (RankFenced, asyncio.TimeoutError) as exc:
            log.warning("leave failed: %s", exc)
        stop.set()

    loop.add_reader(0, on_stdin)
    try:
        await service.start(ready_timeout=args.ready_timeout)
        _emit("ready", rank=args.rank, pid=os.getpid(), incarnation=service.core.incarnation, wall_ns=time.time_ns())
        watcher = loop.create_task(stop.wait())
        fenced = loop.create_task(service.wait_stopped())
        await asyncio.wait({watcher, fenced}, return_when=asyncio.FIRST_COMPLETED)
        if service.fenced is not None:
            f = service.fenced
            _emit("fenced", rank=args.rank, epoch=f.epoch, reason=f.reason, wall_ns=time.time_ns())
        for task in (watcher, fenced):
            task.cancel()
    finally:
        loop.remove_reader(0)
        try:
            # Bounded: with the store's host gone, closing must not hang the process.
            await asyncio.wait_for(_shutdown(service, bus, view_store), 3.0)
        except asyncio.TimeoutError:
            log.warning("shutdown did not finish within 3 s")
    return 0


async def _shutdown(service, bus, view_store) -> None:
    await service.close()
    await bus.close()
    await view_store.close()


def main(argv: list[str] | None = None) -> int:
    """Run one rank until end of stdin or a fence, then exit the process (never returns)."""
    parser = argparse.ArgumentParser(prog="python -m elasticep.membership.worker", description=__doc__.split("\n")[0])
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world", type=int, required=True, help="ranks of the bootstrap view (0..world-1)")
    parser.add_argument("--store", required=True, help="HOST:PORT of the launcher's TCPStore")
    parser.add_argument("--bind", default=None, help="the bus PUB socket's endpoint (default tcp://127.0.0.1:*)")
    parser.add_argument("--join", action="store_true", help="a restarted or new process: ask to be admitted")
    parser.add_argument("--incarnation", type=int, default=0, help="0: the bus picks one (wall-clock ns)")
    parser.add_argument("--profile", choices=("local", "cluster"), default="local",
                        help="the Config profile: local (ranks on one host) or cluster (ranks across hosts); "
                             "the launcher, which knows the placement, picks it")
    parser.add_argument("--config", action="append", default=[], metavar="FIELD=VALUE")
    parser.add_argument("--ready-timeout", type=float, default=30.0, help="wait for the bootstrap peers, s")
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args(argv)
    import torch.distributed  # noqa: F401  (the TCPStore client; import it before the loop runs)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format=f"%(asctime)s rank{args.rank} %(name)s %(levelname)s %(message)s")
    loop = new_event_loop()
    code = 1
    try:
        code = loop.run_until_complete(run(args))
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        # Worker threads may still wait on a store whose host is gone; do not join them.
        os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
