#!/usr/bin/env bash
# Quick start #1: set up, then fine-tune SmolLM2-135M-Instruct on the bundled data and compare.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/lorakit demo "$@"
