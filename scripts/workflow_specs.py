"""The example workflows as compact specs: what each graph contains, where, and the notes an artist reads.

scripts/build_workflows.py turns them into UI graphs against the live node schema.
A node: key -> dict(type, pos=(x, y), w=widgets {name: value} (others: schema default),
  control={seed input: "fixed"}, title, mode, size=(w, h) optional, text (Note)).
Links: (from key, output index, to key, input name).
"""

from __future__ import annotations

VIRTUAL_NODES = {"Note", "MarkdownNote"}  # registered by the frontend itself (extensions/core/noteNode.ts)
MODE_ALWAYS, MODE_NEVER, MODE_BYPASS = 0, 2, 4  # litegraph node modes (muted = NEVER)
SDXL_CHECKPOINT = "sd_xl_base_1.0.safetensors"

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
- Left trainer: plain DreamBooth-LoRA. Adaptive augmentation and adaptive loss weight (ATA) are
  switched off, and the Representation Stabilization (RS) and Attention Alignment (AA) weights
  are 0; 'track_indicator' (an advanced input) stays on so its chart still shows how fast it
  memorises (gamma rising).
- Right trainer: APT with the paper's settings.
Both previews are rendered with the same prompt and seed. Compare how well the prompt's
background and style survive next to your subject.
Put your photos in ComfyUI/input/my_subject and pick your SDXL checkpoint first."""

NOTE_3 = """Advanced: every APT setting, resume, validation samples

- 'APT Indicator & Augmentation settings' and 'APT Regularization weights' hold APT's settings at
  their defaults (the paper's values; lambda_rs and lambda_aa from the benchmark). Rarely needed
  inputs (seed, resume, batch size, research knobs) are 'advanced': on current ComfyUI click the
  node's 'advanced inputs' toggle to see them. Hover a widget for what it does and when to touch it.
- Captions from a captioning node: the 'Context per photo' text box feeds 'APT Caption'. Replace it
  with any node whose text output describes your photos (one line per photo, or a list of texts,
  one per photo) and set the caption mode to 'replace all captions'.
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


CONTEXT_LINES = "in a park, on green grass\nindoors, next to a window\non a city street at night"


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
        "train": {"type": "APTTrainer", "pos": (520, 520), "size": (480, 1010),
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
                    "w": {"lambda_rs": 0.0, "lambda_aa": 0.0}},
        "ata_on": {"type": "APTAtaSettings", "pos": (1060, 40), "title": "ATA (paper settings)"},
        "reg_on": {"type": "APTRegSettings", "pos": (1060, 470), "title": "RS + AA (paper settings)"},
        "train_db": {"type": "APTTrainer", "pos": (520, 720), "size": (480, 1010), "title": "Plain DreamBooth-LoRA",
                     "w": {**common, "lora_name": "my_subject_dreambooth"}, "control": {"seed": "fixed"}},
        "train_apt": {"type": "APTTrainer", "pos": (1060, 720), "size": (480, 1010), "title": "APT",
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
        "train": {"type": "APTTrainer", "pos": (520, 720), "size": (480, 1060),
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
    nodes["ctx"] = {"type": "PrimitiveStringMultiline", "pos": (40, 1710), "size": (420, 140),
                    "title": "Context per photo (or link a captioning node)",
                    "w": {"value": CONTEXT_LINES}}
    links = [("ctx", 0, "cap", "context_captions"),
             ("data", 0, "cap", "dataset"), ("cap", 0, "train", "dataset"), ("ckpt", 0, "train", "model"),
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


THUMB_TITLES = {
    "apt-1-train-lora-and-render": "APT: train a LoRA from photos, render with it",
    "apt-2-dreambooth-vs-apt": "Plain DreamBooth-LoRA vs APT, same data and seeds",
    "apt-3-advanced-resume-validation": "APT advanced: all settings, resume, validation",
}
