"""The cached inputs of a training step: SDXL latents and text conditioning per image."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Sequence

import torch

from .errors import AptDatasetError


@dataclass
class SDXLConditioning:
    """SDXL's text + size conditioning for a batch.

    context:    (B, 77, 2048) penultimate hidden states of CLIP-L and OpenCLIP-bigG, concatenated
    pooled:     (B, 1280) pooled (projected) output of the second text encoder
    time_ids:   (B, 6) original (h, w), crop (top, left), target (h, w) in pixels
    token_mask: (B, 77) bool, True for real tokens (BOS .. first EOS); padding is False
    free_tokens: (B, 77) bool or None, True for the tokens of words attention alignment leaves
                 free (RegularizerConfig.aa_free_words, e.g. the trigger word)
    """

    context: torch.Tensor
    pooled: torch.Tensor
    time_ids: torch.Tensor
    token_mask: torch.Tensor
    free_tokens: torch.Tensor | None = None

    @property
    def aligned_tokens(self) -> torch.Tensor:
        """(B, 77) bool: the tokens whose cross-attention AA aligns with the prior's."""
        if self.free_tokens is None:
            return self.token_mask
        return self.token_mask & ~self.free_tokens.to(self.token_mask.device)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "SDXLConditioning":
        cast = (lambda t: t.to(device=device, dtype=dtype)) if dtype else (lambda t: t.to(device))
        free = None if self.free_tokens is None else self.free_tokens.to(device)
        return SDXLConditioning(cast(self.context), cast(self.pooled), cast(self.time_ids),
                                self.token_mask.to(device), free)

    @staticmethod
    def cat(items: Sequence["SDXLConditioning"]) -> "SDXLConditioning":
        free = None
        if any(c.free_tokens is not None for c in items):
            free = torch.cat([torch.zeros_like(c.token_mask) if c.free_tokens is None else c.free_tokens
                              for c in items])
        return SDXLConditioning(
            torch.cat([c.context for c in items]), torch.cat([c.pooled for c in items]),
            torch.cat([c.time_ids for c in items]), torch.cat([c.token_mask for c in items]), free)


def word_token_mask(ids: torch.Tensor, words: Sequence[Sequence[int]]) -> torch.Tensor:
    """(B, K) bool, True at every position inside an occurrence of one of `words` in `ids`.

    ids: (B, K) token ids of the captions; words: each word's token ids (BPE may split a made-up
    trigger word like "ohwx" into several tokens; every occurrence of the whole sequence counts).
    """
    out = torch.zeros(ids.shape, dtype=torch.bool)
    rows = ids.tolist()
    for w in (list(w) for w in words if len(w)):
        n = len(w)
        for b, row in enumerate(rows):
            for i in range(len(row) - n + 1):
                if row[i:i + n] == w:
                    out[b, i:i + n] = True
    return out.to(ids.device)


def _whole_word(word: str) -> re.Pattern:
    return re.compile(rf"(?<!\w){re.escape(word)}(?!\w)", re.IGNORECASE)


def without_words(caption: str, words: Sequence[str]) -> str:
    """`caption` with every whole-word occurrence of `words` removed (case-insensitive), spaces
    and stray punctuation tidied: ("a sks dog, on the beach", ["sks"]) -> "a dog, on the beach"."""
    out = caption
    for w in words:
        out = _whole_word(w).sub(" ", out)
    out = re.sub(r"\s+([,.;:!?)])", r"\1", out)  # no space before punctuation
    out = re.sub(r"([,;:])(\s*[,;:])+", r"\1", out)  # "a, , b" -> "a, b"
    return re.sub(r"\s+", " ", out).strip().lstrip(",;:").strip()


def preservation_caption(caption: str, trigger_words: Sequence[str]) -> str:
    """The prompt output preservation trains on: `caption` without the trigger words.

    Raises AptDatasetError when the caption has none of them: preserving the prior's output for the
    caption itself would undo what the image teaches.
    """
    if not any(_whole_word(w).search(caption) for w in trigger_words):
        raise AptDatasetError(
            f"the caption {caption!r} does not contain the trigger word ({', '.join(trigger_words)}). "
            "Output preservation trains on each caption with the trigger word removed: add the trigger "
            "word to every caption, or set the preservation weight to 0.")
    return without_words(caption, trigger_words)


def sdxl_time_ids(original_hw: tuple[int, int], crop_top_left: tuple[int, int],
                  target_hw: tuple[int, int]) -> torch.Tensor:
    """(1, 6) float time ids in SDXL's order: original size, crop top-left, target size."""
    return torch.tensor([[*original_hw, *crop_top_left, *target_hw]], dtype=torch.float32)


@dataclass
class CachedExample:
    """One training image after caching.

    latent: (4, h, w) VAE latent already multiplied by the VAE scaling factor
    cond:   conditioning with batch dimension 1
    pixels: (3, H, W) in [-1, 1], kept only for pixel-space augmentation
    variants: (K, 4, h, w) latents of the zoomed/rotated image at each cell of the augmentation's
              variant grid (`apt_core.augment.encode_variants`), only for pre-encoded pixel space
    preserve_cond: conditioning of the caption without the trigger words (batch 1), only for
                   output preservation (RegularizerConfig.lambda_preserve)
    """

    latent: torch.Tensor
    cond: SDXLConditioning
    caption: str
    source: str = ""
    pixels: torch.Tensor | None = None
    repeats: int = 1  # kohya "N_name" folders: sampled N times as often
    preserve_cond: SDXLConditioning | None = None
    variants: torch.Tensor | None = None

    @property
    def bucket(self) -> tuple[int, int]:
        return tuple(self.latent.shape[-2:])  # type: ignore[return-value]


@dataclass
class CachedDataset:
    """Cached examples plus what augmentation needs to fill borders in latent space.

    fill_latent: (4,) per-channel latent of a black image (constant fill in latent space)
    variant_params: (K, 2) the (zoom, angle) each example's `variants` were encoded with
    class_examples: the prior's own images of the class, only for output preservation on class
                    images (RegularizerConfig.class_images; `apt_core.preservation`)
    """

    examples: list[CachedExample]
    fill_latent: torch.Tensor = field(default_factory=lambda: torch.zeros(4))
    variant_params: torch.Tensor | None = None
    class_examples: list[CachedExample] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.examples)

    def buckets(self) -> dict[tuple[int, int], list[int]]:
        groups: dict[tuple[int, int], list[int]] = {}
        for i, ex in enumerate(self.examples):
            groups.setdefault(ex.bucket, []).append(i)
        return groups


def draw_class_batch(pool: Sequence[CachedExample], batch_size: int, num_train_timesteps: int,
                     generator: torch.Generator
                     ) -> tuple[torch.Tensor, SDXLConditioning, torch.Tensor, torch.Tensor]:
    """`batch_size` class images drawn with replacement, each with its own timestep and noise.

    Returns latents (B, 4, h, w), their conditioning (batch B), t (B,) and noise (B, 4, h, w), on the
    CPU (latents and conditioning where the pool keeps them).
    """
    chosen = [pool[i] for i in torch.randint(len(pool), (batch_size,), generator=generator).tolist()]
    t = torch.randint(0, num_train_timesteps, (batch_size,), generator=generator)
    latents = torch.stack([ex.latent for ex in chosen])
    noise = torch.randn(latents.shape, generator=generator)
    return latents, SDXLConditioning.cat([ex.cond for ex in chosen]), t, noise
