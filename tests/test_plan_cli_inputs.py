"""``elasticep plan`` refuses bad --dead / --leaving with status 2 and a message, never a traceback."""

from __future__ import annotations

import json

import pytest
import torch

from elasticep.eplb import initial
from elasticep.eplb.cli import main


@pytest.fixture()
def files(tmp_path):
    load = torch.ones(2, 16)
    (tmp_path / "load.json").write_text(json.dumps(load.tolist()))
    (tmp_path / "cur.json").write_text(json.dumps(initial(load, 8, 3).to_dict()))
    return str(tmp_path / "load.json"), str(tmp_path / "cur.json")


@pytest.mark.parametrize("flag", ["--dead=-1", "--dead=9", "--dead=8", "--dead=x", "--leaving=12"])
def test_bad_rank_ids_exit_2(files, flag, capsys) -> None:
    load, cur = files
    assert main([load, "--current", cur, flag]) == 2
    err = capsys.readouterr().err
    assert err.startswith("elasticep plan: --") and "Traceback" not in err


def test_good_dead_still_plans(files, capsys) -> None:
    load, cur = files
    assert main([load, "--current", cur, "--dead=7", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["alive_ranks"] == 7
