"""``python -m elasticep_sglang.launch_server [elasticep options] <sglang launch_server args>``.

Installs the adapter's hooks, then runs SGLang's own ``sglang.launch_server`` entry with the
remaining arguments. SGLang starts its schedulers with the ``spawn`` start method, which imports
the parent's main module (this one) in each child as ``__mp_main__``; the hooks are installed
there too, from the environment this wrapper sets (:data:`~elasticep_sglang.hooks.ENV_ENABLE`).

elasticep options (all others go to SGLang):

  --elasticep-max-moves N|auto|none   slots the planner may change beyond the coverage repair
  --elasticep-periodic sglang|elasticep
                                      who plans the all-alive periodic rebalance
  --elasticep-dry-run                 parse SGLang's arguments with its own parser, install the
                                      hooks here and in a spawned child, print a JSON report and
                                      exit without starting a server
  --elasticep-help                    this text

Exit status 2 with a one-line message on an unsupported SGLang release.
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
from elasticep_sglang.hooks import ENV_ENABLE, ENV_MAX_MOVES, ENV_PERIODIC, install_from_env, installed_hooks

__all__ = ["main"]


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
    p.add_argument("--elasticep-dry-run", action="store_true")
    p.add_argument("--elasticep-help", action="store_true")
    return p


def _hook_report() -> dict[str, Any]:
    """What is installed in this process (run in the wrapper and in a spawned child)."""
    import sglang.srt.eplb.eplb_algorithms as algorithms

    from elasticep_sglang.rebalance import ElasticRebalance

    hooks = installed_hooks()
    entry = algorithms.rebalance_experts
    return {
        "pid": os.getpid(),
        "installed": hooks is not None,
        "sglang": hooks.version if hooks else None,
        "rebalance_entry": type(entry).__name__ if isinstance(entry, ElasticRebalance) else getattr(entry, "__module__", "?"),
        "max_moves": entry.max_moves if isinstance(entry, ElasticRebalance) else None,
        "periodic": entry.periodic if isinstance(entry, ElasticRebalance) else None,
    }


def _child_report(queue: Any) -> None:
    queue.put(_hook_report())


def _dry_run(sglang_argv: list[str]) -> int:
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
    install_from_env()
    if opts.elasticep_dry_run:
        return _dry_run(sglang_argv)
    # SGLang's own entry, unchanged; sys.modules["__main__"] stays this module (alter_sys=False),
    # so the schedulers SGLang spawns import it, and install the hooks, first.
    sys.argv = ["sglang.launch_server", *sglang_argv]
    runpy.run_module("sglang.launch_server", run_name="__main__", alter_sys=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
elif __name__ == "__mp_main__":
    install_from_env()
