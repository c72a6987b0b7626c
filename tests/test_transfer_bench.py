"""``elasticep bench transfer`` runs end to end and writes the keys the docs promise (no timing asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import elasticep.transfer as transfer

pytestmark = [
    pytest.mark.multiproc,
    pytest.mark.skipif(
        transfer.mooncake_te_unavailable_reason() is not None, reason=str(transfer.mooncake_te_unavailable_reason())
    ),
]


@pytest.mark.timeout(120)
def test_bench_transfer_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "transfer.json"
    # A fresh interpreter: the bench forks its source rank before starting an engine of its own.
    proc = subprocess.run(
        [sys.executable, "-m", "elasticep.cli", "bench", "transfer", "--sizes", "0.25", "1",
         "--count", "2", "--repeats", "1", "--json", str(out)],
        capture_output=True, text=True, timeout=110,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["bytes"] == sum(r["bytes"] for r in result["sizes"]) > 0
    for key in ("elasticep_gib_s", "raw_mooncake_gib_s", "raw_mooncake_read_gib_s", "ratio"):
        assert result[key] > 0, key
    assert [r["count"] for r in result["sizes"]] == [2, 2]
    assert "raw Mooncake write" in proc.stdout
