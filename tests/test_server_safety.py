"""Issue 25 against the REAL ComfyUI host (127.0.0.1, CPU, tiny test model): what a client of a
shared server can put into the nodes, and the disk filling up, with the inputs that broke them.

Each case queues a real prompt over HTTP; nothing is stubbed. The unit tests next to the code
(test_nodes_units, test_images, test_export, test_nodes_job) cover the same rules in process.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from PIL import Image

import comfy_host as ch
import full_disk as disk
from test_images import _png
from test_nodes_integration import TRAINER, _error, _graph, _run, _trainer

pytestmark = pytest.mark.integration



def _images(folder: Path, n: int = 3, caption: str | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, colour in enumerate([(200, 40, 40), (40, 160, 60), (50, 60, 210)][:n]):
        im = Image.new("RGB", (64, 64), (120, 120, 120))
        im.paste(colour, (16, 16, 48, 48))
        im.save(folder / f"ref{i}.png")
    if caption is not None:
        (folder / "ref0.txt").write_text(caption, encoding="utf-8")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    ch.require_comfyui()
    root = tmp_path_factory.mktemp("apt_safety")
    srv = ch.server_with_test_models(root)
    with srv:
        _images(srv.input_dir / "subject", caption="a photo of sks dog")
        _images(root / "private", caption="SECRET caption of another user")
        (srv.input_dir / "link_out").symlink_to(root / "private", target_is_directory=True)
        yield srv


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def _train(server, name, steps=2, folder="subject", **kw):
    return _run(server, {**_graph(folder=folder), **_trainer(name, steps, **kw)})


@pytest.mark.parametrize("folder", ["ABS", "../../private", "link_out"])
def test_a_folder_outside_input_is_refused_and_nothing_of_it_is_read(server, folder):
    if folder == "ABS":
        folder = str(server.root.parent / "private")
    entry = _train(server, "apt_out", folder=folder)
    assert ch.history_status(entry) == "error"
    err = _error(entry)
    assert err.get("node_id") == "2" and "inside ComfyUI's input folder" in err["exception_message"], err
    assert "SECRET" not in json.dumps(entry)


def test_decompression_bombs_are_skipped_from_their_header_and_cost_the_server_a_few_mb(server):
    folder = server.input_dir / "with_bombs"
    _images(folder)
    _png(folder / "onebit.png", 30000, 30000, color_type=0, bit_depth=1)  # 109 KB
    _png(folder / "rgb.png", 16000, 16000)
    _png(folder / "header_only.png", 10000, 10000, pixels=False)  # 57 bytes
    before = _peak_rss_mb(server.proc.pid)
    entry = _run(server, {**_graph(folder="with_bombs"),
                          "9": {"class_type": "PreviewAny", "inputs": {"source": ["2", 1]}}})
    assert ch.history_status(entry) == "success", _error(entry)
    report = json.dumps(entry)
    for name in ("onebit.png", "rgb.png", "header_only.png"):
        assert f"{name}: too large" in report, report[:2000]
    assert _peak_rss_mb(server.proc.pid) - before < 100


def test_cjk_lora_name_is_cut_in_bytes_and_the_file_follows_the_umask(server):
    entry = _train(server, "名" * 100)
    assert ch.history_status(entry) == "success", _error(entry)
    files = [p for p in server.loras_dir.iterdir() if p.name.startswith("名")]
    assert len(files) == 1 and len(files[0].name.encode()) <= 112
    umask = os.umask(0o022)
    os.umask(umask)  # the server inherited this process's umask
    assert files[0].stat().st_mode & 0o777 == 0o666 & ~umask


def test_resume_refuses_a_checkpoint_made_from_other_images(server):
    _images(server.input_dir / "other", n=3, caption="a photo of sks cat")
    assert ch.history_status(_train(server, "apt_resume", steps=2, checkpoint_every=1)) == "success"
    (server.loras_dir / "apt_resume.safetensors").unlink()
    entry = _train(server, "apt_resume", steps=3, checkpoint_every=1, folder="other")
    assert ch.history_status(entry) == "error"
    assert "other images or captions" in _error(entry)["exception_message"]


@pytest.fixture()
def full(server):
    """full(folder) -> filler: that server folder on a full tmpfs (root only: CI runs as root)."""
    mounted = []

    def fill(folder: Path) -> Path:
        filler = disk.fill(folder)
        mounted.append(folder)
        return filler

    yield fill
    for folder in mounted:
        disk.unmount(folder)


def test_full_loras_disk_keeps_the_training_and_the_next_queue_writes_the_lora_without_training(server, full):
    filler = full(server.loras_dir)
    entry = _train(server, "apt_full", steps=3)
    assert ch.history_status(entry) == "error"
    msg = _error(entry)["exception_message"]
    assert f"the disk holding {server.loras_dir} is full" in msg and "without training again" in msg, msg
    assert not [p for p in server.loras_dir.iterdir() if p.name != "filler.bin"]
    filler.unlink()  # space freed
    entry = _train(server, "apt_full", steps=3)
    assert ch.history_status(entry) == "success", _error(entry)
    assert (server.loras_dir / "apt_full.safetensors").is_file()
    run = server.get_json(f"/apt/runs/{TRAINER}")
    assert run["resumed_from"] == 3 and run["status"] == "finished"  # written from the checkpoint: no step run


def test_full_output_disk_still_writes_the_lora(server, full):
    full(server.output_dir / "apt_lora_trainer")
    entry = _train(server, "apt_full_out", steps=2)
    assert ch.history_status(entry) == "success", _error(entry)
    assert (server.loras_dir / "apt_full_out.safetensors").is_file()
    run = server.get_json(f"/apt/runs/{TRAINER}")
    assert run["status"] == "finished" and "final checkpoint could not be saved" in run["message"]
    assert "is full" in run["message"]
