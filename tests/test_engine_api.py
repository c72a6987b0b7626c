"""The public names of elasticep.engine and elasticep.testing are exported and importable."""

from __future__ import annotations

import elasticep.engine as engine
import elasticep.testing as testing


def test_all_names_resolve() -> None:
    for module in (engine, testing):
        assert len(module.__all__) == len(set(module.__all__))
        for name in module.__all__:
            assert getattr(module, name) is not None, f"{module.__name__}.{name}"


def test_public_classes_of_submodules_are_exported() -> None:
    from elasticep.engine import ep, launcher, model, oracle, router

    for sub in (ep, launcher, model, oracle, router):
        for name in sub.__all__:
            assert name in engine.__all__, f"{sub.__name__}.{name} is not exported by elasticep.engine"
