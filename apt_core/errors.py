"""Errors an artist can act on: each message says what is wrong and how to fix it."""


class AptError(Exception):
    """Base class for every error the training core raises on purpose."""


class AptConfigError(AptError, ValueError):
    """A setting is out of range."""


class AptDatasetError(AptError):
    """The images or captions cannot be used."""


class AptModelError(AptError):
    """The model is not an SDXL-shaped UNet (or cannot be read)."""


class AptOutputError(AptError):
    """An output file or folder cannot be written."""


class NonFiniteLossError(AptError):
    """The loss became NaN or inf; the last good state was kept."""

    def __init__(self, step: int, checkpoint: str | None, kept_step: int | None = None):
        self.step = step
        self.checkpoint = checkpoint
        self.kept_step = kept_step
        where = f" The last good state is saved at {checkpoint}." if checkpoint else ""
        if checkpoint and kept_step is not None:
            where = (f" The weights had already diverged before it, so the last healthy state, of step "
                     f"{kept_step}, is saved at {checkpoint}.")
        super().__init__(
            f"The loss became NaN/inf at step {step}.{where} Lower the learning rate, "
            "use bf16 instead of fp16, or check the images for corrupt data, then resume.")
