"""Helpers for tests that need the real ComfyUI host: 0.3.75 (fetched by scripts/fetch_comfyui.sh into
.cache/comfyui, the default) or v0.33.0 (scripts/env_comfy033.sh, .cache/comfyui-0.33.0); the tree is
``$APT_COMFYUI_DIR``. scripts/test.sh runs the host-facing tests on both.

Two layers:

a. In-process: ``import_comfy()`` imports ComfyUI's own python modules (``comfy.lora``,
   ``comfy.utils``, ``comfy.sd``, ``comfy.supported_models``, ``comfy.model_patcher`` ...) on CPU, so a
   test can build a ComfyUI SDXL model from a *diffusers* UNet config
   (``comfy_sdxl_model_from_diffusers_config``), copy a diffusers UNet's weights into it
   (``load_diffusers_unet_into_comfy``) and load a LoRA file exactly the way the ``LoraLoader`` node
   does (``comfy_lora_load_report`` / ``comfy_load_lora``), capturing every "lora key not loaded" line.

b. Real server: ``ComfyServer`` starts ``main.py --cpu`` in a subprocess with a throw-away base
   directory, a ``custom_nodes`` folder holding a symlink to this repository (the pack) and a
   ``loras`` folder, and talks to it over HTTP (stdlib only).

Whether the host is required: ``require_comfyui()`` skips the calling test with a clear reason when
the ComfyUI tree is missing, unless ``APT_REQUIRE_HOST`` or ``CI`` is set, in which case it fails.
"""
from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import types
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Iterator, Mapping

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PACK_LINK_NAME = "comfyui-apt-lora-trainer"


# --------------------------------------------------------------------------------------------------
# Locating the host / skip-or-fail policy
# --------------------------------------------------------------------------------------------------

def _truthy(value: str | None) -> bool:
    return value is not None and value.strip().lower() not in ("", "0", "false", "no", "off")


def comfyui_dir() -> Path:
    """The ComfyUI source tree: ``$APT_COMFYUI_DIR`` or ``<repo>/.cache/comfyui``."""
    env = os.environ.get("APT_COMFYUI_DIR")
    return Path(env).expanduser().resolve() if env else REPO_ROOT / ".cache" / "comfyui"


def comfyui_available() -> bool:
    return (comfyui_dir() / "main.py").is_file()


def comfyui_version() -> str:
    """``__version__`` of the host tree (its comfyui_version.py), e.g. "0.3.75"; "" when unknown."""
    import re

    try:
        text = (comfyui_dir() / "comfyui_version.py").read_text(encoding="utf-8")
    except OSError:
        return ""
    m = re.search(r"""__version__\s*=\s*["']([^"']+)""", text)
    return m.group(1) if m else ""


def host_required() -> bool:
    """True when a missing host must fail the tests instead of skipping them."""
    return _truthy(os.environ.get("APT_REQUIRE_HOST")) or _truthy(os.environ.get("CI"))


def require_comfyui() -> Path:
    """Return the ComfyUI tree; skip the calling test if it is missing (fail under CI / APT_REQUIRE_HOST)."""
    import pytest

    d = comfyui_dir()
    if (d / "main.py").is_file():
        return d
    msg = (f"ComfyUI host tree not found at {d} (no main.py); run `bash scripts/fetch_comfyui.sh` "
           f"or set APT_COMFYUI_DIR")
    if host_required():
        pytest.fail(msg + " [APT_REQUIRE_HOST or CI is set: failing instead of skipping]", pytrace=False)
    pytest.skip(msg)


# --------------------------------------------------------------------------------------------------
# a. In-process import of ComfyUI's modules
# --------------------------------------------------------------------------------------------------

_COMFY_SUBMODULES = (
    "comfy.options", "comfy.cli_args", "comfy.model_management", "comfy.utils", "comfy.ops",
    "comfy.model_base", "comfy.supported_models", "comfy.supported_models_base", "comfy.model_detection",
    "comfy.model_patcher", "comfy.lora", "comfy.lora_convert", "comfy.sd",
    "comfy.ldm.modules.diffusionmodules.openaimodel",
)


def import_comfy(cpu: bool = True) -> types.ModuleType:
    """Import ComfyUI's ``comfy`` package from the host tree and return it (submodules loaded).

    ComfyUI only parses ``sys.argv`` when ``comfy.options.args_parsing`` is True (``main.py`` turns it
    on); library imports keep the default False, so ``comfy.cli_args.args`` holds the defaults and
    pytest's argv is never looked at. We force it off anyway and set ``args.cpu`` before
    ``comfy.model_management`` reads it at import time (it picks the torch device then).
    Idempotent; raises if a different ``comfy`` package is already imported.
    """
    d = str(require_comfyui())
    if d not in sys.path:
        sys.path.insert(0, d)
    already = sys.modules.get("comfy")
    if already is not None:  # comfy/ has no __init__.py: a namespace package, so look at __path__
        origins = [Path(p).resolve() for p in getattr(already, "__path__", [])]
        if not any(Path(d) in o.parents for o in origins):
            raise RuntimeError(f"a different 'comfy' package is already imported from {origins}")
    import importlib

    options = importlib.import_module("comfy.options")
    options.enable_args_parsing(False)
    if "comfy.model_management" not in sys.modules:
        cli_args = importlib.import_module("comfy.cli_args")
        if cpu:
            cli_args.args.cpu = True
    for name in _COMFY_SUBMODULES:
        importlib.import_module(name)
    return sys.modules["comfy"]


# --------------------------------------------------------------------------------------------------
# diffusers UNet2DConditionModel config -> ComfyUI UNetModel config
# --------------------------------------------------------------------------------------------------

def _diffusers_defaults() -> dict:
    try:
        from diffusers import UNet2DConditionModel
    except Exception:  # pragma: no cover - diffusers is a hard test dependency
        return {}
    sig = inspect.signature(UNet2DConditionModel.__init__)
    return {k: p.default for k, p in sig.parameters.items()
            if k != "self" and p.default is not inspect.Parameter.empty}


def _full_diffusers_config(cfg: Any) -> dict:
    if hasattr(cfg, "config") and not isinstance(cfg, Mapping):  # a model instance
        cfg = cfg.config
    out = _diffusers_defaults()
    out.update({k: v for k, v in dict(cfg).items() if not k.startswith("_")})
    return out


def _per_level(value, n: int, name: str) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name} has {len(value)} entries, expected {n}")
        return list(value)
    return [value] * n


def diffusers_to_comfy_unet_config(cfg: Any, dtype=None) -> dict:
    """Convert a diffusers ``UNet2DConditionModel`` config (dict, FrozenDict or the model) into the
    ``unet_config`` dict ComfyUI's ``openaimodel.UNetModel`` / ``supported_models.SDXL`` take.

    Keys produced match ``comfy.model_detection`` output (see its SDXL dict): model_channels,
    in/out_channels, num_res_blocks (per level), channel_mult, transformer_depth (one entry per input
    res block), transformer_depth_output (one per output block, in *input* order - ComfyUI pops from
    the end), transformer_depth_middle, context_dim, num_head_channels / num_heads,
    adm_in_channels + num_classes="sequential" for SDXL's text_time embedding,
    use_linear_in_transformer, ...

    Heads: diffusers' ``attention_head_dim`` is really the number of heads per level (diffusers issue
    2011). ComfyUI has one global setting: a constant head size (``num_head_channels``) or a constant
    head count (``num_heads``); a config that fits neither raises ValueError.
    Structural things ComfyUI cannot express also raise; numeric differences that keep the weight
    layout but change the output are listed by ``comfy_parity_problems``.
    """
    import torch

    c = _full_diffusers_config(cfg)
    boc = list(c["block_out_channels"])
    n = len(boc)
    down = list(c["down_block_types"])
    up = list(c["up_block_types"])
    if len(down) != n or len(up) != n:
        raise ValueError("down/up_block_types and block_out_channels must have the same length")
    for t in down:
        if t not in ("DownBlock2D", "CrossAttnDownBlock2D"):
            raise ValueError(f"unsupported down block type {t!r}")
    for t in up:
        if t not in ("UpBlock2D", "CrossAttnUpBlock2D"):
            raise ValueError(f"unsupported up block type {t!r}")
    if c.get("mid_block_type", "UNetMidBlock2DCrossAttn") != "UNetMidBlock2DCrossAttn":
        raise ValueError(f"unsupported mid_block_type {c.get('mid_block_type')!r} (ComfyUI's "
                         f"unet_to_diffusers assumes a cross-attention middle block)")

    mc = boc[0]
    if any(ch % mc for ch in boc):
        raise ValueError(f"block_out_channels {boc} are not integer multiples of {mc}")
    channel_mult = [ch // mc for ch in boc]

    lpb = [int(x) for x in _per_level(c["layers_per_block"], n, "layers_per_block")]
    if len(set(lpb)) != 1:
        # comfy.utils.unet_to_diffusers numbers input blocks as 1 + (num_res_blocks[x] + 1) * x and
        # diffusers' up blocks assume symmetric skip channels: only a uniform value maps 1:1.
        raise ValueError(f"layers_per_block must be the same on every level for ComfyUI, got {lpb}")
    tlpb = _per_level(c.get("transformer_layers_per_block", 1), n, "transformer_layers_per_block")

    def layer_depths(depth, n_layers: int, has_attn: bool) -> list[int]:
        if not has_attn:
            return [0] * n_layers
        if isinstance(depth, (list, tuple)):
            if len(depth) != n_layers:
                raise ValueError(f"per-layer transformer depth {depth} needs {n_layers} entries")
            return [int(x) for x in depth]
        return [int(depth)] * n_layers

    transformer_depth: list[int] = []
    for i in range(n):
        transformer_depth += layer_depths(tlpb[i], lpb[i], "CrossAttn" in down[i])

    rtlpb = c.get("reverse_transformer_layers_per_block")
    rtlpb = list(reversed(tlpb)) if rtlpb is None else list(rtlpb)
    rlpb = list(reversed(lpb))
    popped: list[int] = []  # order in which ComfyUI pops transformer_depth_output (up block 0 first)
    for j in range(n):
        popped += layer_depths(rtlpb[j], rlpb[j] + 1, "CrossAttn" in up[j])
    transformer_depth_output = list(reversed(popped))

    mid = tlpb[-1]
    transformer_depth_middle = int(mid[0] if isinstance(mid, (list, tuple)) else mid)

    heads = c.get("num_attention_heads") or c.get("attention_head_dim")
    heads = [int(h) for h in _per_level(heads, n, "attention_head_dim/num_attention_heads")]
    rheads = list(reversed(heads))
    rboc = list(reversed(boc))
    used: list[tuple[int, int]] = []  # (channels, heads) of every attention level
    for i in range(n):
        if "CrossAttn" in down[i]:
            used.append((boc[i], heads[i]))
        if "CrossAttn" in up[i]:
            used.append((rboc[i], rheads[i]))
    used.append((boc[-1], heads[-1]))  # middle block
    for ch, h in used:
        if ch % h:
            raise ValueError(f"{ch} channels not divisible by {h} heads")
    head_dims = {ch // h for ch, h in used}
    head_counts = {h for _, h in used}
    if len(head_dims) == 1:
        num_head_channels, num_heads = head_dims.pop(), -1
    elif len(head_counts) == 1:
        num_head_channels, num_heads = -1, head_counts.pop()
    else:
        raise ValueError(f"ComfyUI needs a constant head size or head count; got (channels, heads) {used}")

    ctx = c.get("cross_attention_dim")
    if isinstance(ctx, (list, tuple)):
        if len(set(ctx)) != 1:
            raise ValueError(f"ComfyUI needs one cross_attention_dim, got {ctx}")
        ctx = ctx[0]

    out = {
        "use_checkpoint": False,
        "image_size": c.get("sample_size") or 32,
        "in_channels": int(c["in_channels"]),
        "out_channels": int(c["out_channels"]),
        "model_channels": mc,
        "num_res_blocks": lpb,
        "channel_mult": channel_mult,
        "transformer_depth": transformer_depth,
        "transformer_depth_output": transformer_depth_output,
        "transformer_depth_middle": transformer_depth_middle,
        "context_dim": int(ctx),
        "num_head_channels": num_head_channels,
        "num_heads": num_heads,
        "use_linear_in_transformer": bool(c.get("use_linear_projection", False)),
        "use_spatial_transformer": True,
        "legacy": False,
        "use_temporal_attention": False,
        "use_temporal_resblock": False,
        "adm_in_channels": None,
        "dtype": dtype if dtype is not None else torch.float32,
    }
    if c.get("addition_embed_type") == "text_time" or c.get("class_embed_type") == "projection":
        out["num_classes"] = "sequential"
        out["adm_in_channels"] = int(c["projection_class_embeddings_input_dim"])
    elif c.get("addition_embed_type") is not None or c.get("class_embed_type") is not None:
        raise ValueError("only addition_embed_type='text_time' (SDXL) or no extra embedding is supported")
    return out


def comfy_parity_problems(cfg: Any) -> list[str]:
    """Config settings under which ComfyUI's UNet computes something different from diffusers'
    even though every weight maps 1:1 (ComfyUI hard-codes these). Empty list = outputs match.

    The important one: ComfyUI's ResBlocks and SpatialTransformers always use GroupNorm(32, ...),
    so a tiny model must use ``norm_num_groups=32`` (channels multiples of 32) to match.
    """
    c = _full_diffusers_config(cfg)
    problems = []

    def check(key, ok, want):
        if not ok(c.get(key)):
            problems.append(f"{key}={c.get(key)!r} (ComfyUI computes as {want})")

    check("norm_num_groups", lambda v: v == 32, "32: GroupNorm(32, ...) is hard-coded")
    check("norm_eps", lambda v: abs(float(v) - 1e-5) < 1e-12, "1e-5 in ResBlocks, 1e-6 in transformers")
    check("flip_sin_to_cos", lambda v: v is True, "True (cos, sin order)")
    check("freq_shift", lambda v: v == 0, "0")
    check("act_fn", lambda v: v == "silu", "silu")
    check("resnet_time_scale_shift", lambda v: v == "default", "'default'")
    check("resnet_skip_time_act", lambda v: not v, "False")
    check("resnet_out_scale_factor", lambda v: v == 1.0, "1.0")
    check("mid_block_scale_factor", lambda v: v == 1, "1")
    check("center_input_sample", lambda v: not v, "False")
    check("only_cross_attention", lambda v: not (any(v) if isinstance(v, (list, tuple)) else v), "False")
    check("dual_cross_attention", lambda v: not v, "False")
    check("class_embeddings_concat", lambda v: not v, "False")
    check("time_embedding_type", lambda v: v == "positional", "'positional'")
    check("time_embedding_dim", lambda v: v is None or v == 4 * c["block_out_channels"][0], "4*model_channels")
    check("time_embedding_act_fn", lambda v: v is None, "None")
    check("timestep_post_act", lambda v: v is None, "None")
    check("time_cond_proj_dim", lambda v: v is None, "None")
    check("encoder_hid_dim_type", lambda v: v is None, "None")
    check("conv_in_kernel", lambda v: v == 3, "3")
    check("conv_out_kernel", lambda v: v == 3, "3")
    check("downsample_padding", lambda v: v == 1, "1")
    check("attention_type", lambda v: v == "default", "'default'")
    check("cross_attention_norm", lambda v: v is None, "None")
    check("dropout", lambda v: not v, "0.0")
    return problems


# --------------------------------------------------------------------------------------------------
# Building the ComfyUI model and moving weights across
# --------------------------------------------------------------------------------------------------

def comfy_sdxl_model_from_diffusers_config(unet_config: Any, dtype=None, device=None):
    """Build a ComfyUI SDXL model (``comfy.model_base.SDXL`` via ``comfy.supported_models.SDXL``) with
    the layout of the given diffusers UNet config, wrapped in a ``comfy.model_patcher.ModelPatcher``
    (load and offload device = CPU unless ``device`` is given).

    ComfyUI skips weight init (``comfy.ops.disable_weight_init``): weights are uninitialised until
    ``load_diffusers_unet_into_comfy`` fills them. ``model.embedder`` (SDXL's size/crop embedder,
    hard-coded ``Timestep(256)`` in ComfyUI) is replaced by ``Timestep(addition_time_embed_dim)`` so
    ``patcher.model.encode_adm(pooled_output=..., width=..., height=..., crop_w=..., crop_h=...,
    target_width=..., target_height=...)`` builds the right ``y`` for small test models too.
    """
    import torch

    comfy = import_comfy()
    full = _full_diffusers_config(unet_config)
    cc = diffusers_to_comfy_unet_config(full, dtype=dtype)
    if cc.get("adm_in_channels") is None or full.get("addition_embed_type") != "text_time":
        raise ValueError("not an SDXL-style config (needs addition_embed_type='text_time')")
    model_config = comfy.supported_models.SDXL(cc)
    # supported_models_base.BASE.__init__ overwrites these with unet_extra_config (head size 64).
    model_config.unet_config["num_heads"] = cc["num_heads"]
    model_config.unet_config["num_head_channels"] = cc["num_head_channels"]
    device = torch.device(device) if device is not None else torch.device("cpu")
    model = model_config.get_model({}, device=device)
    openaimodel = comfy.ldm.modules.diffusionmodules.openaimodel
    model.embedder = openaimodel.Timestep(int(full.get("addition_time_embed_dim") or 256))
    model.diffusion_model.to(device)
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=device)


def diffusers_to_comfy_key_map(model_patcher_or_config) -> dict[str, str]:
    """diffusers UNet state-dict key -> ComfyUI ``diffusion_model`` key (no prefix), built by ComfyUI's
    own ``comfy.utils.unet_to_diffusers`` (the mapping LoraLoader uses for diffusers-named LoRAs).
    Accepts a ModelPatcher, a ComfyUI BaseModel or a ComfyUI unet_config dict."""
    comfy = import_comfy()
    obj = model_patcher_or_config
    if hasattr(obj, "model") and hasattr(obj.model, "model_config"):
        obj = obj.model
    if hasattr(obj, "model_config"):
        obj = obj.model_config.unet_config
    return comfy.utils.unet_to_diffusers(dict(obj))


def diffusers_comfy_weight_report(unet_or_state_dict, model_patcher) -> dict[str, list]:
    """Compare a diffusers UNet's weights with a ComfyUI model's under ComfyUI's key mapping.

    Returns lists: ``unmapped`` (diffusers keys with no mapping), ``missing`` (ComfyUI weights nothing
    maps onto), ``dangling`` (mapping targets absent from the ComfyUI model), ``shape_mismatch``
    (``(diffusers_key, comfy_key, diffusers_shape, comfy_shape)``). All empty = full 1:1 coverage.
    """
    sd = unet_or_state_dict.state_dict() if hasattr(unet_or_state_dict, "state_dict") else dict(unet_or_state_dict)
    key_map = diffusers_to_comfy_key_map(model_patcher)
    csd = model_patcher.model.diffusion_model.state_dict()
    report: dict[str, list] = {"unmapped": [], "missing": [], "dangling": [], "shape_mismatch": []}
    covered = set()
    for k, v in sd.items():
        ck = key_map.get(k)
        if ck is None:
            report["unmapped"].append(k)
            continue
        if ck not in csd:
            report["dangling"].append((k, ck))
            continue
        covered.add(ck)
        if tuple(csd[ck].shape) != tuple(v.shape):
            report["shape_mismatch"].append((k, ck, tuple(v.shape), tuple(csd[ck].shape)))
    report["missing"] = sorted(set(csd) - covered)
    return report


def load_diffusers_unet_into_comfy(unet_or_state_dict, model_patcher, strict: bool = True) -> dict[str, list]:
    """Copy a diffusers UNet's weights into the ComfyUI model (in place, via ComfyUI's key mapping).
    With ``strict`` any gap in the mapping raises; returns ``diffusers_comfy_weight_report``."""
    import torch

    sd = unet_or_state_dict.state_dict() if hasattr(unet_or_state_dict, "state_dict") else dict(unet_or_state_dict)
    report = diffusers_comfy_weight_report(sd, model_patcher)
    if strict and any(report.values()):
        raise ValueError(f"diffusers -> ComfyUI weight mapping incomplete: "
                         f"{ {k: v[:5] for k, v in report.items() if v} }")
    key_map = diffusers_to_comfy_key_map(model_patcher)
    dm = model_patcher.model.diffusion_model
    csd = dm.state_dict()
    new = {}
    for k, v in sd.items():
        ck = key_map.get(k)
        if ck in csd and tuple(csd[ck].shape) == tuple(v.shape):
            new[ck] = v.detach().to(dtype=csd[ck].dtype, device=csd[ck].device)
    with torch.no_grad():
        dm.load_state_dict(new, strict=strict)
    return report


@contextlib.contextmanager
def patched_diffusion_model(model_patcher) -> Iterator[Any]:
    """Apply the patcher's weight patches (e.g. a LoRA) on its load device, yield
    ``model_patcher.model.diffusion_model``, then restore the original weights."""
    model_patcher.patch_model(device_to=model_patcher.load_device)
    try:
        yield model_patcher.model.diffusion_model
    finally:
        model_patcher.unpatch_model(device_to=model_patcher.offload_device)


# --------------------------------------------------------------------------------------------------
# Loading a LoRA the way LoraLoader does
# --------------------------------------------------------------------------------------------------

class _ListHandler(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record):
        try:
            self.messages.append(record.getMessage())
        except Exception:  # pragma: no cover
            pass


@contextlib.contextmanager
def capture_logs(level=logging.WARNING) -> Iterator[list[str]]:
    """Collect root-logger messages (ComfyUI logs through ``logging.warning`` etc.)."""
    root = logging.getLogger()
    handler = _ListHandler()
    handler.setLevel(level)
    old_level = root.level
    if root.level > level or root.level == logging.NOTSET:
        root.setLevel(level)
    root.addHandler(handler)
    try:
        yield handler.messages
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)


def comfy_load_lora(model_patcher, lora, strength: float = 1.0):
    """Load a LoRA (path or state dict) onto ``model_patcher`` exactly as ``LoraLoader`` does
    (``comfy.utils.load_torch_file(..., safe_load=True)`` + ``comfy.sd.load_lora_for_models`` with no CLIP).

    Returns ``(patched_patcher, loaded_key_count, not_loaded_lines)``: the file's key count minus its
    keys ComfyUI reported as "lora key not loaded"; ``not_loaded_lines`` holds every such log line
    plus any "NOT LOADED <model key>" line (a key that mapped onto a weight the model lacks).
    """
    comfy = import_comfy()
    if isinstance(lora, (str, os.PathLike)):
        sd = comfy.utils.load_torch_file(str(lora), safe_load=True)
    else:
        sd = dict(lora)
    prefix = "lora key not loaded: "
    with capture_logs(logging.WARNING) as messages:
        patched, _ = comfy.sd.load_lora_for_models(model_patcher, None, sd, strength, 0.0)
    lines = [m for m in messages if m.startswith(prefix) or m.startswith("NOT LOADED")]
    not_loaded_file_keys = {m[len(prefix):] for m in lines if m.startswith(prefix)}
    loaded = sum(1 for k in sd if k not in not_loaded_file_keys)
    return patched, loaded, lines


def comfy_lora_load_report(model_patcher, lora_path) -> tuple[int, list[str]]:
    """``(loaded_key_count, not_loaded_lines)`` for loading ``lora_path`` onto the model like
    ``LoraLoader`` (see ``comfy_load_lora``). A file that fully works has ``not_loaded_lines == []``
    and ``loaded_key_count == len(file keys)``."""
    _, loaded, lines = comfy_load_lora(model_patcher, lora_path)
    return loaded, lines


# --------------------------------------------------------------------------------------------------
# b. Real server
# --------------------------------------------------------------------------------------------------

class ComfyServerError(RuntimeError):
    pass


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ComfyServer:
    """The real ComfyUI host in a subprocess (CPU), isolated in a temp directory.

    Layout under ``root`` (a fresh temp dir unless given): ``custom_nodes/`` (with a symlink
    ``<pack_link_name>`` -> this repo when ``link_pack``), ``models/loras/``, ``input/``, ``output/``,
    ``temp/``, ``user/`` and ``comfyui.log``. Started with ``--base-directory root`` (so nothing is
    written into the ComfyUI tree and no other custom nodes are found) plus the explicit
    ``--output/--input/--temp-directory`` flags and an ``--extra-model-paths-config`` yaml whose
    ``custom_nodes:`` and ``loras:`` entries point at those folders.

    Use as a context manager; ``start()``/``stop()`` also work. ``custom_nodes_dir`` may point at an
    existing folder instead (then nothing is linked).
    """

    def __init__(self, root: str | os.PathLike | None = None, *, link_pack: bool = True,
                 pack_dir: str | os.PathLike = REPO_ROOT, pack_link_name: str = DEFAULT_PACK_LINK_NAME,
                 custom_nodes_dir: str | os.PathLike | None = None, comfy_dir: str | os.PathLike | None = None,
                 python: str | None = None, extra_args: tuple[str, ...] | list[str] = (),
                 env: Mapping[str, str] | None = None, startup_timeout: float = 120.0,
                 host: str = "127.0.0.1", port: int | None = None):
        self.root = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="apt-comfy-"))
        self.root = self.root.resolve()
        self.comfy_dir = Path(comfy_dir).resolve() if comfy_dir else comfyui_dir()
        self.link_pack = link_pack and custom_nodes_dir is None
        self.pack_dir = Path(pack_dir).resolve()
        self.pack_link_name = pack_link_name
        self.custom_nodes_dir = Path(custom_nodes_dir).resolve() if custom_nodes_dir else self.root / "custom_nodes"
        self.loras_dir = self.root / "models" / "loras"
        self.input_dir = self.root / "input"
        self.output_dir = self.root / "output"
        self.temp_parent = self.root / "temp_parent"   # ComfyUI uses <arg>/temp and wipes it
        self.temp_dir = self.temp_parent / "temp"
        self.user_dir = self.root / "user"
        self.log_path = self.root / "comfyui.log"
        self.yaml_path = self.root / "extra_model_paths.yaml"
        self.python = python or sys.executable
        self.extra_args = list(extra_args)
        self.env = dict(env) if env is not None else None
        self.startup_timeout = startup_timeout
        self.host = host
        self.port = port
        self.proc: subprocess.Popen | None = None
        self.startup_seconds: float | None = None
        self.client_id = uuid.uuid4().hex
        self._log_fh = None

    # ---- lifecycle -------------------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _prepare(self) -> None:
        for p in (self.custom_nodes_dir, self.loras_dir, self.input_dir, self.output_dir,
                  self.temp_parent, self.user_dir):
            p.mkdir(parents=True, exist_ok=True)
        if self.link_pack:
            link = self.custom_nodes_dir / self.pack_link_name
            if not link.exists() and not link.is_symlink():
                link.symlink_to(self.pack_dir, target_is_directory=True)
        self.yaml_path.write_text(
            "apt_tests:\n"
            f"    custom_nodes: {json.dumps(str(self.custom_nodes_dir))}\n"
            f"    loras: {json.dumps(str(self.loras_dir))}\n",
            encoding="utf-8")

    def command(self) -> list[str]:
        return [self.python, str(self.comfy_dir / "main.py"), "--cpu",
                "--listen", self.host, "--port", str(self.port),
                "--base-directory", str(self.root),
                "--extra-model-paths-config", str(self.yaml_path),
                "--output-directory", str(self.output_dir),
                "--input-directory", str(self.input_dir),
                "--temp-directory", str(self.temp_parent),
                "--user-directory", str(self.user_dir),
                "--database-url", f"sqlite:///{self.user_dir / 'comfyui.db'}",
                "--disable-auto-launch",
                *self.extra_args]

    def start(self) -> "ComfyServer":
        if not (self.comfy_dir / "main.py").is_file():
            raise ComfyServerError(f"no ComfyUI main.py under {self.comfy_dir}")
        self._prepare()
        fixed_port = self.port is not None
        for attempt in range(3):
            if not fixed_port:
                self.port = free_port(self.host)
            if self._launch_and_wait(last=fixed_port or attempt == 2):
                return self
        raise ComfyServerError("unreachable")  # pragma: no cover

    def _launch_and_wait(self, last: bool) -> bool:
        env = dict(os.environ if self.env is None else self.env)
        env.setdefault("PYTHONUNBUFFERED", "1")
        self._log_fh = open(self.log_path, "ab")
        self._log_fh.write(f"\n=== {' '.join(self.command())}\n".encode())
        self._log_fh.flush()
        t0 = time.monotonic()
        self.proc = subprocess.Popen(self.command(), cwd=str(self.root), env=env, stdin=subprocess.DEVNULL,
                                     stdout=self._log_fh, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = t0 + self.startup_timeout
        while time.monotonic() < deadline:
            rc = self.proc.poll()
            if rc is not None:
                tail = self.log_tail()
                self._close_log()
                self.proc = None
                if not last and "address already in use" in tail.lower():
                    return False
                raise ComfyServerError(f"ComfyUI exited with code {rc} during startup; log tail:\n{tail}")
            try:
                self.get_json("/object_info", timeout=30)
                self.startup_seconds = time.monotonic() - t0
                return True
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError, ValueError):
                time.sleep(0.25)
        tail = self.log_tail()
        self.stop()
        raise ComfyServerError(f"ComfyUI did not answer /object_info within {self.startup_timeout:.0f}s; "
                               f"log tail:\n{tail}")

    def stop(self, timeout: float = 15.0) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            # SIGINT first: main.py catches KeyboardInterrupt and cleans its temp dir.
            for sig, wait in ((signal.SIGINT, timeout), (signal.SIGTERM, 5.0)):
                try:
                    proc.send_signal(sig)
                    proc.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
            # Children of the server (if any) live in its own session: end that group only.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        self._close_log()

    def _close_log(self) -> None:
        if self._log_fh is not None:
            self._log_fh.close()
            self._log_fh = None

    def __enter__(self) -> "ComfyServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # ---- logs ------------------------------------------------------------------------------------
    def log_text(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def import_failed_lines(self) -> list[str]:
        """Custom-node import failures ComfyUI logged at startup ("(IMPORT FAILED): <path>" lines and
        "Cannot import <path> module for custom nodes" lines)."""
        return [ln for ln in self.log_text().splitlines()
                if "IMPORT FAILED" in ln or "module for custom nodes" in ln]

    # ---- HTTP ------------------------------------------------------------------------------------
    def _request(self, method: str, path: str, data: Any = None, timeout: float = 30.0) -> Any:
        body = None if data is None else json.dumps(data).encode()
        req = urllib.request.Request(self.base_url + path, data=body, method=method,
                                     headers={"Content-Type": "application/json"} if body else {})
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
        if not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            return raw.decode("utf-8", errors="replace")

    def get_json(self, path: str, timeout: float = 30.0) -> Any:
        return self._request("GET", path, timeout=timeout)

    def post_json(self, path: str, data: Any = None, timeout: float = 30.0) -> Any:
        return self._request("POST", path, data if data is not None else {}, timeout=timeout)

    def object_info(self, node_class: str | None = None) -> dict:
        return self.get_json("/object_info" + (f"/{node_class}" if node_class else ""))

    def post_prompt(self, prompt: dict, client_id: str | None = None) -> str:
        """Queue an API-format prompt; returns its prompt_id. A rejected prompt (validation error)
        raises ComfyServerError with the server's error and node_errors."""
        try:
            out = self.post_json("/prompt", {"prompt": prompt, "client_id": client_id or self.client_id})
        except urllib.error.HTTPError as e:
            detail = e.read().decode("utf-8", errors="replace")
            raise ComfyServerError(f"/prompt rejected ({e.code}): {detail}") from None
        if not isinstance(out, dict) or "prompt_id" not in out:
            raise ComfyServerError(f"/prompt answered {out!r}")
        if out.get("node_errors"):
            raise ComfyServerError(f"/prompt node errors: {out['node_errors']}")
        return out["prompt_id"]

    def history(self, prompt_id: str | None = None) -> dict:
        return self.get_json("/history" + (f"/{prompt_id}" if prompt_id else ""))

    def queue(self) -> dict:
        return self.get_json("/queue")

    def wait_for(self, prompt_id: str, timeout: float = 300.0, poll: float = 0.25,
                 raise_on_error: bool = False) -> dict:
        """Poll /history until the prompt has finished (success, error or interrupted) and return its
        history entry ({"prompt", "outputs", "status": {"status_str", "completed", "messages"}, ...})."""
        deadline = time.monotonic() + timeout
        while True:
            if not self.running:
                raise ComfyServerError(f"ComfyUI is not running; log tail:\n{self.log_tail()}")
            h = self.history(prompt_id)
            entry = h.get(prompt_id) if isinstance(h, dict) else None
            status = (entry or {}).get("status", {})
            if entry is not None and (status.get("status_str") in ("success", "error") or status.get("completed")):
                if raise_on_error and entry.get("status", {}).get("status_str") != "success":
                    raise ComfyServerError(f"prompt {prompt_id} failed: {entry.get('status')}\n"
                                           f"log tail:\n{self.log_tail()}")
                return entry
            if time.monotonic() > deadline:
                raise TimeoutError(f"prompt {prompt_id} not finished after {timeout:.0f}s; queue="
                                   f"{self.queue()}; log tail:\n{self.log_tail()}")
            time.sleep(poll)

    def interrupt(self, prompt_id: str | None = None) -> None:
        """POST /interrupt (the browser's Cancel). With prompt_id only that prompt is interrupted if running."""
        self.post_json("/interrupt", {"prompt_id": prompt_id} if prompt_id else {})


def history_status(entry: dict) -> str:
    """'success' / 'error' / '' from a history entry; interrupted prompts end as 'error' with an
    ``execution_interrupted`` message."""
    return (entry or {}).get("status", {}).get("status_str", "")


def history_messages(entry: dict) -> list[str]:
    return [m[0] for m in (entry or {}).get("status", {}).get("messages", [])]


def comfy_server_fixture(scope: str = "session", **server_kwargs):
    """Make a pytest fixture yielding a started ``ComfyServer``: ``comfy_server = comfy_server_fixture()``
    in a test module or conftest. Skips/fails via ``require_comfyui()`` when the host tree is missing."""
    import pytest

    @pytest.fixture(scope=scope)
    def _fixture(tmp_path_factory):
        require_comfyui()
        root = tmp_path_factory.mktemp("comfyui")
        with ComfyServer(root, **server_kwargs) as server:
            yield server

    return _fixture


FIXTURE_PACKS = Path(__file__).resolve().parent / "pack_fixtures"


def server_with_test_models(root: str | os.PathLike) -> ComfyServer:
    """A ComfyServer in `root`/comfy that also loads the test-only pack of tests/pack_fixtures (tiny
    SDXL-shaped MODEL/CLIP/VAE nodes), through an extra-model-paths file written into `root`."""
    extra = Path(root) / "fixtures.yaml"
    extra.write_text(f"apt_test_fixtures:\n    custom_nodes: {json.dumps(str(FIXTURE_PACKS))}\n", encoding="utf-8")
    return ComfyServer(Path(root) / "comfy", extra_args=["--extra-model-paths-config", str(extra)])
