"""APT training core: Adaptive Personalized Training of SDXL LoRAs (host-independent).

Parts, named after the paper: `indicator` + `augment` (adaptive training adjustment),
`regularizers` + `probes` (representation stabilization, attention alignment), `lora`,
`export` (kohya LoRA files), `trainer` (the loop). `backbone` is the seam to a host's UNet.
"""

from .config import (AptConfig, AptSwitches, AugmentConfig, IndicatorConfig, LoraConfig,
                     RegularizerConfig, TrainConfig)
from .errors import AptError
from .trainer import AptTrainer, ProgressEvent, TrainResult

__all__ = ["AptConfig", "AptSwitches", "AugmentConfig", "IndicatorConfig", "LoraConfig",
           "RegularizerConfig", "TrainConfig", "AptError", "AptTrainer", "ProgressEvent",
           "TrainResult"]
__version__ = "0.1.0"
