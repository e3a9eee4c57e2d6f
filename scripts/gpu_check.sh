#!/usr/bin/env bash
# GPU-day check of the APT Trainer node on the real SDXL layout (scripts/gpu_check.py says what it
# runs and prints). One command on a CUDA machine:
#   bash scripts/gpu_check.sh                 # ~7 GB checkpoint, GPU 20 steps @1024 + 2-step GPU/CPU comparison
#   bash scripts/gpu_check.sh --dry-run       # anywhere: tools, host tree, layout, prompts; nothing heavy
#   bash scripts/gpu_check.sh --cpu           # anywhere: only the 2-step CPU reference part
#   bash scripts/gpu_check.sh --compare A.safetensors B.safetensors
# Other options (--steps, --resolution, --ref-resolution, --checkpoint, --keep, --json ...): --help.
# Environment: ComfyUI v0.33.0 and its venv from scripts/env_comfy033.sh (tarball in ../shared/hosts/),
# unless APT_GPU_CHECK_PYTHON names a python that already has the host's requirements; then
# APT_COMFYUI_DIR (default .cache/comfyui-0.33.0) is the host tree.
# Exit code: 0 all checks passed, 1 a check failed, 2 a run failed, 3 no host environment.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
if [ -n "${APT_GPU_CHECK_PYTHON:-}" ]; then
    PY="$APT_GPU_CHECK_PYTHON"
    export APT_COMFYUI_DIR="${APT_COMFYUI_DIR:-$ROOT/.cache/comfyui-0.33.0}"
else
    # shellcheck disable=SC1091
    source "$ROOT/scripts/env_comfy033.sh" || { echo "[gpu_check] scripts/env_comfy033.sh failed (rc $?): no ComfyUI v0.33.0 environment" >&2; exit 3; }
    PY=python
fi
export PYTHONUNBUFFERED=1
exec "$PY" "$ROOT/scripts/gpu_check.py" "$@"
