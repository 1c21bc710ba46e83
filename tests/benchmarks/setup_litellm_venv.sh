#!/usr/bin/env bash
# Create a separate venv holding the LiteLLM proxy, for the comparison rows of
# the benchmark (tests/benchmarks/run.py --litellm-venv PATH).
#
#     tests/benchmarks/setup_litellm_venv.sh [PATH]     # default /tmp/litellm-proxy-venv
#
# litellm 1.103.0 resolves from our registry; 1.103.11+ need an unpublished
# certifi, and 1.82.7/1.82.8 must never be installed.
set -euo pipefail

venv="${1:-/tmp/litellm-proxy-venv}"
python="${PYTHON:-python3}"

"$python" -m venv "$venv"
"$venv/bin/pip" install --quiet --upgrade pip
"$venv/bin/pip" install 'litellm[proxy]==1.103.0'
LITELLM_LOCAL_MODEL_COST_MAP=True "$venv/bin/python" -c "import importlib.metadata as m; print('litellm', m.version('litellm'))"
echo "LiteLLM proxy installed: $venv/bin/litellm"
