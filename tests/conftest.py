"""Shared settings: asyncio debug mode (pyproject's ``asyncio_debug``), warnings as errors, and
elasticep's own pytest fixtures (``elasticep.testing.fixtures``)."""

from __future__ import annotations

import os

os.environ.setdefault("MC_LOG_LEVEL", "WARNING")

pytest_plugins = ["elasticep.testing.fixtures"]
