"""The APT nodes in the REAL ComfyUI 0.3.75 server (CPU, 127.0.0.1), one server for the module.

The pack is linked into the server's custom_nodes; the test-only pack tests/pack_fixtures/
(apt_test_models: a tiny SDXL MODEL/CLIP/VAE) is added as an extra custom_nodes path. Everything
goes through HTTP: /object_info, /prompt, /history, /interrupt, /apt/runs. Nothing is stubbed.
"""

from __future__ import annotations

import io
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import comfy_host as ch

pytestmark = pytest.mark.integration

APT_NODES = {"APTDatasetLoader", "APTCaption", "APTAtaSettings", "APTRegSettings", "APTTrainer"}
TRAINER = "10"
FAST = "Fastest (24 GB+ VRAM)"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    ch.require_comfyui()
    root = tmp_path_factory.mktemp("apt_nodes")
    srv = ch.server_with_test_models(root)
    with srv:
        subject = srv.input_dir / "subject"
        subject.mkdir()
        for i, colour in enumerate([(200, 40, 40), (40, 160, 60), (50, 60, 210)]):
            im = Image.new("RGB", (64, 64), (120, 120, 120))
            im.paste(colour, (16, 16, 48, 48))
            im.save(subject / f"ref{i}.png")
        (subject / "ref0.txt").write_text("a photo of sks dog on a red carpet", encoding="utf-8")
        (subject / "readme.md").write_text("not an image", encoding="utf-8")
        (srv.input_dir / "empty_dir").mkdir()
        yield srv


# ---- prompt building ---------------------------------------------------------------------------

def _graph(model_kind="sdxl", folder="subject"):
    return {
        "1": {"class_type": "APTTestTinySDXL", "inputs": {"seed": 0, "kind": model_kind}},
        "2": {"class_type": "APTDatasetLoader", "inputs": {"folder": folder, "resolution": 64, "default_caption": ""}},
        "3": {"class_type": "APTCaption", "inputs": {
            "dataset": ["2", 0], "trigger_word": "sks", "class_word": "dog", "context_captions": "on grass\nin snow",
            "template": "a photo of {trigger} {class}, {context}", "mode": "fill missing captions"}},
    }


def _trainer(name, steps, model=("1", 0), **kw):
    inputs = {"model": list(model), "clip": ["1", 1], "vae": ["1", 2], "dataset": ["3", 0], "steps": steps,
              "rank": 4, "learning_rate": 5e-3, "seed": 0, "checkpoint_every": 0, "lora_name": name,
              "overwrite": False, "resume": True, "memory_preset": FAST}
    inputs.update(kw)
    return {TRAINER: {"class_type": "APTTrainer", "inputs": inputs}}


def _sampler(prefix, model, base_id):
    """CLIPTextEncode x2 + EmptyLatentImage + KSampler + SaveLatent, ids base_id.."""
    b = int(base_id)
    ids = [str(b + i) for i in range(5)]
    return {
        ids[0]: {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of sks dog in snow", "clip": ["1", 1]}},
        ids[1]: {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}},
        ids[2]: {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        ids[3]: {"class_type": "KSampler", "inputs": {
            "model": list(model), "seed": 7, "steps": 3, "cfg": 2.0, "sampler_name": "euler", "scheduler": "normal",
            "positive": [ids[0], 0], "negative": [ids[1], 0], "latent_image": [ids[2], 0], "denoise": 1.0}},
        ids[4]: {"class_type": "SaveLatent", "inputs": {"samples": [ids[3], 0], "filename_prefix": prefix}},
    }


def _pass(nonce, node_id="5"):
    return {node_id: {"class_type": "APTTestModelPass", "inputs": {"model": ["1", 0], "nonce": nonce}}}


def _latent(server, prefix):
    from safetensors.torch import load_file

    files = sorted(server.output_dir.glob(f"{prefix}_*.latent"))
    assert files, f"no latent saved for {prefix}"
    return load_file(str(files[-1]))["latent_tensor"]


def _run(server, prompt, timeout=240):
    entry = server.wait_for(server.post_prompt(prompt), timeout=timeout)
    return entry


def _error(entry) -> dict:
    for event, data in entry.get("status", {}).get("messages", []):
        if event == "execution_error":
            return data
    return {}


def _run_state(server):
    try:
        return server.get_json(f"/apt/runs/{TRAINER}")
    except urllib.error.HTTPError:
        return None


def _wait_for_step(server, step, timeout=180):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = _run_state(server)
        if st and st.get("step", 0) >= step and st.get("status") == "training":
            return st
        time.sleep(0.2)
    raise TimeoutError(f"training never reached step {step}; state {_run_state(server)}\n{server.log_tail()}")


class WsCollector:
    """Collects the JSON messages the server pushes over /ws (as the browser would), in a thread."""

    def __init__(self, server):
        import asyncio
        import threading

        self.messages: list[dict] = []
        self._url = f"ws://{server.host}:{server.port}/ws?clientId={server.client_id}"
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._loop.run_until_complete, args=(self._main(),), daemon=True)
        self._thread.start()
        assert self._ready.wait(30), "websocket did not connect"

    async def _main(self):
        import aiohttp

        self._stop = __import__("asyncio").Event()
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(self._url) as ws:
                self._ready.set()
                while not self._stop.is_set():
                    try:
                        msg = await ws.receive(timeout=0.2)
                    except TimeoutError:
                        continue
                    if msg.type == aiohttp.WSMsgType.TEXT:
                        self.messages.append(json.loads(msg.data))
                    elif msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                        break

    def close(self):
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def of(self, kind):
        return [m["data"] for m in self.messages if m.get("type") == kind]


def _lora_not_loaded_lines(server):
    return [ln for ln in server.log_text().splitlines() if "lora key not loaded" in ln]


# ---- tests -------------------------------------------------------------------------------------

def test_object_info_lists_every_apt_node_and_nothing_failed_to_import(server):
    info = server.object_info()
    assert APT_NODES <= set(info), sorted(k for k in info if k.startswith("APT"))
    for node_id in APT_NODES:
        node = info[node_id]
        assert node["display_name"].startswith("APT ") and node["category"] == "APT LoRA Trainer"
        for section in ("required", "optional"):
            for name, (_, opts) in node["input"].get(section, {}).items():
                assert opts.get("tooltip"), f"{node_id}.{name} has no tooltip"
    assert info["APTTrainer"]["output"] == ["STRING", "MODEL", "STRING"] and info["APTTrainer"]["output_node"]
    assert {"APTTestTinySDXL", "APTTestModelPass"} <= set(info)
    assert server.import_failed_lines() == []
    log = server.log_text()
    assert "comfyui-apt-lora-trainer" in log and "Traceback" not in log
    assert server.get_json("/apt/runs") == {} and server.get_json("/api/apt/runs") == {}


def test_train_then_sample_with_the_lora_and_the_untouched_model(server):
    # A: the model's output before any training
    entry = _run(server, {**_graph(), **_pass(1), **_sampler("before", ("5", 0), 20)})
    assert ch.history_status(entry) == "success", _error(entry)
    before = _latent(server, "before")

    # B: train 3 steps, sample with the trainer's LoRA-applied MODEL output; watch the websocket
    ws = WsCollector(server)
    try:
        entry = _run(server, {**_graph(), **_trainer("apt_it", 3), **_sampler("preview", (TRAINER, 1), 30)})
    finally:
        ws.close()
    assert ch.history_status(entry) == "success", (_error(entry), server.log_tail())
    progress = ws.of("apt.progress")
    assert [p["step"] for p in progress] == [1, 2, 3] and all(p["node"] == TRAINER for p in progress)
    assert {"loss", "loss_denoise", "loss_rs", "loss_aa", "gamma", "it_per_s", "eta_s", "total_steps"} <= set(progress[-1])
    assert [s["status"] for s in ws.of("apt.status")][-1] == "finished"
    bar = [p for p in ws.of("progress") if p.get("node") == TRAINER]  # comfy.utils.ProgressBar
    assert bar and bar[-1]["value"] == bar[-1]["max"] == 3
    ui = entry["outputs"][TRAINER]["apt_run"][0]
    assert ui["lora_name"] == "apt_it.safetensors" and ui["steps_done"] == 3 and len(ui["final_gamma"]) == 10
    assert (server.loras_dir / "apt_it.safetensors").is_file()
    assert not list(server.loras_dir.glob(".*tmp"))
    assert "apt_it.safetensors" in server.object_info("LoraLoader")["LoraLoader"]["input"]["required"]["lora_name"][0]
    state = server.get_json(f"/apt/runs/{TRAINER}")
    assert state["status"] == "finished" and state["step"] == 3 and len(state["history"]) == 3
    assert {"loss", "loss_rs", "loss_aa", "gamma", "it_per_s", "eta_s"} <= set(state["history"][-1])
    assert len(server.get_json(f"/api/apt/runs/{TRAINER}?since=2")["history"]) == 1
    preview = _latent(server, "preview")

    # C: the original MODEL again (fresh KSampler run via a new nonce) and the file via LoraLoader
    lora = {"40": {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1],
                                                          "lora_name": "apt_it.safetensors",
                                                          "strength_model": 1.0, "strength_clip": 1.0}}}
    entry = _run(server, {**_graph(), **_pass(2), **_sampler("after", ("5", 0), 20), **lora,
                          **_sampler("with_lora", ("40", 0), 50)})
    assert ch.history_status(entry) == "success", _error(entry)
    after, with_lora = _latent(server, "after"), _latent(server, "with_lora")
    assert torch.equal(after, before), "training changed the shared MODEL"
    assert (with_lora - before).abs().max() > 1e-4, "the LoRA has no effect"
    torch.testing.assert_close(with_lora, preview)
    assert _lora_not_loaded_lines(server) == []


def test_cancel_leaves_a_checkpoint_and_the_next_run_resumes(server):
    prompt = {**_graph(), **_trainer("apt_cancel", 500)}
    pid = server.post_prompt(prompt)
    _wait_for_step(server, 2)
    server.interrupt()
    entry = server.wait_for(pid, timeout=120)
    assert ch.history_status(entry) == "error"
    assert "execution_interrupted" in ch.history_messages(entry)
    state = server.get_json(f"/apt/runs/{TRAINER}")
    assert state["status"] == "cancelled" and state["checkpoint"], state
    ckpt = Path(state["checkpoint"])
    assert ckpt.is_file() and ckpt.parent == server.output_dir / "apt_lora_trainer" / "apt_cancel"
    done = int(ckpt.stem.split("_")[1])
    assert done >= 2
    assert not (server.loras_dir / "apt_cancel.safetensors").exists()

    entry = _run(server, {**_graph(), **_trainer("apt_cancel", done + 2)})
    assert ch.history_status(entry) == "success", _error(entry)
    state = server.get_json(f"/apt/runs/{TRAINER}")
    assert state["resumed_from"] == done and state["step"] == done + 2 and state["status"] == "finished"
    assert [h["step"] for h in state["history"]] == list(range(1, done + 3))
    assert (server.loras_dir / "apt_cancel.safetensors").is_file()


def test_stop_route_finishes_early_and_saves_the_lora(server):
    with pytest.raises(urllib.error.HTTPError) as err:
        server.post_json(f"/apt/runs/{TRAINER}/stop")
    assert err.value.code == 409  # nothing running
    pid = server.post_prompt({**_graph(), **_trainer("apt_stop", 500)})
    _wait_for_step(server, 1)
    answer = server.post_json(f"/apt/runs/{TRAINER}/stop")
    assert answer["stopping"] is True
    entry = server.wait_for(pid, timeout=120)
    assert ch.history_status(entry) == "success", _error(entry)
    ui = entry["outputs"][TRAINER]["apt_run"][0]
    assert ui["stopped"] and 1 <= ui["steps_done"] < 500
    assert server.get_json(f"/apt/runs/{TRAINER}")["status"] == "stopped"
    assert (server.loras_dir / "apt_stop.safetensors").is_file()


@pytest.mark.parametrize("case, match", [
    ("empty_folder", "No images found"),
    ("non_sdxl", "not SDXL"),
    ("existing_name", "already exists"),
])
def test_bad_inputs_fail_on_the_node_not_the_server(server, case, match):
    if case == "empty_folder":
        prompt = {**_graph(folder="empty_dir"), **_trainer("apt_bad", 2)}
        node = "2"
    elif case == "non_sdxl":
        prompt = {**_graph(model_kind="sd15"), **_trainer("apt_bad", 2)}
        node = TRAINER
    else:  # apt_it.safetensors was written above; resume finds no checkpoint below 2 steps
        prompt = {**_graph(), **_trainer("apt_it", 2, resume=False)}
        node = TRAINER
    entry = _run(server, prompt)
    assert ch.history_status(entry) == "error"
    err = _error(entry)
    assert err.get("node_id") == node and match in err.get("exception_message", ""), err
    assert server.running and "APTTrainer" in server.object_info()


def test_trainer_inside_a_subgraph_reports_under_its_execution_id_with_the_new_inputs(server):
    """The frontend flattens a subgraph into prompt nodes whose ids are "<instance>:<inner id>"; the run,
    its events and routes must use that id (js/apt_widget.js computes the same one). Also runs the
    inputs added later (batch size, LR schedule, warmup, pixel-space augmentation) through the host."""
    from urllib.parse import quote

    exec_id = "12:5"
    graph = _graph()
    graph["4"] = {"class_type": "APTAtaSettings", "inputs": {
        "bins": 10, "ema_alpha": 0.1, "indicator_scale": 1000.0, "p_max": 1.0, "zoom_min": 1.0, "zoom_max": 3.0,
        "rotation": 15.0, "fill_mode": "constant", "adaptive_augmentation": True,
        "adaptive_loss_weight": True, "track_indicator": False, "augmentation_space": "pixel"}}
    trainer = _trainer("apt_sub", 3, batch_size=2, lr_schedule="cosine", warmup_steps=1, ata_settings=["4", 0])
    prompt = {**graph, exec_id: trainer[TRAINER]}
    ws = WsCollector(server)
    try:
        entry = _run(server, prompt)
    finally:
        ws.close()
    assert ch.history_status(entry) == "success", (_error(entry), server.log_tail())
    progress = ws.of("apt.progress")
    assert [p["step"] for p in progress] == [1, 2, 3] and {p["node"] for p in progress} == {exec_id}
    assert {s["node_id"] for s in ws.of("apt.status")} == {exec_id}
    assert [p["lr"] for p in progress] == pytest.approx([5e-3, 5e-3, 2.5e-3])  # warmup 1, then cosine
    assert all(len(p["timesteps"]) == 2 for p in progress)  # batch size 2
    state = server.get_json(f"/apt/runs/{quote(exec_id, safe='')}")
    assert state["node_id"] == exec_id and state["status"] == "finished" and len(state["history"]) == 3
    assert server.get_json(f"/api/apt/runs/{exec_id}")["status"] == "finished"
    assert server.get_json("/apt/runs/5") == {"node_id": "5", "status": "idle", "history": []}  # local id alone
    assert server.get_json("/apt/runs/99:5") == {"node_id": "99:5", "status": "idle", "history": []}
    assert (server.loras_dir / "apt_sub.safetensors").is_file()


def _view_png(server, view: dict) -> np.ndarray:
    url = f"{server.base_url}/view?{urllib.parse.urlencode(view)}"
    with urllib.request.urlopen(url, timeout=30) as r:
        data = r.read()
    with Image.open(io.BytesIO(data)) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB"), dtype=np.int16)


def _render_with_lora(server, lora_file: str, prompt: str, seed: int, prefix: str) -> np.ndarray:
    """What an artist's graph renders with a saved LoRA: LoraLoader -> KSampler with the previews'
    sampler, steps, guidance and negative prompt -> VAEDecode -> SaveImage; the PNG it saved."""
    graph = {
        "1": _graph()["1"],
        "40": {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora_name": lora_file,
                                                      "strength_model": 1.0, "strength_clip": 1.0}},
        "41": {"class_type": "CLIPTextEncode", "inputs": {"text": prompt, "clip": ["40", 1]}},
        "42": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry, low quality, deformed", "clip": ["40", 1]}},
        "43": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "44": {"class_type": "KSampler", "inputs": {
            "model": ["40", 0], "seed": seed, "steps": 12, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal",
            "positive": ["41", 0], "negative": ["42", 0], "latent_image": ["43", 0], "denoise": 1.0}},
        "45": {"class_type": "VAEDecode", "inputs": {"samples": ["44", 0], "vae": ["1", 2]}},
        "46": {"class_type": "SaveImage", "inputs": {"images": ["45", 0], "filename_prefix": prefix}},
    }
    entry = _run(server, graph)
    assert ch.history_status(entry) == "success", (_error(entry), server.log_tail())
    saved = entry["outputs"]["46"]["images"][0]
    return _view_png(server, saved)


def test_previews_are_listed_by_the_run_route_and_served_by_view(server):
    """Previews every 2 of 4 steps: the run route lists steps 0, 2 and 4 with their prompts, the
    websocket announces each step's images, and ComfyUI's /view serves them as PNGs of the training
    size from the run folder (so a reloaded page shows them). The step-2 preview names the LoRA saved
    at that step, and an artist's graph (LoraLoader + KSampler + VAEDecode + SaveImage) rendering
    that file with the same prompt and seed draws the same picture. The same training without
    previews writes the same LoRA, bit for bit."""
    from safetensors.torch import load_file

    def train(name, **kw):
        return _run(server, {**_graph(), **_trainer(name, 4, checkpoint_every=2, learning_rate=0.01,
                                                    save_lora_every_checkpoint=True, **kw)})

    entry = train("apt_noprev", preview_every=0)
    assert ch.history_status(entry) == "success", (_error(entry), server.log_tail())
    assert server.get_json(f"/apt/runs/{TRAINER}")["previews"] == []
    ws = WsCollector(server)
    try:
        entry = train("apt_prev", preview_every=2, preview_prompts="a photo of sks dog\nsks dog in snow")
    finally:
        ws.close()
    assert ch.history_status(entry) == "success", (_error(entry), server.log_tail())
    with_previews, without = (load_file(str(server.loras_dir / f"{n}.safetensors")) for n in ("apt_prev", "apt_noprev"))
    assert with_previews.keys() == without.keys()
    assert all(torch.equal(with_previews[k], without[k]) for k in without), "the previews changed the training"
    state = server.get_json(f"/apt/runs/{TRAINER}")
    got = [(p["step"], p["prompt"], p["seed"]) for p in state["previews"]]
    assert got == [(s, p, i) for s in (0, 2, 4) for i, p in enumerate(["a photo of sks dog", "sks dog in snow"])]
    assert [m["step"] for m in ws.of("apt.previews")] == [0, 2, 4]
    pngs = {}
    for p in state["previews"]:
        view = p["view"]
        assert view["type"] == "output" and view["subfolder"] == "apt_lora_trainer/apt_prev/previews"
        pngs[p["step"], p["seed"]] = _view_png(server, view)
        assert pngs[p["step"], p["seed"]].shape == (64, 64, 3)
    step2 = [p for p in state["previews"] if p["step"] == 2]
    assert [p["lora_file"] for p in step2] == ["apt_prev_step00002.safetensors"] * 2
    for p in step2:
        rendered = _render_with_lora(server, p["lora_file"], p["prompt"], p["seed"], f"prev_check_{p['seed']}")
        # the saved file is fp16 and SaveImage truncates where the preview rounds: a few levels at most
        assert np.abs(rendered - pngs[2, p["seed"]]).max() <= 3, p
        assert np.abs(rendered - pngs[0, p["seed"]]).max() > 3 * 3, p  # and the base model's picture it is not
