"""A tiny randomly initialised SDXL (SDXL's layout, tiny widths) and offline CLIP tokenizers.

What the tests and the benchmarks' CPU variant build instead of real weights; never downloads
anything. `python -m quality.tiny_model FOLDER` writes it as a diffusers folder, for a quick
pipeline check of the command line (`python -m apt_core --model FOLDER --images ...`).
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Sequence

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from apt_core.models import SDXLComponents, sdxl_train_scheduler

_TINY_WORDS = ("a", "photo", "of", "the", "cat", "dog", "sks", "person", "style", "painting")
_TINY_TEXT = dict(hidden_1=32, hidden_2=48, projection_dim=40, time_dim=8)


def tiny_sdxl_unet_config() -> dict[str, Any]:
    """UNet config with SDXL base's layout (3 levels, text_time, linear projection) but tiny widths.

    Heads per level: 2, 4, 4 (head dim 16); cross_attention_dim 32 + 48 = 80.
    """
    t = _TINY_TEXT
    return dict(
        sample_size=32, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(32, 64, 64), norm_num_groups=32,  # 32 like ComfyUI's hard-coded GroupNorm
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4, 4),  # diffusers' SDXL naming: these are head *counts*
        transformer_layers_per_block=(1, 1, 2), use_linear_projection=True,
        cross_attention_dim=t["hidden_1"] + t["hidden_2"],
        addition_embed_type="text_time", addition_time_embed_dim=t["time_dim"],
        projection_class_embeddings_input_dim=t["projection_dim"] + 6 * t["time_dim"],
    )


def tiny_sdxl_vae_config() -> dict[str, Any]:
    """AutoencoderKL with SDXL's layout: 4 levels (8x downsampling), 4 latent channels."""
    return dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
                block_out_channels=(16, 16, 32, 32), norm_num_groups=8, sample_size=64,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                scaling_factor=0.13025, force_upcast=True)


def _bytes_to_unicode() -> list[str]:
    """CLIP's byte -> printable unicode table, in vocabulary order ('!' first, so id 0)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def bpe_vocab(words: Sequence[str] = _TINY_WORDS) -> tuple[dict[str, int], list[str]]:
    """Byte-level CLIP BPE vocab (bytes, bytes+</w>, a merge chain per word, BOS, EOS) and merges."""
    chars = _bytes_to_unicode()
    tokens, merges = chars + [c + "</w>" for c in chars], []
    for word in words:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            pair, merged = f"{parts[0]} {parts[1]}", parts[0] + parts[1]
            if pair not in merges:
                merges.append(pair)
            if merged not in tokens:
                tokens.append(merged)
            parts = [merged] + parts[2:]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(tokens)}, merges


def build_tiny_tokenizers() -> tuple[CLIPTokenizer, CLIPTokenizer]:
    """Two offline CLIP tokenizers (max length 77); #1 pads with EOS, #2 pads with '!' (id 0)."""
    return tokenizers_from_vocab(*bpe_vocab())


def tokenizers_from_vocab(vocab: dict[str, int], merges: list[str]) -> tuple[CLIPTokenizer, CLIPTokenizer]:
    """SDXL's pair of CLIP tokenizers (max length 77) from a BPE vocab and merges, offline.

    #1 pads with EOS, #2 pads with '!' (as SDXL's second tokenizer).
    """
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "vocab.json"), "w", encoding="utf-8") as f:
            json.dump(vocab, f)
        with open(os.path.join(tmp, "merges.txt"), "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
        tok_1 = CLIPTokenizer.from_pretrained(tmp, model_max_length=77, local_files_only=True)
        tok_2 = CLIPTokenizer.from_pretrained(tmp, model_max_length=77, pad_token="!",
                                              local_files_only=True)
    return tok_1, tok_2


def _tiny_text_config(tok: CLIPTokenizer, hidden: int, act: str, **kw: Any) -> CLIPTextConfig:
    return CLIPTextConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                          num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                          hidden_act=act, bos_token_id=tok.bos_token_id,
                          eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **kw)


def build_tiny_sdxl(seed: int = 0) -> SDXLComponents:
    """A tiny randomly initialised SDXL (same layout, tiny widths); identical for the same seed.

    Does not touch the global RNG state.
    """
    tok_1, tok_2 = build_tiny_tokenizers()
    t = _TINY_TEXT
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**tiny_sdxl_unet_config())
        vae = AutoencoderKL(**tiny_sdxl_vae_config())
        te_1 = CLIPTextModel(_tiny_text_config(tok_1, t["hidden_1"], "quick_gelu"))
        te_2 = CLIPTextModelWithProjection(
            _tiny_text_config(tok_2, t["hidden_2"], "gelu", projection_dim=t["projection_dim"]))
    for m in (unet, vae, te_1, te_2):
        m.eval()
    return SDXLComponents(unet, vae, tok_1, tok_2, te_1, te_2, sdxl_train_scheduler(),
                          name=f"tiny-sdxl-seed{seed}")


def save_tiny_sdxl(components: SDXLComponents, folder: str | os.PathLike) -> str:
    """Write `components` as a diffusers StableDiffusionXLPipeline folder; returns the folder."""
    from diffusers import StableDiffusionXLPipeline

    c = components
    pipe = StableDiffusionXLPipeline(vae=c.vae, text_encoder=c.text_encoder_1,
                                     text_encoder_2=c.text_encoder_2, tokenizer=c.tokenizer_1,
                                     tokenizer_2=c.tokenizer_2, unet=c.unet, scheduler=c.scheduler)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return str(folder)


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 2:
        sys.exit("usage: python -m quality.tiny_model FOLDER")
    print(save_tiny_sdxl(build_tiny_sdxl(), sys.argv[1]))
