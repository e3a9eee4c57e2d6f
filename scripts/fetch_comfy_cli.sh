#!/usr/bin/env bash
# Installs comfy-cli, the Comfy Registry's packer (`comfy node pack` / `comfy node publish`), into its
# own virtual environment .cache/comfy-cli (once; it has many dependencies of its own, kept out of
# .venv). tests/test_packaging.py builds the registry zip with it. Needs only the package registry.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.cache/comfy-cli"
PIN="comfy-cli==1.23.0"
if [ "$(cat "$VENV/.pin" 2>/dev/null || true)" != "$PIN" ]; then
    echo "[env] installing $PIN into $VENV" >&2
    rm -rf "$VENV"
    python3 -m venv "$VENV"
    if ! "$VENV/bin/python" -m pip install -q "$PIN" >"$ROOT/.cache/comfy-cli.log" 2>&1; then
        tail -n 20 "$ROOT/.cache/comfy-cli.log" >&2
        echo "[env] installing $PIN failed: the registry-zip test will skip (fail under CI)" >&2
        exit 0
    fi
    echo "$PIN" > "$VENV/.pin"
fi
