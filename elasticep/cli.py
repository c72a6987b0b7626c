"""``elasticep`` command line: ``demo``, ``plan``, ``bench <name>``, ``monitor``.

Each subcommand lives in the module that owns the capability; this file only dispatches, so
importing it stays cheap (no torch until a subcommand needs it).
"""

from __future__ import annotations

import importlib
import sys

COMMANDS: dict[str, str] = {
    "demo": "elasticep.engine.demo",
    "monitor": "elasticep.bus.monitor",
    "plan": "elasticep.eplb.cli",
}
BENCHES: dict[str, str] = {
    "bus": "elasticep.bench.bus",
    "detect": "elasticep.bench.detect",
    "kernel": "elasticep.bench.kernel",
    "plan": "elasticep.bench.plan",
    "transfer": "elasticep.bench.transfer",
    "recovery": "elasticep.bench.recovery",
    "scale": "elasticep.bench.scale",
    "store": "elasticep.bench.store",
    "overhead": "elasticep.bench.overhead",
    "vllm": "elasticep.bench.vllm",
}

USAGE = """usage: elasticep <command> [options]

commands:
  demo                 run the reference engine through a failure and a rejoin
  monitor              print a running cluster's events live
  plan                 plan an expert placement from a load file
  bench <name>         benchmarks: {benches}

options:
  -h, --help           this message
  -V, --version        print the version and exit
""".format(benches=", ".join(BENCHES))


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    if args[0] in ("-V", "--version"):
        from elasticep import __version__

        print(f"elasticep {__version__}")
        return 0
    cmd, rest = args[0], args[1:]
    if cmd == "bench":
        if not rest or rest[0] not in BENCHES:
            print(f"elasticep bench: choose one of {', '.join(BENCHES)}", file=sys.stderr)
            return 2
        target, rest = BENCHES[rest[0]], rest[1:]
    elif cmd in COMMANDS:
        target = COMMANDS[cmd]
    else:
        print(f"elasticep: unknown command {cmd!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    module = importlib.import_module(target)
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
