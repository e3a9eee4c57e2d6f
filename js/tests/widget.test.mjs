// Tests of the ComfyUI extension (js/apt_widget.js) without a browser: the ComfyUI modules it
// imports ("../../scripts/app.js", "../../scripts/api.js") are replaced by stubs laid out the way
// the host serves them (/scripts/*.js next to /extensions/<pack>/*.js) and the few DOM calls the
// widget makes are faked. Run: node --test js/tests/
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { copyFileSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { after, before, beforeEach, describe, it } from "node:test";
import { fileURLToPath, pathToFileURL } from "node:url";

import { layoutPanels } from "../apt_chart_model.js";

const JS_DIR = join(dirname(fileURLToPath(import.meta.url)), "..");
const REPO = join(JS_DIR, "..");

// ---- fakes ---------------------------------------------------------------------------------------

class FakeCtx {
  constructor() {
    this.calls = [];
    for (const name of ["setTransform", "clearRect", "fillRect", "strokeRect", "save", "restore", "setLineDash",
      "beginPath", "moveTo", "lineTo", "stroke", "fillText", "rect", "clip"]) {
      this[name] = (...args) => this.calls.push([name, ...args]);
    }
  }
}

class FakeElement {
  constructor(tag) {
    this.tagName = tag.toUpperCase();
    this.style = {};
    this.dataset = {};
    this.children = [];
    this.listeners = {};
    this.className = "";
    this.textContent = "";
    this.title = "";
    this.disabled = false;
    this.clientWidth = 0;
    this.clientHeight = 0;
    if (this.tagName === "CANVAS") {
      this.width = 300;
      this.height = 150;
    }
  }
  append(...c) { this.children.push(...c); }
  replaceChildren(...c) { this.children = [...c]; }
  getBoundingClientRect() { return { left: 0, top: 0, width: this.clientWidth, height: this.clientHeight }; }
  appendChild(c) { this.children.push(c); return c; }
  addEventListener(type, fn) { (this.listeners[type] ??= []).push(fn); }
  removeEventListener(type, fn) { this.listeners[type] = (this.listeners[type] ?? []).filter((f) => f !== fn); }
  dispatch(type, extra = {}) { for (const fn of this.listeners[type] ?? []) fn({ type, preventDefault() {}, ...extra }); }
  click() { if (!this.disabled) this.dispatch("click"); }
  getContext(kind) { assert.equal(kind, "2d"); return (this.ctx ??= new FakeCtx()); }
}

class FakeApi extends EventTarget {
  constructor() {
    super();
    this.calls = [];
    this.routes = {}; // "GET /apt/runs/7" -> () => {status, body}
  }
  async fetchApi(url, init = {}) {
    const method = init.method ?? "GET";
    this.calls.push({ method, url });
    const path = url.split("?")[0];
    const route = this.routes[`${method} ${path}`];
    // default: the server's answer for a node without a run (200 idle, see nodes/runs.py)
    const idle = { node_id: decodeURIComponent(path.split("/").pop()), status: "idle", history: [] };
    const { status, body } = route ? route(url) : { status: 200, body: idle };
    return { ok: status >= 200 && status < 300, status, json: async () => structuredClone(body) };
  }
  emit(type, detail) { this.dispatchEvent(new CustomEvent(type, { detail })); }
  apiURL(path) { return `/api${path}`; }
}

const fakeApp = { extensions: [], canvas: { ds: { scale: 1 } }, registerExtension(e) { this.extensions.push(e); } };
const fakeApi = new FakeApi();

/** A minimal LiteGraph node class, as the frontend builds one per node type. */
class FakeNode {
  constructor() {
    this.id = -1;
    this.size = [300, 200];
    this.properties = {};
    this.widgets = [];
    this.onNodeCreated?.();
  }
  addDOMWidget(name, type, element, options) {
    const w = { name, type, element, options, computedHeight: 300 };
    this.widgets.push(w);
    return w;
  }
  computeSize() { return [320, 420]; }
  setSize(s) { this.size = s; }
}

function ev(step, extra = {}) {
  return {
    node: "7", prompt_id: "p1", status: "training", lora_name: "apt_lora.safetensors", step, total_steps: 100,
    loss: 0.1, loss_denoise: 0.1, loss_rs: 0.01, loss_aa: 0.001, gamma: Array(10).fill(step / 100),
    aug_rate: 0.2, loss_weight: 0.9, lr: 1e-4, it_per_s: 3, eta_s: (100 - step) / 3, timesteps: [10], ...extra,
  };
}
const strip = (e) => { const { node, prompt_id, status, lora_name, ...rest } = e; return rest; };
const settle = () => new Promise((r) => setTimeout(r, 40)); // timers, fetch promises, (fake) animation frames

// ---- module under test, loaded behind the stubs ----------------------------------------------------

let tmp;
let mod;
let ext;

before(async () => {
  globalThis.__aptTest = { app: fakeApp, api: fakeApi };
  globalThis.window = { devicePixelRatio: 2 };
  globalThis.document = { createElement: (tag) => new FakeElement(tag) };
  tmp = mkdtempSync(join(tmpdir(), "apt-widget-"));
  writeFileSync(join(tmp, "package.json"), '{"type": "module"}\n');
  mkdirSync(join(tmp, "scripts"));
  writeFileSync(join(tmp, "scripts", "app.js"), "export const app = globalThis.__aptTest.app;\n");
  writeFileSync(join(tmp, "scripts", "api.js"), "export const api = globalThis.__aptTest.api;\n");
  const extDir = join(tmp, "extensions", "apt_lora_trainer");
  mkdirSync(extDir, { recursive: true });
  for (const f of ["apt_widget.js", "apt_chart_model.js"]) copyFileSync(join(JS_DIR, f), join(extDir, f));
  mod = await import(pathToFileURL(join(extDir, "apt_widget.js")).href);
  ext = fakeApp.extensions.find((e) => e.name === mod.EXTENSION_NAME);
  ext.setup?.();
});

after(() => rmSync(tmp, { recursive: true, force: true }));

let NodeType;
beforeEach(async () => {
  fakeApi.calls = [];
  fakeApi.routes = {};
  NodeType = class extends FakeNode {};
  await ext.beforeRegisterNodeDef(NodeType, { name: mod.TRAINER_NODE_TYPE });
});

/** Create a trainer node the way the frontend does: constructor (onNodeCreated), id, added to the graph. */
async function createNode(id = 7) {
  const node = new NodeType();
  node.id = id;
  node.onAdded?.();
  const chart = node.__aptChart;
  chart.canvas.clientWidth = 440;
  chart.canvas.clientHeight = 240;
  await settle();
  return node;
}

// ---- tests -------------------------------------------------------------------------------------------

describe("files", () => {
  it("parse (node --check) and the model stays free of DOM and ComfyUI imports", () => {
    for (const f of ["apt_widget.js", "apt_chart_model.js"]) execFileSync(process.execPath, ["--check", join(JS_DIR, f)]);
    const model = readFileSync(join(JS_DIR, "apt_chart_model.js"), "utf8");
    assert.doesNotMatch(model, /^\s*import\s/m);
    assert.doesNotMatch(model, /\b(document|window)\./);
    const widget = readFileSync(join(JS_DIR, "apt_widget.js"), "utf8");
    assert.match(widget, /from "\.\.\/\.\.\/scripts\/app\.js"/);
    assert.match(widget, /from "\.\.\/\.\.\/scripts\/api\.js"/);
  });

  it("has no other .js under js/ (the host loads every .js there as an extension)", () => {
    const found = [];
    const walk = (dir, rel) => {
      for (const e of readdirSync(dir, { withFileTypes: true })) {
        if (e.isDirectory()) walk(join(dir, e.name), `${rel}${e.name}/`);
        else if (e.name.endsWith(".js")) found.push(rel + e.name);
      }
    };
    walk(JS_DIR, "");
    assert.deepEqual(found.sort(), ["apt_chart_model.js", "apt_widget.js"]);
  });

  it("targets the trainer node type defined by the backend", () => {
    const defs = readFileSync(join(REPO, "nodes", "node_defs.py"), "utf8");
    const m = defs.match(/class AptTrainerNode\b[\s\S]*?node_id="([^"]+)"/);
    assert.ok(m, "AptTrainerNode with a node_id in nodes/node_defs.py");
    assert.equal(mod.TRAINER_NODE_TYPE, m[1]);
  });
});

describe("extension", () => {
  it("registers once and leaves other node types alone", async () => {
    assert.equal(fakeApp.extensions.filter((e) => e.name === mod.EXTENSION_NAME).length, 1);
    class Other extends FakeNode {}
    await ext.beforeRegisterNodeDef(Other, { name: "KSampler" });
    assert.equal(new Other().__aptChart, undefined);
  });

  it("adds a non-serialized DOM widget with a canvas, a status line and a Stop button", async () => {
    const node = await createNode();
    const w = node.widgets.find((x) => x.name === mod.WIDGET_NAME);
    assert.ok(w);
    assert.equal(w.options.serialize, false);
    assert.equal(w.serialize, false);
    assert.ok(w.options.getMinHeight() >= 200);
    const chart = node.__aptChart;
    assert.equal(w.element, chart.root);
    assert.equal(chart.root.className, "apt-live-chart");
    assert.equal(chart.root.dataset.aptNode, "7");
    assert.equal(chart.canvas.tagName, "CANVAS");
    assert.ok(node.size[0] >= 440, "node widened for the chart");
    node.onRemoved();
  });
});

describe("data flow", () => {
  it("fetches the history on creation and follows only its own node's events", async () => {
    fakeApi.routes["GET /apt/runs/7"] = () => ({ status: 200, body: {
      node_id: "7", prompt_id: "p1", status: "training", step: 3, total_steps: 100, updated: 1,
      history: [1, 2, 3].map((s) => strip(ev(s))) } });
    const node = await createNode(7);
    const chart = node.__aptChart;
    assert.deepEqual(fakeApi.calls, [{ method: "GET", url: "/apt/runs/7" }]); // once, though asked twice
    assert.equal(chart.model.size, 3);
    assert.equal(chart.model.runId, "p1");

    fakeApi.emit("apt.progress", ev(4, { node: "8" })); // another trainer node
    fakeApi.emit("apt.progress", ev(5, { node: 7 })); // number id: compared as a string
    fakeApi.emit("apt.progress", ev(4));
    fakeApi.emit("apt.progress", ev(4)); // duplicate
    await settle();
    assert.deepEqual(chart.model.events().map((e) => e.step), [1, 2, 3, 4, 5]);
    assert.equal(chart.canvas.dataset.aptStep, "5");
    assert.equal(chart.canvas.dataset.aptEvents, "5");
    assert.equal(chart.canvas.dataset.aptGammaPoints, Array(10).fill(5).join(","));
    assert.deepEqual(JSON.parse(chart.canvas.dataset.aptLossPoints), { loss_denoise: 5, loss_rs: 5, loss_aa: 5 });
    assert.match(chart.statusEl.textContent, /step 5\/100/);
    node.onRemoved();
  });

  it("draws at devicePixelRatio × graph zoom", async () => {
    const node = await createNode(7);
    const c = node.__aptChart.canvas;
    assert.equal(c.width, 880);
    assert.equal(c.height, 480);
    assert.ok(c.ctx.calls.some(([name, a, , , d]) => name === "setTransform" && a === 2 && d === 2));
    fakeApp.canvas.ds.scale = 1.5;
    node.__aptChart._checkSize(); // what the widget's onDraw does every frame
    await settle();
    assert.equal(c.width, 1320);
    fakeApp.canvas.ds.scale = 1;
    node.onRemoved();
  });

  it("resets on a new run and fetches that run's history", async () => {
    const node = await createNode(7);
    const chart = node.__aptChart;
    for (const s of [1, 2, 3]) fakeApi.emit("apt.progress", ev(s));
    await settle();
    assert.equal(chart.model.size, 3);
    fakeApi.routes["GET /apt/runs/7"] = () => ({ status: 200, body: {
      node_id: "7", prompt_id: "p2", status: "training", step: 51, total_steps: 100, resumed_from: 50, updated: 9,
      history: [10, 20, 30, 40, 50].map((s) => strip(ev(s))) } });
    fakeApi.calls = [];
    fakeApi.emit("apt.progress", ev(51, { prompt_id: "p2" })); // resumed run: history comes from the server
    await settle();
    assert.equal(chart.model.runId, "p2");
    assert.deepEqual(chart.model.events().map((e) => e.step), [10, 20, 30, 40, 50, 51]);
    assert.ok(fakeApi.calls.some((c) => c.url === "/apt/runs/7"));
    node.onRemoved();
  });

  it("refetches after the websocket reconnects", async () => {
    const node = await createNode(7);
    fakeApi.calls = [];
    fakeApi.emit("reconnected", undefined);
    await settle();
    assert.deepEqual(fakeApi.calls.map((c) => c.url), ["/apt/runs/7"]);
    node.onRemoved();
  });

  it("stops listening once the node is removed", async () => {
    const node = await createNode(7);
    const chart = node.__aptChart;
    node.onRemoved();
    fakeApi.calls = [];
    fakeApi.emit("apt.progress", ev(1));
    fakeApi.emit("reconnected", undefined);
    await settle();
    assert.equal(chart.model.size, 0);
    assert.equal(fakeApi.calls.length, 0);
  });

  it("follows a node whose id is set by configure (graph load)", async () => {
    fakeApi.routes["GET /apt/runs/12"] = () => ({ status: 200, body: {
      node_id: "12", prompt_id: "p9", status: "finished", step: 2, total_steps: 2, updated: 3, message: "finished",
      history: [1, 2].map((s) => strip(ev(s, { total_steps: 2 }))) } });
    const node = new NodeType(); // id -1: nothing fetched yet
    node.properties.apt_loss_scale = "linear";
    node.id = 12;
    node.onConfigure({});
    await settle();
    const chart = node.__aptChart;
    assert.ok(!fakeApi.calls.some((c) => c.url === "/apt/runs/-1"));
    assert.equal(chart.model.size, 2);
    assert.equal(chart.model.status, "finished");
    assert.equal(chart.model.options.lossScale, "linear");
    assert.equal(chart.scaleBtn.textContent, "linear");
    node.onRemoved();
  });
});

describe("previews", () => {
  const pv = (step, i, lora = null) => ({ step, prompt: `prompt ${i}`, seed: i, file: `previews/step_${step}_${i}.png`,
    lora_file: lora, view: { filename: `step_${step}_${i}.png`, subfolder: "apt_lora_trainer/x/previews", type: "output" } });

  it("shows the latest step's previews from /view, steps back with the buttons and forward by a chart click", async () => {
    fakeApi.routes["GET /apt/runs/7"] = () => ({ status: 200, body: {
      node_id: "7", prompt_id: "p1", status: "training", step: 3, total_steps: 100, updated: 1,
      history: [1, 2, 3].map((s) => strip(ev(s))), previews: [pv(0, 0), pv(0, 1)] } });
    const node = await createNode(7);
    const chart = node.__aptChart;
    assert.equal(chart.strip.dataset.aptPreviewStep, "0", "a reloaded page shows the previews it fetched");
    fakeApi.emit("apt.previews", { node: "7", prompt_id: "p1", step: 50, images: [pv(50, 0, "x_step00050.safetensors"), pv(50, 1, "x_step00050.safetensors")] });
    fakeApi.emit("apt.previews", { node: "8", prompt_id: "p9", step: 60, images: [pv(60, 0)] }); // another node
    await settle();
    assert.equal(chart.strip.dataset.aptPreviewSteps, "0,50");
    assert.equal(chart.strip.dataset.aptPreviewStep, "50");
    const imgs = chart.stripImages.children;
    assert.deepEqual(imgs.map((i) => i.src), [0, 1].map((i) =>
      `/api/view?filename=step_50_${i}.png&subfolder=apt_lora_trainer%2Fx%2Fpreviews&type=output&run=p1`));
    assert.match(imgs[0].title, /step 50, seed 0: prompt 0/);
    assert.match(chart.stripLabel.textContent, /step 50\nstep LoRA/);
    const [prev] = chart.strip.children;
    prev.click();
    await settle();
    assert.equal(chart.strip.dataset.aptPreviewStep, "0");
    // a click on the chart near step 40 of 100 shows the nearest preview step, 50
    chart.canvas.clientWidth = 460;
    chart.canvas.clientHeight = 300;
    const G = layoutPanels(460, 300).gamma.plot;
    chart.canvas.dispatch("click", { clientX: G.x + G.w * 0.4, clientY: G.y + 5 });
    await settle();
    assert.equal(chart.strip.dataset.aptPreviewStep, "50");
    node.onRemoved();
  });

  it("a new run under the same LoRA name (same file names) shows its own images, not the cached ones", async () => {
    fakeApi.routes["GET /apt/runs/7"] = () => ({ status: 200, body: {
      node_id: "7", prompt_id: "p1", status: "finished", step: 3, total_steps: 3, updated: 1,
      history: [1, 2, 3].map((s) => strip(ev(s, { total_steps: 3 }))), previews: [pv(0, 0)] } });
    const node = await createNode(7);
    const chart = node.__aptChart;
    assert.match(chart.stripImages.children[0].src, /run=p1$/);
    fakeApi.routes["GET /apt/runs/7"] = () => ({ status: 200, body: {
      node_id: "7", prompt_id: "p2", status: "training", step: 1, total_steps: 3, updated: 2,
      history: [strip(ev(1, { prompt_id: "p2", total_steps: 3 }))], previews: [pv(0, 0)] } });
    fakeApi.emit("apt.status", { node_id: "7", prompt_id: "p2", status: "training", step: 1, total_steps: 3, updated: 2 });
    await settle();
    assert.equal(chart.model.runId, "p2");
    assert.match(chart.stripImages.children[0].src, /run=p2$/);
    node.onRemoved();
  });
});

describe("stop button", () => {
  it("is disabled without an active run", async () => {
    const node = await createNode(7); // 404: idle
    const chart = node.__aptChart;
    assert.equal(chart.model.status, "idle");
    assert.equal(chart.stopBtn.disabled, true);
    chart.stopBtn.click();
    await settle();
    assert.ok(!fakeApi.calls.some((c) => c.method === "POST"));
    node.onRemoved();
  });

  it("POSTs the stop request and shows stopping…", async () => {
    let release;
    const gate = new Promise((r) => { release = r; });
    fakeApi.routes["POST /apt/runs/7/stop"] = () => ({ status: 200, body: { node_id: "7", stopping: true, step: 2 } });
    fakeApi.routes["GET /apt/runs/7"] = () => ({ status: 200, body: {
      node_id: "7", prompt_id: "p1", status: "training", step: 1, total_steps: 100, updated: 1, history: [strip(ev(1))] } });
    const node = await createNode(7);
    const chart = node.__aptChart;
    fakeApi.emit("apt.progress", ev(2));
    await settle();
    assert.equal(chart.stopBtn.disabled, false);
    assert.equal(chart.stopBtn.textContent, "Stop");
    const orig = fakeApi.fetchApi.bind(fakeApi);
    fakeApi.fetchApi = async (url, init) => { if (init?.method === "POST") await gate; return orig(url, init); };
    chart.stopBtn.click();
    assert.equal(chart.stopBtn.textContent, "stopping…"); // while the request is in flight
    assert.equal(chart.stopBtn.disabled, true);
    release();
    await settle();
    delete fakeApi.fetchApi;
    assert.ok(fakeApi.calls.some((c) => c.method === "POST" && c.url === "/apt/runs/7/stop"));
    assert.equal(chart.model.status, "stopping");
    assert.equal(chart.stopBtn.textContent, "stopping…");
    fakeApi.emit("apt.status", { node_id: "7", prompt_id: "p1", status: "stopped", step: 3, updated: 1e12,
      message: "stopped at step 3; saved apt_lora.safetensors" });
    await settle();
    assert.equal(chart.stopBtn.disabled, true);
    assert.equal(chart.stopBtn.textContent, "Stop");
    assert.match(chart.statusEl.textContent, /stopped early/);
    node.onRemoved();
  });

  it("recovers when the server has no active run (409)", async () => {
    fakeApi.routes["POST /apt/runs/7/stop"] = () => ({ status: 409, body: { stopping: false } });
    const node = await createNode(7);
    const chart = node.__aptChart;
    fakeApi.emit("apt.progress", ev(2));
    await settle();
    chart.stopBtn.click();
    await settle();
    assert.equal(chart.stopPending, false);
    assert.equal(chart.model.status, "lost"); // the refetch said: no such run
    assert.equal(chart.stopBtn.disabled, true);
    node.onRemoved();
  });
});

describe("execution ids (subgraphs)", () => {
  // A root graph with subgraph instance nodes, shaped like the frontend's: graph.nodes, node.isSubgraphNode(),
  // node.subgraph (the shared definition, a graph itself), node.graph (the graph a node sits in).
  const inner = { nodes: [], isRootGraph: false }; // the definition holding the trainer
  const outer = { nodes: [], isRootGraph: false }; // a definition holding an instance of `inner`
  const instance = (id, subgraph) => ({ id, subgraph, isSubgraphNode: () => true });
  const root = { nodes: [], isRootGraph: true };

  beforeEach(() => {
    inner.nodes = [];
    outer.nodes = [instance(30, inner)];
    root.nodes = [{ id: 1, isSubgraphNode: () => false }, instance(12, inner)];
    fakeApp.rootGraph = root;
  });
  after(() => { delete fakeApp.rootGraph; });

  async function createIn(graph, id) {
    const node = new NodeType();
    node.id = id;
    node.graph = graph;
    graph.nodes.push(node);
    node.onAdded?.();
    await settle();
    return node;
  }

  it("computes the frontend's execution id for top-level, subgraph and nested nodes", () => {
    assert.deepEqual(mod.executionIds({ id: 7, graph: root }), ["7"]);
    assert.deepEqual(mod.executionIds({ id: 7 }), ["7"]); // not in a graph yet
    assert.deepEqual(mod.executionIds({ id: -1, graph: root }), []);
    assert.deepEqual(mod.executionIds({ id: 5, graph: inner }), ["12:5"]);
    root.nodes.push(instance(20, outer));
    assert.deepEqual(mod.executionIds({ id: 5, graph: inner }), ["12:5", "20:30:5"]);
    assert.deepEqual(mod.executionIds({ id: 5, graph: { nodes: [] } }), []); // a subgraph placed nowhere
    assert.deepEqual(mod.executionIds({ id: 5, graph: inner }, null), ["5"]); // no root graph on the page
  });

  it("a trainer inside a subgraph fetches, follows and stops by its execution id, not its local id", async () => {
    fakeApi.routes["GET /apt/runs/12%3A5"] = () => ({ status: 200, body: {
      node_id: "12:5", prompt_id: "p1", status: "training", step: 2, total_steps: 100, updated: 1,
      history: [1, 2].map((s) => strip(ev(s, { node: "12:5" }))) } });
    fakeApi.routes["POST /apt/runs/12%3A5/stop"] = () => ({ status: 200, body: { stopping: true } });
    const node = await createIn(inner, 5);
    const chart = node.__aptChart;
    chart.canvas.clientWidth = 440;
    chart.canvas.clientHeight = 240;
    assert.equal(chart.nodeId(), "12:5");
    assert.deepEqual(fakeApi.calls, [{ method: "GET", url: "/apt/runs/12%3A5" }]);
    assert.equal(chart.model.size, 2);
    fakeApi.emit("apt.progress", ev(3, { node: "5" })); // a top-level node 5 is another node
    fakeApi.emit("apt.progress", ev(3, { node: "12:6" }));
    fakeApi.emit("apt.progress", ev(3, { node: "12:5" }));
    fakeApi.emit("apt.status", { node_id: "5", prompt_id: "p1", status: "error", step: 3, total_steps: 100 });
    await settle();
    assert.deepEqual(chart.model.events().map((e) => e.step), [1, 2, 3]);
    assert.equal(chart.model.status, "training");
    assert.equal(chart.root.dataset.aptNode, "12:5");
    chart.stopBtn.click();
    await settle();
    assert.ok(fakeApi.calls.some((c) => c.method === "POST" && c.url === "/apt/runs/12%3A5/stop"));
    node.onRemoved();
  });

  it("a node whose subgraph is placed only later (graph load) fetches once its id is known", async () => {
    root.nodes = [];
    const node = await createIn(inner, 5);
    assert.equal(node.__aptChart.nodeId(), "");
    assert.deepEqual(fakeApi.calls, []);
    root.nodes.push(instance(12, inner));
    node.__aptChart._checkSize(); // what the widget's onDraw does every frame
    await settle();
    assert.deepEqual(fakeApi.calls, [{ method: "GET", url: "/apt/runs/12%3A5" }]);
    node.onRemoved();
  });

  it("a subgraph placed twice: the chart follows the placement that runs", async () => {
    root.nodes.push(instance(14, inner));
    fakeApi.routes["GET /apt/runs/14%3A5"] = () => ({ status: 200, body: {
      node_id: "14:5", prompt_id: "p7", status: "training", step: 4, total_steps: 10, updated: 2,
      history: [1, 2, 3, 4].map((s) => strip(ev(s, { node: "14:5", prompt_id: "p7", total_steps: 10 }))) } });
    const node = await createIn(inner, 5);
    const chart = node.__aptChart;
    assert.equal(chart.nodeId(), "12:5"); // the first placement until another one reports
    fakeApi.calls = [];
    fakeApi.emit("apt.progress", ev(5, { node: "14:5", prompt_id: "p7", total_steps: 10 }));
    await settle();
    assert.equal(chart.nodeId(), "14:5");
    assert.ok(fakeApi.calls.some((c) => c.url === "/apt/runs/14%3A5"));
    assert.deepEqual(chart.model.events().map((e) => e.step), [1, 2, 3, 4, 5]);
    node.onRemoved();
  });
});

describe("idle node", () => {
  it("a node without a run gets 200 idle from the server and shows idle (404 from old servers too)", async () => {
    const node = await createNode(7);
    assert.equal(node.__aptChart.model.status, "idle");
    assert.equal(node.__aptChart.stopBtn.disabled, true);
    node.onRemoved();
    fakeApi.routes["GET /apt/runs/9"] = () => ({ status: 404, body: { error: "not found" } });
    const old = await createNode(9);
    assert.equal(old.__aptChart.model.status, "idle");
    old.onRemoved();
  });
});
