#!/usr/bin/env bash
# `./scripts/run.sh` == bootstrap + `emarsys-stream run` (embedded broker + Emarsys simulator + worker).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/bootstrap.sh
exec .venv/bin/emarsys-stream run "$@"
