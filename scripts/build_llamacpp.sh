#!/usr/bin/env bash
# Build llama.cpp's command-line tools (llama-server, llama-bench, llama-perplexity, llama-quantize,
# llama-cli) and libllama from the copy vendored in the llama-cpp-python 0.3.36 sdist (PyPI), for the
# comparison benchmarks (benchmarks/bench_frontier.py). Nothing of it is part of sparse-export.
#
#   bash scripts/build_llamacpp.sh DIR      # binaries in DIR/llama_cpp_python-0.3.36/vendor/llama.cpp/build/bin
#
# Idempotent: when every binary exists it prints the bin folder and exits. Needs cmake, a C++17 compiler
# and pip (any python with pip: $PYTHON, default python3). -DGGML_NATIVE=ON: tuned for this CPU (its own
# AVX-512 / VNNI paths), as a user building llama.cpp for their server would.
set -euo pipefail
DIR=${1:?usage: build_llamacpp.sh DIR}
VERSION=0.3.36
PYTHON=${PYTHON:-python3}
TARGETS=(llama-server llama-bench llama-perplexity llama-quantize llama-cli)
SRC="$DIR/llama_cpp_python-$VERSION/vendor/llama.cpp"
BIN="$SRC/build/bin"

have_all() {
  for t in "${TARGETS[@]}"; do [ -x "$BIN/$t" ] || return 1; done
  ls "$BIN"/libllama.so* >/dev/null 2>&1 || ls "$SRC"/build/src/libllama.so* >/dev/null 2>&1
}
if have_all; then echo "$BIN"; exit 0; fi

mkdir -p "$DIR"
if [ ! -d "$SRC" ]; then
  if [ ! -f "$DIR/llama_cpp_python-$VERSION.tar.gz" ]; then
    "$PYTHON" -m pip download --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$DIR" >&2
  fi
  tar -xzf "$DIR/llama_cpp_python-$VERSION.tar.gz" -C "$DIR"
fi
# -mno-amx-*: this machine's CPU lists AMX (amx_tile/int8/bf16) but the VM faults on tile instructions
# (llama-server died with SIGILL in ggml's AMX matmul on its warm-up batch): build without them.
NOAMX="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
cmake -S "$SRC" -B "$SRC/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DGGML_NATIVE=ON \
  -DBUILD_SHARED_LIBS=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_OPENSSL=OFF \
  "-DCMAKE_C_FLAGS=$NOAMX" "-DCMAKE_CXX_FLAGS=$NOAMX" >&2
cmake --build "$SRC/build" -j"$(nproc)" --target "${TARGETS[@]}" >&2
have_all || { echo "build_llamacpp.sh: the build finished without every binary in $BIN" >&2; exit 1; }
echo "$BIN"
