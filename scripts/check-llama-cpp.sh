#!/usr/bin/env bash
# Check the GGUF export with llama.cpp itself (not in CI): build llama-cpp-python from source into a cache folder,
# then compare llama.cpp's tokenization and greedy tokens with transformers' on the same exports
# (scripts/check_llama_cpp.py). transformers' GGUF loader dequantizes the file and rebuilds the tokenizer itself,
# so it would not notice a file that llama.cpp splits or runs differently; this does.
# llama-cpp-python ships no CPU wheel: the first run compiles llama.cpp (about an hour on a busy 2-core VM, minutes
# on a workstation); later runs reuse the build. Only the folder it builds (and its .partial while building) is
# ever written or removed under the cache.
# Usage: bash scripts/check-llama-cpp.sh [--build_only]   (after scripts/setup.sh)
#   GENESIS_HF_LLAMA_CPP_CACHE   cache folder (default ~/.cache/genesis_hf/llama-cpp)
#   GENESIS_HF_LLAMA_CPP_VERSION llama-cpp-python release to build (default 0.3.36)
#   GENESIS_HF_LLAMA_CPP_JOBS    parallel compile jobs (default 1; the build runs under nice -n 19)
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION=${GENESIS_HF_LLAMA_CPP_VERSION:-0.3.36}
CACHE=${GENESIS_HF_LLAMA_CPP_CACHE:-$HOME/.cache/genesis_hf/llama-cpp}
JOBS=${GENESIS_HF_LLAMA_CPP_JOBS:-1}
PYTHON=${PYTHON:-.venv/bin/python}
TARGET=$CACHE/llama-cpp-python-$VERSION
STAMP=$TARGET/.genesis_hf-built

if [ ! -f "$STAMP" ]; then
    if [ -e "$TARGET" ]; then
        echo "check-llama-cpp.sh: $TARGET exists but was not finished by this script; move it away or set" \
            "GENESIS_HF_LLAMA_CPP_CACHE to another folder" >&2
        exit 1
    fi
    mkdir -p "$CACHE"
    rm -rf "$TARGET.partial"  # this script's own unfinished build
    echo "check-llama-cpp.sh: building llama-cpp-python $VERSION from source into $TARGET ($JOBS job(s))" >&2
    # CPU only, no multimodal or server tools, portable (no -march=native) so the cache survives a CPU change.
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_BLAS=OFF -DGGML_OPENMP=OFF -DLLAVA_BUILD=OFF -DLLAMA_CURL=OFF \
-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF" \
    CMAKE_BUILD_PARALLEL_LEVEL=$JOBS MAKEFLAGS=-j$JOBS \
        nice -n 19 "$PYTHON" -m pip install --quiet --no-deps --no-binary llama-cpp-python \
        --target "$TARGET.partial" "llama-cpp-python==$VERSION" diskcache
    echo "$VERSION" > "$TARGET.partial/.genesis_hf-built"
    mv "$TARGET.partial" "$TARGET"
fi
if [ "${1:-}" = "--build_only" ]; then
    echo "llama-cpp-python $VERSION is built in $TARGET"
    exit 0
fi
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" scripts/check_llama_cpp.py --llama_cpp_path "$TARGET" "$@"
