"""The standalone command: trains the tiny model end to end, resumes, and reports bad input."""

import pytest
from safetensors import safe_open

from apt_core.__main__ import main
from quality.tiny_model import build_tiny_sdxl, save_tiny_sdxl
from sample_images import write_sample_folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """--model / --images / --resolution of the tiny model (a diffusers folder) and 5 sample photos."""
    root = tmp_path_factory.mktemp("tiny")
    model = save_tiny_sdxl(build_tiny_sdxl(), root / "model")
    photos = write_sample_folder(root / "photos", size=64)
    return ["--model", model, "--images", str(photos), "--resolution", "64"]


def test_model_and_images_are_required(tmp_path, capsys, tiny):
    assert main(["--images", tiny[3], "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "give --model" in capsys.readouterr().err
    assert main(["--model", tiny[1], "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "and --images" in capsys.readouterr().err


def test_demo_run_writes_a_lora_and_a_resumable_checkpoint(tmp_path, capsys, tiny):
    out = tmp_path / "run" / "lora.safetensors"
    assert main([*tiny, "--steps", "4", "--rank", "4", "--print-every", "2", "--checkpoint-every", "2",
                 "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "gamma per bin" in text and "step     4/4" in text
    assert "cached 5 latents (+120 augmentation variants)" in text  # 5 sample photos x the default 8 x 3 grid
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["ss_network_dim"] == "4"
    assert (tmp_path / "run" / "lora.checkpoints" / "step_000004.pt").exists()
    assert main([*tiny, "--steps", "6", "--rank", "4", "--out", str(out), "--resume"]) == 0
    text = capsys.readouterr().out
    assert "resuming at step 4" in text and "finished at step 6" in text


def test_lora_ff_and_conv_flags_add_those_layers_to_the_file(tmp_path, tiny):
    def keys(*flags):
        out = tmp_path / f"l{len(flags)}.safetensors"
        assert main([*tiny, "--steps", "1", "--rank", "2", "--checkpoint-every", "0", *flags, "--out", str(out)]) == 0
        with safe_open(str(out), "pt") as f:
            return {k: f.get_slice(k).get_shape() for k in f.keys()}

    plain, both = keys(), keys("--lora-ff", "--lora-conv")
    assert not any("_ff_" in k or "resnets" in k for k in plain)
    assert any("_ff_net_" in k for k in both)
    conv = [k for k in both if "resnets" in k and k.endswith("conv1.lora_down.weight")]
    assert conv and all(len(both[k]) == 4 for k in conv)  # LoCon: 4-D kohya keys
    assert set(plain) < set(both)


def test_aa_free_words_reach_the_config():
    from apt_core.__main__ import build_config, parse_args
    cfg = build_config(parse_args(["--aa-free-word", "sks", "--aa-free-word", "ohwx"]))
    assert cfg.regularizers.aa_free_words == ("sks", "ohwx")
    assert build_config(parse_args([])).regularizers.aa_free_words == ()


def test_output_preservation_trains_from_the_command_line(tmp_path, capsys, tiny):
    from apt_core.__main__ import build_config, parse_args
    cfg = build_config(parse_args(["--preserve", "0.5", "--trigger-word", "sks"])).regularizers
    assert (cfg.lambda_preserve, cfg.trigger_words) == (0.5, ("sks",))
    assert build_config(parse_args([])).regularizers.lambda_preserve == 0.0  # off: the paper's method
    images = write_sample_folder(tmp_path / "imgs", count=2, size=64)  # captions name "sks toy"
    assert main(["--model", tiny[1], "--images", str(images), "--resolution", "64", "--steps", "2", "--rank", "2",
                 "--preserve", "1", "--trigger-word", "sks", "--print-every", "1",
                 "--out", str(tmp_path / "l.safetensors")]) == 0
    assert " preserve " in capsys.readouterr().out
    assert main(["--model", tiny[1], "--images", str(images), "--resolution", "64", "--steps", "1",
                 "--preserve", "1", "--trigger-word", "ohwx", "--out", str(tmp_path / "m.safetensors")]) == 2
    assert "does not contain the trigger word (ohwx)" in capsys.readouterr().err


def test_preservation_on_class_images_from_the_command_line(tmp_path, capsys, tiny):
    from apt_core.__main__ import build_config, parse_args
    assert build_config(parse_args([])).regularizers.class_images == 0
    images = write_sample_folder(tmp_path / "imgs", count=2, size=64)
    assert main(["--model", tiny[1], "--images", str(images), "--resolution", "64", "--steps", "2", "--rank", "2",
                 "--preserve", "1", "--trigger-word", "sks", "--class-images", "3", "--sample-steps", "2",
                 "--print-every", "1", "--out", str(tmp_path / "l.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "drew 3 class images for preservation" in out and " preserve " in out
    assert (tmp_path / "l.checkpoints" / "class_images.safetensors").is_file()
    assert main(["--model", tiny[1], "--images", str(images), "--resolution", "64", "--steps", "2", "--rank", "2",
                 "--preserve", "1", "--trigger-word", "sks", "--class-images", "3", "--sample-steps", "2",
                 "--out", str(tmp_path / "l.safetensors")]) == 0
    assert "reused 3 class images for preservation" in capsys.readouterr().out


def test_augmentation_space_flags_reach_the_config(tmp_path, capsys, tiny):
    from apt_core.__main__ import build_config, parse_args
    default = build_config(parse_args([])).augment
    assert (default.space, default.precomputed) == ("pixel", True)
    every = build_config(parse_args(["--encode-every-step"])).augment
    assert (every.space, every.variant_grid, every.precomputed) == ("pixel", (0, 0), False)
    assert build_config(parse_args(["--augment-space", "latent"])).augment.space == "latent"
    for flags in (["--encode-every-step"], ["--augment-space", "latent"]):
        assert main([*tiny, "--steps", "2", "--rank", "2", "--checkpoint-every", "0", *flags,
                     "--out", str(tmp_path / "l.safetensors")]) == 0
        assert "augmentation variants" not in capsys.readouterr().out


def test_lr_schedule_and_warmup_reach_the_config():
    from apt_core.__main__ import build_config, parse_args
    default = build_config(parse_args([])).train
    assert (default.lr_schedule, default.warmup_steps) == ("cosine", 0)  # the benchmark-set default
    chosen = build_config(parse_args(["--lr-schedule", "constant", "--warmup", "20"])).train
    assert (chosen.lr_schedule, chosen.warmup_steps) == ("constant", 20)


@pytest.mark.parametrize("args, message", [
    (["--images", "/no/such/folder"], "Image folder not found"),
    (["--rank", "0"], "rank must be a positive integer"),
    (["--model", "/no/such/model.safetensors"], "not found"),
    (["--aa-free-word", "sks dog"], "single non-empty words"),
    (["--preserve", "1"], "needs the trigger word"),
])
def test_bad_input_is_a_clear_error_not_a_traceback(tmp_path, capsys, args, message, tiny):
    assert main([*tiny, *args, "--steps", "1", "--out", str(tmp_path / "x.safetensors")]) == 2
    assert message in capsys.readouterr().err


def test_empty_image_folder(tmp_path, capsys, tiny):
    (tmp_path / "empty").mkdir()
    assert main(["--model", tiny[1], "--images", str(tmp_path / "empty"), "--steps", "1", "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "no images" in capsys.readouterr().err.lower()


def test_before_after_samples_on_the_tiny_model(tmp_path, capsys, tiny):
    from PIL import Image

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# a comment\na photo of sks toy on a beach\n\n")
    out = tmp_path / "lora.safetensors"
    assert main([*tiny, "--steps", "2", "--rank", "2", "--sample-prompts", str(prompts),
                 "--sample-prompt", "a photo of a dog", "--samples-per-prompt", "2", "--sample-steps", "2",
                 "--cfg", "3", "--threads", "1", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    grid = tmp_path / "lora.before_after.png"
    assert text.count("rendered 4 sample(s) (2 DDIM steps, cfg 3, 64 px)") == 2  # before and after
    assert f"before/after grid written to {grid}" in text
    with Image.open(grid) as im:
        assert im.width >= 300 + 4 * 128 and im.height >= 2 * 128
    # --samples-out alone renders the training captions; a missing prompt file is a clear error
    assert main([*tiny, "--steps", "1", "--rank", "2", "--sample-steps", "1",
                 "--samples-out", str(tmp_path / "g.png"), "--out", str(out)]) == 0
    assert "rendered 4 sample(s)" in capsys.readouterr().out and (tmp_path / "g.png").exists()
    assert main([*tiny, "--sample-prompts", str(tmp_path / "none.txt"), "--out", str(out)]) == 2
    assert "sample prompt file not found" in capsys.readouterr().err


def test_ctrl_c_saves_the_state_and_exits_130(tmp_path, monkeypatch, capsys, tiny):
    import os
    import signal

    from apt_core.trainer import AptTrainer

    real = AptTrainer.train_step

    def step(self):
        if self.step_idx == 2:
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C sends; the CLI's handler stops after this step
        return real(self)

    monkeypatch.setattr(AptTrainer, "train_step", step)
    out = tmp_path / "x.safetensors"
    assert main([*tiny, "--steps", "6", "--rank", "2", "--checkpoint-every", "0", "--out", str(out)]) == 130
    assert out.exists() and list((tmp_path / "x.checkpoints").glob("step_000003.pt"))
    assert "stopped early at step 3" in capsys.readouterr().out


def test_baseline_trains_plain_dreambooth_lora(tmp_path, tiny):
    import json

    out = tmp_path / "db.safetensors"
    assert main([*tiny, "--steps", "2", "--rank", "2", "--baseline", "--checkpoint-every", "0", "--out", str(out)]) == 0
    with safe_open(str(out), "pt") as f:
        switches = json.loads(f.metadata()["apt_settings"])["switches"]
    assert not any(v for k, v in switches.items() if k != "track_indicator"), switches
