"""Settings: defaults from the method notes, validation messages, dict round trip."""

import pytest

from apt_core.config import AptConfig, AptSwitches
from apt_core.errors import AptConfigError


def test_defaults_follow_the_paper():
    cfg = AptConfig()
    assert (cfg.indicator.num_bins, cfg.indicator.ema_alpha, cfg.indicator.scale) == (10, 0.1, 1000.0)
    assert (cfg.augment.zoom_min, cfg.augment.zoom_max, cfg.augment.rotation_deg) == (1.0, 3.0, 15.0)
    assert cfg.regularizers.up_block_factors == (4, 2)  # 32x32 and 64x64 at 1024 px
    assert not cfg.lora.include_feed_forward and not cfg.lora.include_conv  # attention projections only
    assert cfg.loss_weight_floor == 0.0


def test_baseline_needs_no_prior_pass_and_tracking_does():
    assert not AptSwitches.baseline().needs_prior
    assert AptSwitches(False, False, False, False, track_indicator=True).needs_prior
    assert AptSwitches().needs_prior


@pytest.mark.parametrize("edit, message", [
    (lambda c: setattr(c.lora, "rank", 0), "rank must be a positive integer"),
    (lambda c: setattr(c.lora, "rank", 2.5), "rank must be a positive integer"),
    (lambda c: setattr(c.augment, "p_max", 1.5), "p_max"),
    (lambda c: setattr(c.augment, "zoom_min", 0.5), "zoom range"),
    (lambda c: setattr(c.augment, "fill", "mirror"), "fill mode"),
    (lambda c: setattr(c.indicator, "ema_alpha", 0.0), "EMA alpha"),
    (lambda c: setattr(c.train, "steps", 0), "steps"),
    (lambda c: setattr(c, "loss_weight_floor", 2.0), "floor"),
    (lambda c: setattr(c.regularizers, "lambda_aa", -1.0), "lambda"),
    (lambda c: setattr(c.regularizers, "aa_free_words", ("sks dog",)), "single non-empty words"),
    (lambda c: setattr(c.regularizers, "aa_free_words", ("",)), "single non-empty words"),
])
def test_out_of_range_settings_are_clear_errors(edit, message):
    cfg = AptConfig()
    edit(cfg)
    with pytest.raises(AptConfigError, match=message):
        cfg.validate()


def test_dict_round_trip_and_unknown_keys():
    cfg = AptConfig()
    cfg.train.steps, cfg.augment.fill, cfg.switches.attention_alignment = 7, "reflect", False
    cfg.regularizers.aa_free_words = ("sks",)
    assert AptConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(AptConfigError, match="unknown"):
        AptConfig.from_dict({"train": {"stepz": 3}})
    with pytest.raises(AptConfigError, match="unknown"):
        AptConfig.from_dict({"speed": 3})


def test_augmentation_is_none_unless_it_runs_and_says_how_it_encodes():
    from apt_core.config import AugmentConfig
    cfg = AptConfig()
    assert cfg.augmentation is cfg.augment and cfg.augment.precomputed and not cfg.augment.encodes_every_step
    assert AptConfig(augment=AugmentConfig(enabled=False)).augmentation is None
    assert AptConfig(switches=AptSwitches.baseline()).augmentation is None
    every = AugmentConfig(variant_grid=(0, 0))
    assert every.encodes_every_step and not every.precomputed
    latent = AugmentConfig(space="latent")
    assert not latent.encodes_every_step and not latent.precomputed


def test_the_lora_covers_every_attention_projection_and_the_switches_add_the_rest():
    """What the LoRA targets is decided by the backbone from these switches (there is no free-form
    target list to get out of step with the names)."""
    from apt_core.backbone import transformer_lora_targets
    from quality.tiny_model import build_tiny_sdxl

    unet = build_tiny_sdxl(0).unet
    default = transformer_lora_targets(unet)
    assert default and {n.split(".attn")[-1][2:] for n in default} == {"to_q", "to_k", "to_v", "to_out.0"}
    assert all(".attn1." in n or ".attn2." in n for n in default)
    with_ff = transformer_lora_targets(unet, include_feed_forward=True)
    assert set(default) < set(with_ff) and all(".ff." in n for n in set(with_ff) - set(default))
