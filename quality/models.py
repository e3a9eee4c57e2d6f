"""The benchmark's SDXL-shaped prior: world-vocabulary tokenizers, text encoders, UNet, VAE.

Same diffusers classes and layout as `quality.tiny_model.build_tiny_sdxl` (3-level UNet with
text_time conditioning, two CLIP text encoders, 4-channel 8x AutoencoderKL), with widths chosen
for the world: 64 px images, 8x8 latents. The tokenizers know every word of the world as one
token (byte-level CLIP BPE plus one merge chain per word), so captions never split into bytes.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from apt_core.conditioning import SDXLConditioning, sdxl_time_ids
from apt_core.models import SDXLComponents, check_sdxl_unet, sdxl_train_scheduler
from .tiny_model import bpe_vocab, tokenizers_from_vocab

from .world import WORDS

IMAGE_SIZE = 64
LATENT_SIZE = IMAGE_SIZE // 8
TEXT = dict(hidden_1=48, hidden_2=64, projection_dim=64, time_dim=8, layers=2, heads=2)


def unet_config(latent_size: int = LATENT_SIZE) -> dict[str, Any]:
    """SDXL base's layout (DownBlock2D + 2 cross-attention levels, text_time, linear projection).

    Widths 32/64/96 with head dim 16 (2, 4, 6 heads), transformer depth 1/1/2. sample_size (the
    latent side) only records the world's image size: `world_image_size` reads it back.
    """
    t = TEXT
    return dict(
        sample_size=latent_size, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(32, 64, 96), norm_num_groups=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4, 6), transformer_layers_per_block=(1, 1, 2),
        use_linear_projection=True, cross_attention_dim=t["hidden_1"] + t["hidden_2"],
        addition_embed_type="text_time", addition_time_embed_dim=t["time_dim"],
        projection_class_embeddings_input_dim=t["projection_dim"] + 6 * t["time_dim"])


def vae_config(image_size: int = IMAGE_SIZE) -> dict[str, Any]:
    """AutoencoderKL, 4 levels (8x downsampling), 4 latent channels, no mid-block attention
    (fully convolutional, so it trains on crops). scaling_factor is set after training."""
    return dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
                block_out_channels=(8, 16, 32, 64), norm_num_groups=1, sample_size=image_size,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                mid_block_add_attention=False, scaling_factor=1.0, force_upcast=True)


def _bpe_split(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE of one word (lowest-rank adjacent pair first)."""
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    while len(parts) > 1:
        pairs = [(ranks.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
        rank, i = min(pairs)
        if rank == 1 << 30:
            break
        parts = parts[:i] + [parts[i] + parts[i + 1]] + parts[i + 2:]
    return parts


def world_vocab(words: Sequence[str] = WORDS) -> tuple[dict[str, int], list[str]]:
    """Byte-level CLIP BPE vocab in which every word of `words` is exactly one token.

    Each word gets a left-to-right merge chain; words whose chain is pre-empted by another
    word's merges are moved to the front until every word encodes to one token.
    """
    order = sorted(dict.fromkeys(words), key=lambda w: (-len(w), w))
    for _ in range(100):
        vocab, merges = bpe_vocab(order)
        ranks = {tuple(m.split()): i for i, m in enumerate(merges)}
        failing = [w for w in order if len(_bpe_split(w, ranks)) != 1]
        if not failing:
            return vocab, merges
        order = failing + [w for w in order if w not in failing]
    raise RuntimeError(f"could not build a vocabulary with single-token words: {failing}")


def build_tokenizers(words: Sequence[str] = WORDS) -> tuple[CLIPTokenizer, CLIPTokenizer]:
    """Two offline CLIP tokenizers (max length 77); #1 pads with EOS, #2 with '!' (as SDXL)."""
    return tokenizers_from_vocab(*world_vocab(words))


def _text_config(tok: CLIPTokenizer, hidden: int, act: str, **kw: Any) -> CLIPTextConfig:
    return CLIPTextConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                          num_hidden_layers=TEXT["layers"], num_attention_heads=TEXT["heads"],
                          max_position_embeddings=77, hidden_act=act, bos_token_id=tok.bos_token_id,
                          eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **kw)


def build_world_sdxl(seed: int = 0, image_size: int = IMAGE_SIZE) -> SDXLComponents:
    """Randomly initialised prior of the benchmark's architecture (identical for the same seed)
    for a world of image_size x image_size pixels (latents image_size / 8)."""
    tok_1, tok_2 = build_tokenizers()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**unet_config(image_size // 8))
        vae = AutoencoderKL(**vae_config(image_size))
        te_1 = CLIPTextModel(_text_config(tok_1, TEXT["hidden_1"], "quick_gelu"))
        te_2 = CLIPTextModelWithProjection(_text_config(tok_2, TEXT["hidden_2"], "gelu",
                                                        projection_dim=TEXT["projection_dim"]))
    check_sdxl_unet(unet)
    for m in (unet, vae, te_1, te_2):
        m.eval()
    return SDXLComponents(unet, vae, tok_1, tok_2, te_1, te_2, sdxl_train_scheduler(),
                          name=f"world-sdxl-seed{seed}")


def world_image_size(components: SDXLComponents) -> int:
    """The side in pixels of the world a prior was trained on (64 for quality/assets/prior)."""
    return int(components.unet.config.sample_size) * 8


def token_ids(components: SDXLComponents, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    c = components
    kw = dict(padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    return c.tokenizer_1(list(captions), **kw).input_ids, c.tokenizer_2(list(captions), **kw).input_ids


def encode_text_grad(components: SDXLComponents, ids_1: torch.Tensor, ids_2: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """apt_core.models.encode_text with gradients (for training the text encoders jointly)."""
    c = components
    dev = c.text_encoder_1.device
    out_1 = c.text_encoder_1(ids_1.to(dev), output_hidden_states=True)
    out_2 = c.text_encoder_2(ids_2.to(dev), output_hidden_states=True)
    context = torch.cat([out_1.hidden_states[-2], out_2.hidden_states[-2]], dim=-1)
    first_eos = (ids_1 == c.tokenizer_1.eos_token_id).int().argmax(dim=1, keepdim=True)
    mask = torch.arange(ids_1.shape[1])[None] <= first_eos
    return context, out_2[0], mask.to(dev)


def conditioning(components: SDXLComponents, captions: Sequence[str], size: int = IMAGE_SIZE,
                 grad: bool = False) -> SDXLConditioning:
    """SDXL conditioning of captions at size x size (no crop), as cache_dataset builds it."""
    with torch.set_grad_enabled(grad):
        ctx, pooled, mask = encode_text_grad(components, *token_ids(components, captions))
    time_ids = sdxl_time_ids((size, size), (0, 0), (size, size)).repeat(len(captions), 1)
    return SDXLConditioning(ctx, pooled, time_ids.to(ctx.device), mask)
