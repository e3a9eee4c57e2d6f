#!/usr/bin/env python3
"""Build the example workflows in workflows/ (UI / litegraph format, what the ComfyUI frontend saves)
from the compact specs below and the LIVE node schema (/object_info of a real ComfyUI with this pack).

    source scripts/env.sh
    python scripts/build_workflows.py            # starts the real host (CPU), writes workflows/*.json + *.jpg
                                                 # and node_list.json
    python scripts/build_workflows.py --check    # exit 1 when a committed file differs from what it would write
    python scripts/build_workflows.py --object-info dump.json   # use a saved /object_info instead of a host

Why a generator: a UI-format node stores its widget values as a positional list (`widgets_values`),
in the order the frontend creates the widgets from the node definition. When a node gains or loses
an input, hand-written graphs silently shift every value after it. Here every value is named in the
spec and placed by the schema, so a schema change is one command away from correct graphs, and
tests/test_workflows_integration.py fails until it is run.

Frontend rules reproduced here (ComfyUI frontend 1.32.9, src/services/litegraphService.ts and
src/renderer/extensions/vueNodes/widgets/composables/useIntWidget.ts):
- inputs are taken in `input_order` (required, then optional); socket-only inputs (MODEL, CLIP, custom
  types, forceInput) come first in `node.inputs`, then one input per widget (with `"widget": {name}`);
- widgets are INT, FLOAT, STRING, BOOLEAN and COMBO inputs (a COMBO is a list of options or "COMBO");
- an INT input with `control_after_generate`, or named `seed` / `noise_seed` when that option is absent,
  gets an extra "control after generate" widget right after it, whose value ("fixed", "increment",
  "decrement", "randomize") is saved in `widgets_values` but never sent to the server;
- Note / MarkdownNote are frontend-only (virtual) nodes: saved with the graph, never in a prompt.
The same module converts a UI graph into an API prompt the way the frontend's graphToPrompt does
(muted/bypassed nodes and virtual nodes left out); the browser test compares both with the frontend.

The thumbnails (`<name>.jpg` next to `<name>.json`, the name the template browser asks for) are
drawn from the graph itself with Pillow.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
WORKFLOW_DIR = REPO / "workflows"
VIRTUAL_NODES = {"Note", "MarkdownNote"}  # registered by the frontend itself (extensions/core/noteNode.ts)
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
CONTROL_VALUES = ("fixed", "increment", "decrement", "randomize")
MODE_ALWAYS, MODE_NEVER, MODE_BYPASS = 0, 2, 4
# Combo inputs whose options are the files on the user's disk: any value is acceptable in a shipped graph.
FILE_COMBOS = {("CheckpointLoaderSimple", "ckpt_name"), ("LoraLoader", "lora_name"),
               ("LoraLoaderModelOnly", "lora_name")}
SDXL_CHECKPOINT = "sd_xl_base_1.0.safetensors"

# ------------------------------------------------------------------------------------------------
# Schema helpers (V1 /object_info entries)
# ------------------------------------------------------------------------------------------------


class SchemaError(ValueError):
    """A spec or a saved graph does not fit the live node schema."""


def _input_kind(spec: list) -> tuple[str, dict, list | None]:
    """(type, options, combo options or None) of one /object_info input spec."""
    first = spec[0]
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if isinstance(first, list):
        return "COMBO", opts, list(first)
    if first == "COMBO":
        return "COMBO", opts, list(opts.get("options", []))
    return str(first), opts, None


def ordered_inputs(info: dict) -> list[tuple[str, str, dict, list | None, bool]]:
    """[(name, type, options, combo options, optional)] in the frontend's order."""
    out = []
    order = info.get("input_order") or {s: list(info.get("input", {}).get(s, {})) for s in ("required", "optional")}
    for section in ("required", "optional"):
        specs = info.get("input", {}).get(section, {})
        for name in order.get(section, []):
            if name in specs:
                t, opts, combo = _input_kind(specs[name])
                out.append((name, t, opts, combo, section == "optional"))
    return out


def has_control_widget(name: str, t: str, opts: dict) -> bool:
    if t != "INT":
        return False
    flag = opts.get("control_after_generate")
    return bool(flag) if flag is not None else name in ("seed", "noise_seed")


def is_widget(t: str, opts: dict) -> bool:
    return t in WIDGET_TYPES and not opts.get("forceInput")


def widget_layout(info: dict) -> list[tuple[str, str | None]]:
    """Positions of `widgets_values`: (input name, None) for a value, (input name, "control") for
    the control-after-generate value that follows it."""
    out: list[tuple[str, str | None]] = []
    for name, t, opts, _combo, _opt in ordered_inputs(info):
        if is_widget(t, opts):
            out.append((name, None))
            if has_control_widget(name, t, opts):
                out.append((name, "control"))
    return out


def default_value(t: str, opts: dict, combo: list | None) -> Any:
    if "default" in opts:
        return opts["default"]
    if t == "COMBO":
        return combo[0] if combo else ""
    return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}[t]


def check_value(node_type: str, name: str, t: str, opts: dict, combo: list | None, value: Any) -> str | None:
    """Why `value` does not fit the input, or None."""
    if t == "BOOLEAN":
        return None if isinstance(value, bool) else f"expected a boolean, got {value!r}"
    if t in ("INT", "FLOAT"):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (t == "INT" and not isinstance(value, int)):
            return f"expected {t}, got {value!r}"
        lo, hi = opts.get("min"), opts.get("max")
        if lo is not None and value < lo or hi is not None and value > hi:
            return f"{value!r} outside [{lo}, {hi}]"
        return None
    if t == "STRING":
        return None if isinstance(value, str) else f"expected a string, got {value!r}"
    if t == "COMBO":
        if not isinstance(value, str):
            return f"expected one of the options, got {value!r}"
        if (node_type, name) in FILE_COMBOS:
            return None
        return None if value in (combo or []) else f"{value!r} is not one of {combo}"
    return None


# ------------------------------------------------------------------------------------------------
# The specs
# ------------------------------------------------------------------------------------------------
# A node: key -> dict(type, pos=(x, y), w=widgets {name: value} (others: schema default),
#   control={seed input: "fixed"}, title, mode, size=(w, h) optional, text (Note)).
# Links: (from key, output index, to key, input name).

NEGATIVE = "blurry, low quality, deformed, watermark, text"
FOLDER = "my_subject"

NOTE_1 = """APT LoRA Trainer - example 1: train a LoRA of your subject and render with it

1. Put 3-10 photos of your subject in ComfyUI/input/my_subject (or type another folder in
   'APT Dataset Loader'; relative paths are inside ComfyUI's input folder). A caption can sit next
   to each photo as a .txt file with the same name.
2. Pick your SDXL checkpoint in 'Load Checkpoint'.
3. 'APT Caption': a rare trigger word (sks) plus a plain class word (person, dog, backpack).
4. Queue. The chart on 'APT Trainer' shows the overfitting indicator gamma per noise level and the
   losses; 'Stop' finishes early and still saves the LoRA. The LoRA is written to
   models/loras/my_subject_apt.safetensors, and the trainer's MODEL output (LoRA applied) renders
   the preview right away.
5. Later runs: the purple group renders with the saved LoRA file through the standard 'Load LoRA'.
   It is muted (Ctrl+M) because the file does not exist before the first training; after training,
   press R to refresh the file lists, then select the group's nodes and press Ctrl+M to un-mute.

Settings follow the APT paper (CVPR 2025). Out of memory? Choose 'Low VRAM' in memory_preset or
lower the dataset resolution to 768. Training again under the same LoRA name needs 'overwrite' on
(or a new name); with 'resume' on, a stopped or cancelled run continues from its last checkpoint."""

NOTE_2 = """APT vs plain DreamBooth-LoRA, side by side

Both trainers see the same photos, captions, seed, steps, rank and learning rate.
- Left trainer: plain DreamBooth-LoRA. Adaptive augmentation, adaptive loss weight (ATA),
  Representation Stabilization (RS) and Attention Alignment (AA) are all switched off;
  'track_indicator' stays on so its chart still shows how fast it memorises (gamma rising).
- Right trainer: APT with the paper's settings.
Both previews are rendered with the same prompt and seed. Compare how well the prompt's
background and style survive next to your subject.
Put your photos in ComfyUI/input/my_subject and pick your SDXL checkpoint first."""

NOTE_3 = """Advanced: every APT setting, resume, validation samples

- 'APT Indicator & Augmentation settings' and 'APT Regularization weights' show every setting with
  the defaults (the paper's values; lambda_rs and lambda_aa from the benchmark); hover a widget for what it does.
- Resume: checkpoints are written every 'checkpoint_every' steps to
  output/apt_lora_trainer/<LoRA name>/. With 'resume' on, the next run under the same LoRA name
  continues from the newest one (after Stop, Cancel or a crash, or after raising 'steps').
  Turn 'resume' off to start over (old checkpoints of that name are deleted).
- The subject shows up in prompts that do not name it, or looks too little like your photos: set
  'class_preservation' to 1 on 'APT Regularization weights' (0.3 for more likeness). The base model
  then draws 32 images from your captions without the trigger word before training, and each
  step takes about twice as long. Every caption must contain the trigger word.
- Validation: three fixed prompts and seeds rendered with the trained LoRA (top) and with the
  untouched base model (bottom group) for comparison. Edit the prompts to match your subject.
- The text boxes show the dataset report (skipped files and why), the final captions and the
  per-step training history (JSON)."""


def _base_nodes(trigger_class=("sks", "person")) -> dict:
    return {
        "ckpt": {"type": "CheckpointLoaderSimple", "pos": (40, 520), "w": {"ckpt_name": SDXL_CHECKPOINT}},
        "data": {"type": "APTDatasetLoader", "pos": (40, 700), "w": {"folder": FOLDER, "resolution": 1024}},
        "cap": {"type": "APTCaption", "pos": (40, 930),
                "w": {"trigger_word": trigger_class[0], "class_word": trigger_class[1]}},
    }


def _sampler_chain(prefix: str, key: str, model: tuple[str, int], pos_key: str, neg_key: str, latent: str,
                   vae: tuple[str, int], x: int, y: int, seed: int, save_prefix: str, mode: int = MODE_ALWAYS,
                   title: str | None = None):
    nodes = {
        f"{key}_ks": {"type": "KSampler", "pos": (x, y), "mode": mode, "title": title,
                      "w": {"seed": seed, "steps": 25, "cfg": 6.0, "sampler_name": "dpmpp_2m",
                            "scheduler": "karras", "denoise": 1.0},
                      "control": {"seed": "fixed"}},
        f"{key}_dec": {"type": "VAEDecode", "pos": (x + 360, y), "mode": mode, "size": (200, 50)},
        f"{key}_save": {"type": "SaveImage", "pos": (x + 580, y), "mode": mode, "size": (320, 360),
                        "w": {"filename_prefix": save_prefix}},
    }
    links = [(model[0], model[1], f"{key}_ks", "model"), (pos_key, 0, f"{key}_ks", "positive"),
             (neg_key, 0, f"{key}_ks", "negative"), (latent, 0, f"{key}_ks", "latent_image"),
             (f"{key}_ks", 0, f"{key}_dec", "samples"), (vae[0], vae[1], f"{key}_dec", "vae"),
             (f"{key}_dec", 0, f"{key}_save", "images")]
    return nodes, links


def spec_train_and_render() -> dict:
    nodes = {"note": {"type": "Note", "pos": (40, 40), "size": (440, 460), "text": NOTE_1}}
    nodes.update(_base_nodes())
    nodes.update({
        "report": {"type": "PreviewAny", "pos": (40, 1170), "size": (420, 160), "title": "Dataset report"},
        "captions": {"type": "PreviewAny", "pos": (40, 1350), "size": (420, 160), "title": "Final captions"},
        "train": {"type": "APTTrainer", "pos": (520, 520), "size": (480, 860),
                  "w": {"steps": 500, "rank": 32, "learning_rate": 1e-4, "seed": 0, "checkpoint_every": 100,
                        "lora_name": "my_subject_apt", "overwrite": False, "resume": True},
                  "control": {"seed": "fixed"}},
        "pos": {"type": "CLIPTextEncode", "pos": (1060, 40), "size": (400, 160), "title": "Prompt (use the trigger word)",
                "w": {"text": "a photo of sks person hiking in a snowy mountain forest, golden hour, detailed"}},
        "neg": {"type": "CLIPTextEncode", "pos": (1060, 240), "size": (400, 120), "title": "Negative prompt",
                "w": {"text": NEGATIVE}},
        "latent": {"type": "EmptyLatentImage", "pos": (1060, 400), "w": {"width": 1024, "height": 1024, "batch_size": 1}},
    })
    links = [("ckpt", 0, "train", "model"), ("ckpt", 1, "train", "clip"), ("ckpt", 2, "train", "vae"),
             ("data", 0, "cap", "dataset"), ("cap", 0, "train", "dataset"), ("data", 1, "report", "source"),
             ("cap", 1, "captions", "source"), ("ckpt", 1, "pos", "clip"), ("ckpt", 1, "neg", "clip")]
    n, l = _sampler_chain("preview", "prev", ("train", 1), "pos", "neg", "latent", ("ckpt", 2), 1060, 560, 42,
                          "apt/my_subject_preview", title="KSampler (trainer's MODEL: LoRA applied)")
    nodes.update(n)
    links += l
    muted = {
        "lora": {"type": "LoraLoader", "pos": (1060, 1000), "mode": MODE_NEVER,
                 "w": {"lora_name": "my_subject_apt.safetensors", "strength_model": 1.0, "strength_clip": 1.0}},
        "pos2": {"type": "CLIPTextEncode", "pos": (1060, 1160), "size": (400, 160), "mode": MODE_NEVER,
                 "w": {"text": "a photo of sks person hiking in a snowy mountain forest, golden hour, detailed"}},
        "neg2": {"type": "CLIPTextEncode", "pos": (1060, 1360), "size": (400, 120), "mode": MODE_NEVER,
                 "w": {"text": NEGATIVE}},
    }
    nodes.update(muted)
    links += [("ckpt", 0, "lora", "model"), ("ckpt", 1, "lora", "clip"), ("lora", 1, "pos2", "clip"),
              ("lora", 1, "neg2", "clip")]
    n, l = _sampler_chain("lora", "file", ("lora", 0), "pos2", "neg2", "latent", ("ckpt", 2), 1500, 1000, 42,
                          "apt/my_subject_lora", mode=MODE_NEVER, title="KSampler (saved LoRA file)")
    nodes.update(n)
    links += l
    groups = [("Later runs: render with the saved LoRA file (un-mute with Ctrl+M after the first training)",
               ["lora", "pos2", "neg2", "file_ks", "file_dec", "file_save"], "#a1309b")]
    return {"nodes": nodes, "links": links, "groups": groups}


def spec_dreambooth_vs_apt() -> dict:
    nodes = {"note": {"type": "Note", "pos": (40, 40), "size": (440, 440), "text": NOTE_2}}
    nodes.update(_base_nodes())
    common = {"steps": 500, "rank": 32, "learning_rate": 1e-4, "seed": 0, "checkpoint_every": 100,
              "overwrite": False, "resume": True}
    nodes.update({
        "ata_off": {"type": "APTAtaSettings", "pos": (520, 40), "title": "ATA off (plain DreamBooth)",
                    "w": {"adaptive_augmentation": False, "adaptive_loss_weight": False, "track_indicator": True}},
        "reg_off": {"type": "APTRegSettings", "pos": (520, 470), "title": "RS + AA off (plain DreamBooth)",
                    "w": {"representation_stabilization": False, "attention_alignment": False}},
        "ata_on": {"type": "APTAtaSettings", "pos": (1060, 40), "title": "ATA (paper settings)"},
        "reg_on": {"type": "APTRegSettings", "pos": (1060, 470), "title": "RS + AA (paper settings)"},
        "train_db": {"type": "APTTrainer", "pos": (520, 720), "size": (480, 860), "title": "Plain DreamBooth-LoRA",
                     "w": {**common, "lora_name": "my_subject_dreambooth"}, "control": {"seed": "fixed"}},
        "train_apt": {"type": "APTTrainer", "pos": (1060, 720), "size": (480, 860), "title": "APT",
                      "w": {**common, "lora_name": "my_subject_apt_compare"}, "control": {"seed": "fixed"}},
        "pos": {"type": "CLIPTextEncode", "pos": (1600, 40), "size": (440, 160), "title": "Prompt (shared)",
                "w": {"text": "a photo of sks person reading a book in a cozy library, warm light"}},
        "neg": {"type": "CLIPTextEncode", "pos": (1600, 240), "size": (440, 120), "title": "Negative prompt (shared)",
                "w": {"text": NEGATIVE}},
        "latent": {"type": "EmptyLatentImage", "pos": (1600, 400), "w": {"width": 1024, "height": 1024, "batch_size": 2}},
    })
    links = [("data", 0, "cap", "dataset"), ("ckpt", 1, "pos", "clip"), ("ckpt", 1, "neg", "clip")]
    for t, ata, reg in (("train_db", "ata_off", "reg_off"), ("train_apt", "ata_on", "reg_on")):
        links += [("ckpt", 0, t, "model"), ("ckpt", 1, t, "clip"), ("ckpt", 2, t, "vae"), ("cap", 0, t, "dataset"),
                  (ata, 0, t, "ata_settings"), (reg, 0, t, "reg_settings")]
    for key, t, x, prefix, title in (("db", "train_db", 1600, "apt_compare/dreambooth", "KSampler (DreamBooth-LoRA)"),
                                     ("apt", "train_apt", 1600, "apt_compare/apt", "KSampler (APT)")):
        y = 600 if key == "db" else 1040
        n, l = _sampler_chain(key, key, (t, 1), "pos", "neg", "latent", ("ckpt", 2), x, y, 42, prefix, title=title)
        nodes.update(n)
        links += l
    groups = [("Plain DreamBooth-LoRA (every APT part off)", ["ata_off", "reg_off", "train_db"], "#444444"),
              ("APT (paper settings)", ["ata_on", "reg_on", "train_apt"], "#8a3ea8")]
    return {"nodes": nodes, "links": links, "groups": groups}


VALIDATION_PROMPTS = (
    "a photo of sks person",
    "a photo of sks person wearing a red scarf in the snow",
    "a watercolor painting of sks person on a beach at sunset",
)


def spec_advanced() -> dict:
    nodes = {"note": {"type": "Note", "pos": (40, 40), "size": (440, 440), "text": NOTE_3}}
    nodes.update(_base_nodes())
    nodes.update({
        "ata": {"type": "APTAtaSettings", "pos": (520, 40), "w": {}},
        "reg": {"type": "APTRegSettings", "pos": (520, 470), "w": {}},
        "train": {"type": "APTTrainer", "pos": (520, 720), "size": (480, 980),
                  "w": {"steps": 1000, "rank": 32, "learning_rate": 1e-4, "seed": 0, "checkpoint_every": 50,
                        "lora_name": "my_subject_apt_advanced", "overwrite": False, "resume": True,
                        "memory_preset": "Low VRAM (12-16 GB): gradient checkpointing",
                        "batch_size": 1, "lr_schedule": "cosine", "warmup_steps": 50,
                        "save_lora_every_checkpoint": False},
                  "control": {"seed": "fixed"}},
        "report": {"type": "PreviewAny", "pos": (40, 1170), "size": (420, 160), "title": "Dataset report"},
        "captions": {"type": "PreviewAny", "pos": (40, 1350), "size": (420, 160), "title": "Final captions"},
        "history": {"type": "PreviewAny", "pos": (40, 1530), "size": (420, 160), "title": "Training history (JSON)"},
        "neg": {"type": "CLIPTextEncode", "pos": (1060, 40), "size": (400, 120), "title": "Negative prompt",
                "w": {"text": NEGATIVE}},
        "latent": {"type": "EmptyLatentImage", "pos": (1500, 40), "w": {"width": 1024, "height": 1024, "batch_size": 1}},
    })
    links = [("data", 0, "cap", "dataset"), ("cap", 0, "train", "dataset"), ("ckpt", 0, "train", "model"),
             ("ckpt", 1, "train", "clip"), ("ckpt", 2, "train", "vae"), ("ata", 0, "train", "ata_settings"),
             ("reg", 0, "train", "reg_settings"), ("data", 1, "report", "source"), ("cap", 1, "captions", "source"),
             ("train", 2, "history", "source"), ("ckpt", 1, "neg", "clip")]
    base_keys = []
    for i, text in enumerate(VALIDATION_PROMPTS):
        x = 1060 + i * 960
        p = f"val{i}_pos"
        nodes[p] = {"type": "CLIPTextEncode", "pos": (x, 340), "size": (900, 110),
                    "title": f"Validation prompt {i + 1}", "w": {"text": text}}
        links.append(("ckpt", 1, p, "clip"))
        n, l = _sampler_chain(f"v{i}", f"v{i}", ("train", 1), p, "neg", "latent", ("ckpt", 2), x, 600, 1000 + i,
                              f"apt_validation/after_{i + 1}", title=f"Validation {i + 1}: trained LoRA")
        nodes.update(n)
        links += l
        n, l = _sampler_chain(f"b{i}", f"b{i}", ("ckpt", 0), p, "neg", "latent", ("ckpt", 2), x, 1060, 1000 + i,
                              f"apt_validation/base_{i + 1}", title=f"Validation {i + 1}: base model")
        nodes.update(n)
        links += l
        base_keys += [f"b{i}_ks", f"b{i}_dec", f"b{i}_save"]
    groups = [("All APT settings (defaults)", ["ata", "reg", "train"], "#8a3ea8"),
              ("Validation samples: trained LoRA", [k for k in nodes if k.startswith("v") and k[1].isdigit()], "#3f789e"),
              ("Reference: the base model, same prompts and seeds", base_keys, "#444444")]
    return {"nodes": nodes, "links": links, "groups": groups}


WORKFLOWS = {
    "apt-1-train-lora-and-render": spec_train_and_render,
    "apt-2-dreambooth-vs-apt": spec_dreambooth_vs_apt,
    "apt-3-advanced-resume-validation": spec_advanced,
}


# ------------------------------------------------------------------------------------------------
# Spec -> UI graph
# ------------------------------------------------------------------------------------------------

def registry_id() -> str:
    """[project].name of pyproject.toml: the pack's id on the Comfy Registry."""
    import tomllib

    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["name"]


def _node_size(info: dict | None, n_widgets: int) -> list[int]:
    if info is None:
        return [400, 200]
    sockets = [1 for name, t, opts, _c, _o in ordered_inputs(info) if not is_widget(t, opts)]
    rows = max(len(sockets), len(info.get("output", [])))
    return [340, 46 + 22 * rows + 24 * n_widgets]


def build_node(node_id: int, key: str, spec: dict, object_info: dict) -> dict:
    """One serialised node (links filled in later)."""
    ntype = spec["type"]
    node: dict[str, Any] = {"id": node_id, "type": ntype, "pos": list(spec["pos"]), "size": None, "flags": {},
                            "order": 0, "mode": spec.get("mode", MODE_ALWAYS), "inputs": [], "outputs": []}
    if spec.get("title"):
        node["title"] = spec["title"]
    if ntype in VIRTUAL_NODES:
        node["properties"] = {}
        node["widgets_values"] = [spec.get("text", "")]
        node["color"], node["bgcolor"] = "#432", "#653"
        node["size"] = list(spec.get("size", (400, 200)))
        return node
    if ntype not in object_info:
        raise SchemaError(f"{key}: node type {ntype!r} is not in /object_info (missing custom node?)")
    info = object_info[ntype]
    given = dict(spec.get("w", {}))
    control = dict(spec.get("control", {}))
    known = {name for name, *_ in ordered_inputs(info)}
    for name in list(given) + list(control):
        if name not in known:
            raise SchemaError(f"{key} ({ntype}): the schema has no input {name!r}; inputs are {sorted(known)}")
    values: list[Any] = []
    widget_inputs = []
    for name, t, opts, combo, optional in ordered_inputs(info):
        if not is_widget(t, opts):
            node["inputs"].append({"name": name, "type": t, "link": None})
            continue
        value = given.pop(name, default_value(t, opts, combo))
        why = check_value(ntype, name, t, opts, combo, value)
        if why:
            raise SchemaError(f"{key} ({ntype}).{name}: {why}")
        values.append(value)
        if has_control_widget(name, t, opts):
            c = control.pop(name, "fixed")
            if c not in CONTROL_VALUES:
                raise SchemaError(f"{key}.{name}: control value {c!r} not in {CONTROL_VALUES}")
            values.append(c)
        widget_inputs.append({"name": name, "type": t, "widget": {"name": name}, "link": None})
    if control:
        raise SchemaError(f"{key} ({ntype}): no control-after-generate widget for {sorted(control)}")
    node["inputs"].extend(widget_inputs)
    for i, (otype, oname) in enumerate(zip(info.get("output", []), info.get("output_name", []))):
        node["outputs"].append({"name": oname, "type": otype, "links": [], "slot_index": i})
    node["properties"] = {"Node name for S&R": ntype}
    if "APTTrainer" in object_info and info.get("python_module") == object_info["APTTrainer"].get("python_module"):
        # the registry id of the pack that provides the node, as the frontend records it: lets
        # ComfyUI-Manager / the frontend offer to install the pack when a user lacks it
        node["properties"]["cnr_id"] = registry_id()
    node["widgets_values"] = values
    node["size"] = list(spec.get("size") or _node_size(info, len(values)))
    return node


def _topo_order(nodes: dict[int, dict], links: list[list]) -> None:
    deps: dict[int, set[int]] = {i: set() for i in nodes}
    for _lid, src, _ss, dst, _ds, _t in links:
        deps[dst].add(src)
    order, done = 0, set()
    while len(done) < len(nodes):
        ready = sorted(i for i in nodes if i not in done and deps[i] <= done)
        if not ready:
            raise SchemaError("the graph has a cycle")
        for i in ready:
            nodes[i]["order"] = order
            order += 1
            done.add(i)


def build_workflow(spec: dict, object_info: dict) -> dict:
    keys = list(spec["nodes"])
    ids = {k: i + 1 for i, k in enumerate(keys)}
    nodes = {ids[k]: build_node(ids[k], k, spec["nodes"][k], object_info) for k in keys}
    links: list[list] = []
    for src_key, out_idx, dst_key, in_name in spec["links"]:
        src, dst = nodes[ids[src_key]], nodes[ids[dst_key]]
        if out_idx >= len(src["outputs"]):
            raise SchemaError(f"{src_key} ({src['type']}) has no output #{out_idx}")
        slot = next((i for i, inp in enumerate(dst["inputs"]) if inp["name"] == in_name), None)
        if slot is None:
            raise SchemaError(f"{dst_key} ({dst['type']}) has no input {in_name!r}")
        out, inp = src["outputs"][out_idx], dst["inputs"][slot]
        if not types_match(out["type"], inp["type"]):
            raise SchemaError(f"{src_key}.{out['name']} ({out['type']}) cannot feed {dst_key}.{in_name} ({inp['type']})")
        if inp["link"] is not None:
            raise SchemaError(f"{dst_key}.{in_name} is linked twice")
        lid = len(links) + 1
        links.append([lid, src["id"], out_idx, dst["id"], slot, out["type"]])
        out["links"].append(lid)
        inp["link"] = lid
    _topo_order(nodes, links)
    groups = []
    for gi, (title, members, color) in enumerate(spec.get("groups", [])):
        boxes = [(nodes[ids[m]]["pos"], nodes[ids[m]]["size"]) for m in members]
        x0 = min(p[0] for p, _ in boxes) - 20
        y0 = min(p[1] for p, _ in boxes) - 70
        x1 = max(p[0] + s[0] for p, s in boxes) + 20
        y1 = max(p[1] + s[1] for p, s in boxes) + 20
        groups.append({"id": gi + 1, "title": title, "bounding": [x0, y0, x1 - x0, y1 - y0], "color": color,
                       "font_size": 24, "flags": {}})
    return {"id": None, "revision": 0, "last_node_id": len(nodes), "last_link_id": len(links),
            "nodes": [nodes[i] for i in sorted(nodes)], "links": links, "groups": groups, "config": {},
            "extra": {"ds": {"scale": 0.55, "offset": [60, 40]}}, "version": 0.4}


def types_match(out_type: str, in_type: str) -> bool:
    if out_type == in_type or "*" in (out_type, in_type):
        return True
    a = {t.strip() for t in str(out_type).split(",")}
    b = {t.strip() for t in str(in_type).split(",")}
    return bool(a & b)


def build_all(object_info: dict) -> dict[str, dict]:
    out = {}
    for i, (name, fn) in enumerate(WORKFLOWS.items()):
        wf = build_workflow(fn(), object_info)
        wf["id"] = f"6a7f0a1e-0000-4000-8000-00000000000{i + 1}"  # fixed: regenerating changes nothing else
        out[name] = wf
    return out


def dumps(workflow: dict) -> str:
    return json.dumps(workflow, indent=2, ensure_ascii=False) + "\n"


# ------------------------------------------------------------------------------------------------
# Validation of a saved graph against the live schema, and UI graph -> API prompt
# ------------------------------------------------------------------------------------------------

def validate_workflow(wf: dict, object_info: dict) -> list[str]:
    """Every problem of a UI graph with respect to the live schema (empty list: fine)."""
    problems: list[str] = []
    by_id = {n["id"]: n for n in wf["nodes"]}
    if len(by_id) != len(wf["nodes"]):
        problems.append("duplicate node ids")
    link_ids = set()
    for link in wf["links"]:
        lid, src, sslot, dst, dslot, ltype = link
        link_ids.add(lid)
        if src not in by_id or dst not in by_id:
            problems.append(f"link {lid}: unknown node {src if src not in by_id else dst}")
            continue
        s, d = by_id[src], by_id[dst]
        if sslot >= len(s["outputs"]) or dslot >= len(d["inputs"]):
            problems.append(f"link {lid}: slot out of range")
            continue
        out, inp = s["outputs"][sslot], d["inputs"][dslot]
        if inp.get("link") != lid or lid not in (out.get("links") or []):
            problems.append(f"link {lid}: not recorded on both ends")
        if not types_match(out["type"], inp["type"]) or not types_match(ltype, inp["type"]):
            problems.append(f"link {lid}: {s['type']}.{out['name']} ({out['type']}) -> {d['type']}.{inp['name']} "
                            f"({inp['type']}) types differ")
        if s["type"] not in VIRTUAL_NODES and s["type"] in object_info:
            live_out = object_info[s["type"]].get("output", [])
            if sslot >= len(live_out) or not types_match(live_out[sslot], inp["type"]):
                problems.append(f"link {lid}: {s['type']} output #{sslot} is no longer {out['type']}")
    for n in wf["nodes"]:
        ntype, where = n["type"], f"node {n['id']} ({n['type']})"
        for inp in n.get("inputs", []):
            if inp.get("link") is not None and inp["link"] not in link_ids:
                problems.append(f"{where}.{inp['name']}: dangling link {inp['link']}")
        if ntype in VIRTUAL_NODES:
            if not (len(n.get("widgets_values", [])) == 1 and isinstance(n["widgets_values"][0], str)):
                problems.append(f"{where}: a note holds exactly one text")
            continue
        info = object_info.get(ntype)
        if info is None:
            problems.append(f"{where}: node type not in /object_info")
            continue
        specs = {name: (t, opts, combo, optional) for name, t, opts, combo, optional in ordered_inputs(info)}
        layout = widget_layout(info)
        values = n.get("widgets_values", [])
        if len(values) != len(layout):
            problems.append(f"{where}: {len(values)} widgets_values but the schema has {len(layout)} widgets "
                            f"({[name + ('/control' if c else '') for name, c in layout]})")
        for (name, ctl), value in zip(layout, values):
            t, opts, combo, _opt = specs[name]
            if ctl:
                if value not in CONTROL_VALUES:
                    problems.append(f"{where}.{name}: control value {value!r}")
                continue
            why = check_value(ntype, name, t, opts, combo, value)
            if why:
                problems.append(f"{where}.{name}: {why}")
        want_sockets = [(name, t) for name, t, opts, _c, _o in ordered_inputs(info) if not is_widget(t, opts)]
        want_widgets = [(name, t) for name, t, opts, _c, _o in ordered_inputs(info) if is_widget(t, opts)]
        have = [(i["name"], i["type"]) for i in n.get("inputs", [])]
        if have != want_sockets + want_widgets:
            problems.append(f"{where}: inputs {have} != schema {want_sockets + want_widgets}")
        for name, (t, opts, combo, optional) in specs.items():
            if not optional and not is_widget(t, opts):
                linked = any(i["name"] == name and i.get("link") is not None for i in n.get("inputs", []))
                if not linked:
                    problems.append(f"{where}: required input {name!r} is not connected")
        have_out = [(o["name"], o["type"]) for o in n.get("outputs", [])]
        if have_out != list(zip(info.get("output_name", []), info.get("output", []))):
            problems.append(f"{where}: outputs {have_out} != schema")
    return problems


def to_api_prompt(wf: dict, object_info: dict) -> dict:
    """The API prompt the frontend's graphToPrompt would queue for this UI graph."""
    by_id = {n["id"]: n for n in wf["nodes"]}
    links = {l[0]: l for l in wf["links"]}
    active = {i for i, n in by_id.items() if n["type"] not in VIRTUAL_NODES and n.get("mode", 0) == MODE_ALWAYS}
    if any(n.get("mode", 0) == MODE_BYPASS for n in by_id.values()):
        raise SchemaError("bypassed nodes are not supported by this converter")
    prompt = {}
    for i in sorted(active):
        n = by_id[i]
        info = object_info[n["type"]]
        inputs: dict[str, Any] = {}
        for (name, ctl), value in zip(widget_layout(info), n.get("widgets_values", [])):
            if not ctl:
                inputs[name] = value
        for inp in n.get("inputs", []):
            lid = inp.get("link")
            if lid is None:
                continue
            _lid, src, sslot, _dst, _ds, _t = links[lid]
            if src in active:
                inputs[inp["name"]] = [str(src), sslot]
            else:
                inputs.pop(inp["name"], None)
        prompt[str(i)] = {"class_type": n["type"], "inputs": inputs,
                          "_meta": {"title": n.get("title") or info.get("display_name") or n["type"]}}
    return prompt


def replace_node_type(wf: dict, old: str, new: str, object_info: dict, widgets: dict | None = None) -> dict:
    """A copy of the graph with every `old` node rebuilt as `new` (same id, position, outputs' links).
    Outputs must line up by index and type (used by the tests: checkpoint loader -> tiny test model)."""
    wf = copy.deepcopy(wf)
    for idx, n in enumerate(wf["nodes"]):
        if n["type"] != old:
            continue
        fresh = build_node(n["id"], f"node {n['id']}", {"type": new, "pos": n["pos"], "w": widgets or {},
                                                       "mode": n.get("mode", 0)}, object_info)
        if any(i.get("link") is not None for i in n["inputs"]):
            raise SchemaError(f"{old} node {n['id']} has linked inputs; cannot replace it")
        if [o["type"] for o in fresh["outputs"]][:len(n["outputs"])] != [o["type"] for o in n["outputs"]]:
            raise SchemaError(f"{new} outputs do not line up with {old}")
        for o_new, o_old in zip(fresh["outputs"], n["outputs"]):
            o_new["links"] = list(o_old.get("links") or [])
        fresh["order"] = n.get("order", 0)
        wf["nodes"][idx] = fresh
    return wf


# ------------------------------------------------------------------------------------------------
# Thumbnails
# ------------------------------------------------------------------------------------------------

_TYPE_COLORS = {"MODEL": (180, 140, 255), "CLIP": (255, 210, 80), "VAE": (255, 110, 110),
                "CONDITIONING": (255, 160, 60), "LATENT": (255, 140, 200), "IMAGE": (100, 180, 255),
                "STRING": (120, 200, 120)}


def _header_color(n: dict) -> tuple[int, int, int]:
    if n["type"] in VIRTUAL_NODES:
        return (120, 100, 50)
    if n["type"].startswith("APT"):
        return (120, 60, 150)
    if "Loader" in n["type"]:
        return (50, 90, 130)
    if n["type"] in ("KSampler", "VAEDecode", "SaveImage"):
        return (50, 110, 70)
    return (70, 70, 80)


THUMB_SIZE = (640, 400)


def render_thumbnail(wf: dict, title: str, path: Path, object_info: dict, width: int = THUMB_SIZE[0],
                     height: int = THUMB_SIZE[1]) -> None:
    """A small picture of the graph: nodes as boxes with their titles, links as lines, muted nodes grey."""
    from PIL import Image, ImageDraw, ImageFont

    nodes = wf["nodes"]
    x0 = min(n["pos"][0] for n in nodes)
    y0 = min(n["pos"][1] for n in nodes)
    x1 = max(n["pos"][0] + n["size"][0] for n in nodes)
    y1 = max(n["pos"][1] + n["size"][1] for n in nodes)
    top = 46
    scale = min((width - 20) / (x1 - x0), (height - top - 10) / (y1 - y0))
    ox = (width - (x1 - x0) * scale) / 2
    img = Image.new("RGB", (width, height), (32, 32, 36))
    d = ImageDraw.Draw(img)
    try:
        font = ImageFont.load_default(size=11)
        big = ImageFont.load_default(size=18)
    except TypeError:  # Pillow < 10.1
        font = big = ImageFont.load_default()

    def tx(x, y):
        return ox + (x - x0) * scale, top + (y - y0) * scale

    for g in wf.get("groups", []):
        gx, gy, gw, gh = g["bounding"]
        a, b = tx(gx, gy)
        c, e = tx(gx + gw, gy + gh)
        col = tuple(int(g["color"][k:k + 2], 16) for k in (1, 3, 5)) if len(g["color"]) == 7 else (80, 80, 80)
        d.rectangle([a, b, c, e], outline=col, width=2, fill=tuple(int(v * 0.35 + 32 * 0.65) for v in col))
    by_id = {n["id"]: n for n in nodes}
    for _lid, src, sslot, dst, dslot, ltype in wf["links"]:
        s, t = by_id[src], by_id[dst]
        a = tx(s["pos"][0] + s["size"][0], s["pos"][1] + 30 + 20 * sslot)
        row = sum(1 for inp in t["inputs"][:dslot] if "widget" not in inp)
        b = tx(t["pos"][0], t["pos"][1] + 30 + 20 * row)
        pts = []
        for k in range(21):
            u = k / 20
            cx = (1 - u) ** 3 * a[0] + 3 * (1 - u) ** 2 * u * (a[0] + 40) + 3 * (1 - u) * u ** 2 * (b[0] - 40) + u ** 3 * b[0]
            cy = (1 - u) ** 3 * a[1] + 3 * (1 - u) ** 2 * u * a[1] + 3 * (1 - u) * u ** 2 * b[1] + u ** 3 * b[1]
            pts.append((cx, cy))
        d.line(pts, fill=_TYPE_COLORS.get(ltype, (160, 160, 160)), width=2)
    for n in nodes:
        a = tx(*n["pos"])
        b = tx(n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1])
        muted = n.get("mode", 0) != MODE_ALWAYS
        body = (60, 60, 60) if muted else ((90, 80, 50) if n["type"] in VIRTUAL_NODES else (53, 53, 58))
        d.rounded_rectangle([a, b], radius=4, fill=body, outline=(20, 20, 20))
        hb = min(b[1], a[1] + 14)
        d.rounded_rectangle([a, (b[0], hb)], radius=4, fill=(90, 90, 90) if muted else _header_color(n))
        label = n.get("title") or object_info.get(n["type"], {}).get("display_name") or n["type"]
        maxc = max(3, int((b[0] - a[0] - 6) / 6))
        d.text((a[0] + 3, a[1] + 1), label if len(label) <= maxc else label[:maxc - 1] + "…", fill=(235, 235, 235),
               font=font)
    d.text((12, 12), title, fill=(240, 240, 240), font=big)
    img.save(path, "JPEG", quality=82, optimize=True)


THUMB_TITLES = {
    "apt-1-train-lora-and-render": "APT: train a LoRA from photos, render with it",
    "apt-2-dreambooth-vs-apt": "Plain DreamBooth-LoRA vs APT, same data and seeds",
    "apt-3-advanced-resume-validation": "APT advanced: all settings, resume, validation",
}


# ------------------------------------------------------------------------------------------------
# node_list.json (ComfyUI-Manager)
# ------------------------------------------------------------------------------------------------
# ComfyUI-Manager's scanner (scanner.py -> extension-node-map.json, used by "Install Missing Custom
# Nodes") finds node names only in NODE_CLASS_MAPPINGS / NODE_CONFIG dict literals, `_CLASS_MAPPINGS[...]`
# assignments, @register_node(...) and a node_list.json at the repository root. V3 nodes registered
# through comfy_entrypoint() match none of these, so the pack lists them in node_list.json.

def pack_node_ids(object_info: dict, module_hint: str = "APTTrainer") -> list[str]:
    """Node ids registered by this pack (same python_module as the APT Trainer)."""
    module = object_info[module_hint]["python_module"]
    return sorted(k for k, v in object_info.items() if v.get("python_module") == module)


def node_list(object_info: dict) -> dict[str, str]:
    return {k: f"{object_info[k]['display_name']}: {object_info[k].get('description', '')}".strip()
            for k in pack_node_ids(object_info)}


def dumps_node_list(object_info: dict) -> str:
    return json.dumps(node_list(object_info), indent=2, ensure_ascii=False) + "\n"


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------

def live_object_info() -> dict:
    """/object_info of the real ComfyUI host (tests/comfy_host.py; CPU, 127.0.0.1) with this pack."""
    sys.path.insert(0, str(REPO / "tests"))
    import comfy_host as ch  # noqa: E402

    if not ch.comfyui_available():
        raise SystemExit(f"no ComfyUI host tree at {ch.comfyui_dir()}: run `source scripts/env.sh` first "
                         f"(or pass --object-info FILE)")
    with ch.ComfyServer() as server:
        failed = server.import_failed_lines()
        failed += [ln for ln in server.log_text().splitlines() if "Unable to parse pyproject.toml" in ln]
        if failed:
            raise SystemExit("custom node import failed:\n" + "\n".join(failed) + "\n" + server.log_tail())
        return server.object_info()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--object-info", type=Path, help="a saved /object_info JSON instead of starting the host")
    ap.add_argument("--check", action="store_true", help="only compare with the committed files; exit 1 if stale")
    ap.add_argument("--out", type=Path, default=WORKFLOW_DIR)
    args = ap.parse_args(argv)
    info = json.loads(args.object_info.read_text()) if args.object_info else live_object_info()
    built = build_all(info)
    stale = []
    for name, wf in built.items():
        problems = validate_workflow(wf, info)
        if problems:
            raise SystemExit(f"{name}: generated graph is invalid:\n  " + "\n  ".join(problems))
        path = args.out / f"{name}.json"
        text = dumps(wf)
        if args.check:
            if not path.is_file() or path.read_text(encoding="utf-8") != text:
                stale.append(str(path))
            if not (args.out / f"{name}.jpg").is_file():
                stale.append(str(args.out / f"{name}.jpg"))
            continue
        args.out.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        render_thumbnail(wf, THUMB_TITLES[name], args.out / f"{name}.jpg", info)
        print(f"wrote {path.relative_to(REPO) if path.is_relative_to(REPO) else path} "
              f"({len(wf['nodes'])} nodes, {len(wf['links'])} links) + thumbnail")
    nl_path = REPO / "node_list.json"
    if args.check:
        if not nl_path.is_file() or nl_path.read_text(encoding="utf-8") != dumps_node_list(info):
            stale.append(str(nl_path))
    elif args.out == WORKFLOW_DIR:
        nl_path.write_text(dumps_node_list(info), encoding="utf-8")
        print(f"wrote node_list.json ({len(node_list(info))} nodes)")
    if stale:
        print("stale (run `python scripts/build_workflows.py`):\n  " + "\n  ".join(stale))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
