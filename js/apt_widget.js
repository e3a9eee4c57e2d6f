// APT LoRA Trainer: live indicator chart on the "APT Trainer" node.
//
// A DOM widget (not serialized) under the node's inputs: a <canvas> with two panels (gamma per
// timestep bin, low → high noise; the loss terms), a status line and a Stop button.
//
// Data flow (backend: nodes/train_job.py, nodes/runs.py):
//   * websocket "apt.progress" {node, prompt_id, status, step, gamma, losses, ...} every logged step
//   * websocket "apt.status"   run summary {node_id, prompt_id, status, message, step, ...}
//   * GET  /apt/runs/{node_id}   summary + full history (after a page reload / graph load, after the
//                                websocket reconnects, when a new run is seen, when a run ends)
//   * POST /apt/runs/{node_id}/stop  graceful stop after the current step (LoRA + checkpoint saved)
// Node ids: the backend keys runs and messages by the node's *execution id* (its unique_id in the
// prompt): "7" on the top level, "12:5" for node 5 inside the subgraph instance node 12, "12:30:5"
// deeper (ComfyUI_frontend getExecutionIdByNode). `executionIds(node)` computes it from the node's
// graph up to the root graph. One subgraph definition can be placed several times, so a node inside
// it may have several execution ids: the chart follows the one that ran last (`followId`).
// A message belongs to a node when `String(message.node ?? message.node_id)` is one of its ids.
// The plotting logic lives in apt_chart_model.js (plain module, unit-tested under Node).
//
// For browser tests: `node.__aptChart` is the AptLiveChart controller (`.model`, `.counts`,
// `.draw()`, `.sync()`); the widget root is `.apt-live-chart[data-apt-node="<execution id>"]` and its canvas
// carries data-apt-status, data-apt-step, data-apt-events, data-apt-run, data-apt-gamma-points
// ("n0,n1,…" drawn points per bin) and data-apt-loss-points (JSON {loss_denoise: n, …}).

import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { AptChartModel, DEFAULT_OPTIONS } from "./apt_chart_model.js";

/** node_id of the trainer node (nodes/node_defs.py AptTrainerNode.define_schema). */
export const TRAINER_NODE_TYPE = "APTTrainer";
export const EXTENSION_NAME = "apt_lora_trainer.LiveChart";
export const WIDGET_NAME = "apt_live_chart";
const MIN_WIDTH = 460;
const MIN_HEIGHT = 390; // canvas + preview strip + status bar, CSS pixels
const BAR_HEIGHT = 26;
const STRIP_HEIGHT = 90; // the preview strip: thumbnails of the step shown
const MAX_BACKING = 4096; // cap of the canvas backing store per dimension
const PROP_SCALE = "apt_loss_scale"; // node.properties: "log" | "linear" (saved with the workflow)
const PROP_SMOOTHING = "apt_loss_smoothing"; // node.properties: EMA weight 0..0.99

/** Controllers of the trainer nodes alive on the page (the websocket listeners route to them). */
const controllers = new Set();
let listening = false;

/** @param {any} v @returns {string} */
const idOf = (v) => (v == null ? "" : String(v));

/** The page's root graph (ComfyUI frontend with subgraphs: app.rootGraph; older: app.graph). */
function rootGraph() {
  return app?.rootGraph ?? app?.graph ?? null;
}

/** @param {any} g */
const graphNodes = (g) => (Array.isArray(g?.nodes) ? g.nodes : Array.isArray(g?._nodes) ? g._nodes : []);

/**
 * Every execution id under which `node` runs: ["7"] on the top level; for a node in a subgraph one
 * "<instance path>:<id>" per placement of that subgraph ([] while the subgraph is placed nowhere).
 * A node not (yet) in a graph, or a page without a root graph: [String(node.id)].
 * @param {any} node @param {any} [root]
 * @returns {string[]}
 */
export function executionIds(node, root = rootGraph()) {
  const id = node?.id;
  if (id == null || id === -1 || id === "-1") return [];
  const local = String(id);
  const graph = node.graph;
  if (!graph || !root || graph === root || graph.isRootGraph) return [local];
  const out = [];
  const seen = new Set();
  const walk = (g, prefix) => {
    if (seen.has(g)) return; // a malformed workflow could nest a subgraph in itself
    seen.add(g);
    for (const n of graphNodes(g)) {
      const sub = n?.isSubgraphNode?.() ? n.subgraph : null;
      if (!sub) continue;
      const path = prefix ? `${prefix}:${n.id}` : String(n.id);
      if (sub === graph) out.push(`${path}:${local}`);
      walk(sub, path);
    }
    seen.delete(g); // the same definition placed again elsewhere is walked again
  };
  walk(root, "");
  return out;
}

/** Register the page-wide websocket listeners once; they route to the live controllers. */
export function ensureListeners() {
  if (listening) return;
  listening = true;
  api.addEventListener("apt.progress", (e) => {
    const d = e?.detail;
    if (!d) return;
    const target = idOf(d.node);
    for (const c of controllers) if (c.follow(target)) c.onProgress(d);
  });
  api.addEventListener("apt.previews", (e) => {
    const d = e?.detail;
    if (!d) return;
    const target = idOf(d.node);
    for (const c of controllers) if (c.follow(target)) c.onPreviews(d);
  });
  api.addEventListener("apt.status", (e) => {
    const d = e?.detail;
    if (!d) return;
    const target = idOf(d.node_id ?? d.node);
    for (const c of controllers) if (c.follow(target)) c.onStatus(d);
  });
  // events sent while the socket was down are missing: refetch
  api.addEventListener("reconnected", () => {
    for (const c of controllers) c.scheduleSync(true);
  });
}

/**
 * Paint a scene (apt_chart_model.js shapes, CSS pixels) on a 2D context.
 * @param {CanvasRenderingContext2D} ctx
 * @param {import("./apt_chart_model.js").Shape[]} shapes
 */
export function paint(ctx, shapes) {
  for (const s of shapes) {
    if (s.type === "rect") {
      if (s.fill) {
        ctx.fillStyle = s.fill;
        ctx.fillRect(s.x, s.y, s.w, s.h);
      }
      if (s.stroke) {
        ctx.strokeStyle = s.stroke;
        ctx.lineWidth = 1;
        ctx.strokeRect(s.x + 0.5, s.y + 0.5, s.w - 1, s.h - 1);
      }
    } else if (s.type === "line") {
      if (s.points.length < 2) continue;
      ctx.save();
      ctx.globalAlpha = s.alpha ?? 1;
      ctx.strokeStyle = s.color;
      ctx.lineWidth = s.width;
      ctx.lineJoin = "round";
      ctx.setLineDash(s.dash ?? []);
      if (s.clip) {
        ctx.beginPath();
        ctx.rect(s.clip.x, s.clip.y, s.clip.w, s.clip.h);
        ctx.clip();
      }
      ctx.beginPath();
      ctx.moveTo(s.points[0][0], s.points[0][1]);
      for (let i = 1; i < s.points.length; i++) ctx.lineTo(s.points[i][0], s.points[i][1]);
      ctx.stroke();
      ctx.restore();
    } else if (s.type === "text") {
      ctx.font = s.font ?? "11px sans-serif";
      ctx.fillStyle = s.color;
      ctx.textAlign = s.align ?? "left";
      ctx.textBaseline = s.baseline ?? "alphabetic";
      ctx.fillText(s.text, s.x, s.y);
    }
  }
}

const raf = (fn) =>
  typeof requestAnimationFrame === "function" ? requestAnimationFrame(fn) : setTimeout(fn, 16);
const cancelRaf = (h) =>
  typeof cancelAnimationFrame === "function" ? cancelAnimationFrame(h) : clearTimeout(h);

/** @param {string} text @param {string} title */
function makeButton(text, title) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = text;
  b.title = title;
  Object.assign(b.style, {
    flex: "0 0 auto", height: "20px", padding: "0 8px", fontSize: "11px", cursor: "pointer",
    borderRadius: "4px", border: "1px solid var(--border-color, #555)",
    background: "var(--comfy-input-bg, #222)", color: "var(--input-text, #ddd)",
  });
  return b;
}

/** The live chart of one trainer node: model + DOM widget + server sync. */
export class AptLiveChart {
  /** @param {any} node a LiteGraph node of type APTTrainer */
  constructor(node) {
    this.node = node;
    node.properties = node.properties ?? {};
    this.model = new AptChartModel({
      lossScale: node.properties[PROP_SCALE] === "linear" ? "linear" : "log",
      smoothing: this._smoothingProp(),
    });
    this.removed = false;
    this.stopPending = false;
    this.syncedId = null; // node id the history was last fetched for
    this.followId = null; // execution id of the last run seen, for a node with several (subgraphs)
    this._wantedId = null; // node id a fetch was scheduled for
    this._syncing = false;
    this._syncAgain = null; // null | "full" | "incremental"
    this._drawHandle = null;
    this._drawnKey = "";
    /** drawn points per series (for tests) */
    this.counts = { gamma: [], loss: {} };
    this._buildDom();
    const widget = node.addDOMWidget(WIDGET_NAME, "apt_live_chart", this.root, {
      serialize: false,
      hideOnZoom: true,
      getMinHeight: () => MIN_HEIGHT,
      onDraw: () => this._checkSize(),
      afterResize: () => this.scheduleDraw(),
    });
    widget.serialize = false; // not in widgets_values either
    this.widget = widget;
    if (typeof ResizeObserver === "function") {
      this._ro = new ResizeObserver(() => this.scheduleDraw());
      this._ro.observe(this.canvas);
    }
    controllers.add(this);
    ensureListeners();
    this.scheduleDraw();
  }

  _buildDom() {
    const root = document.createElement("div");
    root.className = "apt-live-chart";
    Object.assign(root.style, {
      display: "flex", flexDirection: "column", width: "100%", height: "100%", boxSizing: "border-box",
      gap: "2px", overflow: "hidden",
    });
    const canvas = document.createElement("canvas");
    Object.assign(canvas.style, { display: "block", width: "100%", flex: "1 1 auto", minHeight: "0" });
    const bar = document.createElement("div");
    Object.assign(bar.style, {
      display: "flex", alignItems: "center", gap: "6px", height: `${BAR_HEIGHT}px`, flex: "0 0 auto",
      fontSize: "11px", color: "var(--descrip-text, #aaa)", fontFamily: "sans-serif",
    });
    const status = document.createElement("span");
    status.className = "apt-live-status";
    Object.assign(status.style, {
      flex: "1 1 auto", overflow: "hidden", textOverflow: "ellipsis", whiteSpace: "nowrap", minWidth: "0",
    });
    const scaleBtn = makeButton("log", "Loss axis: switch between log and linear scale");
    scaleBtn.className = "apt-live-scale";
    scaleBtn.addEventListener("click", () => this.toggleScale());
    const stopBtn = makeButton("Stop", "Finish training early: stops after the current step and saves the " +
      "LoRA and a resumable checkpoint (Cancel in the queue instead discards the step and marks the run " +
      "cancelled).");
    stopBtn.className = "apt-live-stop";
    stopBtn.addEventListener("click", () => this.stop());
    bar.append(status, scaleBtn, stopBtn);
    // the preview strip: < step N > and the thumbnails of that step (click one to open it)
    const strip = document.createElement("div");
    strip.className = "apt-previews";
    Object.assign(strip.style, {
      display: "flex", alignItems: "center", gap: "4px", height: `${STRIP_HEIGHT}px`, flex: "0 0 auto",
      fontSize: "11px", color: "var(--descrip-text, #aaa)", fontFamily: "sans-serif", overflow: "hidden",
    });
    const prevBtn = makeButton("‹", "Previews of the previous step that has them");
    prevBtn.addEventListener("click", () => { this.model.stepPreview(-1); this.scheduleDraw(); });
    const nextBtn = makeButton("›", "Previews of the next step that has them");
    nextBtn.addEventListener("click", () => { this.model.stepPreview(1); this.scheduleDraw(); });
    const label = document.createElement("span");
    label.className = "apt-previews-step";
    Object.assign(label.style, { minWidth: "54px", textAlign: "center", whiteSpace: "pre-line" });
    const thumbs = document.createElement("div");
    thumbs.className = "apt-previews-images";
    Object.assign(thumbs.style, { display: "flex", gap: "4px", flex: "1 1 auto", overflow: "hidden", height: "100%" });
    strip.append(prevBtn, label, nextBtn, thumbs);
    root.append(canvas, strip, bar);
    // a click on the chart shows the previews nearest to that step
    canvas.addEventListener("click", (e) => {
      // the scene is laid out in the canvas's CSS pixels; the graph's zoom scales what is on screen
      const r = canvas.getBoundingClientRect();
      const w = canvas.clientWidth || r.width;
      const h = canvas.clientHeight || r.height;
      const step = this.model.stepAtPixel(w, h, (e.clientX - r.left) * (r.width ? w / r.width : 1));
      if (step === null || !this.model.previews.length) return;
      this.model.selectPreviewNear(step);
      this.scheduleDraw();
    });
    // keep graph zoom and middle-button panning working over the chart
    canvas.addEventListener("wheel", (e) => {
      const c = app?.canvas;
      if (c?.processMouseWheel) {
        e.preventDefault();
        c.processMouseWheel(e);
      }
    }, { passive: false });
    canvas.addEventListener("pointerdown", (e) => { if (e.button === 1) app?.canvas?.processMouseDown?.(e); });
    canvas.addEventListener("pointermove", (e) => { if ((e.buttons & 4) === 4) app?.canvas?.processMouseMove?.(e); });
    canvas.addEventListener("pointerup", (e) => { if (e.button === 1) app?.canvas?.processMouseUp?.(e); });
    this.root = root;
    this.canvas = canvas;
    this.strip = strip;
    this.stripLabel = label;
    this.stripImages = thumbs;
    this._stripKey = "";
    this.statusEl = status;
    this.scaleBtn = scaleBtn;
    this.stopBtn = stopBtn;
  }

  /** Every execution id of this node (see `executionIds`). */
  ids() {
    return executionIds(this.node);
  }

  /**
   * The id the chart shows and fetches/stops by, as the backend knows it (the node's unique_id in
   * the prompt: "7", or "12:5" inside a subgraph); "" before the node is in a graph.
   */
  nodeId() {
    const ids = this.ids();
    return this.followId !== null && ids.includes(this.followId) ? this.followId : (ids[0] ?? "");
  }

  /**
   * Whether a message with this node id is ours; switches the chart to that id when it is another
   * placement of the same subgraph (the one running now).
   * @param {string} id
   */
  follow(id) {
    if (!id || this.removed) return false;
    if (id === this.nodeId()) return true;
    if (!this.ids().includes(id)) return false;
    this.followId = id;
    this.ensureSynced();
    return true;
  }

  _smoothingProp() {
    const v = Number(this.node.properties?.[PROP_SMOOTHING]);
    return Number.isFinite(v) && v >= 0 && v < 1 ? v : DEFAULT_OPTIONS.smoothing;
  }

  // ---- incoming data --------------------------------------------------------------------------

  /** @param {import("./apt_chart_model.js").ProgressEvent} detail */
  onProgress(detail) {
    const wasEmpty = this.model.size === 0;
    const r = this.model.ingest(detail);
    // a new run, or the first event we see is not the run's first: fetch the history as well
    if (r.reset || (wasEmpty && r.changed && Number(detail.step) > 1)) this.scheduleSync(true);
    if (r.changed) this.scheduleDraw();
  }

  /** "apt.previews": one step's images. @param {{step: number, images: any[], prompt_id?: string}} detail */
  onPreviews(detail) {
    if (detail.prompt_id != null && this.model.runId !== null && idOf(detail.prompt_id) !== idOf(this.model.runId)) {
      this.scheduleSync(true); // another run's previews: refetch everything
      return;
    }
    if (this.model.addPreviews(detail.images)) this.scheduleDraw();
  }

  /** @param {import("./apt_chart_model.js").RunSummary} detail */
  onStatus(detail) {
    const r = this.model.ingestStatus(detail);
    if (r.reset) this.scheduleSync(true);
    else if (!this.model.isActive) this.scheduleSync(false); // pick up the last steps of a finished run
    if (!this.model.isActive || this.model.status === "stopping") this.stopPending = false;
    if (r.changed) this.scheduleDraw();
  }

  /** Fetch the history when the node id changed (creation, graph load, paste) or never fetched. */
  ensureSynced() {
    if (this.removed) this.revive();
    const id = this.nodeId();
    if (id && id !== this._wantedId) {
      if (this._wantedId !== null) this.model.reset(null); // another node id now: forget the old run
      this._wantedId = id;
      this.scheduleSync(true);
    }
  }

  /**
   * Fetch GET /apt/runs/{id} (full, or only the steps after the last one held) and merge it.
   * Calls while one is in flight are coalesced into one more afterwards.
   * @param {boolean} [full]
   */
  scheduleSync(full = true) {
    if (this._syncing) {
      this._syncAgain = full || this._syncAgain === "full" ? "full" : "incremental";
      return;
    }
    this._syncing = true;
    this.sync(full)
      .catch((err) => console.warn("[APT] could not fetch the training run:", err))
      .finally(() => {
        this._syncing = false;
        const again = this._syncAgain;
        this._syncAgain = null;
        if (again && !this.removed) this.scheduleSync(again === "full");
      });
  }

  /** @param {boolean} [full] */
  async sync(full = true) {
    const id = this.nodeId();
    if (!id || this.removed) return;
    const m = this.model;
    const incremental = !full && m.runId !== null && m.lastStep > 0;
    const gen = m.generation;
    const url = `/apt/runs/${encodeURIComponent(id)}${incremental ? `?since=${m.lastStep}` : ""}`;
    const res = await api.fetchApi(url, { cache: "no-store" });
    if (this.removed || this.nodeId() !== id) return;
    this.syncedId = id;
    let snap;
    if (res.status === 404) {
      snap = { status: "idle", history: [] }; // older versions of the pack answered 404 for "no run"
    } else if (res.ok) {
      snap = await res.json();
    } else {
      throw new Error(`GET ${url}: HTTP ${res.status}`);
    }
    if (incremental && idOf(snap.prompt_id) !== idOf(m.runId) && snap.status !== "idle") {
      this._syncAgain = "full"; // another run meanwhile: the partial history is not enough
      return;
    }
    const r = m.applySnapshot(snap, gen);
    if (!m.isActive || m.status === "stopping") this.stopPending = false;
    if (r.changed || r.reset) this.scheduleDraw();
    this._updateBar();
  }

  // ---- actions ----------------------------------------------------------------------------------

  async stop() {
    const id = this.nodeId();
    if (!id || !this.model.isActive || this.model.status === "stopping" || this.stopPending) return;
    this.stopPending = true;
    this._updateBar();
    try {
      const res = await api.fetchApi(`/apt/runs/${encodeURIComponent(id)}/stop`, { method: "POST" });
      if (res.ok) {
        this.model.markStopping();
      } else {
        this.stopPending = false;
        this.scheduleSync(true); // 409: no active run; show what the server knows
      }
    } catch (err) {
      this.stopPending = false;
      console.warn("[APT] stop request failed:", err);
    }
    this.scheduleDraw();
  }

  toggleScale() {
    const next = this.model.options.lossScale === "log" ? "linear" : "log";
    this.model.options.lossScale = next;
    this.node.properties[PROP_SCALE] = next;
    this.scheduleDraw();
  }

  /** Re-read the node properties (after a workflow is loaded) and follow the (new) node id. */
  onConfigure() {
    this.model.options.lossScale = this.node.properties?.[PROP_SCALE] === "linear" ? "linear" : "log";
    this.model.options.smoothing = this._smoothingProp();
    this.ensureSynced();
    this.scheduleDraw();
  }

  // ---- drawing ----------------------------------------------------------------------------------

  scheduleDraw() {
    if (this.removed || this._drawHandle !== null) return;
    this._drawHandle = raf(() => {
      this._drawHandle = null;
      this.draw();
    });
  }

  /** Device pixels per CSS pixel of the canvas: screen DPR × graph zoom (the overlay is CSS-scaled). */
  _pixelRatio() {
    const dpr = (typeof window !== "undefined" && window.devicePixelRatio) || 1;
    const zoom = Number(app?.canvas?.ds?.scale) || 1;
    return dpr * Math.min(4, Math.max(1, zoom));
  }

  /** Called on every canvas frame the node is drawn: redraw when size or zoom changed. */
  _checkSize() {
    // a node inside a subgraph gets its execution id only once the subgraph is placed (graph load)
    if (!this._wantedId) this.ensureSynced();
    const w = this.widget;
    const key = `${w?.width ?? this.node?.size?.[0]}x${w?.computedHeight}@${this._pixelRatio()}`;
    if (key !== this._sizeKey) {
      this._sizeKey = key;
      this.scheduleDraw();
    }
  }

  draw() {
    if (this.removed) return;
    const canvas = this.canvas;
    const cssW = canvas.clientWidth || Math.max(0, (this.widget?.width ?? this.node?.size?.[0] ?? 0) - 20);
    const cssH = canvas.clientHeight ||
      Math.max(0, (this.widget?.computedHeight ?? MIN_HEIGHT) - 20 - BAR_HEIGHT - STRIP_HEIGHT);
    this._updateBar();
    this._updateStrip();
    if (cssW < 10 || cssH < 10) return;
    const ratio = this._pixelRatio();
    const pw = Math.min(MAX_BACKING, Math.round(cssW * ratio));
    const ph = Math.min(MAX_BACKING, Math.round(cssH * ratio));
    if (canvas.width !== pw) canvas.width = pw;
    if (canvas.height !== ph) canvas.height = ph;
    const ctx = canvas.getContext("2d");
    if (!ctx) return;
    ctx.setTransform(pw / cssW, 0, 0, ph / cssH, 0, 0);
    ctx.clearRect(0, 0, cssW, cssH);
    const scene = this.model.scene(cssW, cssH);
    paint(ctx, scene.shapes);
    this.counts = scene.counts;
    const ds = canvas.dataset;
    ds.aptNode = this.nodeId();
    ds.aptStatus = this.model.status;
    ds.aptStep = String(this.model.lastStep);
    ds.aptEvents = String(this.model.size);
    ds.aptRun = this.model.runId ?? "";
    ds.aptGammaPoints = scene.counts.gamma.join(",");
    ds.aptLossPoints = JSON.stringify(scene.counts.loss);
    ds.aptDrawn = String((Number(ds.aptDrawn) || 0) + 1);
  }

  /** The preview strip: the shown step's thumbnails, served by ComfyUI's /view. */
  _updateStrip() {
    const m = this.model;
    const step = m.shownPreviewStep();
    const images = m.previewsAt(step);
    const key = `${m.runId}:${step}:${images.map((p) => p.file).join(",")}`; // a rerun reuses file names
    if (key === this._stripKey) return;
    this._stripKey = key;
    const steps = m.previewSteps();
    const lora = images.find((p) => p.lora_file)?.lora_file;
    this.stripLabel.textContent = step === null ? "no\npreviews" : `step ${step}${lora ? "\nstep LoRA" : ""}`;
    this.stripLabel.title = step === null ? "Previews appear at the steps set by preview_every (advanced)."
      : `Previews at step ${step} of ${steps.length} preview steps${lora ? `; LoRA of this step: ${lora}` : ""}`;
    this.strip.dataset.aptPreviewStep = step === null ? "" : String(step);
    this.strip.dataset.aptPreviewSteps = steps.join(",");
    this.stripImages.replaceChildren(...images.filter((p) => p.view).map((p) => {
      const img = document.createElement("img");
      // a rerun under the same LoRA name writes the same file names: the run id keeps caches apart
      const q = new URLSearchParams({ filename: p.view.filename, subfolder: p.view.subfolder, type: p.view.type,
        run: m.runId ?? "" });
      img.src = api.apiURL(`/view?${q}`);
      img.alt = img.title = `step ${p.step}, seed ${p.seed}: ${p.prompt}`;
      img.className = "apt-preview-image";
      img.dataset.aptStep = String(p.step);
      Object.assign(img.style, { height: "100%", aspectRatio: "1 / 1", objectFit: "cover", cursor: "pointer",
        borderRadius: "3px" });
      img.addEventListener("click", () => window.open(img.src, "_blank"));
      return img;
    }));
  }

  _updateBar() {
    const m = this.model;
    this.root.dataset.aptNode = this.nodeId();
    this.statusEl.textContent = m.statusLine();
    this.statusEl.title = m.message || m.statusLine();
    const stopping = m.status === "stopping" || this.stopPending;
    this.stopBtn.textContent = stopping ? "stopping…" : "Stop";
    this.stopBtn.disabled = !m.isActive || stopping;
    this.stopBtn.style.opacity = this.stopBtn.disabled ? "0.5" : "1";
    this.stopBtn.style.cursor = this.stopBtn.disabled ? "default" : "pointer";
    this.scaleBtn.textContent = m.options.lossScale === "log" ? "log" : "linear";
  }

  // ---- lifecycle --------------------------------------------------------------------------------

  dispose() {
    if (this.removed) return;
    this.removed = true;
    controllers.delete(this);
    this._ro?.disconnect();
    if (this._drawHandle !== null) cancelRaf(this._drawHandle);
    this._drawHandle = null;
  }

  revive() {
    if (!this.removed) return;
    this.removed = false;
    controllers.add(this);
    this._ro?.observe(this.canvas);
    this._wantedId = null;
    this.scheduleDraw();
  }
}

/** Chain `fn` after the existing prototype method `name`. */
function chain(proto, name, fn) {
  const orig = proto[name];
  proto[name] = function (...args) {
    const r = orig?.apply(this, args);
    fn.apply(this, args);
    return r;
  };
}

/** Create the live chart on a trainer node (once). @param {any} node */
export function attachLiveChart(node) {
  if (node.__aptChart) return node.__aptChart;
  const chart = new AptLiveChart(node);
  node.__aptChart = chart;
  try {
    const computed = node.computeSize?.() ?? [0, 0];
    const [w, h] = node.size ?? [0, 0];
    node.setSize?.([Math.max(w, computed[0], MIN_WIDTH), Math.max(h, computed[1])]);
  } catch {
    /* sizing is cosmetic */
  }
  // the id is final only once the node is in the graph (new node) or configured (loaded graph)
  setTimeout(() => chart.ensureSynced(), 0);
  return chart;
}

export const extension = {
  name: EXTENSION_NAME,
  setup() {
    ensureListeners();
  },
  /** @param {any} nodeType @param {any} nodeData */
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData?.name !== TRAINER_NODE_TYPE) return;
    const proto = nodeType.prototype;
    chain(proto, "onNodeCreated", function () { attachLiveChart(this); });
    chain(proto, "onAdded", function () { this.__aptChart?.ensureSynced(); });
    chain(proto, "onConfigure", function () { this.__aptChart?.onConfigure(); });
    chain(proto, "onRemoved", function () { this.__aptChart?.dispose(); });
    chain(proto, "onExecuted", function () { this.__aptChart?.scheduleSync(false); });
  },
};

app.registerExtension(extension);
