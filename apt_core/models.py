"""SDXL model components: loading, checks, prompt and image encoding (the tests' tiny model: quality/tiny_model.py).

Plain PyTorch + diffusers/transformers; never imports ComfyUI and never downloads anything.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from .augment import encode_variants, wants_variants
from .conditioning import (CachedDataset, CachedExample, SDXLConditioning, preservation_caption,
                           sdxl_time_ids, word_token_mask)
from .config import AugmentConfig
from .errors import AptModelError

SDXL_CONFIG_REPO = "stabilityai/stable-diffusion-xl-base-1.0"
SD1_MESSAGE = "this looks like an SD 1.x/2.x model; APT LoRA Trainer needs an SDXL checkpoint"


@dataclass
class SDXLComponents:
    """Everything SDXL LoRA training needs. `scheduler` is the DDPM *training* schedule."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    tokenizer_1: CLIPTokenizer
    tokenizer_2: CLIPTokenizer
    text_encoder_1: CLIPTextModel
    text_encoder_2: CLIPTextModelWithProjection
    scheduler: DDPMScheduler
    name: str


def sdxl_train_scheduler(prediction_type: str = "epsilon",
                         rescale_betas_zero_snr: bool = False) -> DDPMScheduler:
    """SDXL's training noise schedule: scaled_linear betas 0.00085..0.012 over 1000 steps."""
    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                         beta_schedule="scaled_linear", prediction_type=prediction_type,
                         clip_sample=False, steps_offset=1, timestep_spacing="leading",
                         rescale_betas_zero_snr=rescale_betas_zero_snr)


# ----------------------------------------------------------------------------- loading

def check_sdxl_unet(unet: Any) -> None:
    """Raise AptModelError unless `unet` has SDXL's layout (text_time, 3 levels, cross-attn up 0/1)."""
    cfg = getattr(unet, "config", None)
    if cfg is None or not hasattr(unet, "up_blocks"):
        raise AptModelError(f"expected a diffusers UNet2DConditionModel, got {type(unet).__name__}; "
                            "APT LoRA Trainer needs an SDXL checkpoint.")
    if cfg.get("addition_embed_type") != "text_time":
        raise AptModelError(f"The UNet has no SDXL size conditioning (addition_embed_type="
                            f"{cfg.get('addition_embed_type')!r}): {SD1_MESSAGE}.")
    problems = []
    if len(cfg.get("block_out_channels", ())) != 3:
        problems.append(f"{len(cfg.get('block_out_channels', ()))} resolution levels instead of 3")
    up = [type(b).__name__ for b in unet.up_blocks]
    if len(up) != 3 or up[0] != "CrossAttnUpBlock2D" or up[1] != "CrossAttnUpBlock2D":
        problems.append(f"up blocks {up} instead of [CrossAttnUpBlock2D, CrossAttnUpBlock2D, UpBlock2D]")
    if cfg.get("in_channels") != 4:
        problems.append(f"{cfg.get('in_channels')} input channels instead of 4 (inpainting model?)")
    if problems:
        raise AptModelError("The UNet is not SDXL-shaped: " + "; ".join(problems)
                            + ". APT LoRA Trainer needs an SDXL (base-architecture) checkpoint.")


def _single_file_help(path: str, why: str) -> AptModelError:
    return AptModelError(
        f"Cannot load the single-file checkpoint {path} offline: {why} "
        "Fix it one of two ways: (1) on a machine with internet, convert it once to a diffusers "
        "folder: python -c \"from diffusers import StableDiffusionXLPipeline as P; "
        f"P.from_single_file(r'{path}').save_pretrained(r'SDXL_FOLDER')\" and select SDXL_FOLDER "
        "instead; or (2) download SDXL's config and tokenizer files without weights: "
        f"huggingface-cli download {SDXL_CONFIG_REPO} --exclude '*.safetensors' '*.bin' '*.onnx*' "
        "'*.msgpack' --local-dir SDXL_CONFIG and pass config='SDXL_CONFIG' to load_sdxl.")


def _check_checkpoint_keys(path: str) -> None:
    """Reject SD 1.x/2.x, LoRA and UNet-only files from the safetensors header (no tensor reads)."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            keys = set(f.keys())
    except Exception as e:  # corrupt or not a safetensors file
        raise AptModelError(f"{path} is not a readable .safetensors file ({e}).") from e
    if "model.diffusion_model.input_blocks.0.0.weight" not in keys:
        raise AptModelError(f"{path} is not a full SDXL checkpoint (no UNet in original layout; "
                            "a LoRA or a UNet-only file?). Select the full SDXL .safetensors.")
    if "model.diffusion_model.label_emb.0.0.weight" not in keys:
        raise AptModelError(f"{path}: {SD1_MESSAGE}.")


def _local_sdxl_config(config: str | os.PathLike | None, path: str) -> str:
    """A local folder with SDXL's diffusers configs: `config`, or the HF cache (never downloads)."""
    if config is not None:
        if not os.path.isdir(config):
            raise _single_file_help(path, f"the config folder {config} does not exist.")
        return os.fspath(config)
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(SDXL_CONFIG_REPO, local_files_only=True)
    except Exception as e:  # LocalEntryNotFoundError and friends
        raise _single_file_help(path, f"SDXL's config files ({SDXL_CONFIG_REPO}) are not in the "
                                f"local Hugging Face cache ({type(e).__name__}).") from e


def _scheduler_from(config: dict[str, Any] | None) -> DDPMScheduler:
    """Training schedule; only the prediction type (and zero-SNR flag) come from the model."""
    config = config or {}
    return sdxl_train_scheduler(config.get("prediction_type") or "epsilon",
                                bool(config.get("rescale_betas_zero_snr", False)))


def _load_folder(path: str, dtype: torch.dtype) -> SDXLComponents:
    def part(cls: Any, sub: str, **kw: Any) -> Any:
        if not os.path.isdir(os.path.join(path, sub)):
            raise AptModelError(f"{path} has no '{sub}' folder; an SDXL diffusers folder has unet/, "
                                "vae/, text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/.")
        try:
            return cls.from_pretrained(path, subfolder=sub, local_files_only=True, **kw)
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            raise AptModelError(f"Could not read {os.path.join(path, sub)}: {e}") from e

    unet = part(UNet2DConditionModel, "unet", torch_dtype=dtype)
    check_sdxl_unet(unet)
    sched_file, sched_cfg = os.path.join(path, "scheduler", "scheduler_config.json"), None
    if os.path.isfile(sched_file):
        with open(sched_file, encoding="utf-8") as f:
            sched_cfg = json.load(f)
    return SDXLComponents(
        unet=unet, vae=part(AutoencoderKL, "vae", torch_dtype=torch.float32),
        tokenizer_1=part(CLIPTokenizer, "tokenizer"), tokenizer_2=part(CLIPTokenizer, "tokenizer_2"),
        text_encoder_1=part(CLIPTextModel, "text_encoder", torch_dtype=dtype),
        text_encoder_2=part(CLIPTextModelWithProjection, "text_encoder_2", torch_dtype=dtype),
        scheduler=_scheduler_from(sched_cfg), name=os.path.basename(os.path.normpath(path)))


def _load_single_file(path: str, dtype: torch.dtype, config: str | os.PathLike | None
                      ) -> SDXLComponents:
    from diffusers import StableDiffusionXLPipeline

    _check_checkpoint_keys(path)
    cfg = _local_sdxl_config(config, path)  # always local: diffusers would otherwise download
    try:
        pipe = StableDiffusionXLPipeline.from_single_file(path, config=cfg, local_files_only=True,
                                                          torch_dtype=dtype)
    except Exception as e:  # diffusers raises many types for bad configs / checkpoints
        raise _single_file_help(path, f"{type(e).__name__}: {e}.") from e
    check_sdxl_unet(pipe.unet)
    return SDXLComponents(pipe.unet, pipe.vae.to(torch.float32), pipe.tokenizer, pipe.tokenizer_2,
                          pipe.text_encoder, pipe.text_encoder_2,
                          _scheduler_from(dict(pipe.scheduler.config)),
                          name=os.path.splitext(os.path.basename(path))[0])


def load_sdxl(path: str | os.PathLike, dtype: torch.dtype = torch.float32,
              config: str | os.PathLike | None = None) -> SDXLComponents:
    """Load SDXL from a diffusers folder or a single `.safetensors` file, offline only.

    UNet and text encoders are loaded in `dtype`; the VAE always in float32 (SDXL's VAE overflows
    in fp16). `config`: local diffusers folder with SDXL configs, for single-file checkpoints.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        return _load_folder(path, dtype)
    if os.path.isfile(path):
        if not path.lower().endswith(".safetensors"):
            raise AptModelError(f"{path} is not a .safetensors checkpoint or a diffusers folder.")
        return _load_single_file(path, dtype, config)
    raise AptModelError(f"Model not found: {path}. Select an SDXL .safetensors file or a "
                        "diffusers folder (with model_index.json, unet/, vae/, text_encoder/ ...).")


# ----------------------------------------------------------------------------- encoding

def _per_item(value: Any, n: int) -> list[tuple[int, int]]:
    """One (a, b) pair for all captions, or a list of n pairs."""
    if len(value) == 2 and all(isinstance(v, (int, float)) for v in value):
        return [tuple(int(v) for v in value)] * n  # type: ignore[misc]
    pairs = [tuple(int(v) for v in p) for p in value]
    if len(pairs) != n:
        raise ValueError(f"expected {n} size pairs, got {len(pairs)}")
    return pairs  # type: ignore[return-value]


@torch.no_grad()
def encode_text(components: SDXLComponents, captions: Sequence[str]
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Like StableDiffusionXLPipeline.encode_prompt (no clip skip, no CFG).

    Returns context (B, 77, d1+d2): penultimate hidden states of both encoders concatenated;
    pooled (B, p): text_encoder_2's projected text_embeds; token_mask (B, 77) bool, True from BOS
    up to and including the first EOS of tokenizer_1's ids. On the text encoders' device.
    """
    c, captions = components, list(captions)
    states, pooled, mask = [], None, None
    for tok, enc in ((c.tokenizer_1, c.text_encoder_1), (c.tokenizer_2, c.text_encoder_2)):
        ids = tok(captions, padding="max_length", max_length=tok.model_max_length,
                  truncation=True, return_tensors="pt").input_ids.to(enc.device)
        out = enc(ids, output_hidden_states=True)
        states.append(out.hidden_states[-2])
        if mask is None:
            first_eos = (ids == tok.eos_token_id).int().argmax(dim=1, keepdim=True)
            mask = torch.arange(ids.shape[1], device=ids.device)[None] <= first_eos
        pooled = out[0]
    return torch.cat(states, dim=-1), pooled, mask  # type: ignore[return-value]


def free_token_mask(components: SDXLComponents, captions: Sequence[str], words: Sequence[str]
                    ) -> torch.Tensor:
    """(B, 77) bool on CPU: True for the tokens of `words` in each caption (tokenizer_1's ids,
    the ids token_mask is built from; both SDXL tokenizers split words the same way)."""
    tok = components.tokenizer_1
    ids = tok(list(captions), padding="max_length", max_length=tok.model_max_length,
              truncation=True, return_tensors="pt").input_ids
    word_ids = [tok(w, add_special_tokens=False).input_ids for w in words]
    return word_token_mask(ids, word_ids)


def encode_prompts(components: SDXLComponents, captions: Sequence[str], original_hw: Any,
                   crop_top_left: Any, target_hw: Any) -> SDXLConditioning:
    """SDXL conditioning for a batch of captions.

    The size arguments are one (h, w) / (top, left) pair for all captions or a list with one per
    caption. time_ids (B, 6) are float32 on the text encoders' device.
    """
    context, pooled, mask = encode_text(components, captions)
    n = len(captions)
    time_ids = torch.cat([sdxl_time_ids(o, cr, t) for o, cr, t in zip(
        _per_item(original_hw, n), _per_item(crop_top_left, n), _per_item(target_hw, n))])
    return SDXLConditioning(context, pooled, time_ids.to(context.device), mask)


def _vae_fp32(vae: AutoencoderKL) -> AutoencoderKL:
    """SDXL's VAE overflows in fp16: always encode in float32 (upcasts the module in place)."""
    return vae if vae.dtype == torch.float32 else vae.to(torch.float32)


@torch.no_grad()
def encode_pixels(components: SDXLComponents, pixels: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> (B, 4, H/8, W/8) float32 latents (posterior mean * scaling)."""
    vae = _vae_fp32(components.vae)
    x = pixels.to(device=vae.device, dtype=torch.float32)
    latents = vae.encode(x).latent_dist.mean
    shift = getattr(vae.config, "shift_factor", None)
    if shift is not None:
        latents = latents - shift
    return latents * vae.config.scaling_factor


def _move(modules: Iterable[torch.nn.Module], device: torch.device | str) -> list[torch.device]:
    before = []
    for m in modules:
        before.append(next(m.parameters()).device)
        m.to(device)
    return before


def cache_dataset(components: SDXLComponents, records: Sequence[Any], device: torch.device | str,
                  dtype: torch.dtype, keep_pixels: bool = False,
                  store_device: torch.device | str = "cpu",
                  aa_free_words: Sequence[str] = (), trigger_words: Sequence[str] = (),
                  variants_for: AugmentConfig | None = None) -> CachedDataset:
    """Encode every record once: VAE latent (4, H/8, W/8) and SDXL conditioning (batch 1).

    records: objects with `pixels` (3, H, W) in [-1, 1], `caption`, `original_hw`,
    `crop_top_left`, `target_hw`, `source`. Encoding runs on `device` (VAE in float32); results
    are stored on `store_device` in `dtype` (time_ids and pixels stay float32). The VAE and text
    encoders are moved back to where they were afterwards. aa_free_words: marks those words'
    tokens in each conditioning's `free_tokens` (RegularizerConfig.aa_free_words). trigger_words:
    also encode each caption without them as `preserve_cond` (output preservation). variants_for:
    with pre-encoded pixel-space augmentation (`AugmentConfig.precomputed`), also encode each
    image's augmentation variants (`apt_core.augment.encode_variants`) while the VAE is on `device`.
    """
    if not records:
        raise ValueError("cache_dataset needs at least one record")
    c = components
    modules = [c.vae, c.text_encoder_1, c.text_encoder_2]
    before = _move(modules, device)
    try:
        text, preserve = {}, {}
        for cap in dict.fromkeys(r.caption for r in records):  # unique, in order
            ctx, pooled, mask = encode_text(c, [cap])
            free = free_token_mask(c, [cap], aa_free_words).to(store_device) if aa_free_words else None
            text[cap] = (ctx.to(store_device, dtype), pooled.to(store_device, dtype), mask.to(store_device), free)
            if trigger_words:
                ctx, pooled, mask = encode_text(c, [preservation_caption(cap, trigger_words)])
                preserve[cap] = (ctx.to(store_device, dtype), pooled.to(store_device, dtype), mask.to(store_device))
        variants = wants_variants(variants_for)
        examples = []
        for r in records:
            latent = encode_pixels(c, r.pixels[None])[0].to(store_device, dtype)
            ctx, pooled, mask, free = text[r.caption]
            time_ids = sdxl_time_ids(tuple(r.original_hw), tuple(r.crop_top_left), tuple(r.target_hw)).to(store_device)
            pixels = r.pixels.detach().to(store_device, torch.float32).clone() if keep_pixels or variants else None
            keep = SDXLConditioning(*preserve[r.caption][:2], time_ids, preserve[r.caption][2]) \
                if trigger_words else None
            examples.append(CachedExample(latent, SDXLConditioning(ctx, pooled, time_ids, mask, free),
                                          r.caption, str(getattr(r, "source", "")), pixels,
                                          int(getattr(r, "repeats", 1)), keep))
        black = -torch.ones(1, *records[0].pixels.shape)
        fill = encode_pixels(c, black)[0].mean(dim=(1, 2)).to(store_device, torch.float32)
        dataset = CachedDataset(examples, fill)
        if variants:
            encode_variants(dataset, variants_for, lambda px: encode_pixels(c, px), keep_pixels=keep_pixels)
    finally:
        for m, dev in zip(modules, before):
            m.to(dev)
    return dataset
