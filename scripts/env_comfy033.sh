#!/usr/bin/env bash
# Source this file: the second test host, ComfyUI v0.33.0 (Aug 2026; scripts/env.sh sets up 0.3.75).
#   1. extracts the unmodified source tarball (sha256 checked against the value below) into
#      .cache/comfyui-0.33.0 (once; again only when the tarball changes);
#   2. creates a separate virtual environment ($APT_VENV_V033, default .venv-comfy033) with v0.33.0's
#      requirements.txt pins, the pinned torch trio, the pack's requirements.txt and the test tools, in
#      ONE pip call (re-installs only when any of these inputs change: stamp file in the venv);
#   3. activates it and exports APT_COMFYUI_DIR=<the v0.33.0 tree>.
# ComfyUI is not on the package registry under its own name: the tarball comes from the workspace's
# ../shared/hosts/ (beside the repository) or $APT_COMFYUI_V033_TARBALL. Without it (a user's fresh
# machine) this returns 3 and prints why, unless the tree was already extracted.
# Return codes: 0 ready, 3 tarball missing (skip), 1 anything else failed.
#   source scripts/env_comfy033.sh && python -m pytest --host-only     # host-facing tests on v0.33.0
_apt033_main() {
    local root venv dest tarball want_tar stamp want pins
    root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
    venv="${APT_VENV_V033:-$root/.venv-comfy033}"
    dest="$root/.cache/comfyui-0.33.0"
    tarball="${APT_COMFYUI_V033_TARBALL:-$root/../shared/hosts/comfyui-0.33.0.tar.gz}"
    want_tar="63a66a28d63b17aee297b01782a9ed32613fd857aea2de503fe5b9ab52fb5637"
    # Everything the v0.33.0 venv gets besides the host's and the pack's requirements.txt.
    pins="torch==2.11.0 torchvision==0.26.0 torchaudio==2.11.0 pytest>=8 playwright==1.65.2 pyee==13.0.1"

    # 1. the host tree
    if [ "$(cat "$dest.sha256" 2>/dev/null || true)" != "$want_tar" ] || [ ! -f "$dest/main.py" ]; then
        if [ ! -f "$tarball" ]; then
            echo "[env033] ComfyUI v0.33.0 tarball not found at $tarball (set APT_COMFYUI_V033_TARBALL)" >&2
            return 3
        fi
        local got tmp
        got="$(sha256sum "$tarball" | cut -d' ' -f1)"
        if [ "$got" != "$want_tar" ]; then
            echo "[env033] $tarball: sha256 $got, expected $want_tar" >&2
            return 1
        fi
        echo "[env033] extracting $tarball into $dest" >&2
        mkdir -p "$root/.cache" && tmp="$(mktemp -d "$root/.cache/comfyui-0.33.0.tmp.XXXXXX")" || return 1
        if ! tar -xzf "$tarball" -C "$tmp" || [ ! -f "$tmp/comfyui/main.py" ]; then
            rm -rf "$tmp"
            echo "[env033] extracting $tarball failed (expected comfyui/main.py inside)" >&2
            return 1
        fi
        rm -rf "$dest" && mv "$tmp/comfyui" "$dest" && rm -rf "$tmp" && echo "$want_tar" > "$dest.sha256" || return 1
    fi

    # 2. the venv
    stamp="$venv/.requirements.sha256"
    want="$( { cat "$dest/requirements.txt" "$root/requirements.txt"; echo "$pins"; } | sha256sum | cut -d' ' -f1)"
    if [ ! -x "$venv/bin/python" ]; then
        echo "[env033] creating $venv" >&2
        python3 -m venv "$venv" || return 1
    fi
    if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
        echo "[env033] installing v0.33.0 requirements + torch trio + pack requirements (a few minutes)" >&2
        local log="$venv/pip-install.log"
        # shellcheck disable=SC2086  # $pins is a list of requirement specifiers
        if ! { "$venv/bin/python" -m pip install --upgrade pip && \
               "$venv/bin/python" -m pip install $pins -r "$dest/requirements.txt" -r "$root/requirements.txt"; \
             } >"$log" 2>&1; then
            tail -n 40 "$log" >&2
            echo "[env033] pip install failed; full log: $log" >&2
            return 1
        fi
        if ! "$venv/bin/python" -c "import torch, torchvision, torchaudio, peft, diffusers, kornia" >&2; then
            echo "[env033] the installed environment does not import; full pip log: $log" >&2
            return 1
        fi
        echo "$want" > "$stamp" || return 1
    fi

    # 3. activate
    # shellcheck disable=SC1091
    source "$venv/bin/activate" || return 1
    export APT_COMFYUI_DIR="$dest"
}
_apt033_main
_apt033_rc=$?
unset -f _apt033_main
if [ "$_apt033_rc" != 0 ]; then
    _r=$_apt033_rc; unset _apt033_rc
    return "$_r" 2>/dev/null || exit "$_r"
fi
unset _apt033_rc
