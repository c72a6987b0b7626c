"""``elasticep monitor``: print a running cluster's events live, one line each.

Subscribes to every rank's PUB socket with the cluster's read-only monitor key (it can listen to
everyone and publish to no one), finds the ranks through the cluster's ``TCPStore`` rendezvous,
and keeps picking up ranks that join later. Keys come from ``--keys FILE`` or the
``ELASTICEP_BUS_KEYS`` environment variable; a launcher's full key file works too (only the
monitor key is used).

Lines look like::

    13:52:07.114  r2  e3  #418  suspicion  observer=2 suspect=1 source='heartbeat' phi=9.1

(time the event was sent, sender rank, epoch, sequence number, event type, fields). ``--json``
prints each envelope as one JSON object instead. ``--count`` and ``--seconds`` bound the run.

``--operator http://HOST:PORT --token TOKEN`` instead prints one rank's status from its
operator door (:mod:`elasticep.agent.operator`) and exits: view, epoch, members, suspicions and
the last reconfiguration's phases (``--json``: the door's answer as it is).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from typing import TextIO

import msgspec

from elasticep import metrics
from elasticep.bus.loop import run as run_loop
from elasticep.events import EVENT_TAGS, Envelope, event_tag

__all__ = ["format_envelope", "json_envelope", "main", "run"]


def format_envelope(env: Envelope) -> str:
    """One human-readable line for ``env`` (no trailing newline)."""
    t = time.strftime("%H:%M:%S", time.localtime(env.wall_ns / 1e9)) + f".{env.wall_ns // 1_000_000 % 1000:03d}"
    fields = " ".join(f"{name}={value!r}" for name, value in msgspec.structs.asdict(env.event).items())
    return f"{t}  r{env.sender}  e{env.epoch}  #{env.seq}  {event_tag(env.event)}  {fields}"


_JSON = msgspec.json.Encoder()


def json_envelope(env: Envelope) -> str:
    body = msgspec.to_builtins(env.event)
    return _JSON.encode(
        {
            "sender": env.sender,
            "epoch": env.epoch,
            "seq": env.seq,
            "wall_ns": env.wall_ns,
            "mono_ns": env.mono_ns,
            "type": event_tag(env.event),
            "event": body,
        }
    ).decode()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="elasticep monitor", description="Print a running cluster's events live.")
    p.add_argument("--store", metavar="HOST:PORT", help="the cluster's TCPStore")
    p.add_argument("--operator", metavar="URL", help="instead of events: print one rank's status from its operator "
                   "door (http://HOST:PORT) and exit")
    p.add_argument("--token", default=None, help="the operator door's token (default: $ELASTICEP_OPERATOR_TOKEN); --token=T when T starts with -")
    p.add_argument("--keys", metavar="FILE", help="key file with the monitor key (default: $ELASTICEP_BUS_KEYS)")
    p.add_argument("--prefix", default=None, help="rendezvous key prefix (default elasticep/bus/)")
    p.add_argument("--types", default="", help="comma-separated event types to show, e.g. suspicion,view_installed")
    p.add_argument("--count", type=int, default=0, help="exit after this many events (0: no limit)")
    p.add_argument("--seconds", type=float, default=0.0, help="exit after this many seconds (0: no limit)")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--metrics-port", type=int, default=0, help="serve Prometheus metrics on this port")
    return p


async def run(args: argparse.Namespace, out: TextIO) -> int:
    """Subscribe and print until ``--count`` events or ``--seconds`` pass; returns events printed."""
    from elasticep.bus import ClusterKeys, EventBus, ZmqTransport, connect_store
    from elasticep.bus.rendezvous import DEFAULT_PREFIX
    from elasticep.bus.zmq_transport import MONITOR_RANK

    keys = ClusterKeys.load(args.keys) if args.keys else ClusterKeys.from_env()
    keys = keys.for_monitor()
    by_tag = {tag: t for t, tag in EVENT_TAGS.items()}
    wanted = [t.strip() for t in args.types.split(",") if t.strip()]
    unknown = [t for t in wanted if t not in by_tag]
    if unknown:
        raise SystemExit(f"elasticep monitor: unknown event types {unknown}; known: {sorted(by_tag)}")
    store = await asyncio.get_running_loop().run_in_executor(None, connect_store, args.store)
    transport = ZmqTransport.monitor(keys, store, prefix=args.prefix or DEFAULT_PREFIX)
    printed = 0
    fmt = json_envelope if args.json else format_envelope
    async with EventBus(transport, MONITOR_RANK) as bus:
        sub = bus.subscribe(*(by_tag[t] for t in wanted), maxsize=100_000, name="monitor")

        async def printer() -> None:
            nonlocal printed
            async for env in sub:
                out.write(fmt(env) + "\n")
                out.flush()
                printed += 1
                if args.count and printed >= args.count:
                    return

        task = asyncio.get_running_loop().create_task(printer())
        try:
            await asyncio.wait_for(task, args.seconds if args.seconds > 0 else None)
        except asyncio.TimeoutError:
            pass
    return printed


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.operator:
        return _operator_status(args)
    if not args.store:
        parser.error("one of --store (events) or --operator (a rank's status) is required")
    if args.metrics_port:
        metrics.serve(args.metrics_port)
    try:
        printed = run_loop(run(args, sys.stdout))
    except KeyboardInterrupt:
        return 130
    if args.count and printed < args.count:
        print(f"elasticep monitor: saw {printed} of {args.count} events", file=sys.stderr)
        return 1
    return 0


def _operator_status(args: argparse.Namespace) -> int:
    import os

    from elasticep.agent.operator import fetch_status, format_status

    token = args.token if args.token is not None else os.environ.get("ELASTICEP_OPERATOR_TOKEN", "")
    try:
        status = asyncio.run(fetch_status(args.operator, token))
    except Exception as exc:
        print(f"elasticep monitor: {exc}", file=sys.stderr)
        return 1
    print(msgspec.json.encode(status).decode() if args.json else format_status(status))
    return 0


if __name__ == "__main__":
    sys.exit(main())

