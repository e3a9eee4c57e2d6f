#!/usr/bin/env python3
"""Build the example workflows in workflows/ (UI / litegraph format, what the ComfyUI frontend saves)
from the compact specs in workflow_specs.py and the LIVE node schema (/object_info of a real ComfyUI
with this pack).

    source scripts/env.sh
    python scripts/build_workflows.py            # starts the real host (CPU), writes workflows/*.json + *.jpg
                                                 # and node_list.json
    python scripts/build_workflows.py --check    # exit 1 when a committed file differs from what it would write
    python scripts/build_workflows.py --object-info dump.json   # use a saved /object_info instead of a host

Why a generator: a UI-format node stores its widget values as a positional list (`widgets_values`),
in the order the frontend creates the widgets from the node definition. When a node gains or loses
an input, hand-written graphs silently shift every value after it. Here every value is named in the
spec and placed by the schema, so a schema change is one command away from correct graphs, and
tests/test_workflows_integration.py fails until it is run.

Frontend rules reproduced here (ComfyUI frontend 1.32.9, src/services/litegraphService.ts and
src/renderer/extensions/vueNodes/widgets/composables/useIntWidget.ts):
- inputs are taken in `input_order` (required, then optional); socket-only inputs (MODEL, CLIP, custom
  types, forceInput) come first in `node.inputs`, then one input per widget (with `"widget": {name}`);
- widgets are INT, FLOAT, STRING, BOOLEAN and COMBO inputs (a COMBO is a list of options or "COMBO");
- an INT input with `control_after_generate`, or named `seed` / `noise_seed` when that option is absent,
  gets an extra "control after generate" widget right after it, whose value ("fixed", "increment",
  "decrement", "randomize") is saved in `widgets_values` but never sent to the server;
- Note / MarkdownNote are frontend-only (virtual) nodes: saved with the graph, never in a prompt.
The same module converts a UI graph into an API prompt the way the frontend's graphToPrompt does
(muted/bypassed nodes and virtual nodes left out); the browser test compares both with the frontend.

The thumbnails (`<name>.jpg` next to `<name>.json`, the name the template browser asks for) are
drawn from the graph itself with Pillow (workflow_thumbnails.py).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from workflow_specs import (FOLDER, MODE_ALWAYS, MODE_BYPASS, MODE_NEVER, THUMB_TITLES,  # noqa: E402,F401
                            VIRTUAL_NODES, WORKFLOWS)
from workflow_schema import (CONTROL_VALUES, SchemaError, check_value, default_value,  # noqa: E402,F401
                             has_control_widget, is_widget, ordered_inputs, types_match, widget_layout)
from workflow_thumbnails import THUMB_SIZE, render_thumbnail  # noqa: E402,F401

REPO = Path(__file__).resolve().parents[1]
WORKFLOW_DIR = REPO / "workflows"


# ------------------------------------------------------------------------------------------------
# Spec -> UI graph
# ------------------------------------------------------------------------------------------------

def registry_id() -> str:
    """[project].name of pyproject.toml: the pack's id on the Comfy Registry."""
    import tomllib

    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["name"]


def _node_size(info: dict | None, n_widgets: int) -> list[int]:
    if info is None:
        return [400, 200]
    sockets = [1 for name, t, opts, _c, _o in ordered_inputs(info) if not is_widget(t, opts)]
    rows = max(len(sockets), len(info.get("output", [])))
    return [340, 46 + 22 * rows + 24 * n_widgets]


def build_node(node_id: int, key: str, spec: dict, object_info: dict) -> dict:
    """One serialised node (links filled in later)."""
    ntype = spec["type"]
    node: dict[str, Any] = {"id": node_id, "type": ntype, "pos": list(spec["pos"]), "size": None, "flags": {},
                            "order": 0, "mode": spec.get("mode", MODE_ALWAYS), "inputs": [], "outputs": []}
    if spec.get("title"):
        node["title"] = spec["title"]
    if ntype in VIRTUAL_NODES:
        node["properties"] = {}
        node["widgets_values"] = [spec.get("text", "")]
        node["color"], node["bgcolor"] = "#432", "#653"
        node["size"] = list(spec.get("size", (400, 200)))
        return node
    if ntype not in object_info:
        raise SchemaError(f"{key}: node type {ntype!r} is not in /object_info (missing custom node?)")
    info = object_info[ntype]
    given = dict(spec.get("w", {}))
    control = dict(spec.get("control", {}))
    known = {name for name, *_ in ordered_inputs(info)}
    for name in list(given) + list(control):
        if name not in known:
            raise SchemaError(f"{key} ({ntype}): the schema has no input {name!r}; inputs are {sorted(known)}")
    values: list[Any] = []
    widget_inputs = []
    for name, t, opts, combo, optional in ordered_inputs(info):
        if not is_widget(t, opts):
            node["inputs"].append({"name": name, "type": t, "link": None})
            continue
        value = given.pop(name, default_value(t, opts, combo))
        why = check_value(ntype, name, t, opts, combo, value)
        if why:
            raise SchemaError(f"{key} ({ntype}).{name}: {why}")
        values.append(value)
        if has_control_widget(name, t, opts):
            c = control.pop(name, "fixed")
            if c not in CONTROL_VALUES:
                raise SchemaError(f"{key}.{name}: control value {c!r} not in {CONTROL_VALUES}")
            values.append(c)
        widget_inputs.append({"name": name, "type": t, "widget": {"name": name}, "link": None})
    if control:
        raise SchemaError(f"{key} ({ntype}): no control-after-generate widget for {sorted(control)}")
    node["inputs"].extend(widget_inputs)
    for i, (otype, oname) in enumerate(zip(info.get("output", []), info.get("output_name", []))):
        node["outputs"].append({"name": oname, "type": otype, "links": [], "slot_index": i})
    node["properties"] = {"Node name for S&R": ntype}
    if "APTTrainer" in object_info and info.get("python_module") == object_info["APTTrainer"].get("python_module"):
        # the registry id of the pack that provides the node, as the frontend records it: lets
        # ComfyUI-Manager / the frontend offer to install the pack when a user lacks it
        node["properties"]["cnr_id"] = registry_id()
    node["widgets_values"] = values
    node["size"] = list(spec.get("size") or _node_size(info, len(values)))
    return node


def _topo_order(nodes: dict[int, dict], links: list[list]) -> None:
    deps: dict[int, set[int]] = {i: set() for i in nodes}
    for _lid, src, _ss, dst, _ds, _t in links:
        deps[dst].add(src)
    order, done = 0, set()
    while len(done) < len(nodes):
        ready = sorted(i for i in nodes if i not in done and deps[i] <= done)
        if not ready:
            raise SchemaError("the graph has a cycle")
        for i in ready:
            nodes[i]["order"] = order
            order += 1
            done.add(i)


def build_workflow(spec: dict, object_info: dict) -> dict:
    keys = list(spec["nodes"])
    ids = {k: i + 1 for i, k in enumerate(keys)}
    nodes = {ids[k]: build_node(ids[k], k, spec["nodes"][k], object_info) for k in keys}
    links: list[list] = []
    for src_key, out_idx, dst_key, in_name in spec["links"]:
        src, dst = nodes[ids[src_key]], nodes[ids[dst_key]]
        if out_idx >= len(src["outputs"]):
            raise SchemaError(f"{src_key} ({src['type']}) has no output #{out_idx}")
        slot = next((i for i, inp in enumerate(dst["inputs"]) if inp["name"] == in_name), None)
        if slot is None:
            raise SchemaError(f"{dst_key} ({dst['type']}) has no input {in_name!r}")
        out, inp = src["outputs"][out_idx], dst["inputs"][slot]
        if not types_match(out["type"], inp["type"]):
            raise SchemaError(f"{src_key}.{out['name']} ({out['type']}) cannot feed {dst_key}.{in_name} ({inp['type']})")
        if inp["link"] is not None:
            raise SchemaError(f"{dst_key}.{in_name} is linked twice")
        lid = len(links) + 1
        links.append([lid, src["id"], out_idx, dst["id"], slot, out["type"]])
        out["links"].append(lid)
        inp["link"] = lid
    _topo_order(nodes, links)
    groups = []
    for gi, (title, members, color) in enumerate(spec.get("groups", [])):
        boxes = [(nodes[ids[m]]["pos"], nodes[ids[m]]["size"]) for m in members]
        x0 = min(p[0] for p, _ in boxes) - 20
        y0 = min(p[1] for p, _ in boxes) - 70
        x1 = max(p[0] + s[0] for p, s in boxes) + 20
        y1 = max(p[1] + s[1] for p, s in boxes) + 20
        groups.append({"id": gi + 1, "title": title, "bounding": [x0, y0, x1 - x0, y1 - y0], "color": color,
                       "font_size": 24, "flags": {}})
    return {"id": None, "revision": 0, "last_node_id": len(nodes), "last_link_id": len(links),
            "nodes": [nodes[i] for i in sorted(nodes)], "links": links, "groups": groups, "config": {},
            "extra": {"ds": {"scale": 0.55, "offset": [60, 40]}}, "version": 0.4}


def build_all(object_info: dict) -> dict[str, dict]:
    out = {}
    for i, (name, fn) in enumerate(WORKFLOWS.items()):
        wf = build_workflow(fn(), object_info)
        wf["id"] = f"6a7f0a1e-0000-4000-8000-00000000000{i + 1}"  # fixed: regenerating changes nothing else
        out[name] = wf
    return out


def dumps(workflow: dict) -> str:
    return json.dumps(workflow, indent=2, ensure_ascii=False) + "\n"


# ------------------------------------------------------------------------------------------------
# Validation of a saved graph against the live schema, and UI graph -> API prompt
# ------------------------------------------------------------------------------------------------

def validate_workflow(wf: dict, object_info: dict) -> list[str]:
    """Every problem of a UI graph with respect to the live schema (empty list: fine)."""
    problems: list[str] = []
    by_id = {n["id"]: n for n in wf["nodes"]}
    if len(by_id) != len(wf["nodes"]):
        problems.append("duplicate node ids")
    link_ids = set()
    for link in wf["links"]:
        lid, src, sslot, dst, dslot, ltype = link
        link_ids.add(lid)
        if src not in by_id or dst not in by_id:
            problems.append(f"link {lid}: unknown node {src if src not in by_id else dst}")
            continue
        s, d = by_id[src], by_id[dst]
        if sslot >= len(s["outputs"]) or dslot >= len(d["inputs"]):
            problems.append(f"link {lid}: slot out of range")
            continue
        out, inp = s["outputs"][sslot], d["inputs"][dslot]
        if inp.get("link") != lid or lid not in (out.get("links") or []):
            problems.append(f"link {lid}: not recorded on both ends")
        if not types_match(out["type"], inp["type"]) or not types_match(ltype, inp["type"]):
            problems.append(f"link {lid}: {s['type']}.{out['name']} ({out['type']}) -> {d['type']}.{inp['name']} "
                            f"({inp['type']}) types differ")
        if s["type"] not in VIRTUAL_NODES and s["type"] in object_info:
            live_out = object_info[s["type"]].get("output", [])
            if sslot >= len(live_out) or not types_match(live_out[sslot], inp["type"]):
                problems.append(f"link {lid}: {s['type']} output #{sslot} is no longer {out['type']}")
    for n in wf["nodes"]:
        ntype, where = n["type"], f"node {n['id']} ({n['type']})"
        for inp in n.get("inputs", []):
            if inp.get("link") is not None and inp["link"] not in link_ids:
                problems.append(f"{where}.{inp['name']}: dangling link {inp['link']}")
        if ntype in VIRTUAL_NODES:
            if not (len(n.get("widgets_values", [])) == 1 and isinstance(n["widgets_values"][0], str)):
                problems.append(f"{where}: a note holds exactly one text")
            continue
        info = object_info.get(ntype)
        if info is None:
            problems.append(f"{where}: node type not in /object_info")
            continue
        specs = {name: (t, opts, combo, optional) for name, t, opts, combo, optional in ordered_inputs(info)}
        layout = widget_layout(info)
        values = n.get("widgets_values", [])
        if len(values) != len(layout):
            problems.append(f"{where}: {len(values)} widgets_values but the schema has {len(layout)} widgets "
                            f"({[name + ('/control' if c else '') for name, c in layout]})")
        for (name, ctl), value in zip(layout, values):
            t, opts, combo, _opt = specs[name]
            if ctl:
                if value not in CONTROL_VALUES:
                    problems.append(f"{where}.{name}: control value {value!r}")
                continue
            why = check_value(ntype, name, t, opts, combo, value)
            if why:
                problems.append(f"{where}.{name}: {why}")
        want_sockets = [(name, t) for name, t, opts, _c, _o in ordered_inputs(info) if not is_widget(t, opts)]
        want_widgets = [(name, t) for name, t, opts, _c, _o in ordered_inputs(info) if is_widget(t, opts)]
        have = [(i["name"], i["type"]) for i in n.get("inputs", [])]
        if have != want_sockets + want_widgets:
            problems.append(f"{where}: inputs {have} != schema {want_sockets + want_widgets}")
        for name, (t, opts, combo, optional) in specs.items():
            if not optional and not is_widget(t, opts):
                linked = any(i["name"] == name and i.get("link") is not None for i in n.get("inputs", []))
                if not linked:
                    problems.append(f"{where}: required input {name!r} is not connected")
        have_out = [(o["name"], o["type"]) for o in n.get("outputs", [])]
        if have_out != list(zip(info.get("output_name", []), info.get("output", []))):
            problems.append(f"{where}: outputs {have_out} != schema")
    return problems


def to_api_prompt(wf: dict, object_info: dict) -> dict:
    """The API prompt the frontend's graphToPrompt would queue for this UI graph."""
    by_id = {n["id"]: n for n in wf["nodes"]}
    links = {l[0]: l for l in wf["links"]}
    active = {i for i, n in by_id.items() if n["type"] not in VIRTUAL_NODES and n.get("mode", 0) == MODE_ALWAYS}
    if any(n.get("mode", 0) == MODE_BYPASS for n in by_id.values()):
        raise SchemaError("bypassed nodes are not supported by this converter")
    prompt = {}
    for i in sorted(active):
        n = by_id[i]
        info = object_info[n["type"]]
        inputs: dict[str, Any] = {}
        for (name, ctl), value in zip(widget_layout(info), n.get("widgets_values", [])):
            if not ctl:
                inputs[name] = value
        for inp in n.get("inputs", []):
            lid = inp.get("link")
            if lid is None:
                continue
            _lid, src, sslot, _dst, _ds, _t = links[lid]
            if src in active:
                inputs[inp["name"]] = [str(src), sslot]
            else:
                inputs.pop(inp["name"], None)
        prompt[str(i)] = {"class_type": n["type"], "inputs": inputs,
                          "_meta": {"title": n.get("title") or info.get("display_name") or n["type"]}}
    return prompt


def replace_node_type(wf: dict, old: str, new: str, object_info: dict, widgets: dict | None = None) -> dict:
    """A copy of the graph with every `old` node rebuilt as `new` (same id, position, outputs' links).
    Outputs must line up by index and type (used by the tests: checkpoint loader -> tiny test model)."""
    wf = copy.deepcopy(wf)
    for idx, n in enumerate(wf["nodes"]):
        if n["type"] != old:
            continue
        fresh = build_node(n["id"], f"node {n['id']}", {"type": new, "pos": n["pos"], "w": widgets or {},
                                                       "mode": n.get("mode", 0)}, object_info)
        if any(i.get("link") is not None for i in n["inputs"]):
            raise SchemaError(f"{old} node {n['id']} has linked inputs; cannot replace it")
        if [o["type"] for o in fresh["outputs"]][:len(n["outputs"])] != [o["type"] for o in n["outputs"]]:
            raise SchemaError(f"{new} outputs do not line up with {old}")
        for o_new, o_old in zip(fresh["outputs"], n["outputs"]):
            o_new["links"] = list(o_old.get("links") or [])
        fresh["order"] = n.get("order", 0)
        wf["nodes"][idx] = fresh
    return wf


# ------------------------------------------------------------------------------------------------
# node_list.json (ComfyUI-Manager)
# ------------------------------------------------------------------------------------------------
# ComfyUI-Manager's scanner (scanner.py -> extension-node-map.json, used by "Install Missing Custom
# Nodes") finds node names only in NODE_CLASS_MAPPINGS / NODE_CONFIG dict literals, `_CLASS_MAPPINGS[...]`
# assignments, @register_node(...) and a node_list.json at the repository root. V3 nodes registered
# through comfy_entrypoint() match none of these, so the pack lists them in node_list.json.

def pack_node_ids(object_info: dict, module_hint: str = "APTTrainer") -> list[str]:
    """Node ids registered by this pack (same python_module as the APT Trainer)."""
    module = object_info[module_hint]["python_module"]
    return sorted(k for k, v in object_info.items() if v.get("python_module") == module)


def node_list(object_info: dict) -> dict[str, str]:
    return {k: f"{object_info[k]['display_name']}: {object_info[k].get('description', '')}".strip()
            for k in pack_node_ids(object_info)}


def dumps_node_list(object_info: dict) -> str:
    return json.dumps(node_list(object_info), indent=2, ensure_ascii=False) + "\n"


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------

def live_object_info() -> dict:
    """/object_info of the real ComfyUI host (tests/comfy_host.py; CPU, 127.0.0.1) with this pack."""
    sys.path.insert(0, str(REPO / "tests"))
    import comfy_host as ch  # noqa: E402

    if not ch.comfyui_available():
        raise SystemExit(f"no ComfyUI host tree at {ch.comfyui_dir()}: run `source scripts/env.sh` first "
                         f"(or pass --object-info FILE)")
    with ch.ComfyServer() as server:
        failed = server.import_failed_lines()
        failed += [ln for ln in server.log_text().splitlines() if "Unable to parse pyproject.toml" in ln]
        if failed:
            raise SystemExit("custom node import failed:\n" + "\n".join(failed) + "\n" + server.log_tail())
        return server.object_info()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--object-info", type=Path, help="a saved /object_info JSON instead of starting the host")
    ap.add_argument("--check", action="store_true", help="only compare with the committed files; exit 1 if stale")
    ap.add_argument("--out", type=Path, default=WORKFLOW_DIR)
    args = ap.parse_args(argv)
    info = json.loads(args.object_info.read_text()) if args.object_info else live_object_info()
    built = build_all(info)
    stale = []
    for name, wf in built.items():
        problems = validate_workflow(wf, info)
        if problems:
            raise SystemExit(f"{name}: generated graph is invalid:\n  " + "\n  ".join(problems))
        path = args.out / f"{name}.json"
        text = dumps(wf)
        if args.check:
            if not path.is_file() or path.read_text(encoding="utf-8") != text:
                stale.append(str(path))
            if not (args.out / f"{name}.jpg").is_file():
                stale.append(str(args.out / f"{name}.jpg"))
            continue
        args.out.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        render_thumbnail(wf, THUMB_TITLES[name], args.out / f"{name}.jpg", info)
        print(f"wrote {path.relative_to(REPO) if path.is_relative_to(REPO) else path} "
              f"({len(wf['nodes'])} nodes, {len(wf['links'])} links) + thumbnail")
    nl_path = REPO / "node_list.json"
    if args.check:
        if not nl_path.is_file() or nl_path.read_text(encoding="utf-8") != dumps_node_list(info):
            stale.append(str(nl_path))
    elif args.out == WORKFLOW_DIR:
        nl_path.write_text(dumps_node_list(info), encoding="utf-8")
        print(f"wrote node_list.json ({len(node_list(info))} nodes)")
    if stale:
        print("stale (run `python scripts/build_workflows.py`):\n  " + "\n  ".join(stale))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
