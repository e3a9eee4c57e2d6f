"""The training loop on the tiny SDXL-shaped model (CPU, a few seconds each)."""

import math

import peft
import pytest
import torch
import torch.nn.functional as F

from apt_core.augment import AugmentDraw, augment_batch, draw_augmentation, variant_index, zoom_rotate
from apt_core.backbone import DiffusersSDXLBackbone
from apt_core.config import AptSwitches, AugmentConfig
from apt_core.errors import AptConfigError, NonFiniteLossError
from apt_core.models import encode_pixels
from quality.tiny_model import build_tiny_sdxl
from apt_core.trainer import AptTrainer
from apt_core.training_utils import lr_at

from tiny import config, tiny_model_and_data


def make_trainer(switches=None, steps=4, seed=0, **kw):
    components, dataset = tiny_model_and_data(seed, keep_pixels=kw.pop("keep_pixels", False))
    cfg = config(steps, switches, **{k: kw.pop(k) for k in list(kw) if k in (
        "learning_rate", "checkpoint_every", "gradient_checkpointing", "lr_schedule", "warmup_steps")})
    for key, value in kw.pop("overrides", {}).items():
        part, _, name = key.partition(".")
        setattr(getattr(cfg, part), name, value)
    backbone = DiffusersSDXLBackbone.from_components(components)
    trainer = AptTrainer(backbone, dataset, cfg, **kw)
    return trainer, components, dataset


def predict_pair(trainer, dataset):
    ex = dataset.examples[0]
    x = torch.randn(1, 4, *ex.bucket, generator=torch.Generator().manual_seed(5))
    t = torch.tensor([500])
    with torch.no_grad():
        ft = trainer.backbone.predict(x, t, ex.cond)
        with trainer.lora.disabled():
            pre = trainer.backbone.predict(x, t, ex.cond)
    return ft, pre


def set_gamma_everywhere(trainer, gamma):
    gap = -math.log(1.0 - gamma) / trainer.config.indicator.scale
    n = trainer.config.indicator.num_bins
    trainer.indicator.load_state_dict({"ema_pre": [0.01 + gap] * n, "ema_ft": [0.01] * n, "counts": [1] * n})


def test_at_step_zero_prior_equals_fine_tuned_and_rs_aa_are_exactly_zero():
    trainer, _, dataset = make_trainer()
    ft, pre = predict_pair(trainer, dataset)
    assert torch.equal(ft, pre)
    event = trainer.train_step()
    assert event.loss_rs == 0.0 and event.loss_aa == 0.0
    assert event.loss_denoise > 0.0


def test_after_some_steps_rs_and_aa_are_positive_and_prior_differs():
    trainer, _, dataset = make_trainer(steps=8, learning_rate=1e-2)
    result = trainer.run()
    assert result.history[-1]["loss_rs"] > 0.0 and result.history[-1]["loss_aa"] > 0.0
    ft, pre = predict_pair(trainer, dataset)
    assert not torch.equal(ft, pre)
    assert len(trainer._probe_handle.aa_layers) == 1 + 1 + 1 + 2 * 3  # tiny layout: up_blocks.0 (3x2), up_blocks.1 (3x1)


def test_only_lora_parameters_train():
    trainer, components, _ = make_trainer(steps=3, learning_rate=1e-2)
    lora_ids = {id(p) for p in trainer.lora.parameters()}
    base_before = {n: p.detach().clone() for n, p in components.unet.named_parameters() if id(p) not in lora_ids}
    lora_before = [p.detach().clone() for p in trainer.lora.parameters()]
    trainer.run()
    trainable = [p for p in components.unet.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == lora_ids
    for n, p in components.unet.named_parameters():
        if id(p) not in lora_ids:
            assert torch.equal(p, base_before[n]), n
    assert any(not torch.equal(a, b) for a, b in zip(lora_before, trainer.lora.parameters()))


def test_loss_weight_follows_gamma_with_floor():
    weighted, _, _ = make_trainer()
    plain, _, _ = make_trainer(AptSwitches(adaptive_augmentation=False, adaptive_loss_weight=False))
    weighted.config.switches.adaptive_augmentation = False
    set_gamma_everywhere(weighted, 0.7)
    set_gamma_everywhere(plain, 0.7)
    e_w, e_p = weighted.train_step(), plain.train_step()
    assert e_w.loss_weight == pytest.approx(0.3, abs=1e-6)
    assert e_w.loss_denoise == pytest.approx(0.3 * e_p.loss_denoise, rel=1e-5)
    floored, _, _ = make_trainer(overrides={"train.seed": 0})
    floored.config.loss_weight_floor = 0.5
    set_gamma_everywhere(floored, 0.7)
    assert floored.train_step().loss_weight == pytest.approx(0.5)


def test_augmentation_rate_follows_gamma():
    # RS/AA off: this test is about the augmentation coin only, and explicit attention is slower.
    trainer, _, _ = make_trainer(AptSwitches(representation_stabilization=False,
                                             attention_alignment=False), steps=40)
    set_gamma_everywhere(trainer, 0.999)
    trainer.config.augment.p_max = 0.5
    rates = [trainer.train_step() for _ in range(40)][-1].aug_rate
    assert 0.25 < rates < 0.75


def test_baseline_switch_is_plain_dreambooth_lora():
    """All parts off == a minimal DreamBooth-LoRA loop written here from scratch."""
    steps = 5
    trainer, _, dataset = make_trainer(AptSwitches.baseline(), steps=steps, learning_rate=1e-2)
    init = trainer.lora.state_dict()
    calls = []
    trainer.backbone.unet.register_forward_hook(lambda *a: calls.append(1))
    trainer.run()
    assert len(calls) == steps  # no prior forward at all

    ref = build_tiny_sdxl(seed=0)
    unet, sched = ref.unet, ref.scheduler
    unet.requires_grad_(False)
    cfg = trainer.config
    peft.inject_adapter_in_model(peft.LoraConfig(r=4, lora_alpha=4.0, target_modules=list(
        {n.rpartition(".")[0] for n in init})), unet)
    params = []
    for name, module in unet.named_modules():
        if isinstance(module, peft.tuners.lora.LoraLayer):
            module.lora_A["default"].weight.data.copy_(init[f"{name}.down"])
            module.lora_B["default"].weight.data.copy_(init[f"{name}.up"])
            params += [module.lora_A["default"].weight, module.lora_B["default"].weight]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=cfg.train.weight_decay)
    g = torch.Generator().manual_seed(cfg.train.seed)
    weights = torch.ones(len(dataset))
    for i in range(steps):  # the trainer's documented draw order: image, t, noise, augmentation
        for group in opt.param_groups:  # the default schedule: cosine from 1e-2 to 0 at the last step
            group["lr"] = 1e-2 * 0.5 * (1.0 + math.cos(math.pi * i / steps))
        ex = dataset.examples[int(torch.multinomial(weights, 1, generator=g))]
        t = torch.randint(0, 1000, (1,), generator=g)
        noise = torch.randn((1, *ex.latent.shape), generator=g)
        draw_augmentation(1, cfg.augment, g)
        x_t = sched.add_noise(ex.latent[None], noise, t)
        pred = unet(x_t, t, encoder_hidden_states=ex.cond.context,
                    added_cond_kwargs={"text_embeds": ex.cond.pooled, "time_ids": ex.cond.time_ids}).sample
        loss = F.mse_loss(pred, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip)
        opt.step()
        opt.zero_grad()
    got = trainer.lora.state_dict()
    for name, module in unet.named_modules():
        if isinstance(module, peft.tuners.lora.LoraLayer):
            assert torch.allclose(got[f"{name}.up"], module.lora_B["default"].weight, atol=1e-6, rtol=1e-4), name


@pytest.mark.parametrize("part", ["rs", "aa"])
def test_rs_and_aa_at_weight_zero_train_like_ata_alone(part):
    """The probe's hooks change nothing but the loss terms: at lambda 0 the LoRA follows +ATA's
    path, so whatever RS or AA does to a run comes from their gradients. RS only reads features:
    bit-identical. AA swaps the fused kernel for explicit softmax attention in the hooked layers:
    equal up to float rounding (which Adam's first steps magnify to ~1e-4 of the weights)."""
    ata = AptSwitches(representation_stabilization=False, attention_alignment=False)
    probed_switches = AptSwitches(representation_stabilization=part == "rs", attention_alignment=part == "aa")
    plain, _, _ = make_trainer(ata, steps=6, learning_rate=1e-2)
    probed, _, _ = make_trainer(probed_switches, steps=6, learning_rate=1e-2,
                                overrides={"regularizers.lambda_rs": 0.0, "regularizers.lambda_aa": 0.0})
    assert probed._probe_handle is not None and plain._probe_handle is None
    events = [probed.train_step() for _ in range(6)]
    plain.run()
    assert events[-1].loss_rs == 0.0 and events[-1].loss_aa == 0.0
    got, want = probed.lora.state_dict(), plain.lora.state_dict()
    for name in want:
        if part == "rs":
            assert torch.equal(got[name], want[name]), name
        else:
            torch.testing.assert_close(got[name], want[name], atol=5e-4, rtol=0, msg=name)


def test_batch_losses_split_the_objective_into_its_terms():
    trainer, _, dataset = make_trainer(steps=8, learning_rate=1e-2)
    trainer.run()
    ex = dataset.examples[0]
    g = torch.Generator().manual_seed(3)
    latents, noise = ex.latent[None].float(), torch.randn((1, *ex.latent.shape), generator=g)
    t, gamma = torch.tensor([300]), torch.tensor([0.25])
    trainer.probe.begin_step(ex.cond.aligned_tokens)
    try:
        terms = trainer.batch_losses(latents, ex.cond, t, noise, gamma)
        layer_terms = trainer.probe.rs_layer_terms()
    finally:
        trainer.probe.end_step()
    assert float(terms.rs.detach()) > 0 and float(terms.aa.detach()) > 0
    torch.testing.assert_close(terms.total, terms.denoise + terms.rs + terms.aa)
    torch.testing.assert_close(terms.denoise, 0.75 * terms.loss_ft[0])
    lam, lam_aa = trainer.config.regularizers.lambda_rs, trainer.config.regularizers.lambda_aa
    torch.testing.assert_close(terms.rs_raw, torch.stack([v for _, v in layer_terms]).mean())
    torch.testing.assert_close(terms.rs, lam * terms.rs_raw)
    torch.testing.assert_close(terms.aa, lam_aa * terms.aa_raw)


def test_resume_gives_the_same_parameters_as_an_uninterrupted_run(tmp_path):
    straight, _, _ = make_trainer(steps=6, learning_rate=5e-3)
    straight.run()

    first, _, _ = make_trainer(steps=6, learning_rate=5e-3, checkpoint_dir=tmp_path)
    first.on_event = lambda e: first.request_stop() if e.step == 3 else None
    result = first.run()
    assert result.stopped and result.steps_done == 3 and result.checkpoint.exists()

    second, _, _ = make_trainer(steps=6, learning_rate=5e-3, checkpoint_dir=tmp_path)
    assert second.resume() == 3
    second.run()
    for a, b in zip(straight.lora.parameters(), second.lora.parameters()):
        assert torch.equal(a, b)
    assert second.indicator.state_dict() == straight.indicator.state_dict()
    assert [h["loss"] for h in second.history] == [h["loss"] for h in straight.history]


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_state(tmp_path):
    trainer, _, dataset = make_trainer(steps=4, checkpoint_dir=tmp_path)
    trainer.train_step()  # one good step
    for ex in dataset.examples:
        ex.latent[:] = float("nan")
    with pytest.raises(NonFiniteLossError) as err:
        trainer.train_step()
    assert err.value.step == 2 and "step 2" in str(err.value)
    assert err.value.checkpoint is not None and err.value.checkpoint.name == "step_000001.pt"
    assert all(torch.isfinite(p).all() for p in trainer.lora.parameters())


def test_close_leaves_the_unet_exactly_as_it_was():
    components, dataset = tiny_model_and_data(0)
    unet = components.unet
    ex = dataset.examples[0]
    x = torch.randn(1, 4, *ex.bucket)
    before_keys = list(unet.state_dict())
    before_types = {n: type(m) for n, m in unet.named_modules()}
    before_procs = {n: type(p) for n, p in unet.attn_processors.items()}
    with torch.no_grad():
        out0 = DiffusersSDXLBackbone.from_components(components).predict(x, torch.tensor([10]), ex.cond)
    trainer = AptTrainer(DiffusersSDXLBackbone.from_components(components), dataset,
                         config(3, learning_rate=1e-2, gradient_checkpointing=True))
    trainer.run()
    trainer.close()
    with torch.no_grad():
        out1 = trainer.backbone.predict(x, torch.tensor([10]), ex.cond)
    assert torch.equal(out0, out1)
    assert list(unet.state_dict()) == before_keys
    assert {n: type(m) for n, m in unet.named_modules()} == before_types
    assert {n: type(p) for n, p in unet.attn_processors.items()} == before_procs
    assert not unet.is_gradient_checkpointing and not hasattr(unet, "peft_config")


def test_gradient_checkpointing_gives_the_same_training():
    plain, _, _ = make_trainer(steps=3, learning_rate=1e-2)
    ckpt, _, _ = make_trainer(steps=3, learning_rate=1e-2, gradient_checkpointing=True)
    a, b = plain.run(), ckpt.run()
    assert a.history[-1]["loss_aa"] == pytest.approx(b.history[-1]["loss_aa"], rel=1e-4)
    for p, q in zip(plain.lora.parameters(), ckpt.lora.parameters()):
        assert torch.allclose(p, q, atol=1e-6, rtol=1e-4)


def test_pixel_space_augmentation_at_every_step_reencodes_the_drawn_transform():
    components, dataset = tiny_model_and_data(0, keep_pixels=True, variants_for=None)
    cfg = config(3)
    cfg.augment.variant_grid = (0, 0)
    trainer = AptTrainer(DiffusersSDXLBackbone.from_components(components), dataset, cfg,
                         encode_pixels=lambda p: encode_pixels(components, p))
    set_gamma_everywhere(trainer, 0.999)
    draw = AugmentDraw(torch.zeros(1), torch.tensor([2.2]), torch.tensor([7.0]))
    latents = dataset.examples[1].latent[None].clone()
    out, applied = augment_batch(dataset, [1], latents, torch.ones(1), cfg.augment, draw, trainer.encode_pixels)
    want = encode_pixels(components, zoom_rotate(dataset.examples[1].pixels[None], draw.zoom, draw.angle,
                                                 cfg.augment.fill, -1.0))
    assert applied.tolist() == [True] and torch.equal(out, want)
    events = [trainer.train_step() for _ in range(3)]
    assert events[-1].aug_rate > 0.5


def test_pre_encoded_variants_are_what_an_augmented_step_trains_on():
    """The default: pixel space from variants cached with the dataset; no VAE during training."""
    components, dataset = tiny_model_and_data(0)
    cfg = config(3)
    assert cfg.augment.precomputed and dataset.examples[0].pixels is None
    trainer = AptTrainer(DiffusersSDXLBackbone.from_components(components), dataset, cfg)
    draw = AugmentDraw(torch.tensor([0.0, 0.9]), torch.tensor([2.2, 2.2]), torch.tensor([7.0, 7.0]))
    latents = torch.stack([dataset.examples[i].latent for i in (2, 0)])
    out, applied = augment_batch(dataset, [2, 0], latents.clone(), torch.tensor([0.5, 0.5]), cfg.augment, draw)
    cell = int(variant_index(draw, cfg.augment)[0])  # zoom 2.2 -> cell 4, 7 degrees -> cell 2
    assert cell == 14 and applied.tolist() == [True, False]
    assert torch.equal(out[0], dataset.examples[2].variants[cell]) and torch.equal(out[1], latents[1])
    set_gamma_everywhere(trainer, 0.999)
    events = [trainer.train_step() for _ in range(3)]
    assert events[-1].aug_rate > 0.5 and all(math.isfinite(e.loss) for e in events)


def test_variants_for_other_augmentation_settings_are_refused():
    components, dataset = tiny_model_and_data(0)
    for change in ({"zoom_max": 2.0}, {"variant_grid": (4, 3)}):
        cfg = config(1)
        for key, value in change.items():
            setattr(cfg.augment, key, value)
        with pytest.raises(AptConfigError, match="variants encoded for this"):
            AptTrainer(DiffusersSDXLBackbone.from_components(components), dataset, cfg)
    _, bare = tiny_model_and_data(0, variants_for=None)
    with pytest.raises(AptConfigError, match="encode_variants"):
        AptTrainer(DiffusersSDXLBackbone.from_components(components), bare, config(1))
    cfg = config(1)
    cfg.augment.space = "latent"  # needs nothing beyond the latents
    assert AptTrainer(DiffusersSDXLBackbone.from_components(components), bare, cfg).run().steps_done == 1


def test_lr_schedule():
    assert lr_at(0, 1.0, 4, 100, "constant") == 0.25
    assert lr_at(3, 1.0, 4, 100, "constant") == 1.0
    assert lr_at(50, 1.0, 0, 100, "constant") == 1.0
    assert lr_at(50, 1.0, 0, 100, "cosine") == pytest.approx(0.5)
    assert lr_at(100, 1.0, 0, 100, "cosine") == pytest.approx(0.0)


def test_progress_events_carry_what_the_widget_plots():
    trainer, _, _ = make_trainer(steps=2)
    seen = []
    trainer.on_event = seen.append
    trainer.run()
    e = seen[-1].to_dict()
    assert e["step"] == 2 and e["total_steps"] == 2 and len(e["gamma"]) == 10
    for key in ("loss", "loss_denoise", "loss_rs", "loss_aa", "aug_rate", "lr", "it_per_s", "eta_s"):
        assert math.isfinite(e[key])


def test_on_checkpoint_step_runs_at_each_periodic_checkpoint_before_it_is_written(tmp_path):
    seen = []
    trainer, _, _ = make_trainer(steps=5, checkpoint_every=2, checkpoint_dir=tmp_path,
                                 on_checkpoint_step=lambda step: seen.append(
                                     (step, trainer.step_idx, sorted(p.name for p in tmp_path.iterdir()))))
    trainer.run()
    assert seen == [(2, 2, []), (4, 4, ["step_000002.pt"])]  # not at the final (non-periodic) step 5


def test_save_last_good_rewinds_a_failed_step_and_refuses_a_half_updated_one(tmp_path):
    from apt_core.checkpoint import load_checkpoint

    trainer, _, _ = make_trainer(steps=4, checkpoint_dir=tmp_path)
    trainer.train_step()
    between = trainer.save_last_good()  # between steps: the current state, like save_checkpoint
    assert between.name == "step_000001.pt"
    assert torch.equal(load_checkpoint(between)["rng"], trainer.generator.get_state())
    rng_before = trainer.generator.get_state()
    real_step = trainer.optimizer.step
    boom = {"where": "forward"}

    def predict(*a, **k):
        raise RuntimeError("CUDA error: out of memory")
    real_predict = trainer.backbone.predict
    trainer.backbone.predict = predict
    with pytest.raises(RuntimeError, match="out of memory"):
        trainer.train_step()
    trainer.backbone.predict = real_predict
    failed = trainer.save_last_good()  # state of step 1, RNG rewound to the start of step 2
    state = load_checkpoint(failed)
    assert state["step"] == 1 and torch.equal(state["rng"], rng_before)
    assert not torch.equal(trainer.generator.get_state(), rng_before)  # the failed step drew numbers

    def half_update(*a, **k):  # the failure hits while the optimizer writes the weights
        boom["where"] = "update"
        raise RuntimeError("CUDA error: out of memory")
    trainer.optimizer.step = half_update
    with pytest.raises(RuntimeError):
        trainer.train_step()
    trainer.optimizer.step = real_step
    assert boom["where"] == "update" and trainer.save_last_good() is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000001.pt"]
    assert not hasattr(trainer, "_save_last_good")


def test_aa_free_words_leave_the_trigger_tokens_out_of_the_alignment():
    """Same run, same draws: only loss_aa changes, and only where the caption has the word."""
    from tiny import generated_records
    from apt_core.models import cache_dataset
    components, dataset = tiny_model_and_data(0)
    free, absent = (cache_dataset(components, generated_records(3), "cpu", torch.float32, aa_free_words=[w],
                                  variants_for=AugmentConfig()) for w in ("sks", "cat"))
    losses = []
    for data in (dataset, free, absent):
        cfg = config(6, learning_rate=1e-2)
        trainer = AptTrainer(DiffusersSDXLBackbone.from_components(build_tiny_sdxl(seed=0)), data, cfg)
        losses.append([h["loss_aa"] for h in trainer.run().history])
    assert losses[0] == losses[2]
    assert losses[0][0] == losses[1][0] == 0.0  # LoRA starts at zero: identical maps
    assert all(a != b for a, b in zip(losses[0][1:], losses[1][1:]))


def test_peft_input_cast_is_off_under_autocast_and_changes_nothing():
    """Under autocast peft's cast of each LoRA layer's input to fp32 is a copy that the bf16 matmul
    casts straight back: the trainer switches it off there, with bit-identical training."""
    fp32, _, _ = make_trainer(steps=1)
    assert all(layer.cast_input_dtype_enabled for layer in fp32.lora.layers.values())
    runs = []
    for cast in (False, True):
        tr, _, _ = make_trainer(steps=2, learning_rate=1e-2, overrides={"train.mixed_precision": "bf16"})
        assert tr.amp_dtype == torch.bfloat16
        assert not any(layer.cast_input_dtype_enabled for layer in tr.lora.layers.values())
        tr.lora.set_input_cast(cast)
        tr.run()
        runs.append([p.detach().clone() for p in tr.lora.parameters()])
    assert any(p.abs().sum() > 0 for p in runs[0])
    for p, q in zip(*runs):
        assert torch.equal(p, q)


class _OffloadedBackbone(DiffusersSDXLBackbone):
    """A host that keeps weights elsewhere than where it computes (offloaded, memory-mapped, streamed
    per operation): the UNet's first parameter lives on `meta`, the compute device is the CPU."""

    def __init__(self, components):
        super().__init__(components.unet, components.scheduler.alphas_cumprod)
        params = dict(self.unet._parameters)
        self.unet._parameters.clear()
        self.unet.register_parameter("offloaded", torch.nn.Parameter(torch.empty(3, device="meta"),
                                                                     requires_grad=False))
        self.unet._parameters.update(params)

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32


def test_training_computes_on_the_backbones_device_not_where_a_weight_rests():
    components, dataset = tiny_model_and_data(0)
    offloaded = _OffloadedBackbone(components)
    assert next(offloaded.unet.parameters()).device.type == "meta"
    trainer = AptTrainer(offloaded, dataset, config(3, learning_rate=1e-2))
    assert trainer.device == torch.device("cpu")
    trainer.run()
    got = trainer.lora.state_dict()
    trainer.close()
    del offloaded.unet._parameters["offloaded"]
    plain, _, _ = make_trainer(steps=3, learning_rate=1e-2)
    plain.run()
    want = plain.lora.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_resume_refuses_a_checkpoint_of_other_data_or_training_settings(tmp_path):
    first, _, _ = make_trainer(steps=2, checkpoint_dir=tmp_path, data_fingerprint="imagesA")
    first.run()
    first.close()

    def resume(data="imagesA", **changes):
        trainer, _, _ = make_trainer(steps=changes.pop("steps", 2), checkpoint_dir=tmp_path,
                                     data_fingerprint=data, **changes)
        try:
            return trainer.resume()
        finally:
            trainer.close()

    assert resume() == 2
    assert resume(steps=4, overrides={"train.checkpoint_every": 7}) == 2  # longer, other interval: fine
    assert resume(learning_rate=5e-4) == 2  # a lower rate: how a NaN run is continued
    with pytest.raises(AptConfigError, match="other images or captions"):
        resume(data="imagesB")
    with pytest.raises(AptConfigError, match=r"other settings \(train\.learning_rate: 0\.001 -> 0\.002\).*turn 'resume' off"):
        resume(learning_rate=2e-3)
    for key, value in (("lora.alpha", 2.0), ("train.seed", 5), ("indicator.scale", 3.0)):
        with pytest.raises(AptConfigError, match=key.replace(".", r"\.")):
            resume(overrides={key: value})


def test_an_empty_checkpoint_file_says_so(tmp_path):
    from apt_core.checkpoint import load_checkpoint
    from apt_core.errors import AptOutputError

    (tmp_path / "step_000002.pt").write_bytes(b"")
    with pytest.raises(AptOutputError, match=r"the file is empty: its save was cut off\); delete it"):
        load_checkpoint(tmp_path / "step_000002.pt")


def test_nan_after_the_weights_diverged_keeps_the_last_healthy_state_not_the_exploded_one(tmp_path):
    """The loss turns NaN only after the weights exploded: the state before the failing step is
    finite but useless, so the last healthy state (kept every 10 steps) is saved instead."""
    from apt_core.checkpoint import list_checkpoints, load_checkpoint

    trainer, _, dataset = make_trainer(steps=30, checkpoint_dir=tmp_path, learning_rate=1e-2,
                                       overrides={"train.checkpoint_every": 12})
    for _ in range(12):
        trainer.train_step()
    trainer.save_checkpoint()  # a periodic checkpoint at 12 (healthy, but after the kept copy at 10)
    healthy = trainer.recovery.healthy.state["lora"]
    with torch.no_grad():
        for p in trainer.lora.parameters():
            p.mul_(1e4)  # diverged: finite, but 10^4 times larger
    for ex in dataset.examples:
        ex.latent[:] = float("nan")
    with pytest.raises(NonFiniteLossError) as err:
        trainer.train_step()
    assert err.value.kept_step == 10 and err.value.checkpoint.name == "step_000010.pt"
    assert "already diverged" in str(err.value) and "of step 10" in str(err.value)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000010.pt"]  # resume picks it
    saved = load_checkpoint(err.value.checkpoint)
    assert saved["step"] == 10 and all(torch.equal(saved["lora"][k], healthy[k]) for k in healthy)


def test_nan_with_healthy_weights_keeps_the_state_before_the_failing_step(tmp_path):
    trainer, _, dataset = make_trainer(steps=30, checkpoint_dir=tmp_path)
    for _ in range(12):
        trainer.train_step()
    for ex in dataset.examples:
        ex.latent[:] = float("nan")
    with pytest.raises(NonFiniteLossError) as err:
        trainer.train_step()
    assert err.value.kept_step is None and err.value.checkpoint.name == "step_000012.pt"


def test_each_sample_is_weighted_by_its_own_bins_gamma():
    """Distinct gamma per bin: the loss weight must be 1 - gamma of the sample's bin (a lookup read
    from the other end, bin b as B-1-b, would give another weight)."""
    trainer, _, _ = make_trainer(steps=20, switches=AptSwitches(adaptive_augmentation=False))
    n, scale = trainer.config.indicator.num_bins, trainer.config.indicator.scale
    gammas = [0.05 * (b + 1) for b in range(n)]  # 0.05 .. 0.5
    gaps = [-math.log(1.0 - g) / scale for g in gammas]
    trainer.indicator.load_state_dict({"ema_pre": [0.01 + d for d in gaps], "ema_ft": [0.01] * n, "counts": [1] * n})
    seen = set()
    for _ in range(6):
        before = trainer.indicator.gammas()
        event = trainer.train_step()
        b = int(trainer.indicator.bin_of(torch.tensor(event.timesteps))[0])
        assert event.loss_weight == pytest.approx(1.0 - before[b], abs=1e-6)
        seen.add(b)
    assert len(seen) >= 3 and any(b != n - 1 - b for b in seen)


def test_an_error_inside_the_prior_pass_switches_the_lora_back_on():
    trainer, _, dataset = make_trainer(steps=3, learning_rate=1e-2)
    trainer.run()
    ft_before, pre = predict_pair(trainer, dataset)
    assert not torch.equal(ft_before, pre)
    with pytest.raises(RuntimeError):
        with trainer.lora.disabled():
            raise RuntimeError("out of memory in the prior forward")
    ft_after, _ = predict_pair(trainer, dataset)
    assert torch.equal(ft_after, ft_before)


@pytest.mark.parametrize("gpu, capability, emulated_bf16, want", [
    ("A100 / RTX 30xx+", (8, 0), True, torch.bfloat16),
    ("T4 / RTX 20xx", (7, 5), True, torch.float16),   # bf16 only through emulation: fp16 + loss scaling
    ("V100", (7, 0), True, torch.float16),
])
def test_auto_precision_uses_bf16_only_where_the_gpu_computes_it_natively(monkeypatch, gpu, capability,
                                                                        emulated_bf16, want):
    """CPU contract for the GPU choice: torch.cuda.is_bf16_supported() also counts emulation (slow);
    'auto' must pick fp16 with loss scaling there, bf16 only from compute capability 8.0."""
    from apt_core import training_utils as tr

    def is_bf16_supported(including_emulation: bool = True) -> bool:
        return capability[0] >= 8 or (including_emulation and emulated_bf16)

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    cuda = torch.device("cuda", 0)
    assert tr.autocast_dtype("auto", cuda) == want, gpu
    assert tr.autocast_dtype("auto", torch.device("cpu")) is None
    assert tr.autocast_dtype("bf16", cuda) == torch.bfloat16 and tr.autocast_dtype("no", cuda) is None
    # torch before 2.3: no including_emulation argument, the capability decides
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert tr.autocast_dtype("auto", cuda) == want, gpu


def test_the_training_loop_imports_no_sampler_model_loader_or_diffusers():
    """Layering: the host-independent trainer reaches the model only through the Backbone seam; class
    images arrive drawn (preservation / the host), so sampling and model loading stay out of it."""
    import subprocess
    import sys

    code = ("import sys, apt_core.trainer; "
            "print(sorted(m for m in sys.modules if m in ('apt_core.sampling', 'apt_core.models', "
            "'apt_core.preservation', 'diffusers')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
