"""When SGLang is missing, the adapter's error is an ElasticEPError that says what to run, and
does not send the user to an install that replaces their torch without saying so."""

from __future__ import annotations

import sys
from importlib import metadata

import pytest

compat = pytest.importorskip("elasticep_sglang.compat", reason="needs the sglang adapter importable")

from elasticep.errors import ElasticEPError  # noqa: E402


def _no_sglang(monkeypatch) -> None:
    def version(name: str) -> str:
        if name == "sglang":
            raise metadata.PackageNotFoundError(name)
        return metadata.version(name)

    monkeypatch.setattr(compat.metadata, "version", version)
    monkeypatch.setitem(sys.modules, "sglang", None)  # import sglang now raises ImportError


def test_missing_sglang_says_what_to_install(monkeypatch) -> None:
    _no_sglang(monkeypatch)
    with pytest.raises(compat.SGLangNotInstalled) as err:
        compat.check_sglang_version()
    exc = err.value
    assert isinstance(exc, ElasticEPError) and isinstance(exc, ImportError)
    msg = str(exc)
    assert "--no-deps" in msg and compat.SUPPORTED_SGLANG in msg  # the way that keeps the user's torch
    assert "elasticep[sglang]" in msg and "torch" in msg  # and when the extra is the right call


def test_launch_wrapper_prints_the_advice_and_exits_2(monkeypatch, capsys) -> None:
    from elasticep_sglang import launch_server

    _no_sglang(monkeypatch)
    assert launch_server.main(["--model-path", "x"]) == 2
    err = capsys.readouterr().err
    assert "--no-deps" in err and "Traceback" not in err


def test_unsupported_version_advice_keeps_torch() -> None:
    with pytest.raises(compat.UnsupportedSGLangVersion, match="--no-deps"):
        compat.check_sglang_version("0.4.0")
