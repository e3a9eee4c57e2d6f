"""Node-level logic without a server: schemas, dataset/caption helpers, settings, names, run registry."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import comfy_host as ch

sys.path.insert(0, str(Path(__file__).resolve().parent / "pack_fixtures"))


@pytest.fixture(scope="module")
def mods():
    ch.import_comfy()
    from apt_test_models.inproc import pack_module

    return {n: pack_module(n) for n in ("node_defs", "dataset", "settings", "runs")}


def _write_images(folder: Path, n: int, size=(80, 64), captions: dict | None = None):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", size, (40 * i % 255, 90, 160)).save(folder / f"img{i}.png")
    for name, text in (captions or {}).items():
        (folder / name).write_text(text, encoding="utf-8")


# ---- schemas -----------------------------------------------------------------------------------

def test_every_node_has_an_apt_name_a_category_and_tooltips_everywhere(mods):
    nodes = mods["node_defs"].NODES
    ids = [n.GET_SCHEMA().node_id for n in nodes]
    assert len(set(ids)) == len(ids) == 5
    assert set(ids) == {"APTDatasetLoader", "APTCaption", "APTAtaSettings", "APTRegSettings", "APTTrainer"}
    for node in nodes:
        schema = node.GET_SCHEMA()
        assert schema.display_name.startswith("APT "), schema.display_name
        assert schema.category == "APT LoRA Trainer" and schema.description
        for inp in schema.inputs:
            assert inp.tooltip and len(inp.tooltip) > 10, (schema.node_id, inp.id)
        for out in schema.outputs:
            assert out.tooltip, (schema.node_id, out.display_name)
        info = node.GET_NODE_INFO_V1()  # what /object_info serves
        assert info["display_name"] == schema.display_name
    trainer = mods["node_defs"].AptTrainerNode.GET_SCHEMA()
    assert trainer.is_output_node and "UNIQUE_ID" in [h.value for h in trainer.hidden]
    req = mods["node_defs"].AptTrainerNode.INPUT_TYPES()
    assert {"model", "clip", "vae", "dataset"} <= set(req["required"])
    assert {"ata_settings", "reg_settings"} <= set(req["optional"])
    assert req["required"]["model"][0] == "MODEL" and req["required"]["dataset"][0] == "APT_DATASET"
    assert mods["node_defs"].AptTrainerNode.RETURN_TYPES == ["STRING", "MODEL", "STRING"]


def test_entrypoint_returns_the_extension_with_all_nodes(mods):
    import asyncio

    from apt_test_models.inproc import load_pack

    pack = load_pack()[1]
    ext = asyncio.run(pack.comfy_entrypoint())
    from comfy_api.latest import ComfyExtension

    assert isinstance(ext, ComfyExtension)
    assert asyncio.run(ext.get_node_list()) == mods["node_defs"].NODES


# ---- dataset loader --------------------------------------------------------------------------

def test_loader_reads_a_relative_folder_in_the_input_dir_with_report(mods, tmp_path):
    ds_mod = mods["dataset"]
    _write_images(tmp_path / "subject", 3, captions={"img0.txt": "a photo of sks dog on a sofa",
                                                      "notes.md": "hello"})
    ds = ds_mod.load_dataset("subject", None, None, 64, "", str(tmp_path))
    assert len(ds) == 3 and ds.resolution == 64
    assert [r.caption for r in ds.records] == ["a photo of sks dog on a sofa", "", ""]
    assert ds.given_captions == {str(tmp_path / "subject" / "img0.png")}
    assert "3 image(s) loaded" in ds.report and "notes.md" in ds.report and "Skipped" in ds.report
    assert all(r.pixels.shape[0] == 3 for r in ds.records)


def test_loader_combines_images_and_default_caption(mods, tmp_path):
    ds_mod = mods["dataset"]
    _write_images(tmp_path / "f", 2)
    batch = torch.rand(2, 64, 96, 3)
    ds = ds_mod.load_dataset(str(tmp_path / "f"), batch, "first line\nsecond line", 64, "a photo", str(tmp_path))
    assert len(ds) == 4
    assert [r.caption for r in ds.records] == ["a photo", "a photo", "first line", "second line"]
    assert ds.given_captions == {"image[0]", "image[1]"}  # default captions count as missing
    with pytest.raises(Exception, match="caption lines"):
        ds_mod.load_dataset("", batch, "a\nb\nc", 64, "", str(tmp_path))


@pytest.mark.parametrize("folder, match", [("", "No images"), ("nope", "not found"), ("empty", "No images found")])
def test_loader_errors_are_actionable(mods, tmp_path, folder, match):
    from apt_core.errors import AptDatasetError

    (tmp_path / "empty").mkdir()
    with pytest.raises(AptDatasetError, match=match):
        mods["dataset"].load_dataset(folder, None, None, 64, "", str(tmp_path))


def test_loader_fingerprint_changes_when_the_folder_changes(mods, tmp_path, monkeypatch):
    import folder_paths

    monkeypatch.setattr(folder_paths, "get_input_directory", lambda: str(tmp_path))
    _write_images(tmp_path / "s", 2)
    fp = mods["node_defs"]._folder_fingerprint
    a = fp("s")
    assert fp("s") == a
    _write_images(tmp_path / "s", 3)
    assert fp("s") != a


@pytest.mark.parametrize("how", ["absolute", "dotdot", "symlinked folder", "absolute inside"])
def test_loader_stays_inside_the_input_folder(mods, tmp_path, how):
    """On a shared server the folder is a client's text: nothing outside input/ is listed or read."""
    from apt_core.errors import AptDatasetError

    inp, secret = tmp_path / "input", tmp_path / "private"
    _write_images(secret, 3, captions={"img0.txt": "SECRET caption"})
    _write_images(inp / "mine", 3)
    (inp / "link").symlink_to(secret, target_is_directory=True)
    folder = {"absolute": str(secret), "dotdot": "../private", "symlinked folder": "link",
              "absolute inside": str(inp / "mine")}[how]
    if how == "absolute inside":
        assert len(mods["dataset"].load_dataset(folder, None, None, 64, "", str(inp))) == 3
        return
    with pytest.raises(AptDatasetError, match="inside ComfyUI's input folder") as err:
        mods["dataset"].load_dataset(folder, None, None, 64, "", str(inp))
    assert "SECRET" not in str(err.value) and "img0" not in str(err.value)


def test_loader_skips_files_that_link_outside_the_input_folder(mods, tmp_path):
    inp, secret = tmp_path / "input", tmp_path / "private"
    _write_images(secret, 1, captions={"img0.txt": "SECRET caption"})
    _write_images(inp / "mine", 3)
    (inp / "mine" / "stolen.png").symlink_to(secret / "img0.png")
    (inp / "mine" / "img1.txt").symlink_to(secret / "img0.txt")  # a caption read from elsewhere
    (inp / "mine" / "5_more").symlink_to(secret, target_is_directory=True)
    ds = mods["dataset"].load_dataset("mine", None, None, 64, "", str(inp))
    assert len(ds) == 3 and not any("SECRET" in r.caption for r in ds.records)
    assert "SECRET" not in ds.report
    for name in ("stolen.png", "img1.txt", "5_more/"):
        assert f"{name}: a link that leads outside" in ds.report


def test_loader_fingerprint_never_walks_outside_or_below_what_the_loader_reads(mods, tmp_path, monkeypatch):
    import folder_paths

    monkeypatch.setattr(folder_paths, "get_input_directory", lambda: str(tmp_path / "input"))
    fp = mods["node_defs"]._folder_fingerprint
    assert fp("/").startswith("invalid:") and fp("../..").startswith("invalid:")
    _write_images(tmp_path / "input" / "s", 2)
    (tmp_path / "input" / "s" / "deep").mkdir()
    a = fp("s")
    _write_images(tmp_path / "input" / "s" / "deep" / "deeper", 2)  # not read by the loader
    assert fp("s") == a
    _write_images(tmp_path / "input" / "s" / "3_extra", 1)  # read (kohya repeats folder)
    assert fp("s") != a


# ---- captions ----------------------------------------------------------------------------------

def test_caption_template_fills_missing_and_tidies(mods, tmp_path):
    d = mods["dataset"]
    _write_images(tmp_path / "c", 3, captions={"img1.txt": "my own caption"})
    ds = d.load_dataset(str(tmp_path / "c"), None, None, 64, "", str(tmp_path))
    out, text = d.caption_dataset(ds, "sks", "dog", "on green grass\nimg2.png: in the snow", d.DEFAULT_TEMPLATE,
                                  "fill missing captions")
    assert [r.caption for r in out.records] == ["a photo of sks dog, on green grass", "my own caption",
                                                "a photo of sks dog, in the snow"]
    assert [r.caption for r in ds.records] == ["", "my own caption", ""]  # input untouched
    assert "describe the background" in text and "img1.png: my own caption" in text
    assert "do not contain the trigger word 'sks'" in text
    out2, _ = d.caption_dataset(ds, "sks", "dog", "", d.DEFAULT_TEMPLATE, "add trigger to existing captions")
    assert out2.records[1].caption == "sks dog, my own caption"
    assert out2.records[0].caption == "a photo of sks dog"  # no context: no dangling comma
    out3, _ = d.caption_dataset(ds, "sks", "dog", "a\nb\nc\nd", "{trigger} {class} {context}", "replace all captions")
    assert [r.caption for r in out3.records] == ["sks dog a", "sks dog b", "sks dog c"]
    with pytest.raises(Exception, match="placeholders"):
        d.caption_dataset(ds, "sks", "dog", "", "a {subject}", "replace all captions")
    with pytest.raises(Exception, match="trigger word is empty"):
        d.caption_dataset(ds, " ", "dog", "", d.DEFAULT_TEMPLATE, "replace all captions")


def test_caption_node_takes_a_captioners_texts_one_per_image(mods, tmp_path):
    """APT Caption's context can be linked from a captioning node: ComfyUI hands the node lists
    (is_input_list); a list of texts is one per image, in order, an empty one keeping its place."""
    d, nd = mods["dataset"], mods["node_defs"]
    _write_images(tmp_path / "c", 3)
    ds = d.load_dataset(str(tmp_path / "c"), None, None, 64, "", str(tmp_path))
    assert nd.AptCaption.GET_SCHEMA().is_input_list
    run = lambda ctx: nd.AptCaption.execute([ds], ["sks"], ["dog"], ctx, [d.DEFAULT_TEMPLATE],
                                            ["replace all captions"]).result
    out, text = run(["a dog on\ngrass", "", "img2.png: in snow"])
    assert [r.caption for r in out.records] == ["a photo of sks dog, a dog on grass", "a photo of sks dog",
                                                "a photo of sks dog, img2.png: in snow"]
    out, _ = run(["on grass\nimg2.png: in snow"])  # one text: the widget's rules (lines, name: ...)
    assert [r.caption for r in out.records] == ["a photo of sks dog, on grass", "a photo of sks dog",
                                                "a photo of sks dog, in snow"]
    out, text = run(["one", "two"])
    assert out.records[2].caption == "a photo of sks dog" and "1 image(s) got no caption text" in text


def test_contains_word(mods):
    cw = mods["dataset"].contains_word
    assert cw("a photo of sks, dog", "sks") and not cw("a photo of sksx dog", "sks") and not cw("x", "")


# ---- settings / names --------------------------------------------------------------------------

def test_settings_build_the_apt_config(mods):
    s = mods["settings"]
    ata = s.ata_settings(num_bins=5, ema_alpha=0.2, indicator_scale=100.0, p_max=0.5, zoom_min=1.0,
                         zoom_max=2.0, rotation_deg=10.0, fill="reflect",
                         adaptive_augmentation=False, adaptive_loss_weight=True, track_indicator=True)
    reg = s.reg_settings(lambda_rs=0.5, lambda_aa=0.0, resolutions="32x32 only (cheaper)")
    cfg = s.build_config(steps=10, rank=8, learning_rate=2e-4, seed=3, checkpoint_every=5,
                         preset="Low VRAM (12-16 GB): gradient checkpointing", ata=ata, reg=reg)
    assert cfg.train.steps == 10 and cfg.train.gradient_checkpointing and cfg.train.seed == 3
    assert cfg.lora.rank == 8 and cfg.lora.alpha == 8.0
    assert cfg.indicator.num_bins == 5 and cfg.indicator.scale == 100.0
    assert cfg.augment.fill == "reflect" and cfg.augment.zoom_max == 2.0 and not cfg.augment.enabled
    assert cfg.loss_weight_floor == 0.0  # the paper's; not a node setting
    assert cfg.regularizers.up_block_factors == (4,) and cfg.regularizers.aa_distance == "kl"
    # a weight of 0 switches its regularizer off (no hooks); the other stays on
    assert not cfg.switches.adaptive_augmentation and not cfg.switches.attention_alignment
    assert cfg.switches.track_indicator and cfg.switches.representation_stabilization
    default = s.build_config(steps=1, rank=4, learning_rate=1e-4, seed=0, checkpoint_every=0, preset=s.DEFAULT_PRESET)
    assert default.regularizers.up_block_factors == (4, 2) and not default.train.gradient_checkpointing
    assert default.regularizers.aa_free_words == ()
    from apt_core.errors import AptConfigError

    with pytest.raises(AptConfigError, match="zoom"):
        s.ata_settings(num_bins=5, ema_alpha=0.2, indicator_scale=100.0, p_max=0.5, zoom_min=3.0, zoom_max=2.0,
                       rotation_deg=10.0, fill="constant", adaptive_augmentation=True,
                       adaptive_loss_weight=True, track_indicator=False)


@pytest.mark.parametrize("raw, want", [
    ("my lora", "my_lora.safetensors"), ("apt.safetensors", "apt.safetensors"),
    ("../../etc/passwd", "etc_passwd.safetensors"), ("a/b\\c:d", "a_b_c_d.safetensors"),
    ("CON", "CON_lora.safetensors"), ("Ünïcode-名前", "Ünïcode-名前.safetensors"), (" .hidden ", "hidden.safetensors"),
])
def test_lora_names_are_sanitised(mods, raw, want):
    assert mods["settings"].sanitize_lora_name(raw) == want


def test_lora_names_are_limited_in_bytes_so_every_file_of_the_run_can_be_written(mods, tmp_path):
    from apt_core.export import atomic_write

    s = mods["settings"]
    name = s.sanitize_lora_name("名" * 100)  # 300 bytes of UTF-8: over the 255-byte file name limit
    assert len(name[: -len(".safetensors")].encode("utf-8")) <= 100 and name.startswith("名" * 33)
    for file in (name, s.step_lora_name(name, 123456)):
        atomic_write(tmp_path / file, lambda tmp: open(tmp, "wb").write(b"x"))  # temp name is longer still
        assert (tmp_path / file).read_bytes() == b"x"


def test_step_lora_names(mods):
    s = mods["settings"]
    assert s.step_lora_name("apt_lora.safetensors", 300) == "apt_lora_step00300.safetensors"
    assert s.step_lora_name("a.b.safetensors", 123456) == "a.b_step123456.safetensors"
    assert s.is_step_lora_name("apt_lora.safetensors", "apt_lora_step00300.safetensors")
    assert s.is_step_lora_name("a.b.safetensors", "a.b_step123456.safetensors")
    for other in ("apt_lora.safetensors", "apt_lora_step300.safetensors", "apt_lora_step00300_x.safetensors",
                  "apt_lora2_step00300.safetensors", "xapt_lora_step00300.safetensors", "a_b_step00001.safetensors"):
        assert not s.is_step_lora_name("apt_lora.safetensors" if "apt" in other else "a.b.safetensors", other)


def test_empty_lora_name_is_an_error(mods):
    with pytest.raises(Exception, match="no usable characters"):
        mods["settings"].sanitize_lora_name(" /// ")


def test_caption_inputs_lose_control_characters_and_long_ones_are_cut(mods, tmp_path):
    d = mods["dataset"]
    _write_images(tmp_path / "c", 2)
    ds = d.load_dataset("c", None, None, 64, "a\x00 photo\x07", str(tmp_path))
    assert [r.caption for r in ds.records] == ["a photo", "a photo"]
    out, text = d.caption_dataset(ds, "sks", "dog", "x " * 2000, "{trigger} {class}, {context}",
                                  "replace all captions")
    assert all(len(r.caption) <= 1000 for r in out.records) and "were cut: img0.png\n" in text + "\n"


# ---- run registry ------------------------------------------------------------------------------

def test_run_registry_stop_and_snapshot(mods):
    runs = mods["runs"]
    reg = runs.RunRegistry()
    assert reg.request_stop("7") is None
    run = reg.start("7", lora_name="x.safetensors", total_steps=10)
    stopped = []
    reg.set_stop_callback(run, lambda: stopped.append(True))
    reg.add_event(run, {"step": 1, "loss": 0.5, "gamma": [0.0]})
    reg.add_event(run, {"step": 2, "loss": 0.4, "gamma": [0.1]})
    assert reg.snapshot("7", since=1)["history"] == [{"step": 2, "loss": 0.4, "gamma": [0.1]}]
    assert reg.request_stop("7") is run and stopped == [True] and run.status == "stopping"
    assert reg.all()["7"]["loss"] == 0.4
    late = reg.start("8")
    reg.request_stop("8")  # stop before the trainer exists: delivered when the callback is set
    got = []
    reg.set_stop_callback(late, lambda: got.append(1))
    assert got == [1]
    assert runs.register_routes() is False  # no server in unit tests


# ---- new trainer inputs: batch size, LR schedule, warmup, augmentation space --------------------

def _ata(s, **kw):
    args = dict(num_bins=10, ema_alpha=0.1, indicator_scale=1000.0, p_max=1.0, zoom_min=1.0, zoom_max=3.0,
                rotation_deg=15.0, fill="constant", adaptive_augmentation=True,
                adaptive_loss_weight=True, track_indicator=False)
    args.update(kw)
    return s.ata_settings(**args)


ESSENTIALS = {
    "APTTrainer": ["model", "clip", "vae", "dataset", "steps", "learning_rate", "rank", "lora_name",
                   "memory_preset", "ata_settings", "reg_settings"],
    "APTAtaSettings": ["adaptive_augmentation", "adaptive_loss_weight", "zoom_max", "rotation", "fill_mode"],
    "APTRegSettings": ["lambda_rs", "lambda_aa", "class_preservation"],
}


def _inputs(info):
    return [n for section in ("required", "optional") for n in info["input_order"].get(section, [])]


def test_each_node_shows_the_essentials_first_and_folds_the_rest_under_advanced(mods):
    """What an artist sees: the essentials, then the advanced inputs (flagged where the host's schema
    knows the flag), each advanced one optional with a default and a tooltip that says when to touch it."""
    nd = mods["node_defs"]
    for node in (nd.AptTrainerNode, nd.AptAtaSettings, nd.AptRegSettings):
        info = node.GET_NODE_INFO_V1()
        names = _inputs(info)
        essentials = ESSENTIALS[info["name"]]
        assert names[: len(essentials)] == essentials, names
        spec = {**info["input"]["required"], **info["input"].get("optional", {})}
        for name in names[len(essentials):]:
            assert name in info["input"]["optional"], name
            opts = spec[name][1]
            assert "default" in opts and len(opts.get("tooltip", "")) > 20, name
            assert opts.get("advanced", nd.ADVANCED.get("advanced")) == nd.ADVANCED.get("advanced"), name
            assert not opts.get("advanced") or name not in essentials
        for name in essentials:
            assert not spec[name][1].get("advanced"), name


def test_the_trainers_advanced_defaults_train_as_the_documented_defaults(mods):
    nd, s = mods["node_defs"], mods["settings"]
    opt = nd.AptTrainerNode.GET_NODE_INFO_V1()["input"]["optional"]
    assert opt["batch_size"][1]["default"] == 1 and opt["warmup_steps"][1]["default"] == 0
    assert opt["seed"][1]["default"] == 0 and opt["checkpoint_every"][1]["default"] == 100
    assert opt["resume"][1]["default"] is True and opt["overwrite"][1]["default"] is False
    assert opt["save_lora_every_checkpoint"][1]["default"] is False  # off: only the final file
    assert "overfitted" in opt["save_lora_every_checkpoint"][1]["tooltip"]
    assert opt["lr_schedule"][1]["default"] == "cosine"  # the benchmark-set default
    assert opt["precision"][1]["default"] == "auto" and opt["precision"][1]["options"] == ["auto", "bf16", "fp16", "fp32"]
    ata = nd.AptAtaSettings.GET_NODE_INFO_V1()["input"]["optional"]
    assert ata["augmentation_space"][1]["default"] == "pixel"
    assert ata["augmentation_space"][1]["options"] == ["pixel", "pixel_every_step"]  # latent cost the likeness
    # both settings nodes at their defaults train exactly what leaving them out trains
    def defaults(node):
        info = node.GET_NODE_INFO_V1()
        spec = {**info["input"]["required"], **info["input"].get("optional", {})}
        return node.execute(**{n: spec[n][1]["default"] for n in _inputs(info)}).result[0]

    kw = dict(steps=5, rank=4, learning_rate=1e-4, seed=0, checkpoint_every=0, preset=s.DEFAULT_PRESET)
    assert s.build_config(**kw, ata=defaults(nd.AptAtaSettings), reg=defaults(nd.AptRegSettings)) == \
        s.build_config(**kw)
    old = s.build_config(steps=5, rank=4, learning_rate=1e-4, seed=0, checkpoint_every=0, preset=s.DEFAULT_PRESET,
                         ata=_ata(s))
    from apt_core.config import AugmentConfig, TrainConfig

    assert (old.train.batch_size, old.train.lr_schedule, old.train.warmup_steps) == (1, "cosine", 0)
    assert old.augment.space == "pixel" == AugmentConfig().space and TrainConfig().batch_size == 1
    assert old.augment.precomputed and old.augment.variant_grid == AugmentConfig().variant_grid


def test_new_inputs_reach_the_config(mods):
    s = mods["settings"]
    cfg = s.build_config(steps=20, rank=4, learning_rate=1e-4, seed=0, checkpoint_every=0, preset=s.DEFAULT_PRESET,
                         ata=_ata(s, space="pixel"), batch_size=3, lr_schedule="cosine", warmup_steps=4)
    assert (cfg.train.batch_size, cfg.train.lr_schedule, cfg.train.warmup_steps) == (3, "cosine", 4)
    assert cfg.train.mixed_precision == "auto"
    for choice, want in (("fp32", "no"), ("fp16", "fp16"), ("bf16", "bf16")):
        assert s.build_config(steps=2, rank=4, learning_rate=1e-4, seed=0, checkpoint_every=0,
                              preset=s.DEFAULT_PRESET, precision=choice).train.mixed_precision == want
    assert cfg.augment.space == "pixel" and cfg.augment.precomputed
    for choice, space, precomputed in (("pixel_every_step", "pixel", False),):
        cfg = s.build_config(steps=20, rank=4, learning_rate=1e-4, seed=0, checkpoint_every=0,
                             preset=s.DEFAULT_PRESET, ata=_ata(s, space=choice))
        assert (cfg.augment.space, cfg.augment.precomputed) == (space, precomputed)
    from apt_core.errors import AptConfigError

    with pytest.raises(AptConfigError, match="lr schedule"):
        s.build_config(steps=2, rank=4, learning_rate=1e-4, seed=0, checkpoint_every=0, preset=s.DEFAULT_PRESET,
                       lr_schedule="linear")
    with pytest.raises(AptConfigError, match="batch size"):
        s.build_config(steps=2, rank=4, learning_rate=1e-4, seed=0, checkpoint_every=0, preset=s.DEFAULT_PRESET,
                       batch_size=0)
    with pytest.raises(AptConfigError, match="augmentation space"):
        _ata(s, space="voxel")


# ---- routes: execution ids (top level "7", subgraph "12:5"), idle answer ---------------------------

def _route_client(runs):
    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer

    routes = web.RouteTableDef()
    runs.add_routes(routes)
    app = web.Application()
    app.add_routes(routes)
    return TestClient(TestServer(app))


@pytest.mark.parametrize("node_id", ["7", "12:5", "12:30:5"])
def test_routes_follow_top_level_and_subgraph_execution_ids(mods, node_id):
    import asyncio
    from urllib.parse import quote

    runs = mods["runs"]
    runs.RUNS._runs.pop(node_id, None)

    async def go():
        async with _route_client(runs) as client:
            for path in {node_id, quote(node_id, safe="")}:  # raw and percent-encoded (the widget encodes)
                r = await client.get(f"/apt/runs/{path}")
                assert r.status == 200, path
                assert await r.json() == {"node_id": node_id, "status": "idle", "history": []}
                r = await client.post(f"/apt/runs/{path}/stop")
                assert r.status == 409 and (await r.json())["stopping"] is False
            run = runs.RUNS.start(node_id, prompt_id="p", lora_name="x.safetensors", total_steps=3)
            runs.RUNS.add_event(run, {"step": 1, "loss": 0.5})
            runs.RUNS.add_event(run, {"step": 2, "loss": 0.4})
            r = await client.get(f"/apt/runs/{quote(node_id, safe='')}?since=1")
            body = await r.json()
            assert r.status == 200 and body["node_id"] == node_id and body["status"] == "starting"
            assert body["history"] == [{"step": 2, "loss": 0.4}]
            other = "5" if node_id != "5" else "6"  # the local id alone is another node
            assert (await (await client.get(f"/apt/runs/{other}")).json())["status"] == "idle"
            r = await client.post(f"/apt/runs/{quote(node_id, safe='')}/stop")
            assert r.status == 200 and (await r.json()) == {"node_id": node_id, "stopping": True, "step": 2}
            assert runs.RUNS.get(node_id).stop_requested
            assert node_id in (await (await client.get("/apt/runs")).json())
            r = await client.get(f"/apt/runs/{quote(node_id, safe='')}?since=x")
            assert r.status == 400
    try:
        asyncio.run(go())
    finally:
        runs.RUNS._runs.pop(node_id, None)
