"""The front door: ``elasticep.__all__`` names exactly what it re-exports, and each resolves."""

from __future__ import annotations

import subprocess
import sys

import elasticep


def test_every_public_name_resolves_to_its_home() -> None:
    assert len(elasticep.__all__) == len(set(elasticep.__all__))
    for name in elasticep.__all__:
        value = getattr(elasticep, name)
        if name == "__version__":
            continue
        module = elasticep._WHERE[name]
        assert value is getattr(__import__(module, fromlist=[name]), name), name
        sub = sys.modules[module]
        if hasattr(sub, "__all__") and module.count(".") == 1:
            assert name in sub.__all__, f"{name} is not public in {module}"


def test_all_lists_every_export_and_nothing_else() -> None:
    assert set(elasticep.__all__) == {"__version__", *elasticep._WHERE}


def test_unknown_name_is_an_attribute_error() -> None:
    try:
        elasticep.NoSuchThing  # noqa: B018
    except AttributeError as err:
        assert "NoSuchThing" in str(err)
    else:
        raise AssertionError("expected AttributeError")


def test_import_is_cheap() -> None:
    code = "import sys, elasticep; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.split() == ["False", "False"]
