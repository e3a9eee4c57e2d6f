#!/usr/bin/env bash
# Runs the whole test suite (unit + integration against the real ComfyUI host) on CPU.
# Usage: bash scripts/test.sh [pytest args]
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/env.sh" || exit 1
cd "$ROOT" && exec python -m pytest -q "$@"
