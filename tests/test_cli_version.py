"""``elasticep --version`` prints the package version."""

from __future__ import annotations

import elasticep
from elasticep.cli import main


def test_version(capsys) -> None:
    for flag in ("--version", "-V"):
        assert main([flag]) == 0
        assert capsys.readouterr().out.strip() == f"elasticep {elasticep.__version__}"


def test_bench_vllm_without_vllms_environment_says_how_to_build_it(monkeypatch, capsys) -> None:
    from elasticep.cli import main

    monkeypatch.setenv("ELASTICEP_VLLM_PYTHON", "/nonexistent/bin/python")
    assert main(["bench", "vllm", "--runs", "1"]) == 2
    assert "setup-vllm.sh" in capsys.readouterr().err
