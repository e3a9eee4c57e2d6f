// Unit tests of the live chart's plotting logic. Run: node --test js/tests/
import assert from "node:assert/strict";
import { describe, it } from "node:test";

import {
  ACTIVE_STATUSES, AptChartModel, DEFAULT_OPTIONS, LOSS_TERMS, VIRIDIS, binColor, decimate, emaSmooth,
  formatDuration, formatRate, formatTick, layoutPanels, linearScale, logScale, logTicks, lossRange,
  niceTicks, quantile, rampColor, relativeLuminance, toPixels,
} from "../apt_chart_model.js";

const close = (a, b, eps = 1e-9, msg = "") => assert.ok(Math.abs(a - b) <= eps, `${msg} ${a} != ${b}`);

/** A progress event as nodes/train_job.py sends it. */
function ev(step, extra = {}) {
  return {
    node: "7", prompt_id: "p1", status: "training", lora_name: "apt_lora.safetensors",
    step, total_steps: 500, loss: 0.1, loss_denoise: 0.1 + step * 1e-4, loss_rs: 0.01, loss_aa: 0.002,
    gamma: Array.from({ length: 10 }, (_, b) => Math.min(1, (step / 500) * ((b + 1) / 10))),
    aug_rate: 0.34, loss_weight: 0.8, lr: 1e-4, it_per_s: 2.5, eta_s: (500 - step) / 2.5, timesteps: [500],
    ...extra,
  };
}

describe("formatting", () => {
  it("formats durations the human way", () => {
    assert.equal(formatDuration(80), "1m 20s");
    assert.equal(formatDuration(45), "45s");
    assert.equal(formatDuration(0), "0s");
    assert.equal(formatDuration(0.4), "0s");
    assert.equal(formatDuration(59.6), "1m 0s");
    assert.equal(formatDuration(600), "10m 0s");
    assert.equal(formatDuration(3725), "1h 2m");
    assert.equal(formatDuration(90061), "1d 1h");
    for (const bad of [null, undefined, NaN, Infinity, -1, "80"]) assert.equal(formatDuration(bad), "–");
  });

  it("formats speed as it/s or s/it", () => {
    assert.equal(formatRate(2.5), "2.50 it/s");
    assert.equal(formatRate(12.34), "12.3 it/s");
    assert.equal(formatRate(0.25), "4.0 s/it");
    assert.equal(formatRate(0.05), "20 s/it");
    assert.equal(formatRate(0), "– it/s");
    assert.equal(formatRate(null), "– it/s");
  });

  it("formats tick labels compactly", () => {
    assert.equal(formatTick(0), "0");
    assert.equal(formatTick(0.5), "0.5");
    assert.equal(formatTick(250), "250");
    assert.equal(formatTick(1500), "1.5k");
    assert.equal(formatTick(20000), "20k");
    assert.equal(formatTick(0.001), "1e-3");
    assert.equal(formatTick(0.005), "5e-3");
  });
});

describe("colour ramp", () => {
  it("has the viridis endpoints", () => {
    assert.equal(rampColor(0), "#440154");
    assert.equal(rampColor(1), "#fde725");
    assert.equal(rampColor(-3), "#440154"); // clamped
    assert.equal(rampColor(7), "#fde725");
    assert.equal(rampColor(NaN), "#440154");
    assert.equal(rampColor(4 / 9), VIRIDIS[4]);
  });

  it("colours bins from low noise (dark) to high noise (yellow), deterministically", () => {
    assert.equal(binColor(9, 10), "#fde725");
    assert.equal(binColor(0, 10, 0), "#440154");
    assert.equal(binColor(0, 10), rampColor(DEFAULT_OPTIONS.binColorStart));
    const colours = Array.from({ length: 10 }, (_, b) => binColor(b, 10));
    assert.deepEqual(colours, Array.from({ length: 10 }, (_, b) => binColor(b, 10)));
    assert.equal(new Set(colours).size, 10);
    for (const c of colours) assert.match(c, /^#[0-9a-f]{6}$/);
    for (let b = 1; b < 10; b++) {
      assert.ok(relativeLuminance(colours[b]) > relativeLuminance(colours[b - 1]), `bin ${b} lighter than ${b - 1}`);
    }
    assert.equal(binColor(0, 1), "#fde725");
  });
});

describe("EMA smoothing", () => {
  it("matches hand-computed values", () => {
    // s0 = 1; s1 = .5*1 + .5*0 = .5; s2 = .5*.5 = .25; s3 = .5*.25 + .5*1 = .625
    const s = emaSmooth([[1, 1], [2, 0], [3, 0], [4, 1]], 0.5);
    assert.deepEqual(s.map((p) => p[0]), [1, 2, 3, 4]);
    [1, 0.5, 0.25, 0.625].forEach((v, i) => close(s[i][1], v));
    // smoothing 0.8: s0 = 2; s1 = .8*2 + .2*4 = 2.4; NaN skipped; s2 = .8*2.4 + .2*1 = 2.12
    const t = emaSmooth([[10, 2], [20, 4], [30, NaN], [40, 1]], 0.8);
    assert.deepEqual(t.map((p) => p[0]), [10, 20, 40]);
    [2, 2.4, 2.12].forEach((v, i) => close(t[i][1], v, 1e-12));
  });

  it("is the identity at smoothing 0", () => {
    const pts = [[1, 3], [2, 1], [3, 2]];
    assert.deepEqual(emaSmooth(pts, 0), pts);
    assert.deepEqual(emaSmooth([], 0.9), []);
  });

  it("is what the model draws for the loss curves (configurable)", () => {
    const m = new AptChartModel({ smoothing: 0.5 });
    const ys = [0.4, 0.2, 0.2, 0.6];
    ys.forEach((y, i) => m.ingest(ev(i + 1, { loss_denoise: y })));
    const den = m.lossSeries().find((s) => s.key === "loss_denoise");
    assert.deepEqual(den.raw.map((p) => p[1]), ys);
    // .4; .5*.4+.5*.2 = .3; .5*.3+.5*.2 = .25; .5*.25+.5*.6 = .425
    [0.4, 0.3, 0.25, 0.425].forEach((v, i) => close(den.smooth[i][1], v, 1e-12));
    const raw = m.lossSeries({ smoothing: 0 }).find((s) => s.key === "loss_denoise");
    assert.deepEqual(raw.smooth.map((p) => p[1]), ys);
  });
});

describe("decimation", () => {
  const series = (n) => Array.from({ length: n }, (_, i) => [i + 1, Math.sin(i / 17) + (i === 4321 ? 50 : 0)]);

  it("returns a copy when short enough", () => {
    const pts = series(100);
    const out = decimate(pts, 500);
    assert.deepEqual(out, pts);
    assert.notEqual(out, pts);
  });

  it("bounds the count and keeps the first and last points", () => {
    for (const [n, max] of [[10000, 500], [501, 500], [1000, 3], [7, 5], [2000, 499], [100000, 500]]) {
      const pts = series(n);
      const out = decimate(pts, max);
      assert.equal(out.length, Math.min(n, max), `n=${n} max=${max}`);
      assert.deepEqual(out[0], pts[0]);
      assert.deepEqual(out[out.length - 1], pts[n - 1]);
      for (let i = 1; i < out.length; i++) assert.ok(out[i][0] > out[i - 1][0], "x strictly increasing");
      const xs = new Set(pts.map((p) => p[0]));
      for (const p of out) assert.ok(xs.has(p[0]), "only original points");
    }
    assert.deepEqual(decimate(series(50), 2), [[1, Math.sin(0)], series(50)[49]]);
    assert.equal(decimate(series(50), 1).length, 1);
  });

  it("keeps a spike", () => {
    const out = decimate(series(10000), 500);
    assert.ok(out.some((p) => p[0] === 4322), "the outlier at index 4321 survives");
  });

  it("bounds every drawn series of a long run", () => {
    const m = new AptChartModel();
    for (let s = 1; s <= 3000; s++) m.ingest(ev(s, { total_steps: 3000 }));
    const g = m.gammaSeries();
    assert.equal(g.length, 10);
    for (const s of g) {
      assert.equal(s.length, 500);
      assert.equal(s[0][0], 1);
      assert.equal(s[s.length - 1][0], 3000);
    }
    for (const s of m.lossSeries()) assert.ok(s.raw.length <= 500 && s.smooth.length <= 500);
    const counts = m.scene(200, 240).counts; // narrow canvas: at most 2 points per pixel
    for (const c of counts.gamma) assert.ok(c <= 400);
  });
});

describe("scales, ticks and layout", () => {
  it("maps data to pixels and back", () => {
    const x = linearScale([0, 500], [40, 440]);
    assert.equal(x(0), 40);
    assert.equal(x(500), 440);
    assert.equal(x(250), 240);
    close(x.invert(240), 250);
    const y = linearScale([0, 1], [200, 20]); // y grows downwards
    assert.equal(y(0), 200);
    assert.equal(y(1), 20);
    assert.equal(y(0.5), 110);
    assert.equal(linearScale([3, 3], [0, 100])(3), 50);
    assert.deepEqual(toPixels([[0, 0], [500, 1]], x, y), [[40, 200], [440, 20]]);
  });

  it("spaces decades evenly on a log scale", () => {
    const y = logScale([0.001, 1], [300, 0]);
    close(y(0.001), 300);
    close(y(1), 0);
    close(y(0.01), 200);
    close(y(0.1), 100);
    close(y.invert(100), 0.1, 1e-12);
    close(y(0), 300); // non-positive values sit on the floor
  });

  it("picks nice ticks", () => {
    assert.deepEqual(niceTicks(0, 500, 5), [0, 100, 200, 300, 400, 500]);
    assert.deepEqual(niceTicks(0, 1, 2), [0, 0.5, 1]);
    assert.deepEqual(niceTicks(0, 1800, 4), [0, 500, 1000, 1500]);
    assert.deepEqual(niceTicks(2, 2), [2]);
    assert.deepEqual(logTicks(0.001, 0.3), [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2]);
    assert.deepEqual(logTicks(0.001, 0.3, 4), [0.001, 0.01, 0.1]);
    assert.deepEqual(logTicks(0.01, 1), [0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1]);
    assert.deepEqual(logTicks(0.1, 0.15), niceTicks(0.1, 0.15, 4)); // less than a decade: linear ticks
    assert.deepEqual(logTicks(0.01, 1, 4), [0.01, 0.1, 1]); // 1-2-5 would be too many
    const thin = logTicks(1e-9, 0.1, 5); // nine decades, room for five labels
    assert.ok(thin.length >= 2 && thin.length <= 5, String(thin));
    for (let i = 1; i < thin.length; i++) close(Math.log10(thin[i]) - Math.log10(thin[i - 1]), Math.log10(thin[1] / thin[0]), 1e-9);
  });

  it("computes quantiles", () => {
    assert.equal(quantile([1, 2, 3, 4, 5], 0.5), 3);
    assert.equal(quantile([1, 2, 3, 4, 5], 0), 1);
    assert.equal(quantile([1, 2, 3, 4, 5], 1), 5);
    close(quantile([0, 10], 0.25), 2.5);
    assert.ok(Number.isNaN(quantile([], 0.5)));
  });

  it("chooses loss ranges", () => {
    const [a, b] = lossRange([0.01, 0.1], "log");
    close(Math.log10(a), -2.1, 1e-9);
    close(Math.log10(b), -0.9, 1e-9);
    const [c, d] = lossRange([0.05, 0.05, 0, -1, NaN], "log"); // one positive value: a decade around it
    close(Math.log10(d) - Math.log10(c), 1, 1e-9);
    assert.deepEqual(lossRange([0.2, 0.4], "linear"), [0, 0.42000000000000004]);
    assert.deepEqual(lossRange([], "linear"), [0, 1]);
  });

  it("stacks the gamma panel above the loss panel inside the canvas", () => {
    for (const [w, h] of [[440, 240], [800, 600], [200, 120]]) {
      const L = layoutPanels(w, h);
      const g = L.gamma.plot;
      const l = L.loss.plot;
      assert.ok(g.y + g.h <= L.loss.header.y, "gamma above loss");
      assert.ok(L.loss.header.y + L.loss.header.h <= l.y);
      assert.ok(l.y + l.h <= L.xLabels.y && L.xLabels.y + L.xLabels.h <= h, `fits ${w}x${h}`);
      assert.ok(g.x >= 0 && g.x + g.w <= w && l.x === g.x && l.w === g.w, "shared x axis");
      assert.ok(g.h > 0 && l.h > 0);
    }
  });
});

describe("event ingestion", () => {
  it("dedupes by step", () => {
    const m = new AptChartModel();
    assert.deepEqual(m.ingest(ev(1)), { changed: true, reset: false });
    assert.deepEqual(m.ingest(ev(1)), { changed: false, reset: false });
    assert.deepEqual(m.ingest({ ...ev(1), loss: 99 }), { changed: false, reset: false });
    assert.equal(m.size, 1);
    assert.equal(m.ingest({ step: "x" }).changed, false);
    assert.equal(m.ingest(null).changed, false);
    assert.equal(m.size, 1);
  });

  it("orders events arriving out of order", () => {
    const m = new AptChartModel();
    for (const s of [5, 3, 4, 1, 2]) m.ingest(ev(s * 10));
    assert.deepEqual(m.events().map((e) => e.step), [10, 20, 30, 40, 50]);
    assert.equal(m.lastStep, 50);
    assert.equal(m.latest().step, 50);
    assert.deepEqual(m.gammaSeries()[9].map((p) => p[0]), [10, 20, 30, 40, 50]);
  });

  it("merges history fetched after a reload with live events (either order)", () => {
    const live = new AptChartModel();
    live.ingest(ev(6)); // live events arrive first
    live.ingest(ev(7));
    const snap = { node_id: "7", prompt_id: "p1", status: "training", step: 6, total_steps: 500,
      updated: 100, history: [1, 2, 3, 4, 5, 6].map((s) => { const e = ev(s); delete e.node; delete e.prompt_id; return e; }) };
    const gen = live.generation;
    const r = live.applySnapshot(snap, gen);
    assert.equal(r.reset, false);
    assert.deepEqual(live.events().map((e) => e.step), [1, 2, 3, 4, 5, 6, 7]);
    assert.equal(live.lastStep, 7);
    assert.equal(live.runId, "p1");

    const hist = new AptChartModel(); // history first, then live events overlapping it
    hist.applySnapshot(snap);
    for (const s of [5, 6, 7, 8]) hist.ingest(ev(s));
    assert.deepEqual(hist.events().map((e) => e.step), [1, 2, 3, 4, 5, 6, 7, 8]);
  });

  it("resets on a new run (prompt_id)", () => {
    const m = new AptChartModel();
    for (let s = 1; s <= 20; s++) m.ingest(ev(s));
    m.ingestStatus({ prompt_id: "p1", status: "finished", message: "finished at step 20", updated: 5 });
    const gen = m.generation;
    const r = m.ingest(ev(1, { prompt_id: "p2" }));
    assert.deepEqual(r, { changed: true, reset: true });
    assert.equal(m.generation, gen + 1);
    assert.equal(m.runId, "p2");
    assert.equal(m.size, 1);
    assert.equal(m.status, "training");
    assert.equal(m.message, "");
    // an event without prompt_id is taken as part of the current run
    assert.equal(m.ingest(ev(2, { prompt_id: null })).reset, false);
    assert.equal(m.size, 2);
    // a status of a new run resets too
    assert.equal(m.ingestStatus({ prompt_id: "p3", status: "encoding", updated: 1 }).reset, true);
    assert.equal(m.size, 0);
    assert.equal(m.status, "encoding");
  });

  it("resets on a new run start time when the prompt id is unknown", () => {
    const m = new AptChartModel();
    m.ingestStatus({ prompt_id: null, status: "training", started: 10, updated: 11 });
    m.ingest(ev(1, { prompt_id: null }));
    assert.equal(m.ingestStatus({ prompt_id: null, status: "starting", started: 20, updated: 21 }).reset, true);
    assert.equal(m.size, 0);
  });

  it("drops a stale snapshot of an older run", () => {
    const m = new AptChartModel();
    m.ingest(ev(3));
    const genAtRequest = m.generation; // GET sent while run p1 was shown
    m.ingest(ev(1, { prompt_id: "p2" })); // then run p2 started (reset)
    const old = { prompt_id: "p1", status: "finished", updated: 50, history: [ev(1), ev(2), ev(3)] };
    assert.deepEqual(m.applySnapshot(old, genAtRequest), { changed: false, reset: false, stale: true });
    assert.equal(m.runId, "p2");
    assert.equal(m.size, 1);
    // a snapshot of the new run fetched at the same time is applied
    const fresh = { prompt_id: "p2", status: "training", updated: 60, history: [ev(1, { prompt_id: "p2" }), ev(2)] };
    assert.equal(m.applySnapshot(fresh, genAtRequest).stale, false);
    assert.equal(m.size, 2);
  });

  it("applies summaries in server time order and never lets a late step undo an end or a stop", () => {
    const m = new AptChartModel();
    m.ingest(ev(10));
    m.ingestStatus({ prompt_id: "p1", status: "finished", updated: 200, message: "saved" });
    m.ingestStatus({ prompt_id: "p1", status: "training", updated: 150 }); // older summary
    assert.equal(m.status, "finished");
    m.ingest(ev(11, { status: "training" })); // late progress event
    assert.equal(m.status, "finished");
    assert.equal(m.isActive, false);

    const s = new AptChartModel();
    s.ingest(ev(1));
    assert.equal(s.isActive, true);
    s.markStopping();
    s.ingest(ev(2, { status: "training" })); // sent before the server saw the stop
    assert.equal(s.status, "stopping");
    s.ingest(ev(3, { status: "stopping" }));
    assert.equal(s.status, "stopping");
  });

  it("understands the server's 'no run' answer", () => {
    const m = new AptChartModel();
    m.applySnapshot({ node_id: "7", status: "idle", history: [] });
    assert.equal(m.status, "idle");
    assert.equal(m.isActive, false);
    m.ingest(ev(1));
    m.applySnapshot({ node_id: "7", status: "idle", history: [] }); // server restarted mid-run
    assert.equal(m.status, "lost");
    assert.equal(m.size, 1);
    assert.ok(!ACTIVE_STATUSES.includes("lost"));
  });

  it("flags regularizer terms that are switched off and drops non-positive values on a log scale", () => {
    const m = new AptChartModel();
    for (let s = 1; s <= 5; s++) m.ingest(ev(s, { loss_aa: 0, loss_rs: s === 3 ? 0 : 0.01 }));
    const byKey = Object.fromEntries(m.lossSeries({ scale: "log" }).map((s) => [s.key, s]));
    assert.equal(byKey.loss_aa.off, true);
    assert.deepEqual(byKey.loss_aa.smooth, []);
    assert.equal(byKey.loss_rs.off, false);
    assert.deepEqual(byKey.loss_rs.raw.map((p) => p[0]), [1, 2, 4, 5]);
    const lin = Object.fromEntries(m.lossSeries({ scale: "linear" }).map((s) => [s.key, s]));
    assert.equal(lin.loss_rs.raw.length, 5);
    assert.deepEqual(LOSS_TERMS.map((t) => t.key), ["loss_denoise", "loss_rs", "loss_aa"]);
  });
});

describe("status text and scene", () => {
  it("writes the status line", () => {
    const m = new AptChartModel();
    assert.match(m.statusLine(), /^idle/);
    m.ingestStatus({ prompt_id: "p1", status: "encoding", total_steps: 500, message: "encoding 5 image(s)", updated: 1 });
    assert.equal(m.statusLine(), "encoding images · step 0/500 · encoding 5 image(s)");
    m.ingest(ev(100));
    assert.equal(m.statusLine(), "training · step 100/500 · 2.50 it/s · ETA 2m 40s · aug 34%");
    m.ingestStatus({ prompt_id: "p1", status: "stopped", step: 101, message: "stopped at step 101; saved x", updated: 9 });
    assert.equal(m.statusLine(), "stopped early · step 101/500 · aug 34% · stopped at step 101; saved x");
  });

  it("maps gamma and steps into the plot rectangles", () => {
    const m = new AptChartModel();
    m.ingest(ev(250, { gamma: [0, 1, 0.5, 0, 0, 0, 0, 0, 0, 0] }));
    m.ingest(ev(500, { gamma: [0, 1, 0.5, 0, 0, 0, 0, 0, 0, 0] }));
    const { shapes, layout, counts } = m.scene(600, 300);
    const G = layout.gamma.plot;
    const line = (id) => shapes.find((s) => s.type === "line" && s.id === id);
    const g1 = line("gamma:1");
    assert.equal(g1.color, binColor(1, 10));
    close(g1.points[0][0], G.x + G.w / 2, 1e-9, "step 250 of 500 is mid-width");
    close(g1.points[1][0], G.x + G.w, 1e-9, "the last step is at the right edge");
    close(g1.points[0][1], G.y, 1e-9, "gamma 1 at the top");
    close(line("gamma:0").points[0][1], G.y + G.h, 1e-9, "gamma 0 at the bottom");
    close(line("gamma:2").points[0][1], G.y + G.h / 2, 1e-9);
    assert.deepEqual(counts.gamma, Array(10).fill(2));
    const L = layout.loss.plot;
    for (const s of shapes.filter((x) => x.type === "line" && x.id?.startsWith("loss_"))) {
      for (const [px, py] of s.points) {
        assert.ok(px >= L.x - 1e-6 && px <= L.x + L.w + 1e-6 && py >= L.y - 1e-6 && py <= L.y + L.h + 1e-6, s.id);
      }
    }
    const texts = shapes.filter((s) => s.type === "text").map((s) => s.text);
    assert.ok(texts.includes("low noise →") && texts.includes("high noise"));
    assert.ok(texts.some((t) => t.startsWith("loss (log")));
  });

  it("keeps one outlier step from squashing the loss curves (clipped instead)", () => {
    const m = new AptChartModel({ lossScale: "linear", smoothing: 0.9 });
    for (let s = 1; s <= 300; s++) m.ingest(ev(s, { loss_denoise: s === 150 ? 50 : 0.1, loss_rs: 0.01, loss_aa: 0.01 }));
    const { shapes, lossY, layout } = m.scene(600, 300);
    assert.ok(lossY.domain[1] < 10, `range top ${lossY.domain[1]} ignores the spike's raw value`);
    const L = layout.loss.plot;
    for (const s of shapes.filter((x) => x.type === "line" && x.id?.startsWith("loss_"))) assert.deepEqual(s.clip, L);
  });

  it("shows an empty state and a linear loss axis on request", () => {
    const m = new AptChartModel({ lossScale: "linear" });
    const { shapes } = m.scene(400, 250);
    assert.ok(shapes.some((s) => s.type === "text" && s.text === "no training run yet"));
    m.ingest(ev(1));
    const texts = m.scene(400, 250).shapes.filter((s) => s.type === "text").map((s) => s.text);
    assert.ok(texts.some((t) => t.startsWith("loss (linear")));
    assert.ok(!texts.includes("no training run yet"));
  });
});

describe("previews", () => {
  const pv = (step, i, extra = {}) => ({ step, prompt: `p${i}`, seed: i, file: `previews/step_${step}_${i}.png`,
    lora_file: null, view: { filename: `step_${step}_${i}.png`, subfolder: "apt_lora_trainer/x/previews", type: "output" },
    ...extra });

  it("collects previews once each, by step, and shows the latest unless a step is selected", () => {
    const m = new AptChartModel();
    assert.equal(m.shownPreviewStep(), null);
    assert.ok(m.addPreviews([pv(0, 0), pv(0, 1)]));
    assert.ok(!m.addPreviews([pv(0, 0)]), "a known file is not added again");
    m.addPreviews([pv(100, 0), pv(100, 1), pv(200, 0), pv(200, 1)]);
    assert.deepEqual(m.previewSteps(), [0, 100, 200]);
    assert.equal(m.shownPreviewStep(), 200);
    assert.deepEqual(m.previewsAt(100).map((p) => p.prompt), ["p0", "p1"]);
    assert.equal(m.selectPreviewNear(140), 100);
    assert.equal(m.shownPreviewStep(), 100);
    m.addPreviews([pv(300, 0)]);
    assert.equal(m.shownPreviewStep(), 100, "a selected step stays while new previews arrive");
    assert.equal(m.stepPreview(-1), 0);
    assert.equal(m.stepPreview(-1), 0, "stays at the first");
    assert.equal(m.stepPreview(1), 100);
    assert.equal(m.stepPreview(1), 200);
    assert.equal(m.stepPreview(1), 300);
    m.addPreviews([pv(400, 0)]);
    assert.equal(m.shownPreviewStep(), 400, "at the last step the strip follows new previews");
    m.reset("p2");
    assert.deepEqual(m.previewSteps(), [], "a new run starts without previews");
  });

  it("maps a click on the chart to its step on the shared x axis, and marks preview steps", () => {
    const m = new AptChartModel();
    m.ingest(ev(1));
    const W = 460, H = 300;
    const G = layoutPanels(W, H).gamma.plot;
    assert.equal(m.stepAtPixel(W, H, G.x), 0);
    assert.equal(m.stepAtPixel(W, H, G.x + G.w), 500);
    assert.equal(m.stepAtPixel(W, H, G.x + G.w / 2), 250);
    assert.equal(m.stepAtPixel(W, H, G.x - 5), null);
    m.addPreviews([pv(0, 0), pv(250, 0)]);
    const marks = m.scene(W, H).shapes.filter((s) => String(s.id ?? "").startsWith("preview:"));
    assert.deepEqual(marks.map((s) => s.id), ["preview:0", "preview:250"]);
    close(marks[1].points[0][0], G.x + G.w / 2, 1e-6, "the marker sits at its step");
    assert.ok(marks[1].width > marks[0].width, "the shown (latest) step is drawn brighter and wider");
  });

  it("takes the previews of a snapshot (a reloaded page)", () => {
    const m = new AptChartModel();
    m.applySnapshot({ node_id: "7", prompt_id: "p1", status: "finished", step: 4, total_steps: 4,
      history: [ev(4, { total_steps: 4 })], previews: [pv(0, 0), pv(4, 0)] });
    assert.deepEqual(m.previewSteps(), [0, 4]);
  });
});
