"""The benchmark's sampler: DDIM with classifier-free guidance, now `apt_core.sampling`.

Re-exported here so quality/ code keeps importing `quality.sampling`. Each image's starting noise
comes from its own `torch.Generator(seed)`; DDIM with eta = 0 on SDXL's training schedule,
"trailing" spacing (the first step starts at t = 999 from pure noise); the unconditional branch
is the empty prompt (the prior was trained with 10% empty captions).
"""

from __future__ import annotations

from diffusers import DDIMScheduler

from apt_core import sampling as _core
from apt_core.sampling import decode, initial_noise, sample

from .models import IMAGE_SIZE, conditioning

__all__ = ["IMAGE_SIZE", "conditioning", "ddim_scheduler", "decode", "initial_noise", "sample"]


def ddim_scheduler(prediction_type: str = "epsilon") -> DDIMScheduler:
    """DDIM (eta 0, trailing spacing) on SDXL's training schedule."""
    return _core.ddim_scheduler(None, prediction_type)
