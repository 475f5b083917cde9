# Sourced by demo.sh and test.sh: a virtual environment with torch 2.13.0 and the package.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
quiet() { "$@" 2>&1 | { grep -v "^WARNING: Location" || true; }; }  # pip's notes on absent local indexes
# TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu picks the CPU wheel where pip would
# otherwise fetch the multi-GB CUDA one (plain PyPI on Linux).
quiet python -m pip install -q ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==2.13.0"
quiet python -m pip install -q -e ".[test]"
# Benchmark data: a local folder laid out like shared/data, where there is one.
if [ -z "${NLM_DATA_DIR:-}" ] && [ -d ../shared/data ]; then
  export NLM_DATA_DIR="$(cd ../shared/data && pwd)"
fi
