#!/usr/bin/env bash
# Quick start #2: set up, then run the test suite (slow real-model tests: add `-m slow`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
exec .venv/bin/python -m pytest "$@"
