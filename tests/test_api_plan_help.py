"""``elasticep plan --help`` reads as plain text: no RST roles or double backticks."""

from __future__ import annotations

import subprocess
import sys

import pytest

from elasticep.eplb.cli import main, plain


def test_plan_help_has_no_rst_markup(capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "plan an expert placement from a load file" in out
    assert "``" not in out and ":func:" not in out and "`" not in out, out
    assert "initial()" in out and "replan()" in out  # the roles became the plain names
    assert '"logical_count"' in out  # quoted JSON keys are kept


def test_plain_strips_roles_and_literals() -> None:
    assert plain("use :func:`~elasticep.eplb.initial` or :class:`Placement` with ``--out``") == \
        "use initial() or Placement with --out"


@pytest.mark.timeout(120)
def test_the_console_command_prints_the_same() -> None:
    out = subprocess.run([sys.executable, "-m", "elasticep", "plan", "--help"], capture_output=True, text=True,
                         timeout=100)
    assert out.returncode == 0 and "`" not in out.stdout
