"""Shared pieces of the benchmarks: the models, a synthetic cached dataset, timing and memory probes,
machine description. Nothing here downloads anything; real SDXL weights are never needed.
"""

from __future__ import annotations

import copy
import os
import platform
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]

# The real SDXL base UNet (stabilityai/stable-diffusion-xl-base-1.0, unet/config.json), everything
# not listed is diffusers' UNet2DConditionModel default and matches that file. 2.57 B parameters.
SDXL_UNET_CONFIG: dict[str, Any] = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280), norm_num_groups=32,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, use_linear_projection=True,
)

# SDXL's VAE and text encoders (same repository), for the one-off caching cost only.
SDXL_VAE_CONFIG: dict[str, Any] = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
    block_out_channels=(128, 256, 512, 512), norm_num_groups=32, sample_size=1024,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    scaling_factor=0.13025, force_upcast=True,
)
SDXL_TEXT_1 = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                   num_attention_heads=12, hidden_act="quick_gelu", projection_dim=768)
SDXL_TEXT_2 = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                   num_attention_heads=20, hidden_act="gelu", projection_dim=1280)

NUM_EXAMPLES = 4  # a small personalisation set; every example has the same shape (one bucket)
VALID_TOKENS = 12  # BOS + caption + EOS of a short prompt; the rest is padding (token_mask False)


# ------------------------------------------------------------------------------ workload

@dataclass
class Workload:
    """What every variant trains on: one UNet layout, one cached dataset, one noise schedule."""

    model: str  # "sdxl" | "tiny"
    device: torch.device
    dtype: torch.dtype  # UNet weights (bf16 on GPU, fp32 on CPU)
    resolution: int
    batch_size: int
    rank: int
    unet_config: dict[str, Any]
    dataset: Any  # apt_core.conditioning.CachedDataset
    alphas_cumprod: torch.Tensor
    seed: int = 0
    build_s: float = 0.0  # one-off: building the base UNet (random init) on the device
    _base_unet: Any = field(default=None, repr=False)

    @property
    def latent_hw(self) -> tuple[int, int]:
        return self.resolution // 8, self.resolution // 8

    @property
    def amp_dtype(self) -> torch.dtype | None:
        """What the project's trainer picks with mixed_precision="auto"."""
        from apt_core.training_utils import autocast_dtype

        return autocast_dtype("auto", self.device)

    def base_unet(self):
        """The one shared UNet (sequential schedule). Built once; frozen, eval mode."""
        if self._base_unet is None:
            self._base_unet = self._build_timed()
        return self._base_unet

    def fresh_unet(self):
        """A separate UNet with identical weights (interleaved schedule)."""
        return copy.deepcopy(self.base_unet())

    def replace_base_unet(self) -> None:
        """Drop the shared UNet (e.g. left dirty by a failed variant); the next call rebuilds it."""
        self._base_unet = None
        free_memory(self.device)

    def release_base_unet(self):
        unet, self._base_unet = self._base_unet, None
        return unet

    def _build_timed(self):
        started = time.perf_counter()
        unet = build_unet(self.unet_config, self.device, self.dtype, self.seed)
        sync(self.device)
        if not self.build_s:
            self.build_s = time.perf_counter() - started
        return unet


def build_unet(config: dict[str, Any], device: torch.device, dtype: torch.dtype, seed: int = 0):
    """A diffusers UNet2DConditionModel with random weights, built directly on `device`."""
    from diffusers import UNet2DConditionModel

    cuda = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        with torch.device(device):
            unet = UNet2DConditionModel(**config)
    if next(unet.parameters()).dtype != dtype:
        unet = unet.to(dtype=dtype)
    unet.eval()
    unet.requires_grad_(False)  # the base is frozen in every variant (diffusers' scripts do this too)
    return unet


def unet_config_for(model: str) -> dict[str, Any]:
    if model == "sdxl":
        return dict(SDXL_UNET_CONFIG)
    if model == "tiny":
        from quality.tiny_model import tiny_sdxl_unet_config

        return tiny_sdxl_unet_config()
    raise ValueError(f"unknown model {model!r}; use 'sdxl' or 'tiny'")


def synthetic_dataset(unet_config: dict[str, Any], resolution: int, dtype: torch.dtype,
                      n: int = NUM_EXAMPLES, seed: int = 0):
    """A CachedDataset of n examples with SDXL conditioning of the right shapes, stored on the CPU
    like `apt_core.models.cache_dataset` stores it (latents and embeddings in the UNet's dtype).

    latent (4, res/8, res/8); context (1, 77, cross_attention_dim); pooled (1, pooled_dim);
    time_ids (1, 6) float32; token_mask (1, 77) bool with the first VALID_TOKENS True;
    variants (K, 4, res/8, res/8) random stand-ins for the default augmentation grid's pre-encoded
    variants (a training step only looks one up; `time_caching` times encoding them).
    """
    from apt_core.augment import variant_grid
    from apt_core.conditioning import CachedDataset, CachedExample, SDXLConditioning, sdxl_time_ids
    from apt_core.config import AugmentConfig

    ctx_dim = int(unet_config["cross_attention_dim"])
    pooled_dim = int(unet_config["projection_class_embeddings_input_dim"]) \
        - 6 * int(unet_config["addition_time_embed_dim"])
    h = w = resolution // 8
    g = torch.Generator().manual_seed(seed)
    grid = variant_grid(AugmentConfig())
    examples = []
    for i in range(n):
        latent = torch.randn(4, h, w, generator=g).to(dtype)
        variants = torch.randn(len(grid), 4, h, w, generator=g).to(dtype)
        context = torch.randn(1, 77, ctx_dim, generator=g).to(dtype)
        pooled = torch.randn(1, pooled_dim, generator=g).to(dtype)
        time_ids = sdxl_time_ids((resolution, resolution), (0, 0), (resolution, resolution))
        mask = torch.zeros(1, 77, dtype=torch.bool)
        mask[:, :VALID_TOKENS] = True
        examples.append(CachedExample(latent, SDXLConditioning(context, pooled, time_ids, mask),
                                      caption=f"a photo of sks dog {i}", source="synthetic",
                                      variants=variants))
    return CachedDataset(examples, torch.zeros(4), variant_params=grid)


def make_workload(model: str, device: torch.device, resolution: int, batch_size: int, rank: int,
                  seed: int = 0) -> Workload:
    from apt_core.models import sdxl_train_scheduler

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = unet_config_for(model)
    if resolution % 64:
        raise ValueError(f"resolution must be a multiple of 64 (3 UNet levels below the VAE's 8x), "
                         f"got {resolution}")
    return Workload(model=model, device=device, dtype=dtype, resolution=resolution,
                    batch_size=batch_size, rank=rank, unet_config=config,
                    dataset=synthetic_dataset(config, resolution, dtype, seed=seed),
                    alphas_cumprod=sdxl_train_scheduler().alphas_cumprod.float(), seed=seed)


# ------------------------------------------------------------------------------ one-off: caching

def caching_components(model: str, device: torch.device, dtype: torch.dtype):
    """VAE + text encoders + tokenizers of the model in use (random weights), on `device`.

    tiny: quality.tiny_model.build_tiny_sdxl. sdxl: SDXL's real VAE / CLIP-L / OpenCLIP-bigG
    architectures with random weights; the tokenizers are the tiny offline ones (the real vocab files
    are not bundled). Tokenizing 77 ids costs microseconds either way; the encoders do the work.
    """
    from apt_core.models import SDXLComponents, sdxl_train_scheduler
    from quality.tiny_model import build_tiny_sdxl, build_tiny_tokenizers

    if model == "tiny":
        c = build_tiny_sdxl()
        for m in (c.vae, c.text_encoder_1, c.text_encoder_2):
            m.to(device)
        c.unet = None
        return c
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tok_1, tok_2 = build_tiny_tokenizers()

    def text_config(tok, spec):
        return CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                              eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **spec)

    with torch.device(device):
        vae = AutoencoderKL(**SDXL_VAE_CONFIG).eval()
        te_1 = CLIPTextModel(text_config(tok_1, SDXL_TEXT_1)).to(dtype).eval()
        te_2 = CLIPTextModelWithProjection(text_config(tok_2, SDXL_TEXT_2)).to(dtype).eval()
    return SDXLComponents(None, vae, tok_1, tok_2, te_1, te_2, sdxl_train_scheduler(), "sdxl-random")


@dataclass
class _Record:
    pixels: torch.Tensor
    caption: str
    original_hw: tuple = (0, 0)
    crop_top_left: tuple = (0, 0)
    target_hw: tuple = (0, 0)
    source: str = "synthetic"
    repeats: int = 1


def time_caching(model: str, device: torch.device, dtype: torch.dtype, resolution: int) -> dict:
    """Seconds to encode one image (VAE, float32) and its caption (both text encoders) with
    `apt_core.models.cache_dataset`: the first call (cold) and a second one (warm); then the same
    with the default pixel-space augmentation variants (AugmentConfig().variant_grid) encoded too."""
    from apt_core.config import AugmentConfig
    from apt_core.models import cache_dataset

    started = time.perf_counter()
    comps = caching_components(model, device, dtype)
    sync(device)
    build_s = time.perf_counter() - started
    g = torch.Generator().manual_seed(0)
    record = _Record(torch.rand(3, resolution, resolution, generator=g) * 2 - 1,
                     "a photo of sks dog on the grass", (resolution, resolution), (0, 0),
                     (resolution, resolution))
    times = []
    for _ in range(2):
        sync(device)
        t0 = time.perf_counter()
        cache_dataset(comps, [record], device, dtype)
        sync(device)
        times.append(time.perf_counter() - t0)
    sync(device)
    t0 = time.perf_counter()
    cached = cache_dataset(comps, [record], device, dtype, variants_for=AugmentConfig())
    sync(device)
    variants_s = time.perf_counter() - t0
    del comps
    free_memory(device)
    return {"encoders_build_s": build_s, "encode_one_image_cold_s": times[0],
            "encode_one_image_warm_s": times[1], "encode_one_image_with_variants_s": variants_s,
            "variants_per_image": len(cached.examples[0].variants)}


# ------------------------------------------------------------------------------ timing & memory

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds for one call, with the GPU synchronised before and after.

    Python's cyclic garbage collector is paused during the call (like `timeit`): a collection
    lands in whichever step happens to allocate past the threshold, and with a fixed round-robin
    order that is a systematic bias, not just noise. It runs right after instead."""
    import gc

    enabled = gc.isenabled()
    sync(device)
    gc.disable()
    try:
        t0 = time.perf_counter()
        fn()
        sync(device)
        return time.perf_counter() - t0
    finally:
        if enabled:
            gc.enable()


def summarize(times_s: list[float]) -> dict[str, float]:
    ms = sorted(t * 1000.0 for t in times_s)
    q = statistics.quantiles(ms, n=4) if len(ms) >= 2 else [ms[0]] * 3
    return {"median_ms": statistics.median(ms), "min_ms": ms[0], "max_ms": ms[-1],
            "iqr_ms": q[2] - q[0], "mean_ms": statistics.fmean(ms)}


def free_memory(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _proc_status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            m = re.search(rf"^{key}:\s+(\d+)\s+kB", f.read(), re.M)
        return int(m.group(1)) if m else None
    except OSError:
        return None


class MemoryProbe:
    """Peak memory of one variant.

    cuda: torch.cuda.max_memory_allocated() after a reset (bytes, includes the UNet weights).
    cpu: peak RSS (VmHWM, reset through /proc/self/clear_refs) minus the RSS at the start; None
    where the kernel does not allow the reset.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = "cuda_max_allocated" if device.type == "cuda" else "cpu_peak_rss_delta"
        self.start = 0

    def reset(self) -> None:
        free_memory(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
            return
        try:
            with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
                f.write("5")  # reset the peak resident set size (VmHWM) to the current one
            self.start = _proc_status_kib("VmRSS") or 0
        except OSError:
            self.start = -1

    def read(self) -> dict[str, Any]:
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
            return {"memory_kind": self.kind, "peak_bytes": int(peak),
                    "peak_delta_bytes": int(peak - self.start),
                    "peak_reserved_bytes": int(torch.cuda.max_memory_reserved(self.device))}
        hwm = _proc_status_kib("VmHWM")
        if self.start < 0 or hwm is None:
            return {"memory_kind": None}
        return {"memory_kind": self.kind, "peak_bytes": None,
                "peak_delta_bytes": max(0, hwm - self.start) * 1024}


# ------------------------------------------------------------------------------ machine

def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(name: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:
        return None


def import_comfy_host():
    """tests/comfy_host.py (ComfyUI helpers shared with the test-suite), importable from here."""
    tests = str(REPO_ROOT / "tests")
    if tests not in sys.path:
        sys.path.append(tests)
    import comfy_host

    return comfy_host


def comfyui_version() -> str | None:
    try:
        comfy_host = import_comfy_host()

        f = comfy_host.comfyui_dir() / "comfyui_version.py"
        m = re.search(r"__version__\s*=\s*['\"]([^'\"]+)", f.read_text(encoding="utf-8"))
        return m.group(1) if m else None
    except Exception:
        return None


def machine_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpu": cpu_model(), "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(), "python": sys.version.split()[0],
        "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=torch.cuda.get_device_name(device),
                    gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                    tf32_matmul=torch.backends.cuda.matmul.allow_tf32)
    info["versions"] = {"torch": torch.__version__, "diffusers": _version("diffusers"),
                        "peft": _version("peft"), "transformers": _version("transformers"),
                        "kornia": _version("kornia"), "comfyui": comfyui_version()}
    return info


def machine_name(info: dict[str, Any]) -> str:
    if info.get("gpu"):
        return f"{info['gpu']} ({info.get('gpu_memory_gib')} GiB), CPU {info['cpu']}"
    return f"CPU {info['cpu']} ({info['cpu_cores']} cores, torch threads {info['torch_threads']})"
