"""``python -m elasticep_sglang.launch_server``: a bad elasticep option is an argument error
(status 2, usage and a one-line message), never a traceback from deep inside the hooks."""

from __future__ import annotations

import subprocess
import sys

import pytest

launch_server = pytest.importorskip("elasticep_sglang.launch_server", reason="needs the sglang adapter importable")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("value", ["lots", "-3", "1.5", ""])
def test_bad_max_moves_is_an_argument_error(value: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "elasticep_sglang.launch_server", f"--elasticep-max-moves={value}", "--model-path", "x"],
        capture_output=True, text=True, timeout=100,
    )
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    assert "argument --elasticep-max-moves" in out.stderr and "'auto' or 'none'" in out.stderr


@pytest.mark.parametrize("value, parsed", [("7", "7"), ("0", "0"), ("AUTO", "auto"), ("none", "none")])
def test_good_max_moves_parse(value: str, parsed: str) -> None:
    opts, rest = launch_server._parser().parse_known_args(["--elasticep-max-moves", value, "--tp-size", "2"])
    assert opts.elasticep_max_moves == parsed and rest == ["--tp-size", "2"]


def test_bad_periodic_is_an_argument_error() -> None:
    with pytest.raises(SystemExit) as exit_:
        launch_server.main(["--elasticep-periodic", "sometimes"])
    assert exit_.value.code == 2


def test_a_bad_max_moves_in_the_environment_is_a_typed_refusal() -> None:
    from elasticep import metrics
    from elasticep.errors import InvalidArgument
    from elasticep_sglang.hooks import ENV_ENABLE, ENV_MAX_MOVES, install_from_env

    before = metrics.sample("elasticep_api_refused_total", {"area": "sglang"})
    with pytest.raises(InvalidArgument, match=ENV_MAX_MOVES):
        install_from_env({ENV_ENABLE: "1", ENV_MAX_MOVES: "lots"})
    assert metrics.sample("elasticep_api_refused_total", {"area": "sglang"}) == before + 1
