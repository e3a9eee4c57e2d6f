"""Output preservation (an addition to APT): the caption without the trigger word keeps the prior's
prediction. Prompt building, caching, the loss against a hand computation, and that it preserves."""

import pytest
import torch

from apt_core.backbone import DiffusersSDXLBackbone
from apt_core.conditioning import CachedExample, SDXLConditioning, preservation_caption, without_words
from apt_core.config import AptConfig, RegularizerConfig
from apt_core.errors import AptConfigError, AptDatasetError
from apt_core.models import encode_prompts
from apt_core.conditioning import draw_class_batch
from apt_core.preservation import class_prompts, sample_class_examples
from apt_core.sampling import prompt_conditioning, sample
from apt_core.trainer import AptTrainer

from tiny import config, generated_records, tiny_model_and_data


@pytest.mark.parametrize("caption, words, expected", [
    ("a sks shape, on a white background", ["sks"], "a shape, on a white background"),
    ("a photo of sks dog on grass", ["sks"], "a photo of dog on grass"),
    ("sks, a dog on the beach", ["sks"], "a dog on the beach"),
    ("a photo of SKS dog", ["sks"], "a photo of dog"),
    ("ohwx man, sks style", ["ohwx", "sks"], "man, style"),
    ("a sksdog and a sks", ["sks"], "a sksdog and a"),  # only whole words
])
def test_without_words_removes_whole_words_and_tidies(caption, words, expected):
    assert without_words(caption, words) == expected


def test_preservation_caption_needs_the_trigger_word_in_the_caption():
    assert preservation_caption("a sks dog", ["sks"]) == "a dog"
    with pytest.raises(AptDatasetError, match="does not contain the trigger word"):
        preservation_caption("a photo of a dog", ["sks"])
    with pytest.raises(AptDatasetError, match="does not contain the trigger word"):  # tidying is not removal
        preservation_caption("a dog ,  on grass", ["sks"])


def test_config_needs_trigger_words_and_a_non_negative_weight():
    with pytest.raises(AptConfigError, match="needs the trigger word"):
        AptConfig(regularizers=RegularizerConfig(lambda_preserve=1.0)).validate()
    with pytest.raises(AptConfigError, match=">= 0"):
        AptConfig(regularizers=RegularizerConfig(lambda_preserve=-1.0, trigger_words=("sks",))).validate()
    with pytest.raises(AptConfigError, match="single non-empty words"):
        RegularizerConfig(trigger_words=("two words",)).validate()
    AptConfig(regularizers=RegularizerConfig(lambda_preserve=1.0, trigger_words=("sks",))).validate()
    assert RegularizerConfig(lambda_preserve=1.0, trigger_words=("sks",)).preservation_words == ("sks",)
    assert RegularizerConfig(lambda_preserve=0.0, trigger_words=("sks",)).preservation_words == ()


def test_cache_dataset_encodes_each_caption_without_the_trigger_word():
    components, dataset = tiny_model_and_data(trigger_words=("sks",))
    ex = dataset.examples[1]
    assert ex.caption == "a photo of sks dog on grass"
    want = encode_prompts(components, ["a photo of dog on grass"], (64, 64), (0, 0), (64, 64))
    assert torch.equal(ex.preserve_cond.context, want.context)
    assert torch.equal(ex.preserve_cond.pooled, want.pooled)
    assert torch.equal(ex.preserve_cond.time_ids, ex.cond.time_ids)
    assert not torch.equal(ex.preserve_cond.context, ex.cond.context)
    _, plain = tiny_model_and_data()
    assert plain.examples[0].preserve_cond is None


def test_cache_dataset_names_the_caption_without_the_trigger_word():
    components, _ = tiny_model_and_data()
    records = generated_records(2)
    records[1].caption = "a photo of a dog"
    from apt_core.models import cache_dataset
    with pytest.raises(AptDatasetError, match="'a photo of a dog'"):
        cache_dataset(components, records, "cpu", torch.float32, trigger_words=("sks",))


def preserving_trainer(lam: float, steps: int = 6, lr: float = 1e-2, trigger_words=("sks",)):
    components, dataset = tiny_model_and_data(trigger_words=trigger_words)
    cfg = config(steps, learning_rate=lr)
    cfg.regularizers.lambda_preserve, cfg.regularizers.trigger_words = lam, ("sks",)
    return AptTrainer(DiffusersSDXLBackbone.from_components(components), dataset, cfg), dataset


def test_trainer_refuses_preservation_without_cached_prompts():
    with pytest.raises(AptConfigError, match="trigger_words"):
        preserving_trainer(1.0, trigger_words=())


def test_preservation_loss_is_the_mse_to_the_prior_on_the_prompt_without_the_trigger():
    trainer, dataset = preserving_trainer(1.0, steps=4)
    ex = dataset.examples[0]
    g = torch.Generator().manual_seed(7)
    latents, noise = ex.latent[None].float(), torch.randn((1, *ex.latent.shape), generator=g)
    t = torch.tensor([400])
    assert float(trainer.preservation_loss(latents, ex.preserve_cond, t, noise).detach()) == 0.0  # LoRA B = 0
    trainer.run()
    acp = trainer.backbone.alphas_cumprod[400]
    x_t = acp.sqrt() * latents + (1 - acp).sqrt() * noise
    with torch.no_grad():
        ft = trainer.backbone.predict(x_t, t, ex.preserve_cond)
        with trainer.lora.disabled():
            pre = trainer.backbone.predict(x_t, t, ex.preserve_cond)
    got = trainer.preservation_loss(latents, ex.preserve_cond, t, noise)
    assert got.requires_grad and float(got.detach()) > 0
    torch.testing.assert_close(got.detach(), (ft - pre).pow(2).mean())


def test_train_step_reports_the_weighted_preservation_term_in_the_total():
    trainer, _ = preserving_trainer(2.5, steps=4)
    trainer.run()
    h = trainer.history[-1]
    assert h["loss_preserve"] > 0
    assert h["loss"] == pytest.approx(h["loss_denoise"] + h["loss_rs"] + h["loss_aa"] + h["loss_preserve"], rel=1e-5)
    trainer_off, _ = preserving_trainer(0.0, steps=4)
    trainer_off.run()
    assert all(e["loss_preserve"] == 0.0 for e in trainer_off.history)


def preservation_gap(trainer, dataset) -> float:
    """Mean squared gap between the LoRA's and the prior's predictions for every preservation prompt,
    on fixed noisy latents at three timesteps."""
    g = torch.Generator().manual_seed(11)
    total = 0.0
    cond = SDXLConditioning.cat([ex.preserve_cond for ex in dataset.examples])
    latents = torch.stack([ex.latent for ex in dataset.examples]).float()
    for t in (200, 500, 800):
        noise = torch.randn(latents.shape, generator=g)
        tt = torch.full((latents.shape[0],), t)
        with torch.no_grad():
            total += float(trainer.preservation_loss(latents, cond, tt, noise))
    return total / 3


def test_preservation_keeps_the_prompt_without_the_trigger_closer_to_the_prior():
    """Same seed, data and steps: only lambda_preserve differs."""
    free, dataset = preserving_trainer(0.0, steps=12)
    free.run()
    kept, _ = preserving_trainer(5.0, steps=12)
    kept.run()
    gap_free, gap_kept = preservation_gap(free, dataset), preservation_gap(kept, dataset)
    assert gap_free > 0
    assert gap_kept < 0.5 * gap_free, (gap_kept, gap_free)


# ---- on class images: the prior's own samples of the caption without the trigger word ----------

def test_class_prompts_are_the_unique_captions_without_the_trigger_word():
    assert class_prompts(["a sks dog on grass", "a sks dog", "a sks dog on grass"], ["sks"]) == \
        ["a dog on grass", "a dog"]
    with pytest.raises(AptDatasetError, match="does not contain the trigger word"):
        class_prompts(["a dog"], ["sks"])


def test_class_examples_are_the_priors_samples_of_the_class_prompts():
    components, _ = tiny_model_and_data()
    captions = ["a sks dog on grass", "a photo of sks dog"]
    got = sample_class_examples(components, captions, ["sks"], 3, size=64, seed=50, steps=2)
    assert [ex.caption for ex in got] == ["a dog on grass", "a photo of dog", "a dog on grass"]  # cycled
    _, latents = sample(components, [ex.caption for ex in got], [50, 51, 52], steps=2, size=64, return_latents=True)
    for ex, want in zip(got, latents):
        assert ex.latent.shape == (4, 8, 8)
        torch.testing.assert_close(ex.latent, want, atol=1e-3, rtol=1e-3)  # batched-matmul rounding
    want = prompt_conditioning(components, ["a photo of dog"], 64, 64)
    assert torch.equal(got[1].cond.context, want.context) and torch.equal(got[1].cond.time_ids, want.time_ids)
    assert sample_class_examples(components, captions, ["sks"], 0, size=64) == []


def test_draw_class_batch_draws_images_then_timesteps_then_noise():
    pool = [CachedExample(torch.full((4, 2, 2), float(i)), SDXLConditioning(
        torch.zeros(1, 3, 8), torch.zeros(1, 8), torch.zeros(1, 6), torch.ones(1, 3, dtype=torch.bool)), f"c{i}")
        for i in range(5)]
    latents, cond, t, noise = draw_class_batch(pool, 2, 1000, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    pick = torch.randint(5, (2,), generator=g)
    assert torch.equal(latents[:, 0, 0, 0], pick.float())
    assert torch.equal(t, torch.randint(0, 1000, (2,), generator=g))
    assert torch.equal(noise, torch.randn((2, 4, 2, 2), generator=g))
    assert cond.context.shape == (2, 3, 8)


def class_preserving_trainer(lam: float, class_examples, steps: int = 6, lr: float = 1e-2):
    components, dataset = tiny_model_and_data()
    dataset.class_examples = class_examples
    cfg = config(steps, learning_rate=lr)
    cfg.regularizers.lambda_preserve, cfg.regularizers.trigger_words, cfg.regularizers.class_images = lam, ("sks",), 4
    return AptTrainer(DiffusersSDXLBackbone.from_components(components), dataset, cfg)


def tiny_class_examples(n: int = 4):
    components, _ = tiny_model_and_data()
    return sample_class_examples(components, ["a sks dog on grass"], ["sks"], n, size=64, steps=2)


def test_trainer_refuses_class_image_preservation_without_class_images():
    with pytest.raises(AptConfigError, match="sample_class_examples"):
        class_preserving_trainer(1.0, [])
    with pytest.raises(AptConfigError, match="class images must be >= 0"):
        RegularizerConfig(class_images=-1).validate()


def test_class_image_preservation_trains_on_the_class_images(monkeypatch):
    classes = tiny_class_examples()
    trainer = class_preserving_trainer(1.0, classes, steps=3)
    seen = []
    real = trainer.preservation_loss
    monkeypatch.setattr(trainer, "preservation_loss",
                        lambda lat, cond, t, noise: seen.append((lat, cond)) or real(lat, cond, t, noise))
    trainer.run()
    assert len(seen) == 3
    for lat, cond in seen:
        assert any(torch.equal(lat[0], ex.latent) for ex in classes)
        assert torch.equal(cond.context, classes[0].cond.context)  # one class prompt here


def test_class_image_preservation_keeps_the_class_images_closer_to_the_prior():
    """Same seed, data and steps: only lambda_preserve differs; measured on the class images."""
    classes = tiny_class_examples()
    free = class_preserving_trainer(0.0, classes, steps=12)
    free.run()
    # the tiny random model's gap on its class images is ~1e-5, so the weight must be large to count
    kept = class_preserving_trainer(500.0, classes, steps=12)
    kept.run()

    def gap(trainer) -> float:
        g = torch.Generator().manual_seed(11)
        latents = torch.stack([ex.latent for ex in classes])
        cond = SDXLConditioning.cat([ex.cond for ex in classes])
        with torch.no_grad():
            return sum(float(trainer.preservation_loss(latents, cond, torch.full((4,), t),
                                                       torch.randn(latents.shape, generator=g)))
                       for t in (200, 500, 800)) / 3

    gap_free, gap_kept = gap(free), gap(kept)
    assert gap_free > 0
    assert gap_kept < 0.5 * gap_free, (gap_kept, gap_free)


def test_class_latents_are_kept_and_reused_only_for_the_same_key(tmp_path):
    from apt_core.preservation import cached_class_latents
    path, calls = tmp_path / "run" / "class_images.safetensors", []

    def draw(value):
        return lambda: calls.append(value) or torch.full((2, 4, 3, 3), float(value))

    first, reused = cached_class_latents(path, "key-a", draw(1))
    assert (not reused, calls) == (True, [1]) and path.is_file()
    again, reused = cached_class_latents(path, "key-a", draw(2))
    assert reused and calls == [1] and torch.equal(again, first)  # read back, not drawn
    other, reused = cached_class_latents(path, "key-b", draw(3))  # another model / prompts / size
    assert not reused and calls == [1, 3] and float(other[0, 0, 0, 0]) == 3.0
    path.write_bytes(b"not a safetensors file")  # damaged: drawn again and replaced
    fixed, reused = cached_class_latents(path, "key-b", draw(4))
    assert not reused and float(fixed[0, 0, 0, 0]) == 4.0
    assert cached_class_latents(path, "key-b", draw(5))[1]
    blocked = tmp_path / "file"
    blocked.write_text("x")  # a file where the folder should be: cannot keep it, still returns the draw
    got, reused = cached_class_latents(blocked / "class_images.safetensors", "k", draw(6))
    assert not reused and float(got[0, 0, 0, 0]) == 6.0


def test_unet_fingerprint_follows_the_weights():
    from apt_core.preservation import class_draw_key, unet_fingerprint
    components, _ = tiny_model_and_data()
    before = unet_fingerprint(components.unet)
    assert unet_fingerprint(components.unet) == before and len(before) == 16
    with torch.no_grad():
        next(components.unet.parameters()).view(-1)[0] += 1e-3
    assert unet_fingerprint(components.unet) != before
    key = class_draw_key(["a dog"], [1], (8, 8), 25, 5.0, before)
    assert key != class_draw_key(["a dog"], [1], (8, 8), 25, 5.0, unet_fingerprint(components.unet))
    assert key != class_draw_key(["a cat"], [1], (8, 8), 25, 5.0, before)
