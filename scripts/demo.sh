#!/usr/bin/env bash
# End-to-end demo on a fresh machine: sets up .venv (first run only), writes the quality
# benchmark's personalization task into output/demo (4 reference photos of a blue cross, the new
# concept "sks shape", with captions, plus before/after prompts; quality/demo_data.py), trains an
# APT LoRA for it on the CPU on the benchmark's small pretrained SDXL-shaped prior
# (quality/assets/prior128c: 128 px images, follows background and position words), printing the
# overfitting indicator per timestep bin as it rises, and renders the prompts with the LoRA off and
# on (same seeds) into output/demo/before_after.png. The training settings are the benchmark's
# (quality/configs/world128c.json) with the product's APT defaults.
# The indicator scale S is 10, not SDXL's 1000: S must match the model's loss scale, and on these
# priors S = 10 gives the paper's gamma profile (quality/README.md, "Project decisions"). The LoRA
# also covers the feed-forward layers and the resnet convolutions: the small prior draws outlines
# without attention, so an attention-only LoRA cannot learn the cross (quality/README.md).
# Extra arguments go to `python -m apt_core` (e.g. --steps 400, --baseline).
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/env.sh" || exit 1
cd "$ROOT" || exit 1
python -m quality.demo_data --out output/demo --config quality/configs/world128c.json || exit 1
exec python -m apt_core --model quality/assets/prior128c --images output/demo/photos \
    --steps 1000 --rank 16 --lr 1e-3 --lora-ff --lora-conv --indicator-scale 10 --print-every 100 --threads 1 \
    --sample-prompts output/demo/prompts.txt --samples-per-prompt 2 --sample-steps 25 --cfg 5 \
    --out output/demo/apt_demo.safetensors --samples-out output/demo/before_after.png "$@"
