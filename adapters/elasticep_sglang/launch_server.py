"""``python -m elasticep_sglang.launch_server [elasticep options] <sglang launch_server args>``.

Installs the adapter's hooks, then runs SGLang's own ``sglang.launch_server`` entry with the
remaining arguments. SGLang starts its schedulers with the ``spawn`` start method, which imports
the parent's main module (this one) in each child as ``__mp_main__``; the hooks are installed
there too, from the environment this wrapper sets (:data:`~elasticep_sglang.hooks.ENV_ENABLE`),
and so does the ``sglang.srt.plugins`` entry point that SGLang loads in every process.

With the agent on (the default), every scheduler starts an :class:`elasticep.Agent` at its first
step boundary (:mod:`elasticep_sglang.scheduler_agent`). On one node the wrapper hosts the
agents' store (a ``TCPStore`` in this process, which outlives every scheduler) and generates the
cluster's bus keys; with ``--nnodes > 1`` give every node the same ``--elasticep-store`` and
``ELASTICEP_BUS_KEYS`` (or leave the store out: the schedulers then use the store behind SGLang's
``torch.distributed`` init address, which lives in rank 0).

elasticep options (all others go to SGLang):

  --elasticep-max-moves N|auto|none   slots the planner may change beyond the coverage repair
  --elasticep-periodic sglang|elasticep
                                      who plans the all-alive periodic rebalance
  --elasticep-store HOST:PORT         the agents' store (default: hosted here on one node)
  --elasticep-cluster NAME            key prefix in the store (default sglang)
  --no-elasticep-agent                install the hooks only; no agent in the schedulers
  --elasticep-dry-run                 parse SGLang's arguments with its own parser, install the
                                      hooks here and in a spawned child, print a JSON report and
                                      exit without starting a server
  --elasticep-help                    this text

Exit status 2 with a one-line message on an unsupported SGLang release or unusable settings.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import runpy
import sys
from typing import Any

from elasticep_sglang.compat import SUPPORTED_SGLANG, SGLangNotInstalled, UnsupportedSGLangVersion, check_sglang_version
from elasticep_sglang.hooks import ENV_AGENT, ENV_ENABLE, ENV_MAX_MOVES, ENV_PERIODIC, install_from_env, installed_hooks
from elasticep_sglang.scheduler_agent import ENV_CLUSTER, ENV_STORE

__all__ = ["main"]

_store_server: Any = None
"""The agents' ``TCPStore`` server when this wrapper hosts it (kept alive with the process)."""


def _max_moves(text: str) -> str:
    """``--elasticep-max-moves``: an int >= 0, ``auto`` or ``none`` (an argument error otherwise)."""
    value = text.strip().lower()
    if value in ("auto", "none") or (value.isdigit() and value.isascii()):
        return value
    raise argparse.ArgumentTypeError(f"expected an integer >= 0, 'auto' or 'none', not {text!r}")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m elasticep_sglang.launch_server", add_help=False)
    p.add_argument("--elasticep-max-moves", default="auto", type=_max_moves, metavar="N|auto|none")
    p.add_argument("--elasticep-periodic", default="sglang", choices=["sglang", "elasticep"])
    p.add_argument("--elasticep-store", default=None, metavar="HOST:PORT")
    p.add_argument("--elasticep-cluster", default=None, metavar="NAME")
    p.add_argument("--no-elasticep-agent", dest="elasticep_agent", action="store_false")
    p.add_argument("--elasticep-dry-run", action="store_true")
    p.add_argument("--elasticep-help", action="store_true")
    return p


def _topology(sglang_argv: list[str]) -> dict[str, Any]:
    """The few SGLang flags the agent's set-up needs, read without SGLang's full resolution."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--tp-size", "--tp", type=int, default=1)
    p.add_argument("--nnodes", type=int, default=1)
    p.add_argument("--max-ep-size", type=int, default=None)
    p.add_argument("--elastic-ep-backend", default=None)
    known, _ = p.parse_known_args(sglang_argv)
    return {"ranks": max(known.tp_size, known.max_ep_size or 0), "nnodes": known.nnodes,
            "elastic_ep_backend": known.elastic_ep_backend}


def _set_up_agent(opts: argparse.Namespace, sglang_argv: list[str]) -> dict[str, Any]:
    """Settings for the schedulers' agents, in the environment they inherit; raises
    ``ValueError`` for settings that cannot work."""
    global _store_server
    from elasticep.agent import parse_store_address
    from elasticep.bus import ClusterKeys
    from elasticep.bus.keys import KEYS_ENV

    topo = _topology(sglang_argv)
    os.environ[ENV_AGENT] = "1"
    if opts.elasticep_cluster:
        os.environ[ENV_CLUSTER] = opts.elasticep_cluster
    store = opts.elasticep_store or os.environ.get(ENV_STORE)
    hosted = False
    if store:
        parse_store_address(store)
    elif topo["nnodes"] == 1:
        import datetime

        from torch.distributed import TCPStore

        _store_server = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                                 timeout=datetime.timedelta(seconds=30))
        store = f"127.0.0.1:{_store_server.port}"
        hosted = True
    if store:
        os.environ[ENV_STORE] = store
    generated = False
    if KEYS_ENV not in os.environ:
        if topo["nnodes"] > 1:
            raise ValueError(f"--nnodes {topo['nnodes']}: give every node the same {KEYS_ENV} (the cluster's bus "
                             "keys, e.g. from elasticep.bus.ClusterKeys.generate(ranks).to_json())")
        os.environ[KEYS_ENV] = ClusterKeys.generate(max(topo["ranks"], 1)).to_json()
        generated = True
    if not topo["elastic_ep_backend"]:
        print("note: without --elastic-ep-backend SGLang never calls its step boundary and the agent does not "
              "start; use --elastic-ep-backend mooncake", file=sys.stderr)
    return {"enabled": True, "store": store or "torch.distributed", "store_hosted_here": hosted,
            "keys_generated": generated, "ranks": topo["ranks"], "cluster": os.environ.get(ENV_CLUSTER, "sglang")}


def _hook_report() -> dict[str, Any]:
    """What is installed in this process (run in the wrapper and in a spawned child)."""
    import sglang.srt.eplb.eplb_algorithms as algorithms

    from elasticep_sglang.rebalance import ElasticRebalance

    hooks = installed_hooks()
    entry = algorithms.rebalance_experts
    return {
        "pid": os.getpid(),
        "installed": hooks is not None,
        "agent_step": hooks is not None and hooks.step is not None and hooks.step.agent is not None,
        "store": os.environ.get(ENV_STORE),
        "sglang": hooks.version if hooks else None,
        "rebalance_entry": type(entry).__name__ if isinstance(entry, ElasticRebalance) else getattr(entry, "__module__", "?"),
        "max_moves": entry.max_moves if isinstance(entry, ElasticRebalance) else None,
        "periodic": entry.periodic if isinstance(entry, ElasticRebalance) else None,
    }


def _child_report(queue: Any) -> None:
    queue.put(_hook_report())


def _dry_run(sglang_argv: list[str], agent: dict[str, Any]) -> int:
    from sglang.srt.server_args import prepare_server_args

    server_args = prepare_server_args(sglang_argv)
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_child_report, args=(queue,))
    child.start()
    try:
        child_report = queue.get(timeout=120)
    finally:
        child.join(timeout=30)
        if child.is_alive():
            child.kill()
            child.join()
    report = {
        "supported": SUPPORTED_SGLANG,
        "server_args": {
            name: getattr(server_args, name, None)
            for name in ("model_path", "tp_size", "ep_size", "moe_a2a_backend", "elastic_ep_backend",
                         "enable_eplb", "eplb_algorithm", "ep_num_redundant_experts")
        },
        "wrapper": _hook_report(),
        "spawned_child": child_report,
        "agent": agent,
    }
    print(json.dumps(report, sort_keys=True))
    if not getattr(server_args, "elastic_ep_backend", None):
        print("note: without --elastic-ep-backend SGLang keeps no active-ranks state; the hooks then "
              "only serve SGLang's periodic rebalance", file=sys.stderr)
    return 0 if report["wrapper"]["installed"] and child_report["installed"] else 1


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    opts, sglang_argv = _parser().parse_known_args(argv)
    if opts.elasticep_help:
        print(__doc__)
        return 0
    try:
        check_sglang_version()
    except (UnsupportedSGLangVersion, SGLangNotInstalled) as exc:
        print(f"elasticep_sglang: {exc}", file=sys.stderr)
        return 2
    os.environ[ENV_ENABLE] = "1"
    os.environ[ENV_MAX_MOVES] = str(opts.elasticep_max_moves)
    os.environ[ENV_PERIODIC] = opts.elasticep_periodic
    agent: dict[str, Any] = {"enabled": False}
    if opts.elasticep_agent:
        try:
            agent = _set_up_agent(opts, sglang_argv)
        except ValueError as exc:
            print(f"elasticep_sglang: {exc}", file=sys.stderr)
            return 2
    else:
        os.environ.pop(ENV_AGENT, None)
    install_from_env()  # in this process the agent never starts: it has no step boundary
    if opts.elasticep_dry_run:
        return _dry_run(sglang_argv, agent)
    # SGLang's own entry, unchanged; sys.modules["__main__"] stays this module (alter_sys=False),
    # so the schedulers SGLang spawns import it, and install the hooks, first.
    sys.argv = ["sglang.launch_server", *sglang_argv]
    runpy.run_module("sglang.launch_server", run_name="__main__", alter_sys=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
elif __name__ == "__mp_main__":
    install_from_env()
