#!/usr/bin/env bash
# Build llama-cpp-python's OpenAI-compatible server (and the gguf package, which the tests use to write
# a tiny model) into a venv cached outside the repository, keyed by version: the model handler's tests
# and bench/model_stream.py run a real model server from it. llama-cpp-python ships no wheels for
# Linux on PyPI, so pip compiles llama.cpp from the sdist: about 6.5 minutes on 2 cores, once per
# version (or recipe change); a warm cache makes this a no-op that takes well under a second.
# SKIP_LLAMA=1 skips it (the tests that need the server then skip, saying so).
set -euo pipefail

LLAMA_CPP_PYTHON_VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"  # keep in step with harness modelserver.py
GGUF_VERSION="${GGUF_VERSION:-0.19.0}"
CACHE="${STREAMQUEUE_LLAMA_CACHE:-$HOME/.cache/streamqueue-llama}"
DIR="$CACHE/$LLAMA_CPP_PYTHON_VERSION"
PY="${PYTHON:-python3}"

log() { printf '[llama %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
# Compile on every core (CMake's default under pip can be one job at a time).
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"

[ "${SKIP_LLAMA:-0}" = 1 ] && { log "SKIP_LLAMA=1: not building llama-cpp-python"; exit 0; }

build_llama() {
  # A portable CPU build: no -march=native (the cache may move between CI machines), no BLAS, no
  # llama.cpp tests or examples. Built in place: only the recipe stamp, written last, makes it count.
  rm -rf "$DIR/venv" "$DIR/recipe"
  "$PY" -m venv "$DIR/venv"
  "$DIR/venv/bin/python" -m pip install -q --upgrade pip
  CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DGGML_BLAS=OFF" \
    "$DIR/venv/bin/python" -m pip install -q \
    "llama-cpp-python[server]==$LLAMA_CPP_PYTHON_VERSION" "gguf==$GGUF_VERSION"
}

# The cache is keyed by version; a stamp of the recipe (this function and the gguf pin) invalidates it
# when the build changes without a version bump.
recipe() { { declare -f build_llama; echo "gguf==$GGUF_VERSION"; } | sha256sum | cut -c1-16; }

ready() {
  [ "$(cat "$DIR/recipe" 2>/dev/null)" = "$(recipe)" ] && [ -x "$DIR/venv/bin/python" ]
}

ready && { log "llama-cpp-python $LLAMA_CPP_PYTHON_VERSION cached in $DIR"; exit 0; }

mkdir -p "$DIR"
# One build at a time per cache: CI jobs and developers on one machine share it.
exec 9>"$CACHE/.lock"
if ! flock -n 9; then
  log "waiting for another build using $CACHE to finish"
  flock 9
fi
ready && { log "llama-cpp-python $LLAMA_CPP_PYTHON_VERSION cached in $DIR"; exit 0; }

log "building llama-cpp-python[server]==$LLAMA_CPP_PYTHON_VERSION and gguf==$GGUF_VERSION into $DIR/venv (several minutes, once)"
start=$SECONDS
build_llama
"$DIR/venv/bin/python" -c "import llama_cpp.server, gguf"
recipe > "$DIR/recipe"
log "built in $((SECONDS - start))s"
