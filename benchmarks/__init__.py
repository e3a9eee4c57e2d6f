"""Speed benchmarks of the APT LoRA Trainer (see benchmarks/README.md).

`python -m benchmarks.speed` times one training step of this project (DreamBooth-LoRA, APT,
DreamBooth + prior forward) next to the naive diffusers+peft path and ComfyUI's TrainLoraNode, in
one process; `python -m benchmarks.profile_step` breaks the APT step down on the tiny model (CPU).
"""
