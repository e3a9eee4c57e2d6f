"""The example workflows in workflows/ against the REAL ComfyUI host (CPU, 127.0.0.1). Hosts: 0.3.75
(scripts/env.sh; the host scripts/build_workflows.py generates the files against) and v0.33.0
(scripts/env_comfy033.sh); scripts/test.sh runs this file on both.

For every shipped graph (UI / litegraph format, built by scripts/build_workflows.py):
- the host lists it in /workflow_templates and serves it and its `<name>.jpg` thumbnail from
  /api/workflow_templates/<pack folder>/ (what the frontend's template browser fetches);
- every node type exists in the live /object_info (Note nodes are frontend-only), every link joins
  two existing slots whose types match, inputs/outputs and `widgets_values` fit the live schema
  (count, order, types, ranges, combo options); one tolerance: a core node may have gained outputs
  after the saved ones (v0.33.0: SaveImage -> IMAGE, PreviewAny -> STRING), which leaves every saved
  link where it was;
- on the generator's host (GENERATOR_HOST) the file is exactly what the generator writes from the
  live schema: a node input added/removed/reordered elsewhere fails here until
  `python scripts/build_workflows.py` is run. On other hosts the pack's own nodes must still come out
  exactly as the generator writes them from that host's schema, and the core nodes and links the
  same in structure (ids, types, input sockets, links; saved outputs a prefix of the live ones);
- it is converted to an API prompt (as the frontend's graphToPrompt does) and run end to end.

THE LOADER SWAP: the shipped graphs load a real SDXL checkpoint with the standard
`CheckpointLoaderSimple`. No SDXL checkpoint can be shipped with the tests, and ComfyUI's checkpoint
detection does not recognise a tiny UNet as SDXL, so before running, every CheckpointLoaderSimple is
rebuilt (same node id, same MODEL/CLIP/VAE outputs and links) as `APTTestTinySDXL` from the test-only
pack tests/pack_fixtures/apt_test_models (a tiny SDXL-shaped MODEL/CLIP/VAE). To keep CI fast the
API prompt then gets small numbers: 2-3 training steps, 64 px dataset resolution, 64x64 latents and
2 sampling steps. Nothing else is changed or stubbed.
"""

from __future__ import annotations

import importlib.util
import json
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import comfy_host as ch

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = REPO / "workflows"
NAMES = ["apt-1-train-lora-and-render", "apt-2-dreambooth-vs-apt", "apt-3-advanced-resume-validation"]
# The host the committed workflows/ are generated against (scripts/env.sh's; see the docstring).
GENERATOR_HOST = "0.3.75"


def load_builder():
    spec = importlib.util.spec_from_file_location("apt_build_workflows", REPO / "scripts" / "build_workflows.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


bw = load_builder()


def subject_images(folder: Path, n: int = 3) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, colour in enumerate([(200, 40, 40), (40, 160, 60), (50, 60, 210), (220, 200, 40)][:n]):
        im = Image.new("RGB", (64, 64), (120, 120, 120))
        im.paste(colour, (16, 16, 48, 48))
        im.save(folder / f"ref{i}.png")


start_server = ch.server_with_test_models


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    ch.require_comfyui()
    with start_server(tmp_path_factory.mktemp("apt_workflows")) as srv:
        subject_images(srv.input_dir / bw.FOLDER)
        yield srv


@pytest.fixture(scope="module")
def info(server):
    return server.object_info()


def load(name: str) -> dict:
    return json.loads((WORKFLOWS / f"{name}.json").read_text(encoding="utf-8"))


def is_pack_node(node_type: str, info: dict) -> bool:
    """A node this pack registers (same python module as the APT Trainer), not a core or fixture node."""
    return node_type in bw.pack_node_ids(info)


def _outputs(node: dict) -> list[tuple[str, str]]:
    return [(o["name"], o["type"]) for o in node.get("outputs", [])]


def _live_outputs(info: dict, node_type: str) -> list[tuple[str, str]]:
    return list(zip(info[node_type].get("output_name", []), info[node_type].get("output", [])))


def host_problems(wf: dict, info: dict) -> list[str]:
    """bw.validate_workflow, except that a core node whose saved outputs are a prefix of its live
    outputs is fine (a newer host appended outputs; every saved link keeps its slot)."""
    appended = set()
    for n in wf["nodes"]:
        t = n["type"]
        if t in bw.VIRTUAL_NODES or t not in info or is_pack_node(t, info):
            continue
        have, live = _outputs(n), _live_outputs(info, t)
        if have != live and live[:len(have)] == have:
            appended.add(f"node {n['id']} ({t}): outputs {have} != schema")
    return [p for p in bw.validate_workflow(wf, info) if p not in appended]


def structure_differences(shipped: dict, built: dict, info: dict) -> list[str]:
    """What differs between a shipped graph and the one the generator builds from this host's schema:
    pack nodes compared whole (widgets, inputs, outputs, properties, size, ...); core nodes in
    structure only (type, mode, input sockets and their links, saved outputs a prefix of the built ones
    with the same links); links, groups and the graph's own fields compared whole."""
    out = []
    for key in sorted(set(shipped) | set(built)):
        if key != "nodes" and shipped.get(key) != built.get(key):
            out.append(f"graph field {key!r} differs")
    mine = {n["id"]: n for n in shipped["nodes"]}
    theirs = {n["id"]: n for n in built["nodes"]}
    if set(mine) != set(theirs):
        return out + [f"node ids {sorted(mine)} != {sorted(theirs)}"]
    for i, a in mine.items():
        b, where = theirs[i], f"node {i} ({a['type']})"
        if a["type"] != b["type"]:
            out.append(f"{where}: type is {b['type']} in the built graph")
        elif a["type"] in bw.VIRTUAL_NODES or is_pack_node(a["type"], info):
            out += [f"{where}: {k} differs" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        else:
            if a.get("mode") != b.get("mode"):
                out.append(f"{where}: mode differs")
            if [(x["name"], x["type"], x.get("link")) for x in a["inputs"]] != \
                    [(x["name"], x["type"], x.get("link")) for x in b["inputs"]]:
                out.append(f"{where}: input sockets or their links differ")
            ao, bo = a.get("outputs", []), b.get("outputs", [])
            if [(o["name"], o["type"], o.get("links")) for o in ao] != \
                    [(o["name"], o["type"], o.get("links")) for o in bo[:len(ao)]] or \
                    any(o.get("links") for o in bo[len(ao):]):
                out.append(f"{where}: outputs are not a prefix of the built ones")
    return out


def swap_loader(wf: dict, info: dict) -> dict:
    """CheckpointLoaderSimple -> the test-only tiny SDXL loader (see the module docstring)."""
    assert any(n["type"] == "CheckpointLoaderSimple" for n in wf["nodes"])
    out = bw.replace_node_type(wf, "CheckpointLoaderSimple", "APTTestTinySDXL", info, {"seed": 0, "kind": "sdxl"})
    assert not any(n["type"] == "CheckpointLoaderSimple" for n in out["nodes"])
    assert host_problems(out, info) == []
    return out


def shrink(prompt: dict, train_steps: int = 2) -> dict:
    """Small numbers for CPU CI (see the module docstring)."""
    for node in prompt.values():
        inp, ct = node["inputs"], node["class_type"]
        if ct == "APTTrainer":
            inp["steps"] = train_steps
        elif ct == "APTDatasetLoader":
            inp["resolution"] = 64
        elif ct == "EmptyLatentImage":
            inp["width"] = inp["height"] = 64
        elif ct == "KSampler":
            inp["steps"] = 2
    return prompt


def ids_of(wf: dict, node_type: str) -> list[str]:
    return [str(n["id"]) for n in wf["nodes"] if n["type"] == node_type]


def run_ok(server, prompt: dict, timeout: float = 600) -> dict:
    entry = server.wait_for(server.post_prompt(prompt), timeout=timeout)
    if ch.history_status(entry) != "success":
        errors = [m for m in entry.get("status", {}).get("messages", []) if m[0] == "execution_error"]
        pytest.fail(f"workflow failed: {errors}\nlog tail:\n{server.log_tail()}", pytrace=False)
    return entry


def saved_images(server, entry: dict, node_id: str) -> list[Path]:
    images = entry["outputs"].get(node_id, {}).get("images", [])
    paths = [server.output_dir / im["subfolder"] / im["filename"] for im in images]
    assert paths, f"SaveImage {node_id} produced no image"
    for p in paths:
        assert p.is_file(), p
        with Image.open(p) as im:
            assert im.size == (64, 64)
    return paths


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.int16)


# ---- static checks against the live host ---------------------------------------------------------

def test_templates_are_listed_and_served_with_thumbnails(server):
    listed = server.get_json("/workflow_templates")
    assert sorted(listed.get(ch.DEFAULT_PACK_LINK_NAME, [])) == sorted(NAMES), listed
    for name in NAMES:
        base = f"{server.base_url}/api/workflow_templates/{ch.DEFAULT_PACK_LINK_NAME}/{name}"
        with urllib.request.urlopen(base + ".json", timeout=30) as r:
            assert json.loads(r.read()) == load(name)
        # the frontend asks custom-node templates for `<name>.jpg` (workflowTemplatesStore: mediaSubtype 'jpg')
        with urllib.request.urlopen(base + ".jpg", timeout=30) as r:
            assert r.headers.get_content_type() == "image/jpeg"
            data = r.read()
        assert data[:3] == b"\xff\xd8\xff" and len(data) < 200_000
    assert sorted(p.stem for p in WORKFLOWS.glob("*.json")) == sorted(NAMES), "only workflows belong in workflows/"
    # the host parses the pack's pyproject.toml ([tool.comfy]) at load time; a failure is only a warning there
    assert "Unable to parse pyproject.toml" not in server.log_text()
    assert server.import_failed_lines() == []


def test_node_list_json_matches_the_nodes_the_host_registers(info):
    """node_list.json (for ComfyUI-Manager's scanner) names exactly the nodes the pack registers."""
    listed = json.loads((REPO / "node_list.json").read_text(encoding="utf-8"))
    assert sorted(listed) == bw.pack_node_ids(info), "run `python scripts/build_workflows.py`"


@pytest.mark.parametrize("name", NAMES)
def test_workflow_fits_the_live_schema_and_is_up_to_date(info, name):
    wf = load(name)
    assert wf.get("version") == 0.4 and wf["nodes"] and wf["links"]
    unknown = {n["type"] for n in wf["nodes"]} - set(info) - bw.VIRTUAL_NODES
    assert not unknown, f"node types missing from /object_info: {unknown}"
    assert host_problems(wf, info) == []
    assert "CheckpointLoaderSimple" in {n["type"] for n in wf["nodes"]}
    built = bw.build_all(info)[name]
    stale = f"workflows/{name}.json no longer matches the node schema: run `python scripts/build_workflows.py`"
    if ch.comfyui_version() == GENERATOR_HOST:
        assert (WORKFLOWS / f"{name}.json").read_text(encoding="utf-8") == bw.dumps(built), stale
    else:
        assert structure_differences(wf, built, info) == [], stale + f" (on the {GENERATOR_HOST} host)"


def test_host_tolerance_is_limited_to_appended_core_outputs(info):
    """The tolerances above let a core node gain outputs, nothing else, and never on the pack's nodes."""
    wf = load(NAMES[0])
    built = bw.build_all(info)[NAMES[0]]
    grown = json.loads(json.dumps(info))
    grown["SaveImage"]["output"] = list(grown["SaveImage"].get("output", [])) + ["NEW_TYPE"]
    grown["SaveImage"]["output_name"] = list(grown["SaveImage"].get("output_name", [])) + ["new"]
    assert host_problems(wf, grown) == host_problems(wf, info)
    grown["APTTrainer"]["output"] = list(grown["APTTrainer"]["output"]) + ["NEW_TYPE"]
    grown["APTTrainer"]["output_name"] = list(grown["APTTrainer"]["output_name"]) + ["new"]
    assert any("APTTrainer" in p and "outputs" in p for p in host_problems(wf, grown))
    shrunk = json.loads(json.dumps(info))
    shrunk["KSampler"]["output"], shrunk["KSampler"]["output_name"] = [], []
    assert any("KSampler" in p for p in host_problems(wf, shrunk))
    # a pack node's widget value differs: caught; a core node's extra output: not
    changed = json.loads(json.dumps(built))
    trainer = next(n for n in changed["nodes"] if n["type"] == "APTTrainer")
    trainer["widgets_values"][0] += 1
    save = next(n for n in changed["nodes"] if n["type"] == "SaveImage")
    save["outputs"].append({"name": "new", "type": "NEW_TYPE", "links": [], "slot_index": len(save["outputs"])})
    assert [p for p in structure_differences(wf, changed, info) if "APTTrainer" in p] == \
        [f"node {trainer['id']} (APTTrainer): widgets_values differs"]
    assert not [p for p in structure_differences(wf, changed, info) if "SaveImage" in p]


def test_validation_catches_schema_drift(info):
    """The check above can fail: a node that gained a widget input, or a value out of range."""
    wf = load(NAMES[0])
    drifted = json.loads(json.dumps(info))
    trainer = drifted["APTTrainer"]
    trainer["input"]["optional"]["new_knob"] = ["INT", {"default": 1, "min": 0, "max": 9}]
    trainer["input_order"]["optional"].append("new_knob")
    problems = bw.validate_workflow(wf, drifted)
    assert any("widgets_values" in p and "APTTrainer" in p for p in problems), problems
    broken = json.loads(json.dumps(wf))
    node = next(n for n in broken["nodes"] if n["type"] == "APTTrainer")
    node["widgets_values"][0] = -5  # steps
    assert any("steps" in p and "outside" in p for p in bw.validate_workflow(broken, info))
    relinked = json.loads(json.dumps(wf))
    relinked["links"][0][5] = "LATENT"
    assert any("types differ" in p for p in bw.validate_workflow(relinked, info))


# ---- end to end -----------------------------------------------------------------------------------

def test_workflow_1_trains_renders_and_the_saved_lora_renders_the_same(server, info):
    wf = swap_loader(load(NAMES[0]), info)
    (trainer,) = ids_of(wf, "APTTrainer")
    saves = ids_of(wf, "SaveImage")
    muted = {str(n["id"]) for n in wf["nodes"] if n.get("mode") == bw.MODE_NEVER}
    assert {"LoraLoader"} <= {n["type"] for n in wf["nodes"] if str(n["id"]) in muted}
    prompt = shrink(bw.to_api_prompt(wf, info))
    assert not muted & set(prompt), "muted nodes must not be queued"
    entry = run_ok(server, prompt)
    ui = entry["outputs"][trainer]["apt_run"][0]
    assert ui["lora_name"] == "my_subject_apt.safetensors" and ui["steps_done"] == 2
    assert (server.loras_dir / "my_subject_apt.safetensors").is_file()
    (preview_save,) = [s for s in saves if s not in muted]
    preview = saved_images(server, entry, preview_save)

    # the artist's next run: un-mute the "saved LoRA file" group; training is cached, LoraLoader reads the file
    for n in wf["nodes"]:
        if n.get("mode") == bw.MODE_NEVER:
            n["mode"] = bw.MODE_ALWAYS
    entry = run_ok(server, shrink(bw.to_api_prompt(wf, info)))
    (file_save,) = [s for s in saves if s in muted]
    with_file = saved_images(server, entry, file_save)
    assert np.abs(pixels(with_file[0]) - pixels(preview[0])).max() <= 2, \
        "the saved LoRA through LoraLoader renders differently from the trainer's preview MODEL"
    assert not [ln for ln in server.log_text().splitlines() if "lora key not loaded" in ln]


def test_workflow_2_trains_dreambooth_and_apt_side_by_side(server, info):
    wf = swap_loader(load(NAMES[1]), info)
    trainers = ids_of(wf, "APTTrainer")
    assert len(trainers) == 2
    prompt = shrink(bw.to_api_prompt(wf, info))
    # same data, seed and training numbers on both branches; only the APT switches differ
    a, b = (prompt[t]["inputs"] for t in trainers)
    same = {k for k in a if not isinstance(a[k], list) and k != "lora_name"}
    assert {k: a[k] for k in same} == {k: b[k] for k in same} and a["dataset"] == b["dataset"]
    switches = []
    for t in trainers:
        ata = prompt[prompt[t]["inputs"]["ata_settings"][0]]["inputs"]
        reg = prompt[prompt[t]["inputs"]["reg_settings"][0]]["inputs"]
        switches.append((ata["adaptive_augmentation"], ata["adaptive_loss_weight"],
                         reg["lambda_rs"] > 0, reg["lambda_aa"] > 0))
    assert sorted(switches) == [(False, False, False, False), (True, True, True, True)]
    samplers = [n for n in prompt.values() if n["class_type"] == "KSampler"]
    assert len(samplers) == 2 and len({json.dumps({k: v for k, v in s["inputs"].items() if k != "model"})
                                       for s in samplers}) == 1, "both branches must sample identically"
    entry = run_ok(server, prompt)
    names = sorted(entry["outputs"][t]["apt_run"][0]["lora_name"] for t in trainers)
    assert names == ["my_subject_apt_compare.safetensors", "my_subject_dreambooth.safetensors"]
    for n in names:
        assert (server.loras_dir / n).is_file()
    for s in ids_of(wf, "SaveImage"):
        assert len(saved_images(server, entry, s)) == 2  # batch of 2, same seeds on both branches


def test_workflow_3_all_settings_validation_samples_and_resume(server, info):
    wf = swap_loader(load(NAMES[2]), info)
    (trainer,) = ids_of(wf, "APTTrainer")
    prompt = shrink(bw.to_api_prompt(wf, info))
    # every APT setting is exposed on the graph (nothing left to hidden defaults)
    for t in ("APTAtaSettings", "APTRegSettings"):
        assert ids_of(wf, t)
    t_inputs = prompt[trainer]["inputs"]
    schema = [name for name, *_ in bw.ordered_inputs(info["APTTrainer"])]
    assert set(schema) <= set(t_inputs), set(schema) - set(t_inputs)
    assert t_inputs["resume"] is True and t_inputs["checkpoint_every"] > 0
    entry = run_ok(server, prompt)
    assert entry["outputs"][trainer]["apt_run"][0]["steps_done"] == 2
    saves = ids_of(wf, "SaveImage")
    assert len(saves) == 6
    for s in saves:
        saved_images(server, entry, s)
    history = [v for k, v in entry["outputs"].items() if prompt[k]["class_type"] == "PreviewAny"]
    assert len(history) == 3 and all(h.get("text") for h in history)
    ckpts = list((server.output_dir / "apt_lora_trainer" / "my_subject_apt_advanced").glob("*.pt"))
    assert ckpts, "no checkpoint kept"

    # resume: raise the steps; the run continues from the checkpoint instead of starting over
    entry = run_ok(server, shrink(bw.to_api_prompt(wf, info), train_steps=3))
    ui = entry["outputs"][trainer]["apt_run"][0]
    assert ui["resumed_from"] == 2 and ui["steps_done"] == 3, ui
    state = server.get_json(f"/apt/runs/{trainer}")
    assert state["resumed_from"] == 2 and state["status"] == "finished"
