"""``elasticep --version`` prints the package version."""

from __future__ import annotations

import elasticep
from elasticep.cli import main


def test_version(capsys) -> None:
    for flag in ("--version", "-V"):
        assert main([flag]) == 0
        assert capsys.readouterr().out.strip() == f"elasticep {elasticep.__version__}"
