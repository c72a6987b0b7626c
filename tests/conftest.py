"""Shared settings: a short resolver timeout (below), asyncio debug mode (pyproject's ``asyncio_debug``), warnings as errors, and
elasticep's own pytest fixtures (``elasticep.testing.fixtures``)."""

from __future__ import annotations

import os

os.environ.setdefault("MC_LOG_LEVEL", "WARNING")
# Every TCPStore connect makes torch look up the peer's name (a reverse lookup of ::ffff:127.0.0.1,
# which /etc/hosts does not answer, so it goes to the DNS server). A server that rate-limits those
# queries drops them once a few dozen connects come close together, and each dropped one then
# stalls its connect for the resolver's 5 s timeout: past the 5 s a short store client allows.
# One second and one attempt bound that stall; the name is only used in torch's log lines. Set
# here for this process and every rank process the tests start (scripts/test sets it too, before
# Python starts).
os.environ.setdefault("RES_OPTIONS", "timeout:1 attempts:1")

pytest_plugins = ["elasticep.testing.fixtures"]
