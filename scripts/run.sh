#!/usr/bin/env bash
# `make run`: the embedded platform in the foreground, example models built and registered.
# Ctrl-C (or SIGTERM) stops every process it started.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
exec .venv/bin/inference-server standalone --register-examples "$@"
