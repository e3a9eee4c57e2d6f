"""The exported kohya LoRA: key format, metadata, atomic writes, and that it loads with identical
effect in ComfyUI's LoraLoader path (zero "lora key not loaded") and in diffusers."""

import json
import os
import re
from typing import Mapping

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from apt_core.errors import AptOutputError
from apt_core.export import atomic_write, tag_frequency

from lora_checks import assert_loads_in_comfyui, assert_loads_in_diffusers, train_and_export
from tiny import config

KEY = re.compile(r"^lora_unet_[a-z0-9_]+\.(lora_down\.weight|lora_up\.weight|alpha)$")


def read_kohya_lora(path: str | os.PathLike, key_to_module: Mapping[str, str]) -> tuple[dict[str, torch.Tensor], float]:
    """Inverse of apt_core.export.kohya_tensors for files this pack wrote: -> ({"<module>.down"/".up": fp32}, alpha)."""
    tensors = load_file(str(path))
    state, alpha = {}, None
    for key, tensor in tensors.items():
        base, _, part = key.partition(".")
        if base not in key_to_module:
            raise ValueError(f"{path}: key {key!r} does not belong to this model")
        module = key_to_module[base]
        if part == "alpha":
            alpha = float(tensor)
        elif part in ("lora_down.weight", "lora_up.weight"):
            state[f"{module}.{part.split('_')[1].split('.')[0]}"] = tensor.float()
        else:
            raise ValueError(f"{path}: unexpected key {key!r}")
    if alpha is None:
        raise ValueError(f"{path}: no alpha found")
    return state, alpha


@pytest.fixture(scope="module", params=[4.0, 1.0], ids=["alpha=rank", "alpha=rank/4"])
def trained(request, tmp_path_factory):
    """Rank 4 with alpha 4 (scale 1) and alpha 1 (scale 1/4: an exporter that wrote the rank, or
    loaders that ignored alpha, would give 4x the trained effect)."""
    cfg = config(3, learning_rate=2e-2)
    cfg.lora.alpha = request.param
    return train_and_export(tmp_path_factory.mktemp("lora"), cfg, "apt_test.safetensors")


def test_keys_are_kohya_format_with_metadata(trained):
    trainer, path, _, _ = trained
    with safe_open(str(path), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert keys and all(KEY.match(k) for k in keys), [k for k in keys if not KEY.match(k)][:3]
    assert len(keys) == 3 * len(trainer.lora.layers)
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    assert "lora_unet_up_blocks_0_attentions_2_transformer_blocks_1_attn2_to_out_0.alpha" in keys
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == str(trainer.config.lora.alpha)
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["ss_steps"] == "3"
    gammas = json.loads(meta["apt_final_gamma"])
    assert len(gammas) == 10 and gammas == pytest.approx(trainer.indicator.gammas(), abs=1e-6)
    assert json.loads(meta["apt_settings"])["lora"]["rank"] == 4
    tags = json.loads(meta["ss_tag_frequency"])["apt"]
    assert sum(tags.values()) >= len(trainer.dataset.examples) and all(n >= 1 for n in tags.values())


def test_tag_frequency_counts_each_tag_once_per_caption():
    caps = ["sks dog, on grass, Photo", "sks dog,on the beach", " SKS DOG , sks dog, ", ""]
    assert tag_frequency(caps) == {"apt": {"sks dog": 3, "on grass": 1, "photo": 1, "on the beach": 1}}


def test_file_round_trips_to_the_trained_weights(trained):
    trainer, path, _, _ = trained
    names = {trainer.backbone.kohya_key(n): n for n in trainer.lora.layers}
    state, alpha = read_kohya_lora(path, names)
    assert alpha == trainer.config.lora.alpha
    for name, tensor in trainer.lora.state_dict().items():
        assert torch.equal(state[name], tensor), name


def test_loads_in_comfyui_loraloader_with_every_key_and_same_effect(trained):
    _, path, probe, expected = trained
    assert_loads_in_comfyui(path, probe, expected)


def test_loads_in_diffusers_load_lora_weights_with_same_effect(trained):
    _, path, probe, expected = trained
    assert_loads_in_diffusers(path, probe, expected)


def test_atomic_write_leaves_nothing_behind_on_failure(tmp_path):
    target = tmp_path / "out.safetensors"
    target.write_bytes(b"previous good file")

    def broken(tmp):
        with open(tmp, "wb") as f:
            f.write(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(AptOutputError, match=f"the disk holding {tmp_path} is full"):
        atomic_write(target, broken)
    assert target.read_bytes() == b"previous good file"
    assert os.listdir(tmp_path) == ["out.safetensors"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write into read-only folders")
def test_unwritable_output_folder_is_a_clear_error(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    with pytest.raises(AptOutputError, match="no permission to write in"):
        atomic_write(folder / "x.safetensors", lambda tmp: None)


def test_output_path_under_a_file_is_a_clear_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(AptOutputError, match="could not save"):
        atomic_write(tmp_path / "file" / "x.safetensors", lambda tmp: None)


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_saved_files_get_the_mode_the_umask_gives(tmp_path, umask, mode):
    """Not mkstemp's 0600: a ComfyUI running as another user must be able to read the LoRA."""
    old = os.umask(umask)
    try:
        atomic_write(tmp_path / "x.safetensors", lambda tmp: save_file({"a": torch.zeros(2)}, tmp))
    finally:
        os.umask(old)
    assert (tmp_path / "x.safetensors").stat().st_mode & 0o777 == mode


@pytest.mark.parametrize("writer", ["safetensors", "torch.save"])
def test_disk_full_names_the_folder_and_leaves_nothing_behind(full_disk, writer):
    full_disk.free()
    tiny_disk = full_disk.path
    big = {"w": torch.zeros(512, 1024)}  # 2 MB: does not fit
    write = (lambda tmp: save_file(big, tmp)) if writer == "safetensors" else (lambda tmp: torch.save(big, tmp))
    (tiny_disk / "old.safetensors").write_bytes(b"kept")
    with pytest.raises(AptOutputError, match=f"the disk holding {tiny_disk} is full") as err:
        atomic_write(tiny_disk / "new.safetensors", write)
    assert "Free some space there" in str(err.value)
    assert sorted(os.listdir(tiny_disk)) == ["old.safetensors"]


def test_stale_temp_files_of_a_killed_write_are_removed(tmp_path):
    from apt_core.export import TEMP_SUFFIX, remove_stale_temps

    stale = [tmp_path / f".lora.safetensors.abc{TEMP_SUFFIX}", tmp_path / f".lora_step00100.safetensors.x{TEMP_SUFFIX}"]
    other = [tmp_path / f".lora_v2.safetensors.abc{TEMP_SUFFIX}", tmp_path / "lora.safetensors", tmp_path / ".lora.tmp"]
    fresh = tmp_path / f".lora.safetensors.new{TEMP_SUFFIX}"  # a save in progress (another ComfyUI)
    for p in stale + other + [fresh]:
        p.write_bytes(b"x")
    for p in stale + other:
        os.utime(p, (0, 0))
    mine = {"lora.safetensors", "lora_step00100.safetensors"}
    assert sorted(remove_stale_temps(tmp_path, mine.__contains__)) == sorted(stale)
    assert all(p.exists() for p in other) and fresh.exists()
