"""The live chart widget in a REAL browser: headless Debian Chromium driven by playwright, against the
real ComfyUI frontend served by the real host with this pack loaded (CPU, 127.0.0.1). Hosts:
0.3.75 (frontend 1.32.9) and v0.33.0 (frontend 1.48.7); scripts/test.sh runs this file on both.

Flow: open the page; open the template browser (Templates -> Extensions -> the pack's folder), check
the three example cards and their thumbnails, open example 1 by clicking its card; load each shipped
graph and check the frontend serialises it back unchanged; then load example workflow 1
(workflows/apt-1-train-lora-and-render.json, with the checkpoint loader swapped for the test-only tiny
SDXL loader and small numbers, see tests/test_workflows_integration.py) with `app.loadGraphData`,
check that the frontend reads the graph
exactly as the generator wrote it (its own serialisation and graphToPrompt agree), queue it with
`app.queuePrompt(0)`, wait until the chart on the APT Trainer node has drawn points for every
timestep bin, press the widget's Stop button with a real mouse click, and check the graceful stop:
status "stopped" on the chart and on the server, the LoRA and a resumable checkpoint kept, the rest
of the workflow rendered. Screenshots go to test-artifacts/ (gitignored; $APT_TEST_ARTIFACTS, which
scripts/test.sh sets to test-artifacts/comfyui-0.33.0 for the v0.33.0 run); with
APT_UPDATE_DOCS_SCREENSHOT=1 the chart screenshot also replaces docs/widget.png, and the fresh trainer
node's docs/trainer_node.png.

Browser: /usr/bin/chromium (or $APT_CHROMIUM). Never downloaded by playwright. Missing browser or
playwright: skipped locally, FAILS under CI=true / APT_REQUIRE_BROWSER=1.
"""

from __future__ import annotations

import importlib
import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest

import comfy_host as ch
from test_workflows_integration import NAMES, bw, host_problems, load, start_server, subject_images, swap_loader

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
# scripts/test.sh points the v0.33.0 run at test-artifacts/comfyui-0.33.0 so both hosts' screenshots stay
ARTIFACTS = Path(os.environ.get("APT_TEST_ARTIFACTS") or REPO / "test-artifacts")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage"]
TRAIN_STEPS = 400  # far more than needed: the test stops the run with the widget's button
STOP_AFTER = 3     # points per bin before pressing Stop
# APT_UPDATE_DOCS_SCREENSHOT=1: a longer run (80 steps, stopped at 60, learning rate 5e-3 so the tiny
# random model moves) so the committed docs/widget.png shows more than a few points.
DOCS = os.environ.get("APT_UPDATE_DOCS_SCREENSHOT", "").strip().lower() not in ("", "0", "false", "no", "off")
if DOCS:
    TRAIN_STEPS, STOP_AFTER = 80, 60


def chromium_path() -> str:
    return os.environ.get("APT_CHROMIUM", "/usr/bin/chromium")


def require_browser() -> str:
    """The browser executable; skip without it locally, fail under CI / APT_REQUIRE_BROWSER."""
    why = None
    try:
        importlib.import_module("playwright.sync_api")
    except Exception as exc:  # noqa: BLE001
        why = f"playwright is not importable ({exc}); `pip install -r requirements-dev.txt`"
    exe = chromium_path()
    if why is None and not (os.path.isfile(exe) and os.access(exe, os.X_OK)):
        why = (f"no Chromium at {exe}: `apt-get install -y chromium` (Debian) or set APT_CHROMIUM "
               f"(scripts/env.sh installs it under CI)")
    if why:
        if ch.host_required() or ch._truthy(os.environ.get("APT_REQUIRE_BROWSER")):
            pytest.fail(why + " [CI / APT_REQUIRE_BROWSER is set: failing instead of skipping]", pytrace=False)
        pytest.skip(why)
    return exe


def set_widget(wf: dict, info: dict, node_id: int, name: str, value) -> None:
    node = next(n for n in wf["nodes"] if n["id"] == node_id)
    layout = bw.widget_layout(info[node["type"]])
    node["widgets_values"][layout.index((name, None))] = value


def browser_graph(info: dict) -> tuple[dict, int]:
    """Workflow 1 with the tiny loader and small numbers (trainer steps stay high: we press Stop)."""
    wf = swap_loader(load(NAMES[0]), info)
    trainer = None
    for n in wf["nodes"]:
        if n["type"] == "APTTrainer":
            trainer = n["id"]
            set_widget(wf, info, n["id"], "steps", TRAIN_STEPS)
            set_widget(wf, info, n["id"], "checkpoint_every", 0)
            set_widget(wf, info, n["id"], "preview_every", 20 if DOCS else 2)
            if DOCS:
                set_widget(wf, info, n["id"], "learning_rate", 5e-3)
        elif n["type"] == "APTDatasetLoader":
            set_widget(wf, info, n["id"], "resolution", 64)
        elif n["type"] == "EmptyLatentImage":
            set_widget(wf, info, n["id"], "width", 64)
            set_widget(wf, info, n["id"], "height", 64)
        elif n["type"] == "KSampler":
            set_widget(wf, info, n["id"], "steps", 2)
    assert host_problems(wf, info) == []
    return wf, trainer


@pytest.fixture(scope="module")
def browser_exe():
    return require_browser()


@pytest.fixture(scope="module")
def server(tmp_path_factory, browser_exe):
    ch.require_comfyui()
    with start_server(tmp_path_factory.mktemp("apt_browser")) as srv:
        subject_images(srv.input_dir / bw.FOLDER)
        # a returning user: no first-run template dialog over the canvas
        srv.post_json("/settings", {"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False})
        yield srv


def _wait(page, js: str, arg=None, timeout: float = 240.0, what: str = ""):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = page.evaluate(js, arg)
        if last and (not isinstance(last, dict) or last.get("ok")):
            return last
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what or js}: last={last!r}")


CHART_STATE = """(id) => {
  const c = document.querySelector(`.apt-live-chart[data-apt-node="${id}"] canvas`);
  if (!c) return {ok: false, reason: 'no chart canvas'};
  const gamma = (c.dataset.aptGammaPoints || '').split(',').filter(s => s !== '').map(Number);
  return {ok: true, status: c.dataset.aptStatus, step: Number(c.dataset.aptStep || 0), gamma,
          loss: JSON.parse(c.dataset.aptLossPoints || '{}'), events: Number(c.dataset.aptEvents || 0),
          drawn: Number(c.dataset.aptDrawn || 0)};
}"""


def test_chart_fills_every_bin_and_stop_button_stops_gracefully(server, browser_exe):
    from playwright.sync_api import sync_playwright

    info = server.object_info()
    wf, trainer = browser_graph(info)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    profile = tempfile.mkdtemp(prefix="apt-chromium-")
    console: list[str] = []
    mark = 0
    try:
        with sync_playwright() as pw:
            ctx = pw.chromium.launch_persistent_context(profile, executable_path=browser_exe, headless=True,
                                                        args=CHROMIUM_ARGS, viewport={"width": 1600, "height": 1300})
            try:
                page = ctx.pages[0] if ctx.pages else ctx.new_page()
                page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
                page.on("pageerror", lambda e: console.append(f"pageerror: {e}"))
                page.goto(server.base_url + "/", wait_until="domcontentloaded", timeout=120_000)
                _wait(page, "() => !!(window.app && window.app.graph && window.app.canvas)", timeout=180,
                      what="the ComfyUI frontend")
                _wait(page, "() => !!window.LiteGraph?.registered_node_types?.APTTrainer", timeout=60,
                      what="the APT node definitions")
                mark = len(console)  # errors the frontend logs on an empty first start are not ours

                # a fresh APT Trainer at its defaults, as an artist first sees it: the essentials, the rest
                # flagged advanced (frontends that know the flag fold them: 1.48.7 behind the node's
                # "advanced inputs" button in its node design; 1.32.9 shows every input)
                shown = page.evaluate("""async () => {
                    await window.app.loadGraphData({nodes: [], links: [], groups: [], config: {}, extra: {}, version: 0.4});
                    const n = window.LiteGraph.createNode('APTTrainer'); n.pos = [420, 80]; window.app.graph.add(n);
                    const ds = window.app.canvas.ds; ds.scale = 1; ds.offset = [0, 0];
                    window.app.canvas.setDirty(true, true);
                    const adv = (w) => !!(w.advanced || w.options?.advanced);
                    return {flagged: (n.widgets || []).filter(adv).map(w => w.name),
                            plain: (n.widgets || []).filter(w => !adv(w)).map(w => w.name),
                            rect: [n.pos[0], n.pos[1] - window.LiteGraph.NODE_TITLE_HEIGHT, n.size[0],
                                   n.size[1] + window.LiteGraph.NODE_TITLE_HEIGHT]}; }""")
                essentials = ["steps", "learning_rate", "rank", "lora_name", "memory_preset"]
                assert [w for w in shown["plain"] if w in essentials] == essentials, shown
                print("APT Trainer widgets: advanced", shown["flagged"], "shown", shown["plain"])
                if shown["flagged"]:
                    assert not set(shown["flagged"]) & set(essentials), shown
                    assert {"seed", "resume", "overwrite", "batch_size", "lr_schedule"} <= set(shown["flagged"]), shown
                time.sleep(1.0)
                box = page.evaluate("""(r) => { const c = window.app.canvas.canvas.getBoundingClientRect();
                                        return {x: c.x + r[0] - 10, y: c.y + r[1] - 10, width: r[2] + 20, height: r[3] + 20}; }""",
                                    shown["rect"])
                page.screenshot(path=str(ARTIFACTS / "trainer-node.png"), clip=box)

                # the artist's way in: Templates -> Extensions -> <pack folder> shows the three graphs with
                # their thumbnails; clicking a card opens it
                page.evaluate("async () => { await window.app.extensionManager.command.execute('Comfy.BrowseTemplates'); }")
                nav = page.get_by_text(ch.DEFAULT_PACK_LINK_NAME, exact=True)
                nav.first.click(timeout=60_000)
                for name in NAMES:
                    page.get_by_text(name, exact=True).first.wait_for(timeout=60_000)
                _wait(page, """(w) => [...document.querySelectorAll('img')]
                        .filter(i => i.complete && i.naturalWidth === w).length >= 3""", bw.THUMB_SIZE[0],
                      timeout=60, what="three template thumbnails")
                page.screenshot(path=str(ARTIFACTS / "templates.png"))
                page.get_by_text(NAMES[0], exact=True).first.click()
                _wait(page, "() => window.app.graph.nodes.some(n => n.type === 'APTTrainer') && "
                            "!document.querySelector('.p-dialog-mask')", timeout=60, what="the template to open")
                opened = sorted(page.evaluate("() => window.app.graph.nodes.map(n => n.type)"))
                assert opened == sorted(n["type"] for n in load(NAMES[0])["nodes"])
                # every shipped graph, unchanged, loads in the real frontend with all node types known and
                # the frontend's own serialisation giving back the same widget values
                for name in NAMES:
                    shipped = load(name)
                    page.evaluate("async (wf) => { await window.app.loadGraphData(wf); }", shipped)
                    got = page.evaluate("""() => window.app.graph.serialize().nodes.map(n => ({id: String(n.id),
                        type: n.type, known: !!window.LiteGraph.registered_node_types[n.type],
                        values: n.widgets_values ?? [], mode: n.mode, cnr: n.properties?.cnr_id ?? null}))""")
                    assert {g["id"] for g in got} == {str(n["id"]) for n in shipped["nodes"]}, name
                    assert all(g["known"] for g in got), (name, [g["type"] for g in got if not g["known"]])
                    want = {str(n["id"]): n["widgets_values"] for n in shipped["nodes"]}
                    assert {g["id"]: g["values"] for g in got} == want, name
                    assert {g["id"]: g["mode"] for g in got} == {str(n["id"]): n["mode"] for n in shipped["nodes"]}
                    assert {g["id"]: g["cnr"] for g in got if g["type"].startswith("APT")} == \
                        {str(n["id"]): n["properties"]["cnr_id"] for n in shipped["nodes"] if n["type"].startswith("APT")}
                page.evaluate("async (wf) => { await window.app.loadGraphData(wf); }", wf)

                # the frontend reads the generated graph exactly as the generator laid it out
                mine = {str(n["id"]): n["widgets_values"] for n in wf["nodes"]}
                theirs = page.evaluate("""() => Object.fromEntries(window.app.graph.serialize().nodes
                                           .map(n => [String(n.id), n.widgets_values ?? []]))""")
                assert theirs == mine
                front = page.evaluate("async () => (await window.app.graphToPrompt()).output")
                ours = bw.to_api_prompt(wf, info)
                # inputs the schema does not know are dropped by the server (e.g. the frontend's PreviewAny
                # sends its read-only display widget as "preview"); everything else must agree exactly
                def strip(p):
                    return {k: {"class_type": v["class_type"],
                                "inputs": {n: x for n, x in v["inputs"].items()
                                           if n in {i[0] for i in bw.ordered_inputs(info[v["class_type"]])}}}
                            for k, v in p.items()}
                assert strip(front) == strip(ours)
                assert all(set(v["inputs"]) <= set(front[k]["inputs"]) for k, v in ours.items())
                assert page.evaluate(f"() => !!window.app.graph.getNodeById({trainer}).__aptChart")

                # put the trainer node in view at zoom 1 so its DOM widget is shown and clickable
                page.evaluate("""(id) => { const n = window.app.graph.getNodeById(id); const ds = window.app.canvas.ds;
                                 ds.scale = 1; ds.offset = [-n.pos[0] + 80, -n.pos[1] + 60];
                                 window.app.canvas.setDirty(true, true); }""", trainer)
                page.evaluate("async () => { await window.app.queuePrompt(0); }")

                state = _wait(page, f"""(id) => {{ const s = ({CHART_STATE})(id);
                    s.ok = s.ok && s.status === 'training' && s.gamma.length === 10 && s.gamma.every(n => n >= {STOP_AFTER});
                    return s; }}""", trainer, timeout=300, what="gamma points in every bin")
                assert len(state["gamma"]) == 10 and min(state["gamma"]) >= STOP_AFTER, state
                assert state["loss"] and all(v >= 2 for v in state["loss"].values()), state
                page.screenshot(path=str(ARTIFACTS / "widget-training.png"))

                stop = page.locator(f'.apt-live-chart[data-apt-node="{trainer}"] .apt-live-stop')
                assert stop.is_enabled() and stop.text_content() == "Stop"
                stop.click(timeout=30_000)
                final = _wait(page, f"""(id) => {{ const s = ({CHART_STATE})(id);
                    s.ok = s.ok && s.status === 'stopped'; return s; }}""", trainer, timeout=240,
                              what="the chart to show 'stopped'")
                # the rest of the workflow (preview render) finishes after the graceful stop
                deadline = time.monotonic() + 240
                while True:
                    q = server.queue()
                    if not q.get("queue_running") and not q.get("queue_pending"):
                        break
                    assert time.monotonic() < deadline, f"queue never drained: {q}"
                    time.sleep(0.5)
                time.sleep(1.0)  # let the page draw the final state
                chart = page.locator(f'.apt-live-chart[data-apt-node="{trainer}"]')
                # the preview strip: the latest step's images from /view; a click on the chart at step 0
                # shows the base model's previews
                strip = chart.locator(".apt-previews")
                _wait(page, """(sel) => { const s = document.querySelector(sel); const imgs = s ? [...s.querySelectorAll('img')] : [];
                        return {ok: imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth === 64),
                                steps: s?.dataset.aptPreviewSteps, shown: s?.dataset.aptPreviewStep}; }""",
                      f'.apt-live-chart[data-apt-node="{trainer}"] .apt-previews', timeout=120, what="preview images")
                steps = [int(s) for s in strip.get_attribute("data-apt-preview-steps").split(",")]
                every = 20 if DOCS else 2
                assert steps[:2] == [0, every] and all(s % every == 0 or s == final["step"] for s in steps), steps
                assert strip.get_attribute("data-apt-preview-step") == str(steps[-1])
                box = chart.locator("canvas").bounding_box()
                page.mouse.click(box["x"] + 41, box["y"] + 30)  # the gamma plot's left edge: step 0
                _wait(page, """(sel) => { const s = document.querySelector(sel);
                        const imgs = [...s.querySelectorAll('img')];
                        return {ok: s.dataset.aptPreviewStep === '0' && imgs.length > 0
                                    && imgs.every(i => i.src.includes('step_000000_') && i.complete && i.naturalWidth === 64)}; }""",
                      f'.apt-live-chart[data-apt-node="{trainer}"] .apt-previews', timeout=30,
                      what="the step-0 previews after a click on the chart")
                if not DOCS:
                    chart.screenshot(path=str(ARTIFACTS / "widget-previews-step0.png"))
                    page.mouse.click(box["x"] + box["width"] - 12, box["y"] + 30)  # the right edge: the latest
                    time.sleep(0.5)
                chart.screenshot(path=str(ARTIFACTS / "widget.png"))
                page.screenshot(path=str(ARTIFACTS / "widget-page.png"))
                assert stop.is_disabled()
            finally:
                ctx.close()
    finally:
        (ARTIFACTS / "widget-browser-console.log").write_text("\n".join(console), encoding="utf-8")
        shutil.rmtree(profile, ignore_errors=True)

    run = server.get_json(f"/apt/runs/{trainer}")
    assert run["status"] == "stopped", run
    assert STOP_AFTER <= run["step"] < TRAIN_STEPS and final["step"] == run["step"]
    assert run["checkpoint"] and Path(run["checkpoint"]).is_file(), run
    assert (server.loras_dir / "my_subject_apt.safetensors").is_file()
    history = server.history()
    (entry,) = [e for e in history.values() if any(v.get("class_type") == "APTTrainer"
                                                   for v in e["prompt"][2].values())]
    assert ch.history_status(entry) == "success", entry["status"]
    ui = entry["outputs"][str(trainer)]["apt_run"][0]
    assert ui["stopped"] and ui["steps_done"] == run["step"]
    images = [o for o in entry["outputs"].values() if o.get("images")]
    assert images, "the preview branch rendered nothing after the stop"
    errors = [m for m in console if m.startswith("pageerror") or "[APT]" in m]
    # after our graphs are loaded: no frontend error at all, except resources it cannot fetch offline
    # (api.comfy.org lookups, optional user files)
    errors += [m for m in console[mark:] if m.startswith("error:") and "Failed to load resource" not in m]
    assert not errors, errors
    if ch._truthy(os.environ.get("APT_UPDATE_DOCS_SCREENSHOT")):
        shutil.copyfile(ARTIFACTS / "widget.png", REPO / "docs" / "widget.png")
        shutil.copyfile(ARTIFACTS / "trainer-node.png", REPO / "docs" / "trainer_node.png")
