"""The APT nodes (ComfyUI V3 schema)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from comfy_api.latest import io

from apt_core.config import FILL_MODES, AugmentConfig, IndicatorConfig, RegularizerConfig, TrainConfig
from apt_core.images import REPEAT_DIR

from .dataset import CAPTION_MODES, DEFAULT_TEMPLATE, caption_dataset, load_dataset, resolve_folder
from .settings import (AUG_SPACES, DEFAULT_PRESET, DEFAULT_RESOLUTIONS, LR_SCHEDULES, PRECISIONS, PRESETS,
                       RESOLUTIONS, ata_settings,
                       build_config, reg_settings, sanitize_lora_name)

log = logging.getLogger("apt_lora_trainer")

CATEGORY = "APT LoRA Trainer"
AptDatasetIO = io.Custom("APT_DATASET")
AtaSettingsIO = io.Custom("APT_ATA_SETTINGS")
RegSettingsIO = io.Custom("APT_REG_SETTINGS")

_IND, _AUG, _REG = IndicatorConfig(), AugmentConfig(), RegularizerConfig()


def _advanced() -> dict:
    """Inputs an artist rarely needs: ComfyUI's schema marks them advanced (frontends that know the flag
    fold them under the node's "advanced inputs"); hosts without the flag (0.3.75) show them as usual."""
    import inspect

    return {"advanced": True} if "advanced" in inspect.signature(io.Int.Input.__init__).parameters else {}


ADVANCED = _advanced()


def _folder_fingerprint(folder: str) -> str:
    """Names, sizes and times of what the loader reads (the folder's files and its N_name
    subfolders' files, one level), so edits re-run the loader."""
    import folder_paths

    try:
        root = resolve_folder(folder, folder_paths.get_input_directory())
    except Exception:  # noqa: BLE001 - the node itself reports the problem
        return f"invalid:{folder}"
    h = hashlib.sha1(str(root).encode())
    if not root.is_dir():
        return h.hexdigest() + ":missing"
    for d in [root, *sorted(p for p in root.iterdir() if p.is_dir() and REPEAT_DIR.match(p.name))]:
        for entry in sorted(os.scandir(d), key=lambda e: e.name):
            try:
                st = entry.stat()
            except OSError:
                continue
            stamp = "dir" if entry.is_dir() else f"{st.st_size}|{st.st_mtime_ns}"
            h.update(f"{d.name}/{entry.name}|{stamp}\n".encode())
    return h.hexdigest()


class AptDatasetLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="APTDatasetLoader",
            display_name="APT Dataset Loader",
            category=CATEGORY,
            description="Load 3-10 reference images of your subject (a folder and/or an IMAGE batch) with "
                        "their captions, resized and cropped to SDXL's training buckets.",
            inputs=[
                io.String.Input("folder", default="", tooltip=(
                    "Folder with the reference images (.png .jpg .webp ...). A caption can sit next to each "
                    "image as a .txt file with the same name. The folder must be inside ComfyUI's input "
                    "folder: type its name there (my_subject); paths and links that lead elsewhere are "
                    "refused. Subfolders named like '10_name' are repeated 10 times per epoch. Leave empty "
                    "when you connect images instead.")),
                io.Int.Input("resolution", default=1024, min=64, max=2048, step=64, tooltip=(
                    "Training resolution in pixels (SDXL: 1024). Images are fitted to SDXL's aspect-ratio "
                    "buckets of about this area. Lower it (768) to save memory.")),
                io.String.Input("default_caption", default="", tooltip=(
                    "Caption for images without a .txt file / caption line. Leave empty and use 'APT "
                    "Caption' to build captions from a trigger word instead.")),
                io.Image.Input("images", optional=True, tooltip=(
                    "Optional IMAGE batch (e.g. from Load Image nodes) used in addition to the folder.")),
                io.String.Input("captions", optional=True, multiline=True, default="", tooltip=(
                    "Captions for the connected images: one line per image in order, or a single line "
                    "for all of them.")),
            ],
            outputs=[
                AptDatasetIO.Output(display_name="dataset", tooltip="The images and captions, for APT Caption / APT Trainer."),
                io.String.Output(display_name="report", tooltip="What was loaded: count, sizes, buckets, skipped files and why."),
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, folder="", resolution=1024, default_caption="", images=None, captions=None):
        return _folder_fingerprint(folder) if folder and folder.strip() else ""

    @classmethod
    def execute(cls, folder: str, resolution: int, default_caption: str, images=None,
                captions: str | None = None) -> io.NodeOutput:
        import folder_paths

        ds = load_dataset(folder, images, captions, int(resolution), default_caption,
                          folder_paths.get_input_directory())
        log.info("APT dataset: %d image(s)", len(ds))
        return io.NodeOutput(ds, ds.report)


class AptCaption(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="APTCaption",
            display_name="APT Caption",
            category=CATEGORY,
            description="Build captions from a trigger word, a class word and a short context per image. "
                        "APT works best when captions describe the background/context and keep the subject "
                        "simple.",
            inputs=[
                AptDatasetIO.Input("dataset", tooltip="The dataset from APT Dataset Loader."),
                io.String.Input("trigger_word", default="sks", tooltip=(
                    "A rare word that will mean your subject, e.g. 'sks' or 'ohwx'. Write it in prompts "
                    "to use the LoRA.")),
                io.String.Input("class_word", default="person", tooltip=(
                    "What the subject is, in one or two plain words: 'person', 'dog', 'backpack', "
                    "'art style'.")),
                io.String.Input("context_captions", multiline=True, default="", tooltip=(
                    "One line per image, in the dataset's order, describing the background / context "
                    "(not the subject): 'on green grass next to a road'. A line 'name.png: ...' goes to "
                    "that file. Images without a line get no context. Can also come from a captioning "
                    "node: link its text output here (a list of texts, one per image, works too).")),
                io.String.Input("template", default=DEFAULT_TEMPLATE, tooltip=(
                    "How a caption is built; placeholders {trigger}, {class}, {context}. Empty pieces "
                    "and dangling commas are removed.")),
                io.Combo.Input("mode", options=list(CAPTION_MODES), default=CAPTION_MODES[0], tooltip=(
                    "fill missing: only images without a caption (.txt / captions input) get the "
                    "template; replace all: every image gets the template; add trigger: existing "
                    "captions get '<trigger> <class>,' in front when the trigger word is missing.")),
            ],
            outputs=[
                AptDatasetIO.Output(display_name="dataset", tooltip="The dataset with the final captions."),
                io.String.Output(display_name="captions", tooltip="The final caption of every image, and warnings."),
            ],
            # a captioning node run over a list of images sends one text per image: take them all at once
            is_input_list=True,
        )

    @classmethod
    def execute(cls, dataset, trigger_word, class_word, context_captions, template, mode) -> io.NodeOutput:
        ds, text = caption_dataset(_first(dataset), _first(trigger_word), _first(class_word),
                                   context_lines(context_captions), _first(template), _first(mode))
        return io.NodeOutput(ds, text)


def _first(value):
    return value[0] if isinstance(value, list) else value


def context_lines(value) -> str | list[str]:
    """APT Caption's context input: one text (the widget, or one linked string) is used as written;
    several (a captioner's list output) are kept as a list, one per image."""
    if isinstance(value, list):
        return [str(v or "") for v in value] if len(value) > 1 else str(value[0] or "") if value else ""
    return str(value or "")


class AptAtaSettings(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="APTAtaSettings",
            display_name="APT Indicator & Augmentation settings",
            category=CATEGORY,
            description="Adaptive Training Adjustment: the overfitting indicator (gamma per noise level) "
                        "and what it drives - zoom-out/rotation augmentation and loss down-weighting. "
                        "Leave it out to train with the defaults.",
            inputs=[
                io.Boolean.Input("adaptive_augmentation", default=True, tooltip=(
                    "Zoom out / rotate images more often as the model starts to memorise them. Turn off "
                    "(with the next switch and both weights on APT Regularization weights at 0) to train "
                    "plain DreamBooth-LoRA for comparison.")),
                io.Boolean.Input("adaptive_loss_weight", default=True, tooltip=(
                    "Learn less at the noise levels where the model already memorises.")),
                io.Float.Input("zoom_max", default=_AUG.zoom_max, min=1.0, max=10.0, step=0.05, tooltip=(
                    "Largest zoom-out: the image shrinks to 1/zoom of the frame (paper: 3). Lower it (2) "
                    "if your LoRA draws the subject too small.")),
                io.Float.Input("rotation", default=_AUG.rotation_deg, min=0.0, max=180.0, step=0.5, tooltip=(
                    "Random rotation in degrees, +/- (paper: 15). 0 for subjects that must stay upright "
                    "(text, logos).")),
                io.Combo.Input("fill_mode", options=list(FILL_MODES), default=_AUG.fill, tooltip=(
                    "What fills the space around a zoomed-out image. border (default): its edge pixels "
                    "stretched outward, no frame to learn; constant: black, as in the paper (in the "
                    "benchmark the LoRA learned the black frame); reflect: a mirror image (can repeat "
                    "the subject; in the benchmark it raised the drift of prompts without the subject).")),
                io.Float.Input("p_max", default=_AUG.p_max, min=0.0, max=1.0, step=0.01, optional=True, **ADVANCED, tooltip=(
                    "Highest chance of augmenting an image (chance = min(gamma, p_max)). Research knob: "
                    "0.5 bought no likeness in the benchmark.")),
                io.Float.Input("zoom_min", default=_AUG.zoom_min, min=1.0, max=10.0, step=0.05, optional=True, **ADVANCED,
                               tooltip="Smallest zoom-out (1 = full size). Research knob."),
                io.Int.Input("bins", default=_IND.num_bins, min=1, max=100, optional=True, **ADVANCED, tooltip=(
                    "Noise-level bins the indicator tracks (paper: 10). Research knob.")),
                io.Float.Input("ema_alpha", default=_IND.ema_alpha, min=0.001, max=1.0, step=0.001, optional=True, **ADVANCED,
                               tooltip=(
                    "Smoothing of the per-bin losses, once per step: new = (1 - alpha) * old + alpha * "
                    "value (paper: 0.1). Research knob.")),
                io.Float.Input("indicator_scale", default=_IND.scale, min=0.001, max=100000.0, step=1.0,
                               optional=True, **ADVANCED, tooltip=(
                    "S in gamma = 1 - exp(-S * (base loss - LoRA loss)). SDXL: 1000 (paper). Touch it only "
                    "if the chart's gamma jumps to 1 in every bin within a few dozen steps (lower S) or "
                    "never rises (raise S): S must match the model's loss scale. A lower S draws the "
                    "subject in new scenes more often, for more change to prompts without it.")),
                io.Combo.Input("augmentation_space", options=list(AUG_SPACES), default="pixel", optional=True, **ADVANCED,
                               tooltip=(
                    "pixel (default, the paper's order): the picture is zoomed/rotated, then encoded; "
                    f"each image's {_AUG.variant_grid[0] * _AUG.variant_grid[1]} variants are encoded "
                    "once before training, so training needs no VAE and no more memory. "
                    "pixel_every_step: the exact draw is encoded at every augmented step (VAE stays "
                    "loaded: more GPU memory, slower steps); in the benchmark no better.")),
                io.Boolean.Input("track_indicator", default=False, optional=True, **ADVANCED, tooltip=(
                    "Compute gamma even when both switches above are off, so the chart of a plain "
                    "DreamBooth-LoRA run shows how fast it memorises (one extra forward per step).")),
            ],
            outputs=[AtaSettingsIO.Output(display_name="ata_settings", tooltip="Connect to APT Trainer.")],
        )

    @classmethod
    def execute(cls, adaptive_augmentation: bool, adaptive_loss_weight: bool, zoom_max: float, rotation: float,
                fill_mode: str, p_max: float = _AUG.p_max, zoom_min: float = _AUG.zoom_min,
                bins: int = _IND.num_bins, ema_alpha: float = _IND.ema_alpha,
                indicator_scale: float = _IND.scale, augmentation_space: str = "pixel",
                track_indicator: bool = False) -> io.NodeOutput:
        return io.NodeOutput(ata_settings(
            num_bins=bins, ema_alpha=ema_alpha, indicator_scale=indicator_scale, p_max=p_max,
            zoom_min=zoom_min, zoom_max=zoom_max, rotation_deg=rotation, fill=fill_mode,
            adaptive_augmentation=adaptive_augmentation, adaptive_loss_weight=adaptive_loss_weight,
            track_indicator=track_indicator, space=augmentation_space))


class AptRegSettings(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="APTRegSettings",
            display_name="APT Regularization weights",
            category=CATEGORY,
            description="Representation Stabilization (keeps feature statistics close to the base model), "
                        "Attention Alignment (keeps cross-attention spread over every prompt word) and the "
                        "opt-in class preservation. Leave it out to train with the defaults.",
            inputs=[
                io.Float.Input("lambda_rs", default=_REG.lambda_rs, min=0.0, max=1000.0, step=0.001,
                               round=0.0001, tooltip=(
                    "Weight of Representation Stabilization (decoder features vs the base model). Keeps "
                    "the layout and style your prompt asks for. 0 = off. Too high stops the subject from "
                    "being learned (in the benchmark 1.0 did; 0.01, the default, did not).")),
                io.Float.Input("lambda_aa", default=_REG.lambda_aa, min=0.0, max=1000.0, step=0.001,
                               round=0.0001, tooltip=(
                    "Weight of Attention Alignment (cross-attention maps vs the base model): prompts keep "
                    "control of background and style. 0 = off (saves memory and time). Higher slows "
                    "learning the subject (in the benchmark 1.0 held it back a lot, 0.01 a little).")),
                io.Float.Input("class_preservation", default=0.0, min=0.0, max=100.0, step=0.1, tooltip=(
                    "Not part of APT: DreamBooth's prior preservation. Turn it on (0.3-1) when the "
                    "subject leaks into prompts that do not name it. Before training the base model "
                    "draws 'class images' from your captions without the trigger word ('a photo of "
                    "person, on a beach'); training keeps its predictions on them. 0 = off (default). "
                    "Needs the trigger word in every caption; each step does about twice the work.")),
                io.Int.Input("class_images", default=32, min=1, max=1000, optional=True, **ADVANCED, tooltip=(
                    "How many class images the base model draws (25 sampling steps each) when "
                    "class_preservation is on. Kept with the run's checkpoints, so resuming does not draw "
                    "them again.")),
                io.String.Input("trigger_word", default="sks", optional=True, **ADVANCED, tooltip=(
                    "The trigger word of your captions (as in APT Caption), removed from each caption to "
                    "make the class prompts. Only used when class_preservation is on.")),
                io.Combo.Input("resolutions", options=list(RESOLUTIONS), default=DEFAULT_RESOLUTIONS, optional=True, **ADVANCED,
                               tooltip=(
                    "Which decoder stages RS and AA watch, named by their size for a 1024 px image (the "
                    "paper: both). '32x32 only' saves memory when training runs out of it.")),
            ],
            outputs=[RegSettingsIO.Output(display_name="reg_settings", tooltip="Connect to APT Trainer.")],
        )

    @classmethod
    def execute(cls, lambda_rs: float, lambda_aa: float, class_preservation: float = 0.0,
                class_images: int = 32, trigger_word: str = "sks",
                resolutions: str = DEFAULT_RESOLUTIONS) -> io.NodeOutput:
        return io.NodeOutput(reg_settings(
            lambda_rs=lambda_rs, lambda_aa=lambda_aa, resolutions=resolutions,
            class_preservation=class_preservation, class_images=class_images, trigger_word=trigger_word))


class AptTrainerNode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="APTTrainer",
            display_name="APT Trainer",
            category=CATEGORY,
            description="Train an SDXL LoRA with APT (Adaptive Personalized Training, CVPR 2025) on the "
                        "connected model. Saves the LoRA into your loras folder and outputs the model with "
                        "the LoRA applied for a quick test.",
            is_output_node=True,
            inputs=[
                io.Model.Input("model", tooltip="The SDXL model from 'Load Checkpoint' (any SDXL fine-tune)."),
                io.Clip.Input("clip", tooltip="The CLIP from the same 'Load Checkpoint' node."),
                io.Vae.Input("vae", tooltip="The VAE from the same 'Load Checkpoint' node."),
                AptDatasetIO.Input("dataset", tooltip="Images + captions from APT Dataset Loader / APT Caption."),
                io.Int.Input("steps", default=500, min=1, max=100000, tooltip=(
                    "Training steps (each step trains on 'batch_size' images, 1 by default). 300-1000 "
                    "for 3-10 images; the paper trains up to 2000. APT learns a subject more slowly than "
                    "plain LoRA: if the likeness is weak, train longer (the quality benchmark needed "
                    "about 1.5x the steps).")),
                io.Float.Input("learning_rate", default=1e-4, min=1e-7, max=1e-2, step=1e-6, round=1e-7, tooltip=(
                    "AdamW learning rate of the LoRA weights. 1e-4 is a safe start; lower it if images "
                    "burn, raise it if nothing is learned.")),
                io.Int.Input("rank", default=32, min=1, max=256, tooltip=(
                    "LoRA rank (size). 16-32 is plenty for one subject; higher = bigger file, more "
                    "memory.")),
                io.String.Input("lora_name", default="apt_lora", tooltip=(
                    "File name of the LoRA in your loras folder ('.safetensors' is added; other "
                    "characters than letters, digits, '.', '-', '_' become '_').")),
                io.Combo.Input("memory_preset", options=list(PRESETS), default=DEFAULT_PRESET, tooltip=(
                    "Fastest: everything kept in memory. Low VRAM: recompute activations in the backward "
                    "pass (gradient checkpointing): about half the memory, slower steps. Measured on an "
                    "H100, SDXL at 1024, rank 32: peak 14.1 GiB and 0.60 s per step (Fastest) against "
                    "7.3 GiB and 1.09 s (Low VRAM), for the UNet alone.")),
                AtaSettingsIO.Input("ata_settings", optional=True, tooltip=(
                    "Optional: APT Indicator & Augmentation settings (defaults follow the paper, except the "
                    "'border' fill around zoomed-out images).")),
                RegSettingsIO.Input("reg_settings", optional=True, tooltip=(
                    "Optional: APT Regularization weights (defaults lambda_rs 0.01 and lambda_aa 0.01, set "
                    "by the quality benchmark; the paper's 1.0 held the subject back there).")),
                io.Int.Input("seed", optional=True, **ADVANCED, default=0, min=0, max=2**31 - 1, tooltip=(
                    "Fixes the LoRA initialisation, image order, noise and augmentation: same seed + "
                    "settings = same LoRA.")),
                io.Int.Input("checkpoint_every", optional=True, **ADVANCED, default=100, min=0, max=100000, tooltip=(
                    "Save a resumable checkpoint every N steps (0: only when stopping/finishing). "
                    "Checkpoints live in output/apt_lora_trainer/<LoRA name>/.")),
                io.Boolean.Input("save_lora_every_checkpoint", optional=True, **ADVANCED, default=False, tooltip=(
                    "Also save the LoRA at every checkpoint ('checkpoint_every' steps) into your loras "
                    "folder, next to the final file, as '<LoRA name>_step00300.safetensors' and so on. "
                    "Use it to pick an earlier step if the final LoRA looks overfitted: subject too "
                    "big/centred, backgrounds ignored. 'overwrite' covers these files too.")),
                io.Boolean.Input("resume", optional=True, **ADVANCED, default=True, tooltip=(
                    "On: continue from this LoRA name's last checkpoint (after Cancel or a crash) if it "
                    "has fewer steps than 'steps'. Off: start from scratch (old checkpoints of this name "
                    "are deleted).")),
                io.Boolean.Input("overwrite", optional=True, **ADVANCED, default=False, tooltip=(
                    "Replace an existing LoRA file of the same name. Off: the node stops with an error "
                    "instead. (Resuming a run may always update its own file.)")),
                io.Int.Input("batch_size", optional=True, **ADVANCED, default=1, min=1, max=16, tooltip=(
                    "Images per step (all from the same aspect bucket). 1 follows the paper and uses "
                    "the least memory; 2-4 gives smoother steps but needs about that many times the "
                    "activation memory (use 'Low VRAM' with it).")),
                io.Combo.Input("lr_schedule", optional=True, **ADVANCED, options=list(LR_SCHEDULES),
                               default=TrainConfig.lr_schedule, tooltip=(
                    "How the learning rate changes over the run. cosine (default): slowly falls to 0 at "
                    "the last step; in the benchmark the final LoRA then depended 2-3x less on where "
                    "the run stopped and drifted less from the base model. constant: the same all the "
                    "way (the earlier default); pick it to compare checkpoints saved along the run.")),
                io.Int.Input("warmup_steps", optional=True, **ADVANCED, default=0, min=0, max=100000, tooltip=(
                    "Raise the learning rate from almost 0 to its full value over the first N steps "
                    "(0: start at full value). 5-10% of the steps helps when the first images burn.")),
                io.Int.Input("preview_every", optional=True, **ADVANCED, default=100, min=0, max=100000, tooltip=(
                    "Render sample previews every N steps (and at step 0, the base model, and the last "
                    "step): the chart's step axis shows them, and they are saved in the run folder. "
                    "0 = off. Cost: one prompt is 12 sampler steps with guidance plus a VAE decode, "
                    "for SDXL at 1024 px the compute of about 8 training steps (counted in FLOPs; about 4 "
                    "steps of H100 time before the decode): the 3 default prompts every 100 steps add 25%, "
                    "30% on a default 500-step run with its step-0 previews "
                    "(benchmarks/results/preview_flops_sdxl1024.md). On the tiny CPU test "
                    "model a prompt took about 6 steps' time.")),
                io.String.Input("preview_prompts", optional=True, **ADVANCED, multiline=True, default="", tooltip=(
                    "Your own preview prompts, one per line (each gets its own fixed seed). Empty: the "
                    "first training caption and two new contexts for '<trigger> <class>' from APT Caption.")),
                io.Combo.Input("precision", optional=True, **ADVANCED, options=list(PRECISIONS), default="auto",
                               tooltip=(
                    "auto (default): bf16 on GPUs that compute it natively (NVIDIA RTX 30xx, A100 and "
                    "newer), fp16 with loss scaling on older ones (T4, V100, RTX 20xx), full precision on "
                    "the CPU. Choose fp32 only if a run stops with NaN under fp16: it is slower and needs "
                    "about twice the activation memory.")),
            ],
            outputs=[
                io.String.Output(display_name="lora_name", tooltip=(
                    "The saved file's name as LoraLoader lists it.")),
                io.Model.Output(display_name="model", tooltip=(
                    "The input model with the new LoRA applied (strength 1), for an immediate test.")),
                io.String.Output(display_name="indicator_history", tooltip=(
                    "JSON: per-step losses, gamma per timestep bin, augmentation rate, learning rate.")),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, clip, vae, dataset, steps: int, learning_rate: float, rank: int, lora_name: str,
                memory_preset: str, ata_settings=None, reg_settings=None, seed: int = 0,
                checkpoint_every: int = 100, save_lora_every_checkpoint: bool = False, resume: bool = True,
                overwrite: bool = False, batch_size: int = 1, lr_schedule: str = TrainConfig.lr_schedule,
                warmup_steps: int = 0, preview_every: int = 100, preview_prompts: str = "",
                precision: str = "auto") -> io.NodeOutput:
        import comfy.sd
        import comfy.utils
        import folder_paths

        from comfy_execution.utils import get_executing_context

        from .train_job import TrainJob, run_in_worker

        hidden = getattr(cls, "hidden", None)
        node_id = str(getattr(hidden, "unique_id", None) or "apt")
        ctx = get_executing_context()
        config = build_config(steps=steps, rank=rank, learning_rate=learning_rate, seed=seed,
                              checkpoint_every=checkpoint_every, preset=memory_preset,
                              ata=ata_settings, reg=reg_settings, batch_size=batch_size,
                              lr_schedule=lr_schedule, warmup_steps=warmup_steps, precision=precision)
        lora_file = sanitize_lora_name(lora_name)
        loras_dir = folder_paths.get_folder_paths("loras")[0]
        run_dir = Path(folder_paths.get_output_directory()) / "apt_lora_trainer" / Path(lora_file).stem
        job = TrainJob(model=model, clip=clip, vae=vae, dataset=dataset, config=config, lora_file=lora_file,
                       loras_dir=loras_dir, checkpoint_dir=run_dir, overwrite=overwrite, resume=resume,
                       node_id=node_id, prompt_id=getattr(ctx, "prompt_id", None),
                       save_step_loras=save_lora_every_checkpoint, preview_every=preview_every,
                       preview_prompts=preview_prompts).prepare()
        result = run_in_worker(job.run)

        lora_sd = comfy.utils.load_torch_file(str(result.lora_path), safe_load=True)
        model_lora, _ = comfy.sd.load_lora_for_models(model, None, lora_sd, 1.0, 0.0)
        history = json.dumps({**result.summary(), "history": result.history})
        return io.NodeOutput(result.lora_file, model_lora, history,
                             ui={"apt_run": [result.summary()]})


NODES = [AptDatasetLoader, AptCaption, AptAtaSettings, AptRegSettings, AptTrainerNode]
