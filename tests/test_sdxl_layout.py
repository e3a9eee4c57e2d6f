"""Slow: the APT nodes on a checkpoint with the REAL SDXL layout, in the real ComfyUI host (CPU).

A random-weight SDXL single-file checkpoint (tests/sdxl_checkpoint.py: the host's own SDXL, CLIP
and VAE classes on the meta device, ~6.5 GiB of fp16 written tensor by tensor) is put in the
server's models/checkpoints and:

1. the standard "Load Checkpoint" (CheckpointLoaderSimple) loads it and the host takes it for SDXL
   (log: "model_type EPS", "Requested to load SDXL"; the APT Trainer refuses anything else);
2. APT Dataset Loader (3 generated images, 128 px) -> APT Caption -> APT Trainer trains 2 steps
   with the low-memory preset (gradient checkpointing), on cpu;
3. LoraLoader loads the LoRA with no "lora key not loaded" line, and the LoRA's keys cover every
   transformer block of the UNet (counted from the model's own module list: 70 for SDXL).

Time and peak memory of the server (RSS sampled from /proc, and its VmHWM) are printed and, with
$APT_TEST_ARTIFACTS set, written to sdxl_layout.json there.

Skipped unless APT_SLOW=1 (it needs ~7 GB of disk, ~19 GB of RAM and a few minutes). Measured on
2 shared cores, ComfyUI v0.33.0: 2.5 min in all (checkpoint 34-80 s, load + encode + 2 steps
~100-200 s), server peak RSS 18.8 GiB (16.3 GiB anonymous: the fp32 UNet 9.6, CLIP 1.5, training
~3-4; the rest are the checkpoint's mmapped pages while loading). On ComfyUI 0.3.75 the first
backward goes past 20 GiB: that host leaves the UNet's weights requires_grad=True (v0.33.0's
BaseModel calls diffusion_model.requires_grad_(False)), so autograd fills a .grad as large as the
UNet (9.6 GiB fp32) - until the pack freezes the base weights itself.

    APT_SLOW=1 python -m pytest tests/test_sdxl_layout.py                 # ComfyUI 0.3.75 (.venv)
    source scripts/env_comfy033.sh && APT_SLOW=1 python -m pytest tests/test_sdxl_layout.py   # v0.33.0

APT_SDXL_CHECKPOINT=<file> reuses a checkpoint written before by `python tests/sdxl_checkpoint.py
<file>` (linked, not deleted) instead of writing a new one. While the server runs, the test stops
it when the machine's MemAvailable falls below $APT_SLOW_MIN_AVAILABLE_GB (default 1.0), so a
memory-hungry run fails with a message rather than pushing other work into the OOM killer.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path

import pytest

import comfy_host as ch

RUN_COMMAND = ("APT_SLOW=1 python -m pytest tests/test_sdxl_layout.py (for ComfyUI v0.33.0 first "
               "`source scripts/env_comfy033.sh`)")
SLOW = ch._truthy(os.environ.get("APT_SLOW"))


pytestmark = [
    pytest.mark.slow,
    pytest.mark.integration,
    pytest.mark.skipif(not SLOW, reason=f"slow test (real SDXL layout, ~7 GB file, ~19 GB RAM, minutes); "
                                        f"run it with: {RUN_COMMAND}"),
]

TRAINER = "10"
CKPT_NAME = "sdxl_random_layout.safetensors"
LORA = "sdxl_layout_apt"
GIB = 2 ** 30


# ---- memory watch ------------------------------------------------------------------------------

def _proc_status(pid: int) -> dict[str, int]:
    """kB fields of /proc/<pid>/status (VmRSS, VmHWM, RssAnon, RssFile)."""
    out = {}
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                    out[key] = int(rest.split()[0])
    except (OSError, ValueError):
        pass
    return out


def _mem_available_kb() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


class MemoryWatch:
    """Samples the server's RSS every 0.5 s (peaks of VmRSS / RssAnon / RssFile and VmHWM) and the
    machine's lowest MemAvailable; kills the server's process group when MemAvailable falls below
    `min_available_gb`."""

    def __init__(self, pid: int, min_available_gb: float, log_path: Path | None = None):
        self.pid = pid
        self.min_kb = int(min_available_gb * 2 ** 20)
        self.log_path = log_path
        self.peak: dict[str, int] = {}
        self.lowest_available_kb: int | None = None
        self.killed = False
        self.timeline: list[str] = []  # every 5 s: time, RssAnon, RssFile, MemAvailable, last log line
        self._t0 = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _last_log_line(self) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(max(0, f.seek(0, 2) - 4096))
                lines = [ln for ln in f.read().decode("utf-8", "replace").splitlines() if ln.strip()]
        except (OSError, TypeError):
            return ""
        return lines[-1].replace("\x1b[32m", "").replace("\x1b[0m", "")[:110] if lines else ""

    def _loop(self) -> None:
        next_mark = 0.0
        while not self._stop.is_set():
            now = self.sample()
            avail = _mem_available_kb()
            if avail is not None:
                self.lowest_available_kb = min(avail, self.lowest_available_kb or avail)
                if avail < self.min_kb and not self.killed:
                    self.killed = True
                    self.timeline.append(f"MemAvailable {avail / 2 ** 20:.2f} GiB < limit: killing the server")
                    try:
                        os.killpg(self.pid, signal.SIGKILL)  # the server runs in its own session
                    except (ProcessLookupError, PermissionError):
                        pass
            t = time.monotonic() - self._t0
            if t >= next_mark and now:
                next_mark = t + 5.0
                self.timeline.append(f"{t:6.0f}s anon {now.get('RssAnon', 0) / 2 ** 20:5.2f} file "
                                     f"{now.get('RssFile', 0) / 2 ** 20:5.2f} avail "
                                     f"{(avail or 0) / 2 ** 20:5.2f} GiB | {self._last_log_line()}")
            self._stop.wait(0.5)

    def sample(self) -> dict[str, int]:
        now = _proc_status(self.pid)
        for k, v in now.items():
            self.peak[k] = max(v, self.peak.get(k, 0))
        return now

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join(5)
        self.sample()
        gb = {k: round(v / 2 ** 20, 2) for k, v in self.peak.items()}
        return {"server_peak_gib": gb, "lowest_mem_available_gib":
                round(self.lowest_available_kb / 2 ** 20, 2) if self.lowest_available_kb else None,
                "killed_for_memory": self.killed, "memory_timeline": list(self.timeline)}


# ---- helpers -----------------------------------------------------------------------------------

def _error(entry) -> dict:
    for event, data in entry.get("status", {}).get("messages", []):
        if event == "execution_error":
            return data
    return {}


def _combo_options(spec) -> list[str]:
    """Options of a combo input in /object_info (old style [[...], {...}] or V3 ["COMBO", {"options"}])."""
    kind, opts = spec[0], (spec[1] if len(spec) > 1 else {})
    return list(kind) if isinstance(kind, list) else list(opts.get("options", []))


def _low_memory_preset(server) -> str:
    spec = server.object_info("APTTrainer")["APTTrainer"]["input"]["required"]["memory_preset"]
    options = _combo_options(spec)
    low = [o for o in options if "low" in o.lower() or "checkpointing" in o.lower()]
    assert low, f"no low-memory preset among {options}"
    return low[0]


def _write_images(folder: Path, n: int = 3, size: int = 128) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    colours = [(200, 40, 40), (40, 160, 60), (50, 60, 210), (210, 200, 40)]
    for i in range(n):
        im = Image.new("RGB", (size, size), (120, 120, 120))
        q = size // 4
        im.paste(colours[i % len(colours)], (q, q, 3 * q, 3 * q))
        im.save(folder / f"ref{i}.png")


def _training_graph(preset: str) -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT_NAME}},
        "2": {"class_type": "APTDatasetLoader", "inputs": {"folder": "subject", "resolution": 128,
                                                          "default_caption": ""}},
        "3": {"class_type": "APTCaption", "inputs": {
            "dataset": ["2", 0], "trigger_word": "sks", "class_word": "dog", "context_captions": "on grass\nin snow",
            "template": "a photo of {trigger} {class}, {context}", "mode": "fill missing captions"}},
        TRAINER: {"class_type": "APTTrainer", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "dataset": ["3", 0], "steps": 2, "rank": 4,
            "learning_rate": 1e-4, "seed": 0, "checkpoint_every": 0, "lora_name": LORA, "overwrite": True,
            "resume": False, "memory_preset": preset}},
    }


def _lora_loader_graph() -> dict:
    # Node "1" is the same as in the training prompt: the host reuses its cached output.
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT_NAME}},
        "40": {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1],
                                                      "lora_name": f"{LORA}.safetensors",
                                                      "strength_model": 1.0, "strength_clip": 1.0}},
        "41": {"class_type": "PreviewAny", "inputs": {"source": ["40", 0]}},
    }


# ---- the test ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def workdir():
    """A throw-away folder for the checkpoint and the server, deleted afterwards (pytest would keep
    its tmp_path folders, 7 GB each)."""
    ch.require_comfyui()
    d = Path(tempfile.mkdtemp(prefix="apt-sdxl-layout-"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_real_sdxl_layout_loads_trains_and_the_lora_covers_all_transformer_blocks(workdir, capsys):
    import sdxl_checkpoint as sc
    from safetensors import safe_open

    report: dict = {"host": str(ch.comfyui_dir())}
    t_all = time.monotonic()

    # The layout, from the host's own classes (also: expected transformer blocks from its module list).
    layout = sc.sdxl_layout()
    blocks = sc.transformer_block_names(layout.unet)
    expected = {sc.kohya_block_prefix(b) for b in blocks}
    assert len(blocks) == 70 and len(expected) == 70

    root = workdir / "comfy"
    ckpt_dir = workdir / "checkpoints"
    ckpt_dir.mkdir(parents=True)
    ckpt = ckpt_dir / CKPT_NAME
    reuse = os.environ.get("APT_SDXL_CHECKPOINT")
    t0 = time.monotonic()
    if reuse and Path(reuse).is_file():
        ckpt.symlink_to(Path(reuse).resolve())
        report["checkpoint"] = f"reused {reuse}"
    else:
        info = sc.write_random_sdxl_checkpoint(ckpt, layout=layout)
        report["checkpoint"] = f"written: {info['tensors']} tensors, {info['bytes'] / GIB:.2f} GiB"
    report["checkpoint_seconds"] = round(time.monotonic() - t0, 1)
    del layout

    extra = workdir / "checkpoints.yaml"
    extra.write_text(f"apt_sdxl_layout:\n    checkpoints: {json.dumps(str(ckpt_dir))}\n", encoding="utf-8")
    server = ch.ComfyServer(root, extra_args=["--extra-model-paths-config", str(extra)], startup_timeout=300)
    watch = None
    try:
        server.start()
        watch = MemoryWatch(server.proc.pid, float(os.environ.get("APT_SLOW_MIN_AVAILABLE_GB", "1.0")),
                            server.log_path)
        report["server_start_seconds"] = round(server.startup_seconds or 0, 1)
        _write_images(server.input_dir / "subject")
        assert CKPT_NAME in server.object_info("CheckpointLoaderSimple")["CheckpointLoaderSimple"]["input"][
            "required"]["ckpt_name"][0]
        preset = _low_memory_preset(server)
        report["memory_preset"] = preset

        # 1 + 2: load, train 2 steps
        t0 = time.monotonic()
        entry = server.wait_for(server.post_prompt(_training_graph(preset)),
                                timeout=float(os.environ.get("APT_SLOW_TIMEOUT", "1800")))
        report["train_prompt_seconds"] = round(time.monotonic() - t0, 1)
        assert not watch.killed, f"stopped: MemAvailable fell below the limit; {watch.stop()}"
        assert ch.history_status(entry) == "success", (_error(entry), server.log_tail(80))
        log = server.log_text()
        assert "model_type EPS" in log, server.log_tail(80)
        assert "Requested to load SDXL" in log.replace("SDXLClipModel", ""), server.log_tail(80)
        train_lines = [ln for ln in log.splitlines() if "APT: training" in ln]
        assert train_lines and train_lines[-1].rstrip().endswith(" on cpu"), train_lines
        report["apt_log"] = [ln.strip() for ln in log.splitlines() if "APT" in ln and "step" in ln]
        ui = entry["outputs"][TRAINER]["apt_run"][0]
        assert ui["steps_done"] == 2, ui
        state = server.get_json(f"/apt/runs/{TRAINER}")
        assert state["status"] == "finished" and len(state["history"]) == 2, state
        losses = [h["loss"] for h in state["history"]]
        assert all(isinstance(v, (int, float)) and v == v and abs(v) < 1e6 for v in losses), losses
        report["losses"] = losses
        report["it_per_s"] = state["history"][-1].get("it_per_s")

        # 3: LoraLoader, and the file's coverage
        lora_path = server.loras_dir / f"{LORA}.safetensors"
        assert lora_path.is_file()
        t0 = time.monotonic()
        entry = server.wait_for(server.post_prompt(_lora_loader_graph()), timeout=900)
        report["lora_loader_prompt_seconds"] = round(time.monotonic() - t0, 1)
        assert ch.history_status(entry) == "success", (_error(entry), server.log_tail(80))
        log = server.log_text()
        not_loaded = [ln for ln in log.splitlines() if "lora key not loaded" in ln or "NOT LOADED" in ln]
        assert not_loaded == [], not_loaded[:10]
        report["checkpoint_loads"] = log.count("model_type EPS")
    except BaseException as exc:
        # Say where the time and memory went, whatever failed (a killed server shows up as a reset
        # connection or "ComfyUI is not running").
        server.stop()
        if watch is not None:
            report.update(watch.stop())
            watch = None
        raise AssertionError(f"{type(exc).__name__}: {str(exc)[:2000]}\n[sdxl_layout] so far: "
                             f"{json.dumps(report, indent=2)}\nserver log tail:\n{server.log_tail(40)}") from exc
    finally:
        server.stop()
        if watch is not None:
            report.update(watch.stop())

    with safe_open(str(lora_path), "pt") as f:
        keys = list(f.keys())
    found = sc.lora_block_prefixes(keys)
    assert found == expected, (sorted(expected - found)[:5], sorted(found - expected)[:5])
    assert len(found) == 70
    report["lora_keys"] = len(keys)
    report["lora_blocks"] = len(found)
    report["total_seconds"] = round(time.monotonic() - t_all, 1)

    artifacts = os.environ.get("APT_TEST_ARTIFACTS")
    if artifacts:
        Path(artifacts).mkdir(parents=True, exist_ok=True)
        (Path(artifacts) / "sdxl_layout.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    with capsys.disabled():
        print("\n[sdxl_layout] " + json.dumps(report, indent=2))
