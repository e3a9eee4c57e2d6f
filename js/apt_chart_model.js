// APT LoRA Trainer: plotting logic of the live indicator chart.
//
// A plain ES module: no DOM, no ComfyUI imports, so it runs (and is tested) under Node as well as
// in the browser. `AptChartModel` ingests the trainer's progress events and run summaries (live
// websocket messages and the history fetched from GET /apt/runs/{node_id}, in any order) and turns
// them into a "scene": a list of drawing primitives in CSS pixels that apt_widget.js paints on a
// <canvas> without any further logic.
//
// Event shapes (see nodes/train_job.py, nodes/runs.py, apt_core/trainer.py ProgressEvent):
/**
 * @typedef {Object} ProgressEvent  one logged training step ("apt.progress" / history entry)
 * @property {string} [node]             trainer node's unique_id (live events only)
 * @property {string|null} [prompt_id]   the prompt that runs the training (live events only)
 * @property {string} [status]           run status when the step was logged
 * @property {string} [lora_name]
 * @property {number} step               1-based step number (steps may be sparse: log_every)
 * @property {number} total_steps
 * @property {number} loss               weighted total loss
 * @property {number} loss_denoise
 * @property {number} loss_rs
 * @property {number} loss_aa
 * @property {number[]} gamma            overfitting indicator per timestep bin, 0..1, low → high noise
 * @property {number} aug_rate           fraction of recent samples that were augmented
 * @property {number} loss_weight
 * @property {number} lr
 * @property {number} it_per_s
 * @property {number} eta_s
 * @property {number[]} [timesteps]
 */
/**
 * @typedef {Object} Preview  one sample preview ("apt.previews" message, GET /apt/runs/{id} `previews`)
 * @property {number} step
 * @property {string} prompt
 * @property {number} seed
 * @property {string} file  relative to the run folder
 * @property {string|null} [lora_file]  the step LoRA saved at this step
 * @property {{filename: string, subfolder: string, type: string}} [view]  ComfyUI /view query
 */

/**
 * @typedef {Object} RunSummary  "apt.status" message, or GET /apt/runs/{id} (then with `history`)
 * @property {string} [node_id]
 * @property {string|null} [prompt_id]
 * @property {string} status     starting|encoding|training|stopping|finished|stopped|cancelled|error|idle
 * @property {string} [lora_name]
 * @property {number} [step]
 * @property {number} [total_steps]
 * @property {number} [resumed_from]
 * @property {string} [message]
 * @property {string|null} [checkpoint]
 * @property {boolean} [stop_requested]
 * @property {number} [started]  server time (s) the run started
 * @property {number} [updated]  server time (s) of this summary
 * @property {number|null} [it_per_s]
 * @property {number|null} [eta_s]
 * @property {ProgressEvent[]} [history]
 */
/** @typedef {[number, number]} Point  [x, y] */

/** Run statuses during which a Stop request makes sense (mirrors nodes/runs.py ACTIVE). */
export const ACTIVE_STATUSES = Object.freeze(["starting", "encoding", "training", "stopping"]);
/** Statuses after which the run does not change any more. */
export const FINAL_STATUSES = Object.freeze(["finished", "stopped", "cancelled", "error"]);

/** Loss terms drawn in the loss panel: event key, legend label, colour. */
export const LOSS_TERMS = Object.freeze([
  Object.freeze({ key: "loss_denoise", label: "denoising", color: "#e6e6e6" }),
  Object.freeze({ key: "loss_rs", label: "RS", color: "#ff9f43" }),
  Object.freeze({ key: "loss_aa", label: "AA", color: "#ff5e8a" }),
]);

/** @typedef {{maxPoints:number, smoothing:number, lossScale:"log"|"linear", binColorStart:number}} ChartOptions */
/** @type {ChartOptions} */
export const DEFAULT_OPTIONS = Object.freeze({
  maxPoints: 500, // per drawn series (decimation above that)
  smoothing: 0.8, // EMA weight of the previous value for the loss curves; 0 = raw
  lossScale: "log",
  binColorStart: 0.15, // bin 0 gets viridis(0.15): the darkest viridis purple vanishes on dark themes
});

// ---------------------------------------------------------------------------------------------
// Formatting

/**
 * Human duration: "45s", "1m 20s", "2h 5m", "1d 3h"; "–" when unknown.
 * @param {number|null|undefined} seconds
 * @returns {string}
 */
export function formatDuration(seconds) {
  if (seconds == null || typeof seconds !== "number" || !Number.isFinite(seconds) || seconds < 0) return "–";
  let s = Math.round(seconds);
  if (s < 60) return `${s}s`;
  const d = Math.floor(s / 86400);
  s -= d * 86400;
  const h = Math.floor(s / 3600);
  s -= h * 3600;
  const m = Math.floor(s / 60);
  s -= m * 60;
  if (d > 0) return `${d}d ${h}h`;
  if (h > 0) return `${h}h ${m}m`;
  return `${m}m ${s}s`;
}

/**
 * Training speed as ComfyUI prints it: "2.31 it/s", or "4.2 s/it" when slower than 1 it/s.
 * @param {number|null|undefined} itPerS
 * @returns {string}
 */
export function formatRate(itPerS) {
  if (itPerS == null || !Number.isFinite(itPerS) || itPerS <= 0) return "– it/s";
  if (itPerS >= 1) return `${itPerS >= 10 ? itPerS.toFixed(1) : itPerS.toFixed(2)} it/s`;
  const sPerIt = 1 / itPerS;
  return `${sPerIt >= 10 ? sPerIt.toFixed(0) : sPerIt.toFixed(1)} s/it`;
}

/**
 * Compact axis label: 0.5, 12, 1.5k, 2e-3.
 * @param {number} v
 * @returns {string}
 */
export function formatTick(v) {
  if (v === 0) return "0";
  const a = Math.abs(v);
  if (a >= 1e4) return `${+(v / 1000).toFixed(a >= 1e5 ? 0 : 1)}k`;
  if (a >= 1000 && Number.isInteger(v / 100)) return `${+(v / 1000).toFixed(1)}k`;
  if (a >= 1) return `${+v.toFixed(2)}`;
  if (a >= 0.01) return `${+v.toPrecision(2)}`;
  const exp = Math.floor(Math.log10(a));
  const mant = +(v / 10 ** exp).toPrecision(2);
  return mant === 1 ? `1e${exp}` : `${mant}e${exp}`;
}

// ---------------------------------------------------------------------------------------------
// Colours

/** The 10-colour viridis palette (matplotlib), evenly spaced from t = 0 to t = 1. */
export const VIRIDIS = Object.freeze([
  "#440154", "#482878", "#3e4989", "#31688e", "#26828e",
  "#1f9e89", "#35b779", "#6ece58", "#b5de2b", "#fde725",
]);

/** @param {string} hex "#rrggbb" @returns {[number, number, number]} */
export function hexToRgb(hex) {
  const n = parseInt(hex.slice(1), 16);
  return [(n >> 16) & 255, (n >> 8) & 255, n & 255];
}

/** @param {number[]} rgb @returns {string} "#rrggbb" */
export function rgbToHex(rgb) {
  return "#" + rgb.map((c) => Math.max(0, Math.min(255, Math.round(c))).toString(16).padStart(2, "0")).join("");
}

/** WCAG relative luminance of "#rrggbb" (0 black .. 1 white). @param {string} hex */
export function relativeLuminance(hex) {
  const [r, g, b] = hexToRgb(hex).map((c) => {
    const s = c / 255;
    return s <= 0.03928 ? s / 12.92 : ((s + 0.055) / 1.055) ** 2.4;
  });
  return 0.2126 * r + 0.7152 * g + 0.0722 * b;
}

/**
 * Viridis-like perceptual ramp (dark purple → yellow, monotonically lighter), t clamped to [0, 1].
 * @param {number} t
 * @returns {string} "#rrggbb"
 */
export function rampColor(t) {
  const x = Number.isFinite(t) ? Math.max(0, Math.min(1, t)) : 0;
  const pos = x * (VIRIDIS.length - 1);
  const i = Math.min(VIRIDIS.length - 2, Math.floor(pos));
  const f = pos - i;
  const a = hexToRgb(VIRIDIS[i]);
  const b = hexToRgb(VIRIDIS[i + 1]);
  return rgbToHex(a.map((c, k) => c + (b[k] - c) * f));
}

/**
 * Colour of timestep bin `bin` of `numBins` (bin 0 = lowest noise = darkest; last = yellow).
 * Deterministic: depends only on its arguments.
 * @param {number} bin
 * @param {number} numBins
 * @param {number} [start] ramp position of bin 0 (default DEFAULT_OPTIONS.binColorStart)
 * @returns {string}
 */
export function binColor(bin, numBins, start = DEFAULT_OPTIONS.binColorStart) {
  if (numBins <= 1) return rampColor(1);
  return rampColor(start + (1 - start) * (bin / (numBins - 1)));
}

// ---------------------------------------------------------------------------------------------
// Series maths

/**
 * Exponential moving average of a series (TensorBoard-style "smoothing"):
 * s_0 = y_0, s_i = smoothing * s_{i-1} + (1 - smoothing) * y_i. Points with a non-finite y are
 * skipped (not emitted, not folded in). smoothing <= 0 returns the finite points unchanged.
 * @param {Point[]} points
 * @param {number} smoothing in [0, 1)
 * @returns {Point[]}
 */
export function emaSmooth(points, smoothing) {
  const w = Number.isFinite(smoothing) ? Math.max(0, Math.min(0.999, smoothing)) : 0;
  /** @type {Point[]} */
  const out = [];
  let s = NaN;
  for (const [x, y] of points) {
    if (!Number.isFinite(y)) continue;
    s = Number.isNaN(s) ? y : w * s + (1 - w) * y;
    out.push([x, s]);
  }
  return out;
}

/**
 * Reduce a series (sorted by x) to at most `maxPoints` points with Largest-Triangle-Three-Buckets:
 * keeps the first and last point and, per bucket, the point that best preserves the line's shape
 * (spikes survive). Returns a copy when no reduction is needed.
 * @param {Point[]} points
 * @param {number} maxPoints
 * @returns {Point[]}
 */
export function decimate(points, maxPoints) {
  const n = points.length;
  const max = Math.floor(maxPoints);
  if (!(max > 0) || n <= max) return points.slice();
  if (max === 1) return [points[n - 1]];
  if (max === 2) return [points[0], points[n - 1]];
  /** @type {Point[]} */
  const out = [points[0]];
  const every = (n - 2) / (max - 2); // interior points per bucket
  let a = 0; // index of the previously kept point
  for (let i = 0; i < max - 2; i++) {
    // average of the next bucket (the last bucket's "next" is the final point)
    const nStart = Math.floor((i + 1) * every) + 1;
    const nEnd = Math.min(n, Math.floor((i + 2) * every) + 1);
    let ax = 0;
    let ay = 0;
    const cnt = Math.max(1, nEnd - nStart);
    if (nEnd > nStart) {
      for (let j = nStart; j < nEnd; j++) {
        ax += points[j][0];
        ay += points[j][1];
      }
      ax /= cnt;
      ay /= cnt;
    } else {
      [ax, ay] = points[n - 1];
    }
    const start = Math.floor(i * every) + 1;
    const end = Math.min(n - 1, Math.floor((i + 1) * every) + 1);
    const [px, py] = points[a];
    let best = start;
    let bestArea = -1;
    for (let j = start; j < end; j++) {
      const area = Math.abs((px - ax) * (points[j][1] - py) - (px - points[j][0]) * (ay - py));
      if (area > bestArea) {
        bestArea = area;
        best = j;
      }
    }
    out.push(points[best]);
    a = best;
  }
  out.push(points[n - 1]);
  return out;
}

// ---------------------------------------------------------------------------------------------
// Scales, ticks, layout

/**
 * @typedef {((v: number) => number) & {domain:[number, number], range:[number, number], log:boolean,
 *   invert:(p: number) => number}} Scale
 */

/**
 * Linear map domain → range (pixels). A degenerate domain maps to the middle of the range.
 * @param {[number, number]} domain
 * @param {[number, number]} range
 * @returns {Scale}
 */
export function linearScale(domain, range) {
  const [d0, d1] = domain;
  const [r0, r1] = range;
  const span = d1 - d0;
  const f = /** @type {Scale} */ ((v) => (span === 0 ? (r0 + r1) / 2 : r0 + ((v - d0) / span) * (r1 - r0)));
  f.invert = (p) => (r1 === r0 ? d0 : d0 + ((p - r0) / (r1 - r0)) * span);
  f.domain = [d0, d1];
  f.range = [r0, r1];
  f.log = false;
  return f;
}

/**
 * Log10 map domain → range; values <= 0 map to the domain minimum.
 * @param {[number, number]} domain both > 0
 * @param {[number, number]} range
 * @returns {Scale}
 */
export function logScale(domain, range) {
  const l0 = Math.log10(domain[0]);
  const l1 = Math.log10(domain[1]);
  const lin = linearScale([l0, l1], range);
  const f = /** @type {Scale} */ ((v) => lin(v > 0 ? Math.log10(v) : l0));
  f.invert = (p) => 10 ** lin.invert(p);
  f.domain = [domain[0], domain[1]];
  f.range = [range[0], range[1]];
  f.log = true;
  return f;
}

/**
 * "Nice" tick values (steps of 1, 2 or 5 × 10^k) covering [min, max], about `count` of them.
 * @param {number} min
 * @param {number} max
 * @param {number} [count]
 * @returns {number[]}
 */
export function niceTicks(min, max, count = 5) {
  if (!Number.isFinite(min) || !Number.isFinite(max)) return [];
  if (max < min) [min, max] = [max, min];
  if (max === min) return [min];
  const raw = (max - min) / Math.max(1, count);
  const mag = 10 ** Math.floor(Math.log10(raw));
  const norm = raw / mag;
  const step = (norm <= 1 ? 1 : norm <= 2 ? 2 : norm <= 5 ? 5 : 10) * mag;
  const ticks = [];
  const first = Math.ceil(min / step - 1e-9);
  const last = Math.floor(max / step + 1e-9);
  for (let k = first; k <= last; k++) ticks.push(+(k * step).toPrecision(12));
  return ticks;
}

/**
 * Ticks of a log axis over [min, max] (> 0): powers of ten (every k-th decade when there are more
 * than `maxCount`), plus 2× and 5× when they fit; linear nice ticks when fewer than two of those
 * fall inside (less than about a decade).
 * @param {number} min
 * @param {number} max
 * @param {number} [maxCount] at most this many ticks (default 8)
 * @returns {number[]}
 */
export function logTicks(min, max, maxCount = 8) {
  if (!(min > 0) || !(max > 0)) return [];
  if (max < min) [min, max] = [max, min];
  const limit = Math.max(2, Math.floor(maxCount));
  const lo = Math.floor(Math.log10(min));
  const hi = Math.ceil(Math.log10(max));
  const inside = (v) => v >= min * (1 - 1e-9) && v <= max * (1 + 1e-9);
  const collect = (mults, every) => {
    const ticks = [];
    const first = Math.ceil(lo / every) * every;
    for (let e = first; e <= hi; e += every) {
      for (const m of mults) {
        const v = +(m * 10 ** e).toPrecision(12);
        if (inside(v)) ticks.push(v);
      }
    }
    return ticks;
  };
  let ticks = collect([1, 2, 5], 1);
  if (ticks.length > limit) ticks = collect([1], 1);
  for (let every = 2; ticks.length > limit; every++) ticks = collect([1], every);
  if (ticks.length < 2) return niceTicks(min, max, Math.min(4, limit)).filter((v) => v > 0);
  return ticks;
}

/**
 * The q-quantile (0..1) of an ascending array, linearly interpolated; NaN when empty.
 * @param {number[]} sorted
 * @param {number} q
 */
export function quantile(sorted, q) {
  if (sorted.length === 0) return NaN;
  const pos = Math.max(0, Math.min(1, q)) * (sorted.length - 1);
  const i = Math.floor(pos);
  const f = pos - i;
  return i + 1 < sorted.length ? sorted[i] + (sorted[i + 1] - sorted[i]) * f : sorted[i];
}

/**
 * y range of the loss panel for the given values.
 * log: [min, max] widened by 10% of the log span each side (a decade around a single value);
 * linear: from 0 (or the negative minimum) to the max plus 5%.
 * @param {number[]} values
 * @param {"log"|"linear"} scale
 * @returns {[number, number]}
 */
export function lossRange(values, scale) {
  const finite = values.filter((v) => Number.isFinite(v) && (scale !== "log" || v > 0));
  if (finite.length === 0) return scale === "log" ? [1e-3, 1] : [0, 1];
  let min = Math.min(...finite);
  let max = Math.max(...finite);
  if (scale === "log") {
    let l0 = Math.log10(min);
    let l1 = Math.log10(max);
    const pad = l1 - l0 < 1e-9 ? 0.5 : (l1 - l0) * 0.1;
    l0 -= pad;
    l1 += pad;
    return [10 ** l0, 10 ** l1];
  }
  min = Math.min(0, min);
  if (max <= min) max = min + 1;
  return [min, max + (max - min) * 0.05];
}

/** @typedef {{x:number, y:number, w:number, h:number}} Rect */

/**
 * Two stacked panels (gamma on top, losses below) sharing the x axis, in CSS pixels.
 * Each panel has a header line (title + legend) above its plot rectangle; the x tick labels go
 * under the loss panel only.
 * @param {number} width
 * @param {number} height
 * @returns {{gamma: {header: Rect, plot: Rect}, loss: {header: Rect, plot: Rect}, xLabels: Rect}}
 */
export function layoutPanels(width, height) {
  const W = Math.max(0, width);
  const H = Math.max(0, height);
  const left = 40; // y tick labels
  const right = 10;
  const header = 16;
  const gap = 6;
  const xLabel = 14;
  const plotW = Math.max(1, W - left - right);
  const avail = Math.max(2, H - 2 * header - gap - xLabel - 4);
  const gammaH = Math.round(avail * 0.52);
  const lossH = Math.max(1, avail - gammaH);
  const gHeader = { x: left, y: 2, w: plotW, h: header };
  const gPlot = { x: left, y: gHeader.y + header, w: plotW, h: Math.max(1, gammaH) };
  const lHeader = { x: left, y: gPlot.y + gPlot.h + gap, w: plotW, h: header };
  const lPlot = { x: left, y: lHeader.y + header, w: plotW, h: lossH };
  return {
    gamma: { header: gHeader, plot: gPlot },
    loss: { header: lHeader, plot: lPlot },
    xLabels: { x: left, y: lPlot.y + lPlot.h, w: plotW, h: xLabel },
  };
}

/**
 * Map data points to pixel coordinates.
 * @param {Point[]} points
 * @param {Scale} xScale
 * @param {Scale} yScale
 * @returns {Point[]}
 */
export function toPixels(points, xScale, yScale) {
  return points.map(([x, y]) => [xScale(x), yScale(y)]);
}

// ---------------------------------------------------------------------------------------------
// The model

/**
 * @typedef {{type:"rect", x:number, y:number, w:number, h:number, fill?:string, stroke?:string}
 *   | {type:"line", points:Point[], color:string, width:number, alpha?:number, dash?:number[], id?:string,
 *      clip?:Rect}
 *   | {type:"text", x:number, y:number, text:string, color:string, align?:"left"|"center"|"right",
 *      baseline?:"top"|"middle"|"bottom"|"alphabetic", font?:string}} Shape
 */

const FONT = "11px sans-serif";
const SMALL_FONT = "10px sans-serif";
const TEXT = "#d0d0d0";
const MUTED = "#8c8c8c";
const GRID = "rgba(255,255,255,0.09)";
const PANEL = "rgba(0,0,0,0.22)";

/** @param {unknown} v @returns {number} NaN unless a finite number */
function num(v) {
  return typeof v === "number" && Number.isFinite(v) ? v : NaN;
}

/**
 * Live state of one trainer node's run, fed with events; produces series, text and a scene.
 */
export class AptChartModel {
  /** @param {Partial<ChartOptions>} [options] */
  constructor(options = {}) {
    /** @type {ChartOptions} */
    this.options = { ...DEFAULT_OPTIONS, ...options };
    /** Incremented on every reset: lets an async fetch detect that a newer run replaced its own. */
    this.generation = 0;
    this.reset(null);
  }

  /**
   * Forget everything: a new run (prompt) starts.
   * @param {string|null} [runId] prompt_id of the new run
   */
  reset(runId = null) {
    this.generation += 1;
    /** @type {string|null} */
    this.runId = runId ?? null;
    /** @type {number|null} server start time of the run, when a summary told it */
    this.started = null;
    /** @type {Map<number, ProgressEvent>} */
    this._byStep = new Map();
    /** @type {ProgressEvent[]|null} */
    this._sorted = null;
    this.status = "idle";
    this.message = "";
    this.loraName = "";
    this.totalSteps = 0;
    this.lastStep = 0;
    this.resumedFrom = 0;
    this.stopRequested = false;
    /** @type {number} server time of the last summary applied (stale summaries are ignored) */
    this.statusUpdated = -Infinity;
    /** @type {Preview[]} sample previews of the run, in the order rendered */
    this.previews = [];
    /** @type {number|null} the preview step shown (null: the latest) */
    this.selectedStep = null;
    this._cache = new Map();
  }

  // ---- previews ----------------------------------------------------------------------------

  /**
   * Add previews (an "apt.previews" message's images, or a snapshot's list); known files are skipped.
   * @param {Preview[]} list
   * @returns {boolean} whether anything was added
   */
  addPreviews(list) {
    const known = new Set(this.previews.map((p) => p.file));
    const fresh = (Array.isArray(list) ? list : []).filter((p) => p && Number.isFinite(Number(p.step)) && !known.has(p.file));
    this.previews.push(...fresh);
    return fresh.length > 0;
  }

  /** Steps that have previews, ascending. @returns {number[]} */
  previewSteps() {
    return [...new Set(this.previews.map((p) => Number(p.step)))].sort((a, b) => a - b);
  }

  /** The preview step shown: the selected one, else the latest. @returns {number|null} */
  shownPreviewStep() {
    const steps = this.previewSteps();
    if (!steps.length) return null;
    return this.selectedStep !== null && steps.includes(this.selectedStep) ? this.selectedStep : steps[steps.length - 1];
  }

  /** Previews of one step, in prompt order. @param {number|null} step @returns {Preview[]} */
  previewsAt(step) {
    return this.previews.filter((p) => Number(p.step) === step);
  }

  /**
   * Select the preview step nearest to `step` (a click on the chart); null selects the latest.
   * @param {number|null} step
   * @returns {number|null} the step selected
   */
  selectPreviewNear(step) {
    const steps = this.previewSteps();
    if (step === null || !steps.length) {
      this.selectedStep = null;
      return this.shownPreviewStep();
    }
    const near = steps.reduce((best, s) => (Math.abs(s - step) < Math.abs(best - step) ? s : best), steps[0]);
    this.selectedStep = near === steps[steps.length - 1] ? null : near; // the latest keeps following new ones
    return near;
  }

  /**
   * Move the selection to the previous (-1) or next (+1) preview step.
   * @param {number} delta
   * @returns {number|null}
   */
  stepPreview(delta) {
    const steps = this.previewSteps();
    const now = this.shownPreviewStep();
    if (now === null) return null;
    const i = Math.min(steps.length - 1, Math.max(0, steps.indexOf(now) + Math.sign(delta)));
    this.selectedStep = i === steps.length - 1 ? null : steps[i]; // the last one follows new previews
    return steps[i];
  }

  /**
   * The training step under pixel x of a chart of width x height (the scene's x axis), or null
   * outside the plots.
   * @param {number} width @param {number} height @param {number} x
   * @returns {number|null}
   */
  stepAtPixel(width, height, x) {
    const G = layoutPanels(width, height).gamma.plot;
    if (x < G.x || x > G.x + G.w) return null;
    const xMax = Math.max(1, this.totalSteps, this.lastStep);
    return Math.round(((x - G.x) / G.w) * xMax);
  }

  /** Number of distinct steps held. */
  get size() {
    return this._byStep.size;
  }

  /** True while the run can still be stopped (starting, encoding, training, stopping). */
  get isActive() {
    return ACTIVE_STATUSES.includes(this.status);
  }

  /** Number of timestep bins (length of the longest gamma list seen). */
  get numBins() {
    let n = 0;
    for (const e of this._byStep.values()) n = Math.max(n, Array.isArray(e.gamma) ? e.gamma.length : 0);
    return n;
  }

  /** Events sorted by step. @returns {ProgressEvent[]} */
  events() {
    if (!this._sorted) this._sorted = [...this._byStep.values()].sort((a, b) => a.step - b.step);
    return this._sorted;
  }

  /** The event with the highest step, or null. @returns {ProgressEvent|null} */
  latest() {
    const ev = this.events();
    return ev.length ? ev[ev.length - 1] : null;
  }

  /**
   * Adopt the run of an incoming message; reset when it belongs to another run.
   * @param {string|null|undefined} promptId
   * @param {number|null|undefined} [started]
   * @returns {boolean} true when the model was reset
   */
  _adoptRun(promptId, started) {
    const pid = promptId == null || promptId === "" ? null : String(promptId);
    const st = typeof started === "number" && Number.isFinite(started) ? started : null;
    const otherPrompt = pid !== null && this.runId !== null && pid !== this.runId;
    const otherStart = st !== null && this.started !== null && st !== this.started &&
      (pid === null || pid === this.runId);
    if (otherPrompt || otherStart) {
      this.reset(pid);
      if (st !== null) this.started = st;
      return true;
    }
    if (pid !== null && this.runId === null) this.runId = pid;
    if (st !== null && this.started === null) this.started = st;
    return false;
  }

  /**
   * Add one progress event (live or from history). Duplicates (same step) are ignored; events may
   * arrive in any order; an event of another prompt resets the model first.
   * @param {ProgressEvent} event
   * @param {{promptId?: string|null}} [ctx] the run the event belongs to, when known better than the
   *   event's own prompt_id (history entries of a snapshot belong to the snapshot's run)
   * @returns {{changed: boolean, reset: boolean}}
   */
  ingest(event, ctx = {}) {
    if (!event || typeof event !== "object") return { changed: false, reset: false };
    const step = Number(event.step);
    if (!Number.isInteger(step) || step < 0) return { changed: false, reset: false };
    const reset = this._adoptRun("promptId" in ctx ? ctx.promptId : event.prompt_id, null);
    const newest = step > this.lastStep;
    if (this._byStep.has(step)) return { changed: reset, reset };
    this._byStep.set(step, event);
    this._sorted = null;
    this._cache.clear();
    if (newest) {
      this.lastStep = step;
      // a progress event never ends a run nor undoes a stop request seen meanwhile
      const st = event.status ? String(event.status) : "";
      if (st && !FINAL_STATUSES.includes(this.status) && !(this.status === "stopping" && st === "training")) {
        this.status = st;
      }
    }
    const total = num(event.total_steps);
    if (total > 0 && (newest || !this.totalSteps)) this.totalSteps = total;
    if (event.lora_name && !this.loraName) this.loraName = String(event.lora_name);
    return { changed: true, reset };
  }

  /**
   * Apply a run summary ("apt.status" message). Summaries older than the last one applied (by
   * their server `updated` time) only contribute their run identity.
   * @param {RunSummary} summary
   * @returns {{changed: boolean, reset: boolean}}
   */
  ingestStatus(summary) {
    if (!summary || typeof summary !== "object") return { changed: false, reset: false };
    const reset = this._adoptRun(summary.prompt_id, summary.started);
    const updated = num(summary.updated);
    if (Number.isFinite(updated) && updated < this.statusUpdated) return { changed: reset, reset };
    if (Number.isFinite(updated)) this.statusUpdated = updated;
    if (summary.status) this.status = String(summary.status);
    if (typeof summary.message === "string") this.message = summary.message;
    if (summary.lora_name) this.loraName = String(summary.lora_name);
    const total = num(summary.total_steps);
    if (total > 0) this.totalSteps = total;
    const step = num(summary.step);
    if (step > this.lastStep) this.lastStep = step;
    const resumed = num(summary.resumed_from);
    if (resumed >= 0) this.resumedFrom = resumed;
    if (typeof summary.stop_requested === "boolean") this.stopRequested = summary.stop_requested;
    this._cache.clear();
    return { changed: true, reset };
  }

  /**
   * Apply GET /apt/runs/{id}: the summary and its history. `generationAtRequest` (this.generation
   * when the request was sent) drops a snapshot of an older run that arrives after a live event of
   * a newer one already reset the model.
   * @param {RunSummary} snapshot
   * @param {number} [generationAtRequest]
   * @returns {{changed: boolean, reset: boolean, stale: boolean}}
   */
  applySnapshot(snapshot, generationAtRequest) {
    if (!snapshot || typeof snapshot !== "object") return { changed: false, reset: false, stale: false };
    const pid = snapshot.prompt_id == null ? null : String(snapshot.prompt_id);
    if (generationAtRequest !== undefined && generationAtRequest !== this.generation && pid !== this.runId) {
      return { changed: false, reset: false, stale: true };
    }
    if (snapshot.status === "idle") {
      // the server has no run for this node (never trained, or the server restarted)
      if (this.size === 0) {
        const changed = this.status !== "idle";
        this.status = "idle";
        return { changed, reset: false, stale: false };
      }
      if (this.isActive) {
        this.status = "lost";
        this.message = "the server no longer knows this run (restarted?)";
        return { changed: true, reset: false, stale: false };
      }
      return { changed: false, reset: false, stale: false };
    }
    const st = this.ingestStatus(snapshot);
    let changed = st.changed;
    for (const ev of snapshot.history ?? []) changed = this.ingest(ev, { promptId: pid }).changed || changed;
    changed = this.addPreviews(snapshot.previews) || changed;
    return { changed, reset: st.reset, stale: false };
  }

  /** Mark the run as stopping right after a successful POST .../stop. */
  markStopping() {
    if (this.isActive) {
      this.status = "stopping";
      this.stopRequested = true;
    }
  }

  // ---- series ------------------------------------------------------------------------------

  /**
   * gamma of each bin over steps, one series per bin (decimated).
   * @param {number} [maxPoints]
   * @returns {Point[][]}
   */
  gammaSeries(maxPoints = this.options.maxPoints) {
    const key = `g:${maxPoints}`;
    if (this._cache.has(key)) return this._cache.get(key);
    const n = this.numBins;
    /** @type {Point[][]} */
    const series = Array.from({ length: n }, () => []);
    for (const e of this.events()) {
      if (!Array.isArray(e.gamma)) continue;
      for (let b = 0; b < n; b++) {
        const g = num(e.gamma[b]);
        if (Number.isFinite(g)) series[b].push([e.step, Math.max(0, Math.min(1, g))]);
      }
    }
    const out = series.map((s) => decimate(s, maxPoints));
    this._cache.set(key, out);
    return out;
  }

  /**
   * Loss terms: raw and EMA-smoothed (smoothing on the full series, then decimation). A term that
   * is zero throughout (regularizer switched off) is flagged `off`. In log scale non-positive
   * values are dropped.
   * @param {{smoothing?: number, maxPoints?: number, scale?: "log"|"linear"}} [opts]
   * @returns {{key:string, label:string, color:string, off:boolean, raw:Point[], smooth:Point[]}[]}
   */
  lossSeries(opts = {}) {
    const smoothing = opts.smoothing ?? this.options.smoothing;
    const maxPoints = opts.maxPoints ?? this.options.maxPoints;
    const scale = opts.scale ?? this.options.lossScale;
    const key = `l:${smoothing}:${maxPoints}:${scale}`;
    if (this._cache.has(key)) return this._cache.get(key);
    const events = this.events();
    const out = LOSS_TERMS.map((term) => {
      /** @type {Point[]} */
      const pts = [];
      let any = false;
      for (const e of events) {
        const v = num(/** @type {any} */ (e)[term.key]);
        if (!Number.isFinite(v)) continue;
        if (v !== 0) any = true;
        if (scale === "log" && v <= 0) continue;
        pts.push([e.step, v]);
      }
      const off = events.length > 0 && !any;
      return {
        key: term.key, label: term.label, color: term.color, off,
        raw: off ? [] : decimate(pts, maxPoints),
        smooth: off ? [] : decimate(emaSmooth(pts, smoothing), maxPoints),
      };
    });
    this._cache.set(key, out);
    return out;
  }

  /**
   * What a browser test (or a tooltip) can check: drawn points per series.
   * @returns {{events:number, lastStep:number, status:string, runId:string|null, gamma:number[], loss:Object<string, number>}}
   */
  pointCounts() {
    const loss = {};
    for (const s of this.lossSeries()) loss[s.key] = s.smooth.length;
    return {
      events: this.size, lastStep: this.lastStep, status: this.status, runId: this.runId,
      gamma: this.gammaSeries().map((s) => s.length), loss,
    };
  }

  // ---- text --------------------------------------------------------------------------------

  /** Short word for the status, as the artist reads it. */
  statusLabel() {
    return {
      idle: "idle — queue the workflow to train", starting: "starting", encoding: "encoding images",
      training: "training", stopping: "stopping…", finished: "finished", stopped: "stopped early",
      cancelled: "cancelled", error: "error", lost: "connection to run lost",
    }[this.status] ?? this.status;
  }

  /**
   * The status line: "training · step 120/500 · 2.31 it/s · ETA 2m 44s · aug 34%".
   * @returns {string}
   */
  statusLine() {
    const last = this.latest();
    const parts = [this.statusLabel()];
    if (this.status === "idle" && !last) return parts[0];
    const total = this.totalSteps || last?.total_steps || 0;
    if (this.lastStep > 0 || total > 0) parts.push(`step ${this.lastStep}${total ? `/${total}` : ""}`);
    if (last && (this.status === "training" || this.status === "stopping")) {
      parts.push(formatRate(last.it_per_s));
      parts.push(`ETA ${formatDuration(last.eta_s)}`);
    }
    if (last && Number.isFinite(num(last.aug_rate))) parts.push(`aug ${Math.round(last.aug_rate * 100)}%`);
    if (this.message && (FINAL_STATUSES.includes(this.status) || this.status === "lost" || !last)) {
      parts.push(this.message);
    }
    return parts.join(" · ");
  }

  // ---- scene -------------------------------------------------------------------------------

  /**
   * Everything to draw for a canvas of width × height CSS pixels.
   * @param {number} width
   * @param {number} height
   * @param {{smoothing?: number, scale?: "log"|"linear", maxPoints?: number}} [opts]
   * @returns {{shapes: Shape[], layout: ReturnType<typeof layoutPanels>, xScale: Scale, gammaY: Scale,
   *   lossY: Scale, counts: {gamma: number[], loss: Object<string, number>}}}
   */
  scene(width, height, opts = {}) {
    const scale = opts.scale ?? this.options.lossScale;
    const smoothing = opts.smoothing ?? this.options.smoothing;
    const maxPoints = opts.maxPoints ?? Math.max(2, Math.min(this.options.maxPoints, Math.round(width * 2)));
    const layout = layoutPanels(width, height);
    const { gamma: G, loss: L } = layout;
    /** @type {Shape[]} */
    const shapes = [];
    const xMax = Math.max(1, this.totalSteps, this.lastStep);
    const xScale = linearScale([0, xMax], [G.plot.x, G.plot.x + G.plot.w]);
    const gammaY = linearScale([0, 1], [G.plot.y + G.plot.h, G.plot.y]);
    const losses = this.lossSeries({ smoothing, maxPoints, scale });
    // y range: the smoothed curves entirely, the raw values without their 2% most extreme each side
    // (one outlier step must not squash the curves); lines are clipped to the plot
    const lossValues = [];
    for (const s of losses) {
      for (const p of s.smooth) lossValues.push(p[1]);
      const raw = s.raw.map((p) => p[1]).sort((a, b) => a - b);
      if (raw.length) lossValues.push(quantile(raw, 0.02), quantile(raw, 0.98));
    }
    const [l0, l1] = lossRange(lossValues, scale);
    const lossY = scale === "log" ? logScale([l0, l1], [L.plot.y + L.plot.h, L.plot.y])
      : linearScale([l0, l1], [L.plot.y + L.plot.h, L.plot.y]);

    // panels and grids
    for (const P of [G.plot, L.plot]) shapes.push({ type: "rect", ...P, fill: PANEL });
    const xTicks = niceTicks(0, xMax, Math.max(2, Math.floor(G.plot.w / 70)));
    for (const t of xTicks) {
      const px = xScale(t);
      for (const P of [G.plot, L.plot]) shapes.push({ type: "line", points: [[px, P.y], [px, P.y + P.h]], color: GRID, width: 1 });
      shapes.push({ type: "text", x: px, y: layout.xLabels.y + 2, text: formatTick(t), color: MUTED,
        align: "center", baseline: "top", font: SMALL_FONT });
    }
    for (const t of [0, 0.5, 1]) {
      const py = gammaY(t);
      shapes.push({ type: "line", points: [[G.plot.x, py], [G.plot.x + G.plot.w, py]], color: GRID, width: 1 });
      shapes.push({ type: "text", x: G.plot.x - 4, y: py, text: formatTick(t), color: MUTED, align: "right",
        baseline: "middle", font: SMALL_FONT });
    }
    const yTicks = scale === "log" ? logTicks(l0, l1, Math.max(2, Math.floor(L.plot.h / 16)))
      : niceTicks(l0, l1, Math.max(2, Math.floor(L.plot.h / 30)));
    for (const t of yTicks) {
      const py = lossY(t);
      if (py < L.plot.y - 0.5 || py > L.plot.y + L.plot.h + 0.5) continue;
      shapes.push({ type: "line", points: [[L.plot.x, py], [L.plot.x + L.plot.w, py]], color: GRID, width: 1 });
      shapes.push({ type: "text", x: L.plot.x - 4, y: py, text: formatTick(t), color: MUTED, align: "right",
        baseline: "middle", font: SMALL_FONT });
    }

    // gamma panel: title + "low noise → high noise" legend with one swatch per bin
    const nBins = this.numBins || 10;
    shapes.push({ type: "text", x: G.header.x, y: G.header.y + G.header.h / 2,
      text: G.header.w >= 380 ? "overfitting γ per noise level" : "γ per noise level",
      color: TEXT, align: "left", baseline: "middle", font: FONT });
    const sw = 8;
    const legendRight = G.header.x + G.header.w;
    const hiLabelW = 58;
    const swatchesX = legendRight - hiLabelW - nBins * sw;
    shapes.push({ type: "text", x: legendRight, y: G.header.y + G.header.h / 2, text: "high noise", color: MUTED,
      align: "right", baseline: "middle", font: SMALL_FONT });
    for (let b = 0; b < nBins; b++) {
      shapes.push({ type: "rect", x: swatchesX + b * sw, y: G.header.y + 4, w: sw, h: G.header.h - 8,
        fill: binColor(b, nBins, this.options.binColorStart) });
    }
    shapes.push({ type: "text", x: swatchesX - 4, y: G.header.y + G.header.h / 2, text: "low noise →", color: MUTED,
      align: "right", baseline: "middle", font: SMALL_FONT });
    // gamma lines, low noise first so that high noise is drawn on top
    const gSeries = this.gammaSeries(maxPoints);
    gSeries.forEach((pts, b) => {
      if (pts.length === 0) return;
      const px = toPixels(pts.length === 1 ? [pts[0], pts[0]] : pts, xScale, gammaY);
      shapes.push({ type: "line", id: `gamma:${b}`, points: px, color: binColor(b, gSeries.length,
        this.options.binColorStart), width: 1.5, clip: { x: G.plot.x, y: G.plot.y - 1, w: G.plot.w, h: G.plot.h + 2 } });
    });

    // loss panel: title + legend
    shapes.push({ type: "text", x: L.header.x, y: L.header.y + L.header.h / 2,
      text: `loss (${scale === "log" ? "log" : "linear"}${smoothing > 0 ? `, smoothed ${smoothing}` : ""})`,
      color: TEXT, align: "left", baseline: "middle", font: FONT });
    let lx = L.header.x + L.header.w;
    for (let i = losses.length - 1; i >= 0; i--) {
      const s = losses[i];
      const label = s.off ? `${s.label} off` : s.label;
      const w = 8 + label.length * 6;
      shapes.push({ type: "text", x: lx, y: L.header.y + L.header.h / 2, text: label, color: s.off ? MUTED : s.color,
        align: "right", baseline: "middle", font: SMALL_FONT });
      lx -= w + 12;
    }
    for (const s of losses) {
      if (s.raw.length > 1 && smoothing > 0) {
        shapes.push({ type: "line", id: `${s.key}:raw`, points: toPixels(s.raw, xScale, lossY), color: s.color,
          width: 1, alpha: 0.25, clip: L.plot });
      }
      if (s.smooth.length > 0) {
        const pts = s.smooth.length === 1 ? [s.smooth[0], s.smooth[0]] : s.smooth;
        shapes.push({ type: "line", id: `${s.key}`, points: toPixels(pts, xScale, lossY), color: s.color, width: 1.5,
          clip: L.plot });
      }
    }

    // preview steps: a tick under the gamma panel each; the one shown is brighter
    const shown = this.shownPreviewStep();
    for (const s of this.previewSteps()) {
      const px = xScale(s);
      shapes.push({ type: "line", id: `preview:${s}`, points: [[px, G.plot.y + G.plot.h - 6], [px, G.plot.y + G.plot.h]],
        color: s === shown ? "#ffffff" : "rgba(255,255,255,0.45)", width: s === shown ? 3 : 2 });
    }

    // current step marker and the empty state
    if (this.lastStep > 0) {
      const px = xScale(this.lastStep);
      for (const P of [G.plot, L.plot]) {
        shapes.push({ type: "line", points: [[px, P.y], [px, P.y + P.h]], color: "rgba(255,255,255,0.25)",
          width: 1, dash: [3, 3] });
      }
    }
    if (this.size === 0) {
      const msg = this.status === "idle" ? "no training run yet" : this.message || this.statusLabel();
      shapes.push({ type: "text", x: G.plot.x + G.plot.w / 2, y: G.plot.y + G.plot.h / 2, text: msg, color: MUTED,
        align: "center", baseline: "middle", font: FONT });
    }
    const counts = {
      gamma: gSeries.map((s) => s.length),
      loss: Object.fromEntries(losses.map((s) => [s.key, s.smooth.length])),
    };
    return { shapes, layout, xScale, gammaY, lossY, counts };
  }
}
