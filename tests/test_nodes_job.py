"""TrainJob (the APT Trainer node's work) in process, on the tiny fixture MODEL/CLIP/VAE.

The fixture builds a real ComfyUI SDXL model, a real comfy.sd.CLIP (SDXL classes, tiny configs)
and a real comfy.sd.VAE, inside torch.inference_mode() like ComfyUI's loaders do.
"""

from __future__ import annotations

import dataclasses
import math
import re
import sys
from pathlib import Path

import numpy as np
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
         checkpoint_every=0, save_step_loras=False, preview_every=0, preview_prompts="", **cfg):
    config = m["settings"].build_config(steps=steps, rank=4, learning_rate=cfg.pop("learning_rate", 1e-3), seed=0,
                                        checkpoint_every=checkpoint_every,
                                        preset=cfg.pop("preset", m["settings"].DEFAULT_PRESET))
    return m["train_job"].TrainJob(
        model=model or m["model"], clip=m["clip"], vae=m["vae"], config=config,
        dataset=_dataset(m) if dataset is None else dataset,
        lora_file=f"{name}.safetensors", loras_dir=tmp_path / "loras", checkpoint_dir=tmp_path / "runs" / name,
        overwrite=overwrite, resume=resume, node_id=node_id, save_step_loras=save_step_loras,
        preview_every=preview_every, preview_prompts=preview_prompts)


def _preview_job(m, tmp_path, name, every, steps=4, **kw):
    """A job on the dataset with its subject ('sks dog') known, previews every `every` steps."""
    kw.setdefault("dataset", dataclasses.replace(_dataset(m), subject="sks dog"))
    return _job(m, tmp_path, name, steps=steps, node_id=name, learning_rate=5e-2, preview_every=every, **kw)


def _sample(model, seed=0, dtype=torch.float32):
    """The original UNet's output for a fixed input (what sampling with the MODEL computes)."""
    base = model.model
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, 8, 8, generator=g).to(dtype)
    ctx = torch.randn(1, 77, 80, generator=g).to(dtype)
    y = torch.randn(1, base.adm_channels, generator=g).to(dtype)
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
    assert ex.cond.free_tokens is None
    # the trigger word's tokens are the ones ComfyUI's CLIP-L tokenizer gives for it alone
    free = enc.cache_dataset(list(ds.records), base, m["clip"], m["vae"], context_dim=80, adm_channels=96,
                             aa_free_words=["sks"]).examples[0].cond
    ids = m["clip"].tokenizer.clip_l.tokenizer(ds.records[0].caption)["input_ids"]
    sks = m["clip"].tokenizer.clip_l.tokenizer("sks")["input_ids"][1:-1]
    where = [i for i in range(len(ids)) if any(ids[j:j + len(sks)] == sks for j in range(i - len(sks) + 1, i + 1))]
    assert where and free.free_tokens.nonzero()[:, 1].tolist() == where
    assert torch.equal(free.context, ex.cond.context)
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
    assert not list((tmp_path / "loras").glob(".*tmp"))
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


def test_fp16_host_weights_train_in_fp16_autocast_and_stay_bit_identical(m, tmp_path):
    """ComfyUI usually loads SDXL in fp16. The LoRA trains in fp32 under fp16 autocast with loss
    scaling (CPU here: torch's CPU autocast cannot run bf16 over fp16 GroupNorm weights, which
    CUDA autocast computes in fp32), and the shared fp16 model stays untouched."""
    with torch.inference_mode():
        model = m["fixture"].build_model(0, "sdxl", dtype=torch.float16)
    base = model.model
    assert next(base.diffusion_model.parameters()).dtype == torch.float16

    before = _sample(model, dtype=torch.float16)
    job = _job(m, tmp_path, "half", model=model, learning_rate=1e-2).prepare()
    job.config.train.mixed_precision = "fp16"
    res = job.run()
    assert res.steps_done == STEPS and all(math.isfinite(h["loss"]) for h in res.history)
    tensors = _lora_tensors(res.lora_path)
    assert {t.dtype for t in tensors.values()} == {torch.float16}
    assert any(float(t.abs().max()) > 0 for k, t in tensors.items() if k.endswith("lora_up.weight"))
    loaded, not_loaded = ch.comfy_lora_load_report(model, res.lora_path)
    assert not_loaded == [] and loaded == len(tensors)
    assert torch.equal(_sample(model, dtype=torch.float16), before)
    assert all(p.dtype == torch.float16 for p in base.diffusion_model.parameters())


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


# ---- a LoRA file at every checkpoint (save_lora_every_checkpoint) -----------------------------------

def _stop_at(m, monkeypatch, node_id, step):
    """Request a graceful stop (the node's Stop button) when the progress event of `step` goes out."""
    tj = m["train_job"]
    real_send = tj.send

    def send(event, data):
        real_send(event, data)
        if event == "apt.progress" and data["step"] == step:
            assert m["runs"].RUNS.request_stop(node_id) is not None
    monkeypatch.setattr(tj, "send", send)


def test_every_checkpoint_also_saves_a_loadable_step_lora(m, tmp_path):
    from safetensors import safe_open

    loras = tmp_path / "loras"
    res = _job(m, tmp_path, "steps", steps=6, checkpoint_every=2, save_step_loras=True,
               node_id="stepper").prepare().run()
    names = ["steps_step00002.safetensors", "steps_step00004.safetensors", "steps_step00006.safetensors"]
    assert res.step_files == names and res.summary()["step_files"] == names
    assert sorted(p.name for p in loras.iterdir()) == sorted(names + ["steps.safetensors"])  # no *.tmp left
    files = {n: _lora_tensors(loras / n) for n in names}
    final = _lora_tensors(res.lora_path)
    for name, tensors in files.items():
        assert tensors.keys() == final.keys()
        loaded, not_loaded = ch.comfy_lora_load_report(m["model"], loras / name)  # what LoraLoader does
        assert not_loaded == [] and loaded == len(tensors)
        with safe_open(str(loras / name), "pt") as f:
            meta = f.metadata()
        assert meta["ss_steps"] == str(int(name[-17:-12])) and meta["ss_output_name"] == name[:-12]
    a, b, c = (files[n] for n in names)
    for earlier, later in ((a, b), (b, c), (a, c)):  # each step's file holds that step's weights
        assert any(not torch.equal(earlier[k], later[k]) for k in earlier)
    assert all(torch.equal(c[k], final[k]) for k in c)  # the last checkpoint is the final LoRA
    msg = m["runs"].RUNS.get("stepper").message
    assert msg.startswith("finished at step 6; saved steps.safetensors") and all(n in msg for n in names)
    # off (the default): only the final file, as before
    res = _job(m, tmp_path, "nosteps", steps=2, checkpoint_every=1).prepare().run()
    assert res.step_files == [] and not list(loras.glob("nosteps_step*"))


def test_step_loras_are_never_replaced_silently_but_a_resumed_run_may_redo_its_own(m, tmp_path, monkeypatch):
    from apt_core.errors import AptOutputError

    loras, ckpts = tmp_path / "loras", tmp_path / "runs" / "own"
    # every=1, stopped after step 2: step files 1 and 2, checkpoints 1 and 2, the final file
    _stop_at(m, monkeypatch, "own", 2)
    res = _job(m, tmp_path, "own", steps=3, checkpoint_every=1, save_step_loras=True, node_id="own").prepare().run()
    monkeypatch.undo()
    assert res.stopped and res.step_files == ["own_step00001.safetensors", "own_step00002.safetensors"]
    step2 = _lora_tensors(loras / "own_step00002.safetensors")
    # lose the last checkpoint: the resumed run replays step 2 and rewrites its own step-2 file
    (ckpts / "step_000002.pt").unlink()
    res = _job(m, tmp_path, "own", steps=3, checkpoint_every=1, save_step_loras=True, resume=True,
               node_id="own").prepare().run()
    assert res.resumed_from == 1 and res.steps_done == 3
    assert res.step_files == ["own_step00002.safetensors", "own_step00003.safetensors"]
    again = _lora_tensors(loras / "own_step00002.safetensors")
    assert all(torch.equal(step2[k], again[k]) for k in step2)  # bit-exact replay of step 2

    # a run from scratch under that name: refused before anything is touched, without overwrite ...
    (loras / "own.safetensors").unlink()  # even with the final file gone (moved away by the artist)
    before = {p.name: p.stat().st_mtime_ns for p in loras.iterdir()}
    kept_ckpts = sorted(p.name for p in ckpts.iterdir())
    with pytest.raises(AptOutputError, match=r"Step LoRAs .*own_step00001\.safetensors.*overwrite"):
        _job(m, tmp_path, "own", steps=2, checkpoint_every=1, save_step_loras=True, node_id="own").prepare()
    assert {p.name: p.stat().st_mtime_ns for p in loras.iterdir()} == before
    assert sorted(p.name for p in ckpts.iterdir()) == kept_ckpts
    # ... while with resume on, the finished run writes its final LoRA again from its last checkpoint,
    # without training and without touching its step files
    res = _job(m, tmp_path, "own", steps=3, checkpoint_every=1, save_step_loras=True, resume=True,
               node_id="own").prepare().run()
    assert res.resumed_from == 3 and res.steps_done == 3 and res.step_files == []
    assert {p.name: p.stat().st_mtime_ns for p in loras.iterdir() if p.name != "own.safetensors"} == before
    (loras / "own.safetensors").unlink()
    # ... while a run that writes no step files (option off, or checkpoint_every 0) leaves them alone
    _job(m, tmp_path, "own", steps=2, checkpoint_every=1, node_id="own").prepare()
    _job(m, tmp_path, "own", steps=2, checkpoint_every=0, save_step_loras=True, node_id="own").prepare()
    assert sorted(p.name for p in loras.iterdir()) == [f"own_step0000{i}.safetensors" for i in (1, 2, 3)]

    # ... and with overwrite on, the earlier run's step files are replaced (stale ones removed)
    (loras / "own_step00002_old.safetensors").write_bytes(b"x")  # not a step file of 'own'
    (loras / "own2_step00001.safetensors").write_bytes(b"x")  # another LoRA's step file
    res = _job(m, tmp_path, "own", steps=2, checkpoint_every=2, save_step_loras=True, overwrite=True,
               learning_rate=3e-3, node_id="own").prepare().run()
    assert res.resumed_from == 0 and res.step_files == ["own_step00002.safetensors"]
    assert sorted(p.name for p in loras.iterdir()) == [
        "own.safetensors", "own2_step00001.safetensors", "own_step00002.safetensors", "own_step00002_old.safetensors"]
    new2 = _lora_tensors(loras / "own_step00002.safetensors")
    assert any(not torch.equal(step2[k], new2[k]) for k in step2)


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


# ---- out of memory inside training (item: GPU-path robustness, testable on CPU) -------------------

def _reference_lora(m, tmp_path, steps=4):
    if "ref" not in m:  # the uninterrupted run (also used by the cancel tests)
        m["ref"] = _lora_tensors(_job(m, tmp_path / "ref", "ref", steps=steps).prepare().run().lora_path)
    return m["ref"]


@pytest.mark.parametrize("error", ["torch", "runtime"])
def test_oom_in_training_keeps_the_last_good_step_frees_memory_and_leaves_the_model_identical(
        m, tmp_path, monkeypatch, error):
    import comfy.model_management as mm

    steps = 4
    ref = _reference_lora(m, tmp_path, steps)
    before = _sample(m["model"])
    cb, tj = m["comfy_backbone"], m["train_job"]
    real_predict = cb.ComfySDXLBackbone.predict
    calls = {"n": 0}

    def predict(self, *a, **k):  # the 3rd step's fine-tuned forward (after its prior forward) fails
        calls["n"] += 1
        if calls["n"] == 2 * 2 + 2:
            if error == "torch":
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            raise RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be ...")
        return real_predict(self, *a, **k)

    unet = m["model"].model.diffusion_model
    released = []
    real_empty = mm.soft_empty_cache

    def soft_empty_cache(*a, **k):  # when memory is handed back, the LoRA must already be gone
        released.append(not hasattr(unet, "peft_config") and not any("forward" in vars(x) for x in unet.modules()))
        return real_empty(*a, **k)

    monkeypatch.setattr(cb.ComfySDXLBackbone, "predict", predict)
    monkeypatch.setattr(mm, "soft_empty_cache", soft_empty_cache)
    with pytest.raises(tj.AptOutOfMemoryError) as err:
        _job(m, tmp_path, "oom", steps=steps, node_id="oom").prepare().run()
    monkeypatch.undo()
    msg = str(err.value)
    for part in ("Out of GPU memory at step 3 of 4", "Low VRAM", "lower resolution", "smaller rank",
                 "step_000002.pt", "resume", "out of memory"):
        assert part in msg, (part, msg)
    assert "\n" not in msg  # only the first line of PyTorch's message
    assert released and all(released)
    ckpt = tmp_path / "runs" / "oom" / "step_000002.pt"
    assert ckpt.exists() and [p.name for p in (tmp_path / "runs" / "oom").iterdir()] == ["step_000002.pt"]
    assert not (tmp_path / "loras" / "oom.safetensors").exists()
    run = m["runs"].RUNS.get("oom")
    assert run.status == "error" and "Low VRAM" in run.message
    assert not hasattr(unet, "peft_config") and not any("forward" in vars(x) for x in unet.modules())
    assert torch.equal(_sample(m["model"]), before)  # the shared MODEL is bit-identical
    assert torch.equal(_sample_loaded(m["model"]), before)
    # the saved state is the one before the failing step: resuming gives the uninterrupted LoRA exactly
    res = _job(m, tmp_path, "oom", steps=steps, resume=True, node_id="oom").prepare().run()
    assert res.resumed_from == 2 and res.steps_done == steps
    got = _lora_tensors(res.lora_path)
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)


def test_oom_before_the_first_step_and_with_low_vram_already_on(m, tmp_path, monkeypatch):
    cb, tj = m["comfy_backbone"], m["train_job"]

    def predict(self, *a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")
    monkeypatch.setattr(cb.ComfySDXLBackbone, "predict", predict)
    low = "Low VRAM (12-16 GB): gradient checkpointing"
    with pytest.raises(tj.AptOutOfMemoryError) as err:
        _job(m, tmp_path, "oom0", steps=3, preset=low).prepare().run()
    msg = str(err.value)
    assert "at step 1 of 3" in msg and "Low VRAM" not in msg.split("(PyTorch")[0].split("Try")[1]
    assert "Checkpoints saved before the failure are kept" in msg
    assert not (tmp_path / "runs" / "oom0").exists() or not list((tmp_path / "runs" / "oom0").iterdir())
    unet = m["model"].model.diffusion_model
    assert not hasattr(unet, "peft_config") and not any("forward" in vars(x) for x in unet.modules())


# ---- batch size, LR schedule + warmup, pixel-space augmentation ----------------------------------

def test_batch_size_schedule_and_warmup_reach_the_training_loop(m, tmp_path):
    s = m["settings"]
    config = s.build_config(steps=4, rank=4, learning_rate=1e-3, seed=0, checkpoint_every=0, preset=s.DEFAULT_PRESET,
                            batch_size=2, lr_schedule="cosine", warmup_steps=2)
    job = m["train_job"].TrainJob(model=m["model"], clip=m["clip"], vae=m["vae"], config=config, dataset=_dataset(m),
                                  lora_file="sched.safetensors", loras_dir=tmp_path / "loras",
                                  checkpoint_dir=tmp_path / "runs" / "sched", overwrite=False, resume=False,
                                  node_id="sched")
    res = job.prepare().run()
    lrs = [h["lr"] for h in res.history]
    assert lrs == pytest.approx([5e-4, 1e-3, 1e-3, 5e-4])  # warmup 1/2, 2/2, then cosine from the top
    assert all(len(h["timesteps"]) == 2 for h in res.history)  # two images per step


def test_pixel_encoder_matches_the_vae_and_pixel_space_augmentation_reencodes(m, tmp_path, monkeypatch):
    enc, tj = m["encoding"], m["train_job"]
    ds = _dataset(m, 2)
    base = m["model"].model
    px = torch.stack([r.pixels for r in ds.records])
    with torch.no_grad():
        want = base.process_latent_in(m["vae"].encode(enc.to_comfy_image(px)).float())
    torch.testing.assert_close(enc.pixel_encoder(m["vae"], base)(px), want.float())
    cached = enc.cache_dataset(list(ds.records), base, m["clip"], m["vae"], context_dim=80, adm_channels=96,
                               keep_pixels=True)
    assert all(torch.equal(ex.pixels, r.pixels) for ex, r in zip(cached.examples, ds.records))

    from apt_core.indicator import OverfittingIndicator

    # every sample augmented (gamma = 1), so each step must go through the VAE
    monkeypatch.setattr(OverfittingIndicator, "gamma_for", lambda self, bins: torch.ones(len(bins)))
    seen = []
    real = tj.pixel_encoder

    def spy(vae, base_model):
        f = real(vae, base_model)

        def encode(p):
            seen.append(tuple(p.shape))
            return f(p)
        return encode
    monkeypatch.setattr(tj, "pixel_encoder", spy)
    s = m["settings"]
    ata = s.ata_settings(num_bins=10, ema_alpha=0.1, indicator_scale=1000.0, p_max=1.0, zoom_min=2.0, zoom_max=3.0,
                         rotation_deg=15.0, fill="constant", adaptive_augmentation=True,
                         adaptive_loss_weight=True, track_indicator=False, space="pixel_every_step")
    config = s.build_config(steps=3, rank=4, learning_rate=1e-3, seed=0, checkpoint_every=0, preset=s.DEFAULT_PRESET,
                            ata=ata)
    before = _sample(m["model"])
    job = tj.TrainJob(model=m["model"], clip=m["clip"], vae=m["vae"], config=config, dataset=_dataset(m),
                      lora_file="pix.safetensors", loras_dir=tmp_path / "loras",
                      checkpoint_dir=tmp_path / "runs" / "pix",
                      overwrite=False, resume=False, node_id="pix")
    res = job.prepare().run()
    assert seen == [(1, 3, 64, 64)] * 3 and res.history[-1]["aug_rate"] == 1.0
    assert res.lora_path.exists()
    monkeypatch.undo()
    assert torch.equal(_sample(m["model"]), before)


def test_default_pixel_space_encodes_the_variants_with_the_vae_before_training(m, tmp_path, monkeypatch):
    from apt_core.augment import variant_grid, zoom_rotate
    from apt_core.config import AugmentConfig
    from apt_core.indicator import OverfittingIndicator

    enc, tj = m["encoding"], m["train_job"]
    ds = _dataset(m, 2)
    base = m["model"].model
    aug = AugmentConfig(variant_grid=(2, 1))
    cached = enc.cache_dataset(list(ds.records), base, m["clip"], m["vae"], context_dim=80, adm_channels=96,
                               variants_for=aug)
    grid = variant_grid(aug)
    assert torch.equal(cached.variant_params, grid)
    for ex, r in zip(cached.examples, ds.records):
        assert ex.pixels is None and ex.variants.shape == (2, *ex.latent.shape)
        for k, (zoom, angle) in enumerate(grid):
            warped = zoom_rotate(r.pixels[None], zoom[None], angle[None], aug.fill, -1.0)
            with torch.no_grad():
                torch.testing.assert_close(ex.variants[k], enc.encode_latents(m["vae"], base, warped)[0])

    # every sample augmented (gamma = 1), none of them encoded during training
    monkeypatch.setattr(OverfittingIndicator, "gamma_for", lambda self, bins: torch.ones(len(bins)))
    monkeypatch.setattr(tj, "pixel_encoder", lambda *a: pytest.fail("no VAE encode during training"))
    s = m["settings"]
    config = s.build_config(steps=3, rank=4, learning_rate=1e-3, seed=0, checkpoint_every=0, preset=s.DEFAULT_PRESET)
    assert config.augment.precomputed
    before = _sample(m["model"])
    job = tj.TrainJob(model=m["model"], clip=m["clip"], vae=m["vae"], config=config, dataset=_dataset(m),
                      lora_file="grid.safetensors", loras_dir=tmp_path / "loras",
                      checkpoint_dir=tmp_path / "runs" / "grid", overwrite=False, resume=False, node_id="grid")
    res = job.prepare().run()
    assert res.history[-1]["aug_rate"] == 1.0 and res.lora_path.exists()
    monkeypatch.undo()
    assert torch.equal(_sample(m["model"]), before)


def _inference_tensors(unet):
    """Weak references to the UNet's tensors, their copies, total and largest size (no strong refs kept:
    pytest's assertion rewriting would hold on to anything asserted here)."""
    import weakref

    ts = [t for mod in unet.modules() for t in [*mod._parameters.values(), *mod._buffers.values()] if t is not None]
    all_inference = all(t.is_inference() for t in ts)
    sizes = [t.numel() * t.element_size() for t in ts]
    # detach: a clone of a Parameter that requires grad would keep it alive through its grad_fn
    return [weakref.ref(t) for t in ts], [t.detach().clone() for t in ts], all_inference, sum(sizes), max(sizes)


def test_training_never_reparameterises_or_copies_the_shared_unet(m, tmp_path):
    """The host's adapters and per-op casts do the work: every Parameter of the shared UNet is the
    same object, still the inference tensor ComfyUI loaded, with the same values, after a run."""
    with torch.inference_mode():
        model = m["fixture"].build_model(1, "sdxl")
    unet = model.model.diffusion_model
    params = dict(unet.named_parameters())
    values = {n: p.clone() for n, p in params.items()}
    assert all(p.is_inference() for p in params.values())
    res = _job(m, tmp_path, "noswap", model=model, learning_rate=1e-2).prepare().run()
    assert res.steps_done == STEPS
    after = dict(unet.named_parameters())
    assert after.keys() == params.keys() and all(after[n] is p and p.is_inference() for n, p in params.items())
    assert all(torch.equal(values[n], p) for n, p in after.items())
    assert not any(vars(x).get("weight_function") or vars(x).get("bias_function") for x in unet.modules())


def _dynamic_model(m, seed):
    """A MODEL the way ComfyUI v0.33's loader hands it out under dynamic VRAM: a dynamic patcher whose
    weights stay on the offload device (here `meta`: unreadable, so any use of them fails) and whose
    loader factory (`cached_patcher_init`) can load a non-dynamic copy. ComfyUI reroutes a dynamic
    patcher on a CPU load device to a plain one, so `is_dynamic` is the only stubbed part."""
    import comfy.model_patcher as mp

    calls = []

    def load(disable_dynamic=False):  # what Load Checkpoint registers (comfy.sd.load_checkpoint_guess_config)
        calls.append((disable_dynamic, torch.is_inference_mode_enabled()))
        return m["fixture"].build_model(seed, "sdxl")

    with torch.inference_mode():
        model = m["fixture"].build_model(seed, "sdxl")
    model.model.diffusion_model.to("meta")
    dynamic = type("FakeDynamicPatcher", (mp.ModelPatcher,), {"is_dynamic": lambda self: True})
    patcher = dynamic(model.model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))
    patcher.cached_patcher_init = (load, ())
    return patcher, calls


def test_dynamic_vram_model_trains_on_the_load_device_through_the_hosts_delegate(m, tmp_path):
    """ComfyUI v0.33+: weights on the offload device, compute on the patcher's load device. Training
    must run on the load device through the host's non-dynamic delegate (loaded outside inference
    mode), never touch the shared weights, and give the LoRA the resident model gives."""
    import inspect

    import comfy.model_patcher as mp

    if "disable_dynamic" not in inspect.signature(mp.ModelPatcher.clone).parameters:
        pytest.skip("this ComfyUI has no dynamic VRAM (0.3.75): nothing to delegate")
    patcher, calls = _dynamic_model(m, 2)
    res = _job(m, tmp_path, "dyn", model=patcher, learning_rate=1e-2).prepare().run()
    assert res.steps_done == STEPS and calls == [(True, False)]
    assert all(p.device.type == "meta" for p in patcher.model.diffusion_model.parameters())  # untouched
    with torch.inference_mode():
        resident = m["fixture"].build_model(2, "sdxl")
    want = _job(m, tmp_path, "res", model=resident, learning_rate=1e-2).prepare().run()
    got, ref = _lora_tensors(res.lora_path), _lora_tensors(want.lora_path)
    assert got.keys() == ref.keys()
    assert all(torch.equal(got[k], ref[k]) for k in ref)


def test_class_preservation_draws_class_images_with_the_host_model_and_trains_on_them(m, tmp_path, monkeypatch):
    from apt_core.preservation import draw_class_latents
    from apt_core.trainer import AptTrainer

    s, tj = m["settings"], m["train_job"]
    reg = s.reg_settings(lambda_rs=0.01, lambda_aa=0.01, resolutions=s.DEFAULT_RESOLUTIONS,
                         class_preservation=1.0, class_images=3, trigger_word="sks")
    config = s.build_config(steps=2, rank=4, learning_rate=1e-3, seed=0, checkpoint_every=0,
                            preset=s.DEFAULT_PRESET, reg=reg)
    assert (config.regularizers.lambda_preserve, config.regularizers.class_images) == (1.0, 3)
    seen = {}
    real_draw, real_init = draw_class_latents, AptTrainer.__init__
    preservation = sys.modules[tj.load_or_draw_class_latents.__module__]  # where the job's draw is looked up
    monkeypatch.setattr(preservation, "draw_class_latents",
                        lambda *a, **k: seen.setdefault("latents", real_draw(*a, **k)))
    monkeypatch.setattr(AptTrainer, "__init__",
                        lambda self, backbone, dataset, *a, **k: seen.setdefault("classes", dataset.class_examples)
                        and real_init(self, backbone, dataset, *a, **k))
    before = _sample(m["model"])
    job = tj.TrainJob(model=m["model"], clip=m["clip"], vae=m["vae"], config=config, dataset=_dataset(m),
                      lora_file="cls.safetensors", loras_dir=tmp_path / "loras",
                      checkpoint_dir=tmp_path / "runs" / "cls", overwrite=False, resume=False, node_id="cls")
    res = job.prepare().run()
    assert res.lora_path.exists() and res.history[-1]["loss_preserve"] > 0  # step 1: LoRA B = 0, term 0
    classes = seen["classes"]
    assert len(classes) == 3 and seen["latents"].shape == (3, 4, 8, 8)
    assert all(torch.isfinite(ex.latent).all() for ex in classes)
    assert [ex.caption for ex in classes] == ["a photo of dog in snow", "a photo of dog on grass",
                                              "a photo of dog in snow"]
    assert torch.equal(_sample(m["model"]), before)  # drawing and training left the host model as it was

    # A second run of the same LoRA name on the same model and captions reuses them without drawing.
    monkeypatch.setattr(preservation, "draw_class_latents", lambda *a, **k: pytest.fail("drew the class images again"))
    seen.clear()
    again = tj.TrainJob(model=m["model"], clip=m["clip"], vae=m["vae"], config=config, dataset=_dataset(m),
                        lora_file="cls.safetensors", loras_dir=tmp_path / "loras",
                        checkpoint_dir=tmp_path / "runs" / "cls", overwrite=True, resume=False, node_id="cls")
    assert again.prepare().run().lora_path.exists()
    assert all(torch.equal(a.latent, b.latent) for a, b in zip(seen["classes"], classes))


def test_class_preservation_settings_need_a_trigger_word_and_images(m):
    from apt_core.errors import AptConfigError

    s = m["settings"]
    kw = dict(lambda_rs=0.01, lambda_aa=0.01, resolutions=s.DEFAULT_RESOLUTIONS)
    with pytest.raises(AptConfigError, match="trigger word"):
        s.reg_settings(**kw, class_preservation=1.0, trigger_word=" ")
    with pytest.raises(AptConfigError, match="at least 1 class image"):
        s.reg_settings(**kw, class_preservation=1.0, class_images=0)
    off = s.reg_settings(**kw, class_preservation=0.0)["regularizers"]
    from apt_core.errors import AptDatasetError
    on = s.reg_settings(**kw, class_preservation=1.0, trigger_word="ohwx")
    config = s.build_config(steps=1, rank=4, learning_rate=1e-3, seed=0, checkpoint_every=0,
                            preset=s.DEFAULT_PRESET, reg=on)
    job = m["train_job"].TrainJob(model=m["model"], clip=m["clip"], vae=m["vae"], config=config, dataset=_dataset(m),
                                  lora_file="x.safetensors", loras_dir="/nonexistent", checkpoint_dir="/nonexistent",
                                  overwrite=False, resume=False, node_id="x")
    with pytest.raises(AptDatasetError, match="does not contain the trigger word"):  # before any work
        job.prepare()
    assert (off["lambda_preserve"], off["class_images"], off["trigger_words"]) == (0.0, 0, ())


def test_a_full_loras_disk_loses_nothing_and_the_next_queue_writes_the_lora_without_training(
        m, tmp_path, full_disk, monkeypatch):
    from apt_core.errors import AptOutputError
    from apt_core.trainer import AptTrainer

    job = _job(m, tmp_path, "full", learning_rate=1e-2)
    job.loras_dir = full_disk.path / "loras"
    with pytest.raises(AptOutputError, match="is full") as err:
        job.prepare().run()
    kept = tmp_path / "runs" / "full" / f"step_{STEPS:06d}.pt"
    assert kept.exists() and str(kept) in str(err.value) and "without training again" in str(err.value)
    assert not list(full_disk.path.rglob("*.safetensors*"))
    full_disk.free()
    steps = []
    real = AptTrainer.train_step
    monkeypatch.setattr(AptTrainer, "train_step", lambda self: steps.append(1) or real(self))
    again = _job(m, tmp_path, "full", learning_rate=1e-2, resume=True)
    again.loras_dir = full_disk.path / "loras"
    res = again.prepare().run()
    assert steps == [] and res.resumed_from == STEPS and res.lora_path.exists()
    want = _job(m, tmp_path / "ref", "full", learning_rate=1e-2).prepare().run()
    got, ref = _lora_tensors(res.lora_path), _lora_tensors(want.lora_path)
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)


def test_a_full_output_disk_still_saves_the_lora(m, tmp_path, full_disk):
    job = _job(m, tmp_path, "ck", learning_rate=1e-2)
    job.checkpoint_dir = full_disk.path / "runs" / "ck"
    res = job.prepare().run()
    assert res.lora_path.exists() and res.checkpoint is None
    assert "final checkpoint could not be saved" in m["runs"].RUNS.get("n1").message


def test_resume_refuses_a_checkpoint_made_from_other_images(m, tmp_path, monkeypatch):
    from apt_core.errors import AptConfigError

    _stop_at(m, monkeypatch, "rs", 2)
    res = _job(m, tmp_path, "rs", node_id="rs").prepare().run()
    monkeypatch.undo()
    assert res.stopped and res.steps_done == 2
    (tmp_path / "loras" / "rs.safetensors").unlink()
    other = m["dataset"].AptDataset(tuple(__import__("tiny").generated_records(3, 64, seed=7)), 64)
    with pytest.raises(AptConfigError, match="other images or captions.*turn 'resume' off"):
        _job(m, tmp_path, "rs", node_id="rs", resume=True, dataset=other).prepare().run()
    assert (tmp_path / "runs" / "rs" / "step_000002.pt").exists()  # nothing deleted
    res = _job(m, tmp_path, "rs", node_id="rs", resume=True).prepare().run()  # the same images: continues
    assert res.resumed_from == 2 and res.steps_done == STEPS


def test_prepare_removes_the_temp_files_a_killed_save_left(m, tmp_path):
    from apt_core.export import TEMP_SUFFIX

    (tmp_path / "loras").mkdir()
    (tmp_path / "runs" / "tmpd").mkdir(parents=True)
    stale = [tmp_path / "loras" / f".tmpd.safetensors.x1{TEMP_SUFFIX}",
             tmp_path / "runs" / "tmpd" / f".step_000002.pt.x2{TEMP_SUFFIX}"]
    kept = tmp_path / "loras" / f".tmpd_v2.safetensors.x3{TEMP_SUFFIX}"  # another LoRA's: not ours to delete
    for p in [*stale, kept]:
        p.write_bytes(b"half a file")
        __import__("os").utime(p, (0, 0))  # left by a run killed long ago
    _job(m, tmp_path, "tmpd").prepare()
    assert not any(p.exists() for p in stale) and kept.exists()


def test_every_long_phase_before_training_reports_counts_and_time_left(m, tmp_path, monkeypatch):
    """Encoding the images with their augmentation variants and drawing class images show
    'what done/total, about Ns left' in the node (apt.status) and move ComfyUI's progress bar."""
    import comfy.utils

    s, tj = m["settings"], m["train_job"]
    reg = s.reg_settings(lambda_rs=0.01, lambda_aa=0.01, class_preservation=1.0, class_images=4, trigger_word="sks")
    config = s.build_config(steps=2, rank=4, learning_rate=1e-3, seed=0, checkpoint_every=0,
                            preset=s.DEFAULT_PRESET, reg=reg)
    messages, bars = [], []
    real_send = tj.send
    monkeypatch.setattr(tj, "send", lambda event, data: (messages.append(data.get("message")) if event == "apt.status"
                                                         else None, real_send(event, data))[1])
    monkeypatch.setattr(tj.PhaseProgress, "MIN_INTERVAL", 0.0)  # every update goes out
    hook = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: bars.append((value, total)))
    try:
        job = tj.TrainJob(model=m["model"], clip=m["clip"], vae=m["vae"], config=config, dataset=_dataset(m),
                          lora_file="phases.safetensors", loras_dir=tmp_path / "loras",
                          checkpoint_dir=tmp_path / "runs" / "phases", overwrite=False, resume=False, node_id="ph")
        assert job.prepare().run().lora_path.exists()
    finally:
        comfy.utils.set_progress_bar_global_hook(hook)
    total = 3 * (1 + 24)  # 3 images and their 8 x 3 variants
    enc = [x for x in messages if x and x.startswith("encoding images and variants ")]
    assert enc[-1] == f"encoding images and variants {total}/{total}"
    assert any(re.fullmatch(rf"encoding images and variants \d+/{total}, about \d+s left", x) for x in enc)
    draw = [x for x in messages if x and x.startswith("drawing class images ")]
    assert draw[-1] == "drawing class images 4/4" and len(draw) > 2
    assert "loading the model onto cpu" in messages
    assert (total, total) in bars and (4, 4) in bars and (2, 2) in bars  # encoding, drawing, training


def test_loading_the_model_shows_the_time_it_has_taken(m, monkeypatch):
    """Loading has no counts from the host: the node shows the seconds so far, every second, and the
    ticker stops with the block (also on an error)."""
    import time

    tj, runs = m["train_job"], m["runs"]
    run = runs.RUNS.start("ticker")
    sent = []
    monkeypatch.setattr(tj, "send", lambda event, data: sent.append(data["message"]))
    with tj._elapsed_status(run, "loading the model onto cpu", every=0.05):
        time.sleep(0.3)
    assert sent[0] == "loading the model onto cpu"
    assert re.fullmatch(r"loading the model onto cpu \(0s\)", sent[1]), sent
    n = len(sent)
    with pytest.raises(RuntimeError):
        with tj._elapsed_status(run, "x", every=0.05):
            raise RuntimeError("load failed")
    time.sleep(0.2)
    assert len(sent) == n + 1  # only the first message: the ticker stopped with the error


# ---- previews while training ---------------------------------------------------------------------

def test_previews_render_at_their_steps_without_changing_the_training(m, tmp_path, monkeypatch):
    """Previews every 2 steps (and step 0, the base model): PNGs of the training size in the run
    folder, listed in previews/index.json with step, prompt, seed and the step LoRA of that step;
    the LoRA trained with previews is bit-identical to the one trained without; a preview shows
    what the saved step LoRA renders through ComfyUI's own LoRA loading, same seed and prompt."""
    import comfy.sd
    import comfy.utils
    from PIL import Image

    tj, pv = m["train_job"], sys.modules[m["train_job"].Previewer.__module__]
    ds = dataclasses.replace(_dataset(m), subject="sks dog")
    sent = []
    real_send = tj.send
    monkeypatch.setattr(tj, "send", lambda e, d: (sent.append((e, d)), real_send(e, d))[1])

    def job(name, every):
        return _preview_job(m, tmp_path, name, every, dataset=ds, checkpoint_every=2, save_step_loras=True)

    import comfy.model_management as mm
    vae_loaded_after = []
    real_render = pv.Previewer.render

    def render(self, *a, **kw):  # the VAE a preview loaded is let go before training goes on
        out = real_render(self, *a, **kw)
        vae_loaded_after.append(any(lm.model is self.vae.patcher for lm in mm.current_loaded_models))
        return out

    monkeypatch.setattr(pv.Previewer, "render", render)
    with_previews = job("prev", 2).prepare().run()
    assert vae_loaded_after == [False, False, False]
    without = job("plain", 0).prepare().run()
    got, ref = _lora_tensors(with_previews.lora_path), _lora_tensors(without.lora_path)
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref), "previews changed training"

    run_dir = tmp_path / "runs" / "prev"
    index = pv.read_index(run_dir)
    prompts = pv.preview_prompts([r.caption for r in ds.records], "sks dog")
    assert len(prompts) == 3 and "sks dog" in prompts[1]
    assert [(p["step"], p["prompt"], p["seed"]) for p in index["images"]] == \
        [(s, p, i) for s in (0, 2, 4) for i, p in enumerate(prompts)]
    assert [p["lora_file"] for p in index["images"] if p["step"] == 2] == ["prev_step00002.safetensors"] * 3
    assert index["seconds"] > 0
    for p in index["images"]:
        with Image.open(run_dir / p["file"]) as im:
            assert im.format == "PNG" and im.size == (ds.resolution, ds.resolution)
    assert not (tmp_path / "runs" / "plain" / pv.PREVIEW_DIR).exists()
    assert [d["step"] for e, d in sent if e == "apt.previews" and d["node"] == "prev"] == [0, 2, 4]
    step_s = 1.0 / np.median([h["it_per_s"] for h in without.history])
    print(f"tiny CPU model, 64 px: {index['seconds'] / len(index['images']):.3f} s per preview prompt "
          f"({pv.STEPS} sampler steps + VAE), {step_s:.3f} s per APT training step")
    # the run reports the time previews took, and those still to come count in the ETA
    assert with_previews.summary()["preview_seconds"] == pytest.approx(index["seconds"], abs=1e-3)
    j = job("eta", 2)
    j.previewer = pv.Previewer(None, None, None, ["p"], tmp_path, (64, 64), seconds=6.0, renders=2)
    assert j._preview_eta(1, 4) == pytest.approx(6.0)  # steps 2 and 4 left, 3 s each
    assert j._preview_eta(3, 4) == pytest.approx(3.0) and j._preview_eta(4, 4) == 0.0
    j.preview_every = 3
    assert j._preview_eta(0, 7) == pytest.approx(9.0)  # steps 3, 6 and the last, 7
    assert without.summary()["preview_seconds"] == 0.0

    # the step-2 preview is what the saved step-2 LoRA renders, loaded the host's way
    lora = comfy.utils.load_torch_file(str(tmp_path / "loras" / "prev_step00002.safetensors"), safe_load=True)
    model_lora, _ = comfy.sd.load_lora_for_models(m["model"], None, lora, 1.0, 0.0)
    again = pv.Previewer(model_lora, m["vae"], m["clip"], prompts[:1], tmp_path / "again", (64, 64), seed=0)
    again.render(2)
    a = np.asarray(Image.open(tmp_path / "again" / "previews" / "step_000002_0.png"), dtype=np.int16)
    b = np.asarray(Image.open(run_dir / "previews" / "step_000002_0.png"), dtype=np.int16)
    assert np.abs(a - b).max() <= 2, np.abs(a - b).max()  # the file holds the LoRA in fp16: rounding
    base = np.asarray(Image.open(run_dir / "previews" / "step_000000_0.png"), dtype=np.int16)
    print("step 0 vs step 2 preview: max", np.abs(base - b).max(), "mean", np.abs(base - b).mean(),
          "| preview vs step LoRA render: max", np.abs(a - b).max(), "mean", np.abs(a - b).mean())
    assert np.abs(base - b).max() > 32, "the previews do not show the LoRA"


def test_a_failing_preview_turns_previews_off_and_never_costs_the_training(m, tmp_path, monkeypatch):
    """Out of memory (or a full disk) while rendering a preview: previews stop for this run, the
    training goes on to the same LoRA, and the node says why."""
    pv = sys.modules[m["train_job"].Previewer.__module__]
    real = pv.Previewer.render
    calls = []

    def render(self, step, lora_file=None, should_stop=lambda: False):
        calls.append(step)
        if step == 2:
            raise RuntimeError("CUDA error: out of memory")
        return real(self, step, lora_file, should_stop)

    monkeypatch.setattr(pv.Previewer, "render", render)
    res = _preview_job(m, tmp_path, "failing", 2).prepare().run()
    assert calls == [0, 2], "no preview after the failure, not even the last step's"
    ref = _preview_job(m, tmp_path, "ref", 0).prepare().run()
    got, want = _lora_tensors(res.lora_path), _lora_tensors(ref.lora_path)
    assert all(torch.equal(got[k], want[k]) for k in want)
    state = m["runs"].RUNS.get("failing")
    assert {p["step"] for p in state.previews} == {0} and state.status == "finished"
    assert res.steps_done == 4


def test_a_resumed_run_lists_the_previews_it_continues_and_a_new_run_starts_without(m, tmp_path):
    tj = m["train_job"]

    def job(steps, resume):
        return _preview_job(m, tmp_path, "cont", 2, steps=steps, checkpoint_every=2, overwrite=True, resume=resume,
                            preview_prompts="a photo of sks dog")

    job(2, False).prepare().run()
    job(4, True).prepare().run()  # resumes at 2
    steps = [p["step"] for p in m["runs"].RUNS.get("cont").previews]
    assert steps == [0, 2, 4]
    job(2, False).prepare().run()  # resume off: a new run under the name
    assert [p["step"] for p in m["runs"].RUNS.get("cont").previews] == [0, 2]
    index = sys.modules[tj.Previewer.__module__].read_index(tmp_path / "runs" / "cont")
    assert [p["step"] for p in index["images"]] == [0, 2]


def test_stop_during_previews_skips_the_rest_and_ends_the_run_at_that_step(m, tmp_path, monkeypatch):
    pv = sys.modules[m["train_job"].Previewer.__module__]
    real = pv.Previewer.render

    def render(self, step, lora_file=None, should_stop=lambda: False):
        if step == 2:  # the artist presses Stop while step 2's previews are being rendered
            assert m["runs"].RUNS.request_stop("stopper") is not None
        return real(self, step, lora_file, should_stop=should_stop)

    monkeypatch.setattr(pv.Previewer, "render", render)
    res = _preview_job(m, tmp_path, "stopper", 2, steps=6).prepare().run()
    assert res.stopped and res.steps_done == 2 and res.lora_path.is_file()
    assert {p["step"] for p in m["runs"].RUNS.get("stopper").previews} == {0}  # step 2's were skipped
