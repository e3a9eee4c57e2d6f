"""TrainJob (the APT Trainer node's work) in process, on the tiny fixture MODEL/CLIP/VAE.

The fixture builds a real ComfyUI SDXL model, a real comfy.sd.CLIP (SDXL classes, tiny configs)
and a real comfy.sd.VAE, inside torch.inference_mode() like ComfyUI's loaders do.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import comfy_host as ch

sys.path.insert(0, str(Path(__file__).resolve().parent / "pack_fixtures"))

STEPS = 4


@pytest.fixture(scope="module")
def m():
    ch.import_comfy()
    import apt_test_models
    from apt_test_models.inproc import pack_module

    mods = {n: pack_module(n) for n in ("train_job", "dataset", "settings", "runs", "encoding", "comfy_backbone")}
    with torch.inference_mode():
        mods["model"] = apt_test_models.build_model(0, "sdxl")
        mods["clip"] = apt_test_models.build_clip(0)
        mods["vae"] = apt_test_models.build_vae(0)
    mods["fixture"] = apt_test_models
    return mods


def _dataset(m, n=3, nan=False):
    from tiny import generated_records

    recs = generated_records(n, 64)
    if nan:  # corrupt data: every image decodes to NaN
        for r in recs:
            r.pixels[:] = float("nan")
    return m["dataset"].AptDataset(tuple(recs), 64)


def _job(m, tmp_path, name="t", steps=STEPS, resume=False, overwrite=False, node_id="n1", dataset=None, model=None,
         checkpoint_every=0, **cfg):
    config = m["settings"].build_config(steps=steps, rank=4, learning_rate=cfg.pop("learning_rate", 1e-3), seed=0,
                                        checkpoint_every=checkpoint_every,
                                        preset=cfg.pop("preset", m["settings"].DEFAULT_PRESET))
    return m["train_job"].TrainJob(
        model=model or m["model"], clip=m["clip"], vae=m["vae"], config=config,
        dataset=_dataset(m) if dataset is None else dataset,
        lora_file=f"{name}.safetensors", loras_dir=tmp_path / "loras", checkpoint_dir=tmp_path / "runs" / name,
        overwrite=overwrite, resume=resume, node_id=node_id)


def _sample(model, seed=0):
    """The original UNet's output for a fixed input (what sampling with the MODEL computes)."""
    base = model.model
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, 8, 8, generator=g)
    ctx = torch.randn(1, 77, 80, generator=g)
    y = torch.randn(1, base.adm_channels, generator=g)
    with torch.no_grad():
        return base.diffusion_model(x, timesteps=torch.tensor([500.0]), context=ctx, y=y)


def _sample_loaded(patcher):
    """Load the patcher the way KSampler does (ComfyUI swaps weight patches between clones), sample."""
    import comfy.model_management as mm

    mm.load_models_gpu([patcher])
    return _sample(patcher)


def _lora_tensors(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def test_encoding_uses_sdxl_size_conditioning_and_the_latent_scale(m):
    enc = m["encoding"]
    ds = _dataset(m, 2)
    base = m["model"].model
    cached = enc.cache_dataset(list(ds.records), base, m["clip"], m["vae"], context_dim=80, adm_channels=96)
    ex = cached.examples[0]
    assert ex.cond.context.shape == (1, 77, 80) and ex.cond.pooled.shape == (1, 96)
    assert ex.latent.shape == (4, 8, 8) and ex.latent.dtype == torch.float32
    with torch.no_grad():
        raw = m["vae"].encode(enc.to_comfy_image(ds.records[0].pixels))
    torch.testing.assert_close(ex.latent, raw[0].float() * 0.13025)
    tokens = m["clip"].tokenize(ds.records[0].caption)
    n_real = len(m["clip"].tokenizer.clip_l.tokenizer(ds.records[0].caption)["input_ids"])  # BOS..EOS
    assert int(ex.cond.token_mask.sum()) == n_real and bool(ex.cond.token_mask[0, 0])
    # y = pooled CLIP-G + SDXL size embedding: original 64x64, crop 0,0, target 64x64 (not 768x768)
    with torch.no_grad():
        out = m["clip"].encode_from_tokens(tokens, return_pooled=True, return_dict=True)
    y = base.encode_adm(pooled_output=out["pooled_output"], width=64, height=64, crop_w=0, crop_h=0,
                        target_width=64, target_height=64)
    torch.testing.assert_close(ex.cond.pooled, y.float())
    y768 = base.encode_adm(pooled_output=out["pooled_output"])
    assert not torch.allclose(ex.cond.pooled, y768.float())
    assert cached.fill_latent.shape == (4,)
    with pytest.raises(Exception, match="does not match the model"):
        enc.cache_dataset(list(ds.records), base, m["clip"], m["vae"], context_dim=2048, adm_channels=2816)


def test_job_trains_saves_a_loadable_lora_and_leaves_the_model_unchanged(m, tmp_path):
    before = _sample(m["model"])
    job = _job(m, tmp_path, "full").prepare()
    res = job.run()
    assert res.steps_done == STEPS and not res.stopped and not res.cancelled
    assert res.lora_path == tmp_path / "loras" / "full.safetensors" and res.lora_path.exists()
    assert not list((tmp_path / "loras").glob("*.tmp"))
    assert len(res.history) == STEPS and len(res.gammas) == 10
    keys = list(_lora_tensors(res.lora_path))
    assert all(k.startswith("lora_unet_") for k in keys) and any("output_blocks" in k for k in keys)
    loaded, not_loaded = ch.comfy_lora_load_report(m["model"], res.lora_path)
    assert not_loaded == [] and loaded == len(keys)
    patched, _, _ = ch.comfy_load_lora(m["model"], res.lora_path)
    with_lora = _sample_loaded(patched)
    assert not torch.allclose(with_lora, before, atol=1e-6)
    assert torch.equal(_sample_loaded(m["model"]), before)  # bit-identical after training + a LoRA
    unet = m["model"].model.diffusion_model
    assert not hasattr(unet, "peft_config") and not any("forward" in vars(x) for x in unet.modules())
    run = m["runs"].RUNS.get("n1")
    assert run.status == "finished" and run.step == STEPS and len(run.history) == STEPS


def test_existing_file_needs_overwrite_and_resume_off_starts_fresh(m, tmp_path):
    from apt_core.errors import AptOutputError

    _job(m, tmp_path, "dup", steps=1).prepare().run()
    assert (tmp_path / "runs" / "dup" / "step_000001.pt").exists()
    with pytest.raises(AptOutputError, match="already exists"):
        _job(m, tmp_path, "dup", steps=1).prepare()
    # resume=True but the checkpoint already reached `steps`: a fresh run, which needs overwrite too
    with pytest.raises(AptOutputError, match="overwrite"):
        _job(m, tmp_path, "dup", steps=1, resume=True).prepare()
    assert (tmp_path / "runs" / "dup" / "step_000001.pt").exists()  # a refused run deletes nothing
    res = _job(m, tmp_path, "dup", steps=1, overwrite=True).prepare().run()
    assert res.resumed_from == 0


def test_stop_route_stops_after_the_current_step_and_saves(m, tmp_path, monkeypatch):
    tj = m["train_job"]
    real_send = tj.send

    def send(event, data):
        real_send(event, data)
        if event == "apt.progress" and data["step"] == 2:
            assert m["runs"].RUNS.request_stop("stopper") is not None
    monkeypatch.setattr(tj, "send", send)
    res = _job(m, tmp_path, "stopped", steps=50, node_id="stopper").prepare().run()
    assert res.stopped and not res.cancelled and res.steps_done == 2
    assert res.lora_path.exists() and res.checkpoint.endswith("step_000002.pt")
    assert m["runs"].RUNS.get("stopper").status == "stopped"


@pytest.mark.parametrize("where", ["between_steps", "mid_step"])
def test_cancel_checkpoints_and_the_next_run_resumes_exactly(m, tmp_path, monkeypatch, where):
    import comfy.model_management as mm

    steps = 4
    if "ref" not in m:  # the uninterrupted reference run, shared by both variants
        m["ref"] = _lora_tensors(_job(m, tmp_path / "ref", "ref", steps=steps).prepare().run().lora_path)
    tj = m["train_job"]
    real_send = tj.send
    hooks = []
    if where == "between_steps":
        def send(event, data):
            real_send(event, data)
            if event == "apt.progress" and data["step"] == 2:
                mm.interrupt_current_processing(True)
        monkeypatch.setattr(tj, "send", send)
    else:  # the flag is raised inside the 3rd step's fine-tuned forward: ComfyUI's ops throw
        calls = {"n": 0}

        def hook(mod, inp, out):
            calls["n"] += 1
            if calls["n"] == 2 * 2 + 2:  # steps 1-2: prior + ft forwards; step 3: prior, then ft
                mm.interrupt_current_processing(True)
        hooks.append(m["model"].model.diffusion_model.output_blocks[4][1].register_forward_hook(hook))
    try:
        with pytest.raises(mm.InterruptProcessingException):
            _job(m, tmp_path, "cancel", steps=steps, node_id="c").prepare().run()
    finally:
        for h in hooks:
            h.remove()
        monkeypatch.setattr(tj, "send", real_send)
        mm.interrupt_current_processing(False)
    run = m["runs"].RUNS.get("c")
    assert run.status == "cancelled" and "resumable" in run.message
    assert (tmp_path / "runs" / "cancel" / "step_000002.pt").exists()
    assert not (tmp_path / "loras" / "cancel.safetensors").exists()
    unet = m["model"].model.diffusion_model
    assert not hasattr(unet, "peft_config") and not any("forward" in vars(x) for x in unet.modules())

    res = _job(m, tmp_path, "cancel", steps=steps, resume=True, node_id="c").prepare().run()
    assert res.resumed_from == 2 and res.steps_done == steps
    assert [h["step"] for h in res.history] == list(range(1, steps + 1))
    a, b = m["ref"], _lora_tensors(res.lora_path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bad_inputs_raise_actionable_errors_and_leave_the_model_clean(m, tmp_path, monkeypatch):
    from apt_core.errors import AptDatasetError, AptModelError, NonFiniteLossError

    before = _sample(m["model"])
    with pytest.raises(AptModelError, match="not SDXL"):
        _job(m, tmp_path, "sd15", model=m["fixture"].build_model(0, "sd15")).prepare()
    with pytest.raises(AptDatasetError, match="empty"):
        _job(m, tmp_path, "empty", dataset=m["dataset"].AptDataset((), 64)).prepare()
    with pytest.raises(NonFiniteLossError, match="NaN/inf at step 1") as err:
        _job(m, tmp_path, "nan", dataset=_dataset(m, nan=True)).prepare().run()
    assert "Lower the learning rate" in str(err.value)
    assert m["runs"].RUNS.get("n1").status == "error"

    def oom(self, *a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(m["comfy_backbone"].ComfySDXLBackbone, "predict", oom)
    with pytest.raises(m["train_job"].AptOutOfMemoryError, match="Low VRAM") as err:
        _job(m, tmp_path, "oom").prepare().run()
    assert "resolution" in str(err.value) and "Tried to allocate" in str(err.value)
    monkeypatch.undo()
    unet = m["model"].model.diffusion_model
    assert not hasattr(unet, "peft_config") and not any("forward" in vars(x) for x in unet.modules())
    assert torch.equal(_sample(m["model"]), before)
