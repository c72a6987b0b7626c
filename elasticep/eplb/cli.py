"""``elasticep plan``: plan an expert placement from a load file.

Without ``--current`` it computes a balanced first placement (:func:`~elasticep.eplb.initial`);
with ``--current`` (a placement written by an earlier ``--out``, or SGLang's
``{"physical_to_logical_map": ...}``) it replans for the given dead, leaving or added ranks
(:func:`~elasticep.eplb.replan`). It prints a summary, or JSON with ``--json``; ``--out PATH``
writes the new placement for the next run.

The load file is ``.pt`` or ``.json`` holding a ``[layers, experts]`` array (``[experts]`` for
one layer), or a dict with it under ``"load"`` or SGLang's ``"logical_count"`` (a leading
dimension, e.g. SGLang's per-rank or per-window counts, is summed).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

import pickle

import torch

from elasticep.eplb.placement import Placement, RedundancyExhausted
from elasticep.errors import InvalidArgument
from elasticep.eplb.planner import balance, initial, replan


def _read(path: str) -> Any:
    p = Path(path)
    if p.suffix not in (".pt", ".json"):
        raise InvalidArgument(f"{path}: expected a .pt or .json file")
    try:
        if p.suffix == ".pt":
            return torch.load(p, map_location="cpu", weights_only=True)
        return json.loads(p.read_text())
    except OSError:
        raise
    except (ValueError, RuntimeError, pickle.UnpicklingError, EOFError, UnicodeDecodeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InvalidArgument(f"{path}: not a readable {p.suffix} file ({first})") from None


def read_load(path: str) -> torch.Tensor:
    """``[layers, experts]`` float64 load from a ``.pt`` or ``.json`` file (see the module doc)."""
    data = _read(path)
    if isinstance(data, dict):
        for key in ("load", "logical_count"):
            if key in data:
                data = data[key]
                break
        else:
            raise InvalidArgument(f"{path}: a dict load file needs a 'load' or 'logical_count' entry")
    try:
        t = torch.as_tensor(data).to(torch.float64)
    except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
        raise InvalidArgument(f"{path}: load must be an array of numbers ({exc})") from None
    if t.dim() == 3:
        t = t.sum(0)
    if t.dim() == 1:
        t = t.unsqueeze(0)
    if t.dim() != 2:
        raise InvalidArgument(f"{path}: load must be [layers, experts], got shape {tuple(t.shape)}")
    return t


def read_placement(path: str, slots_per_rank: int | None, num_experts: int) -> Placement:
    """A placement from ``--out`` JSON (``to_dict``) or SGLang's maps (``.pt`` or ``.json``)."""
    data = _read(path)
    if not isinstance(data, dict):
        raise InvalidArgument(f"{path}: expected a dict with 'phy2log' or 'physical_to_logical_map'")
    if "phy2log" in data:
        if "slots_per_rank" not in data:
            raise InvalidArgument(f"{path}: a placement from --out has 'slots_per_rank' next to 'phy2log'")
        return Placement(data["phy2log"], data["slots_per_rank"], data.get("num_experts", num_experts))
    if "physical_to_logical_map" in data:
        if slots_per_rank is None:
            raise InvalidArgument("an SGLang map needs --slots-per-rank")
        return Placement.from_sglang(
            data["physical_to_logical_map"], data.get("logical_to_all_physical_map"),
            slots_per_rank=slots_per_rank, num_experts=num_experts,
        )
    raise InvalidArgument(f"{path}: expected a dict with 'phy2log' or 'physical_to_logical_map'")


def _ids(text: str | None, what: str = "ranks", num_ranks: int | None = None) -> list[int]:
    """Comma-separated rank ids; each must be an integer in ``0..num_ranks-1`` (ValueError)."""
    if not text:
        return []
    ids = []
    for x in text.split(","):
        if not x.strip():
            continue
        try:
            r = int(x)
        except ValueError:
            raise InvalidArgument(f"--{what}: {x.strip()!r} is not a rank id") from None
        if r < 0 or (num_ranks is not None and r >= num_ranks):
            bound = f"0..{num_ranks - 1}" if num_ranks is not None else ">= 0"
            raise InvalidArgument(f"--{what}: rank {r} is outside {bound}")
        ids.append(r)
    return ids


MAX_RANKS = 4096
"""The most ranks ``elasticep plan`` plans for (the largest cluster ``elasticep bench scale``
models); a larger ``--ranks`` is a usage error (status 2), not minutes of planning."""
MAX_SLOTS_PER_RANK = 1024
"""The most expert slots per rank ``elasticep plan`` takes."""

_ROLE = re.compile(r":[a-z]+:`~?(?:[\w.]+\.)?(\w+)`")


def plain(rst: str) -> str:
    """``rst`` as plain text for a terminal: Sphinx roles become the bare name (``initial()``
    for a function), inline literals lose their double backticks."""
    text = _ROLE.sub(lambda m: m.group(1) + ("()" if m.group(0).startswith(":func:") else ""), rst)
    return text.replace("``", "")


def main(argv: list[str] | None = None) -> int:
    head, _, rest = __doc__.partition("\n\n")
    ap = argparse.ArgumentParser(prog="elasticep plan", description=plain(head) + "\n\n" + plain(rest.strip()),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("load", help="load file (.pt or .json), [layers, experts]")
    ap.add_argument("--ranks", type=int, help="EP ranks (default: the current placement's)")
    ap.add_argument("--slots-per-rank", type=int, help="physical expert slots per rank")
    ap.add_argument("--current", help="current placement (.json from --out, or SGLang's map)")
    ap.add_argument("--dead", help="comma-separated dead ranks")
    ap.add_argument("--leaving", help="comma-separated ranks leaving gracefully")
    ap.add_argument("--max-moves", type=int, help="moves allowed beyond the coverage repair (default: no limit)")
    ap.add_argument("--groups", type=int, help="expert groups (hierarchical first placement)")
    ap.add_argument("--nodes", type=int, default=1, help="nodes (hierarchical first placement)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a summary")
    ap.add_argument("--moves", action="store_true", help="with --json, list every move under \"move_list\"")
    ap.add_argument("--out", help="write the new placement as JSON (input for --current)")
    args = ap.parse_args(argv)
    if args.ranks is not None and not 1 <= args.ranks <= MAX_RANKS:
        ap.error(f"--ranks must be 1..{MAX_RANKS}, not {args.ranks}")
    if args.slots_per_rank is not None and not 1 <= args.slots_per_rank <= MAX_SLOTS_PER_RANK:
        ap.error(f"--slots-per-rank must be 1..{MAX_SLOTS_PER_RANK}, not {args.slots_per_rank}")

    try:
        load = read_load(args.load)
        if args.current:
            current = read_placement(args.current, args.slots_per_rank, load.shape[1])
            R = max(args.ranks or current.num_ranks, current.num_ranks)
            alive = torch.ones(R, dtype=torch.bool)
            alive[_ids(args.dead, "dead", R)] = False
            plan = replan(current, load, alive, max_moves=args.max_moves, leaving=_ids(args.leaving, "leaving", R))
            placement = plan.placement
            result: dict[str, Any] = {"mode": "replan", **plan.summary()}
            if args.moves:
                result["move_list"] = [
                    {"layer": m.layer, "slot": m.slot, "expert": m.expert, "previous": m.previous, "sources": list(m.sources)}
                    for m in plan.moves
                ]
        else:
            if args.ranks is None or args.slots_per_rank is None:
                ap.error("without --current, give --ranks and --slots-per-rank")
            placement = initial(load, args.ranks, args.slots_per_rank, args.groups, args.nodes)
            result = {
                "mode": "initial",
                "layers": placement.num_layers,
                "experts": placement.num_experts,
                "ranks": placement.num_ranks,
                "slots_per_rank": placement.slots_per_rank,
                "balance": balance(placement, load),
                "max_replicas": placement.max_replicas,
            }
    except RedundancyExhausted as exc:
        print(f"elasticep plan: {exc}", file=sys.stderr)
        return 3
    except (ValueError, OSError) as exc:
        print(f"elasticep plan: {exc}", file=sys.stderr)
        return 2

    if args.out:
        Path(args.out).write_text(json.dumps(placement.to_dict()))
    if args.json:
        print(json.dumps(result, indent=2))
    elif result["mode"] == "replan":
        print(result["reason"])
        print(f"moves: {result['moves']} (lower bound {result['lower_bound']}); "
              f"ranks alive {result['alive_ranks']}/{result['ranks']}, holding experts {result['target_ranks']}")
    else:
        print(f"initial placement: {result['layers']} layers x {result['experts']} experts on "
              f"{result['ranks']} ranks x {result['slots_per_rank']} slots; balance {result['balance']:.4f}, "
              f"at most {result['max_replicas']} replicas per expert")
    return 0


if __name__ == "__main__":
    sys.exit(main())
