"""Encode an APT dataset once with the host's VAE and CLIP into `apt_core`'s CachedDataset.

- Latents: `VAE.encode` (ComfyUI IMAGE layout (B, H, W, C) in [0, 1]), then the model's
  `latent_format.process_in` (SDXL: x 0.13025), i.e. what the sampler feeds the UNet.
- Text: `CLIP.tokenize` + `encode_from_tokens` per caption, then the model's own `encode_adm` with
  SDXL's size conditioning set per image (original size, crop offset, target size = bucket) — the
  same numbers `CLIPTextEncodeSDXL` would set. Plain `CLIPTextEncode` would leave them at 768 x 768.
  `SDXLConditioning.pooled` stores that full adm vector `y` (see comfy_backbone).
- The token mask (real tokens BOS..EOS, per 77-token chunk) comes from the CLIP-L token ids.
- Pixel-space augmentation variants (`apt_core.augment.encode_variants`) go through `VAE.encode`
  too, before training, so the VAE can be unloaded while the UNet trains.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from apt_core.augment import encode_variants, variant_grid, wants_variants
from apt_core.conditioning import (CachedDataset, CachedExample, SDXLConditioning, sdxl_time_ids,
                                   word_token_mask)
from apt_core.config import AugmentConfig
from apt_core.errors import AptModelError
from apt_core.preservation import cycled_class_prompts


def to_comfy_image(pixels: torch.Tensor) -> torch.Tensor:
    """(3, H, W) or (B, 3, H, W) in [-1, 1] -> ComfyUI IMAGE (B, H, W, 3) in [0, 1]."""
    if pixels.ndim == 3:
        pixels = pixels[None]
    return ((pixels.float() + 1.0) * 0.5).clamp(0.0, 1.0).movedim(1, -1).contiguous()


def _clip_l_ids(clip, tokens: dict) -> tuple[list[list], int] | None:
    """(token ids per 77-token chunk, end token id) of the CLIP-L tokens ("l"), or None when the
    tokenizer is unknown (custom text encoders). Embedding tokens are not ints; kept as they are."""
    key = "l" if "l" in tokens else next(iter(tokens), None)
    tok = getattr(getattr(clip, "tokenizer", None), f"clip_{key}", None) if key else None
    end = getattr(tok, "end_token", None)
    if key is None or end is None:
        return None
    return [[t[0] for t in chunk] for chunk in tokens[key]], end


def _first_end(ids: list, end: int) -> int | None:
    """Index of the first end token in one chunk's ids (embedding entries are not ints), or None."""
    return next((i for i, t in enumerate(ids) if isinstance(t, int) and t == end), None)


def token_mask(clip, tokens: dict, length: int) -> torch.Tensor:
    """(1, length) bool: True from BOS up to and including the first EOS of each 77-token chunk.

    Uses the CLIP-L ids ("l"); falls back to all True when the tokenizer is unknown or the chunk
    layout does not match the context length (custom text encoders).
    """
    found = _clip_l_ids(clip, tokens)
    if found is None:
        return torch.ones(1, length, dtype=torch.bool)
    chunks, end = found
    parts = []
    for ids in chunks:
        first_end = _first_end(ids, end)
        first_end = len(ids) - 1 if first_end is None else first_end
        parts += [i <= first_end for i in range(len(ids))]
    if len(parts) != length:
        return torch.ones(1, length, dtype=torch.bool)
    return torch.tensor(parts, dtype=torch.bool)[None]


def free_token_mask(clip, tokens: dict, words: Sequence[str], length: int) -> torch.Tensor | None:
    """(1, length) bool: True for the tokens of `words` in a caption's tokens (CLIP-L ids, the
    ids token_mask reads); None without words or when the tokenizer/layout is unknown."""
    found = _clip_l_ids(clip, tokens)
    if not words or found is None or sum(len(c) for c in found[0]) != length:
        return None
    chunks, end = found
    word_ids = []
    for w in words:
        ids = _clip_l_ids(clip, clip.tokenize(w))[0][0]  # BOS, the word's tokens, EOS, padding
        stop = _first_end(ids, end)
        word_ids.append(ids[1:len(ids) if stop is None else stop])
    flat = torch.tensor([[t if isinstance(t, int) else -1 for c in chunks for t in c]])
    return word_token_mask(flat, word_ids)


def encode_caption(clip, base_model, caption: str, original_hw, crop_top_left, target_hw,
                   aa_free_words: Sequence[str] = ()) -> SDXLConditioning:
    """One caption -> SDXLConditioning (batch 1) with ComfyUI's adm vector in `pooled`."""
    tokens = clip.tokenize(caption)
    out = clip.encode_from_tokens(tokens, return_pooled=True, return_dict=True)
    cond, pooled = out["cond"], out["pooled_output"]
    if pooled is None:
        raise AptModelError("The CLIP gave no pooled output; connect the CLIP of an SDXL checkpoint.")
    (oh, ow), (top, left), (th, tw) = original_hw, crop_top_left, target_hw
    y = base_model.encode_adm(pooled_output=pooled, width=ow, height=oh, crop_w=left, crop_h=top,
                              target_width=tw, target_height=th, device=cond.device)
    return SDXLConditioning(
        context=cond.detach().float().cpu().clone(),
        pooled=y.detach().float().cpu().clone(),
        time_ids=sdxl_time_ids(tuple(original_hw), tuple(crop_top_left), tuple(target_hw)),
        token_mask=token_mask(clip, tokens, cond.shape[1]),
        free_tokens=free_token_mask(clip, tokens, aa_free_words, cond.shape[1]))


def encode_latents(vae, base_model, pixels: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> (B, 4, H/8, W/8) float32 CPU latents as the UNet sees them."""
    latent = vae.encode(to_comfy_image(pixels))
    return base_model.process_latent_in(latent.float()).detach().float().cpu().clone()


def encode_latent(vae, base_model, pixels: torch.Tensor) -> torch.Tensor:
    """(3, H, W) in [-1, 1] -> (4, H/8, W/8) float32 latent as the UNet sees it."""
    return encode_latents(vae, base_model, pixels[None])[0]


def pixel_encoder(vae, base_model) -> Callable[[torch.Tensor], torch.Tensor]:
    """(B, 3, H, W) in [-1, 1] -> (B, 4, H/8, W/8) float32 latents as the UNet sees them, for
    pixel-space augmentation during training.

    Calls the VAE's network directly instead of `VAE.encode`: that one first asks ComfyUI to load
    the VAE, which may unload other models to make room - possibly the UNet being trained. The job
    loads the VAE together with the UNet before training, so its weights are already in place.
    Same network and the same input path as `VAE.encode` in `encode_latent` (IMAGE layout, clamp,
    [0, 1] -> [-1, 1], channels-last memory), so an image gives the latent the cache holds for it.
    """
    def encode(pixels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            x = vae.process_input(to_comfy_image(pixels)).movedim(-1, 1)
            latent = vae.first_stage_model.encode(x.to(vae.vae_dtype).to(vae.device)).float()
            return base_model.process_latent_in(latent).float()
    return encode


def cache_dataset(records: Sequence, base_model, clip, vae, *, context_dim: int, adm_channels: int,
                  check_interrupt: Callable[[], None] = lambda: None,
                  on_item: Callable[[int, int], None] = lambda i, n: None,
                  keep_pixels: bool = False, aa_free_words: Sequence[str] = (),
                  variants_for: AugmentConfig | None = None) -> CachedDataset:
    """Encode every record once (under no_grad, on whatever device ComfyUI picks) to CPU float32.
    keep_pixels: also keep each image (3, H, W) in [-1, 1] for pixel-space augmentation at every step;
    aa_free_words: mark those words' tokens in `free_tokens` (RegularizerConfig.aa_free_words);
    variants_for: with pre-encoded pixel-space augmentation (`AugmentConfig.precomputed`), also
    encode each image's augmentation variants. on_item(done, total): after each image or variant
    encoded (total = images + variants)."""
    if clip is None:
        raise AptModelError("No CLIP connected: the checkpoint has no text encoder. Connect the CLIP "
                            "output of 'Load Checkpoint' (an SDXL checkpoint).")
    if vae is None:
        raise AptModelError("No VAE connected. Connect the VAE output of 'Load Checkpoint'.")
    variants = wants_variants(variants_for)
    total = len(records) * (1 + (len(variant_grid(variants_for)) if variants else 0))
    examples = []
    text_cache: dict[tuple, SDXLConditioning] = {}
    with torch.no_grad():
        for i, r in enumerate(records):
            check_interrupt()
            key = (r.caption, tuple(r.original_hw), tuple(r.crop_top_left), tuple(r.target_hw))
            if key not in text_cache:
                text_cache[key] = encode_caption(clip, base_model, *key, aa_free_words=aa_free_words)
            cond = text_cache[key]
            if i == 0:
                if cond.context.shape[-1] != context_dim or cond.pooled.shape[-1] != adm_channels:
                    raise AptModelError(
                        f"The CLIP does not match the model: it gives text features of width "
                        f"{cond.context.shape[-1]} / size vector {cond.pooled.shape[-1]}, the SDXL UNet "
                        f"expects {context_dim} / {adm_channels}. Connect the CLIP from the same SDXL "
                        "checkpoint as the MODEL.")
            latent = encode_latent(vae, base_model, r.pixels)
            pixels = r.pixels.detach().float().cpu().clone() if keep_pixels or variants else None
            examples.append(CachedExample(latent, cond, r.caption, str(getattr(r, "source", "")),
                                          pixels, int(getattr(r, "repeats", 1))))
            on_item(i + 1, total)
        black = -torch.ones_like(records[0].pixels)
        fill = encode_latent(vae, base_model, black).mean(dim=(1, 2))
        dataset = CachedDataset(examples, fill)
        if variants:
            encode_variants(dataset, variants_for, lambda px: encode_latents(vae, base_model, px),
                            check_interrupt=check_interrupt, keep_pixels=keep_pixels,
                            progress=lambda done, _n: on_item(len(records) + done, total))
    return dataset


def class_conditionings(clip, base_model, captions: Sequence[str], trigger_words: Sequence[str], count: int,
                        resolution: int) -> tuple[list[str], list[SDXLConditioning], SDXLConditioning]:
    """What the base model draws class images from (`apt_core.preservation`): `count` prompts cycling
    through the captions without the trigger words, their conditionings (batch 1 each), and the
    empty prompt's (the unguided branch), all square at `resolution`."""
    chosen = cycled_class_prompts(captions, trigger_words, count)
    size = ((resolution, resolution), (0, 0), (resolution, resolution))
    with torch.no_grad():
        conds = {p: encode_caption(clip, base_model, p, *size) for p in dict.fromkeys(chosen)}
        uncond = encode_caption(clip, base_model, "", *size)
    return chosen, [conds[p] for p in chosen], uncond
