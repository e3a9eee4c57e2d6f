#!/usr/bin/env bash
# End-to-end demo on a fresh machine: sets up .venv (first run only), then trains an APT LoRA on the
# embedded small SDXL-shaped model and generated sample photos (CPU, about a minute), printing the
# overfitting indicator per timestep bin as it rises. Extra arguments go to `python -m apt_core`.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/env.sh" || exit 1
cd "$ROOT" && exec python -m apt_core --steps 300 --rank 8 --lr 1e-3 --print-every 50 \
    --out output/demo/apt_demo.safetensors "$@"
