"""``elasticep bench kernel`` runs end to end at a tiny size and writes the keys the docs name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from elasticep.bench import kernel as bench


@pytest.mark.multiproc
@pytest.mark.timeout(120)
def test_bench_kernel_writes_its_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "kernel.json"
    argv = ["--ranks", "2", "--tokens", "8", "--hidden", "64", "--iters", "5", "--warmup", "2",
            "--gloo-iters", "3", "--gloo-warmup", "1", "--json", str(out)]
    assert bench.main(argv) == 0
    res = json.loads(out.read_text())
    for key in ("ranks", "tokens", "hidden", "dispatch_combine_p50_us", "shm_copy_p50_us", "gloo_all_to_all_p50_us"):
        assert key in res
    assert (res["ranks"], res["tokens"], res["hidden"]) == (2, 8, 64)
    assert res["dispatch_combine_p50_us"] > 0 and res["shm_copy_p50_us"] > 0 and res["gloo_all_to_all_p50_us"] > 0
    assert res["masks_all_active"] is True
    assert "all_to_all_single" in capsys.readouterr().out
