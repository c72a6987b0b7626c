"""Shared fixtures. asyncio debug mode is on for every test; warnings are errors (pyproject)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("PYTHONASYNCIODEBUG", "1")
os.environ.setdefault("MC_LOG_LEVEL", "WARNING")

pytest_plugins = ["elasticep.testing.fixtures"]


@pytest.fixture(autouse=True)
def _asyncio_debug(request: pytest.FixtureRequest) -> None:
    """Turn on asyncio debug mode for async tests (slow callbacks and unawaited coroutines)."""
    if request.node.get_closest_marker("asyncio") is not None:
        import asyncio

        try:
            asyncio.get_running_loop().set_debug(True)
        except RuntimeError:
            pass
