"""Run the personalization benchmark and write a markdown report, results.json and a figure.

    python -m quality.run --config quality/configs/default.json --out quality/report
    python -m quality.run --config quality/configs/default.json --out /tmp/smoke --quick --untrained-prior

--quick: 1 seed, baseline and APT only, a few steps (a smoke test of the pipeline, not a result).
--untrained-prior: a randomly initialised prior of the same architecture (no assets needed).
--merge DIR [DIR ...]: combine finished runs of the same config that differ only in their seeds
and methods (e.g. one process per method and seed on a multi-core machine) into one report in --out.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np

from . import plot
from .bench import DETAIL, KEYS, fill_description, run_benchmark, summary
from .task import LABELS, METHODS, load_config
from .metrics import mean_std
from .textio import read_results, save_text

DESCRIPTIONS = {
    "identity": "concept generated with the references' shape and colour (higher = better)",
    "identity_loose": "same, any shape the prior never saw (cross or diamond: a small cross decodes to a diamond-like blob) in the concept's colour",
    "context": "requested background and style generated (higher = better)",
    "layout": "requested position and size generated (higher = better)",
    "pos_spread": "RMS distance of object centres from the references' centre, fraction of the side (higher = more layout freedom)",
    "scale_spread": "RMS log2 size ratio to the references' size (higher = more scale freedom)",
    "drift_px": "mean |pixel difference| to the prior on prompts without the concept, same seeds (lower = better)",
    "drift_attr": "fraction of detected attributes that changed vs the prior on those prompts (lower = better)",
    "eps_gap": "L_pre - L_ft on the references at fixed (t, noise) draws: memorisation (lower = less)",
    "eps_dev": "mean ||eps_ft - eps_pre||^2 on world images without the concept (lower = closer to the prior)",
    "ref_identity": "identity on {n_ref} images for the references' own caption (did the LoRA learn the concept at all)",
    "ref_identity_loose": "identity_loose on those {n_ref} images",
    "id_shape / id_colour": "identity split: concept shape / concept colour generated, on the concept prompts",
}


def _attr(value) -> str:
    """A reference attribute for the report: one value, or the references' values in turn."""
    return " / ".join(value) + " (one per reference)" if isinstance(value, list) else value


def _cell(mean: float, std: float, show_std: bool = True) -> str:
    if isinstance(mean, float) and math.isnan(mean):
        return "—"
    return f"{mean:.3f} ± {std:.3f}" if show_std else f"{mean:.3f}"


def markdown(out: dict, quick: bool) -> str:
    res = out["results"]
    cfg = res["config"]
    summ = summary(res)
    methods = ["prior"] + list(res["runs"])
    steps = cfg["apt_config"]["train"]["steps"]
    lines = ["# APT personalization benchmark", ""]
    if quick:
        lines += ["**Quick smoke run: the numbers below say nothing about quality.**", ""]
    con = cfg["concept"]
    lines += [
        f"Concept: a **{con['colour']} {con['shape']}** ({_attr(con['style'])} style), never seen by the prior, bound "
        f"to `sks`; {con['n_images']} references, {_attr(con['size_name'])}, {_attr(con['position'])}, on a "
        f"{_attr(con['background'])} background, caption `{res['reference_caption']}`.",
        f"Prior: `{cfg['prior']}` ({res.get('image_size', 64)} px world). Training: {steps} steps, "
        f"seeds {cfg['seeds']}, settings "
        f"`{json.dumps(cfg['apt_config'])}`, augmentation fill: {fill_description(cfg)}.",
        f"Evaluation at step {cfg['eval']['steps'][-1]}: {len(res['prompts'])} concept images "
        f"({len(set(res['prompts']))} prompts x {cfg['eval']['samples_per_prompt']} seeds) and "
        f"{len(res['drift_prompts'])} images without the concept; DDIM {cfg['eval']['sampling_steps']} "
        f"steps, CFG {cfg['eval']['guidance']}. Mean ± sample std over training seeds "
        f"(the prior row is one deterministic evaluation). Runtime {res['seconds']:.0f} s"
        + (f" (the longest of {len(res['merged_from'])} processes merged with --merge; their sum "
           f"{res['seconds_total']:.0f} s)." if res.get("seconds_total") else
           f" (the longest of {len(res['merged_from'])} processes merged with --merge)." if res.get("merged_from")
           else "."),
        ""]
    header = "| method | " + " | ".join(KEYS) + " | mean final gamma |"
    lines += [header, "|" + "---|" * (len(KEYS) + 2)]
    for m in methods:
        row = summ[m]
        cells = [_cell(*row[k], show_std=m != "prior") if k in row else "—" for k in KEYS]
        g = _cell(*row["final_gamma_mean"]) if "final_gamma_mean" in row else "—"
        lines.append(f"| {LABELS.get(m, m)} | " + " | ".join(cells) + f" | {g} |")
    ceil = res.get("identity_ceiling")
    if ceil:
        lines += ["", f"Ceiling (a perfect generator: the concept rendered exactly as each concept prompt asks, "
                  f"through the VAE and the detectors): identity {ceil['identity']:.3f}, identity_loose "
                  f"{ceil['identity_loose']:.3f}."]
    lines += ["", "Identity split into shape and colour, object present, and context / layout by attribute "
              "(fraction of concept images that show what the prompt asked for):", "",
              "| method | " + " | ".join(DETAIL) + " |", "|" + "---|" * (len(DETAIL) + 1)]
    for m in methods:
        row = summ[m] if m != "prior" else {k: (res["prior"].get(k, float("nan")), 0.0) for k in DETAIL}
        lines.append(f"| {LABELS.get(m, m)} | " + " | ".join(
            _cell(*row.get(k, (float("nan"), 0.0)), show_std=m != "prior") for k in DETAIL) + " |")
    lines += per_step_table(res)
    n_ref = cfg["eval"].get("ref_samples", 4)  # reports from before the setting used 4
    lines += ["", "Metrics:", ""] + [f"- `{k}`: {v.format(n_ref=n_ref)}" for k, v in DESCRIPTIONS.items()]
    lines += ["", "Concept prompts:", ""] + [f"- `{p}`" for p in dict.fromkeys(res["prompts"])]
    lines += ["", "Prompts without the concept (prior drift):", ""] + [f"- `{p}`" for p in res["drift_prompts"]]
    lines += ["", "![figure](figure.png)", ""]
    return "\n".join(lines)


STEP_KEYS = ("ref_identity", "id_shape", "identity", "context", "style", "layout", "pos_spread",
             "drift_px", "drift_attr", "eps_dev", "eps_gap")


def per_step_table(res: dict) -> list[str]:
    """Markdown lines: every metric of STEP_KEYS at every evaluation step (mean ± std over seeds),
    for reports with more than one evaluation step (the curves behind the figure)."""
    if len(res["config"]["eval"]["steps"]) < 2:
        return []
    lines = ["", "Every evaluation step (mean ± std over training seeds):", "",
             "| method | step | " + " | ".join(STEP_KEYS) + " |", "|" + "---|" * (len(STEP_KEYS) + 2)]
    for m, runs in res["runs"].items():
        for i, step in enumerate(e["step"] for e in runs[0]["evals"]):
            evals = [r["evals"][i] for r in runs if len(r["evals"]) > i]
            cells = [_cell(*mean_std([e[k] for e in evals if k in e])) for k in STEP_KEYS]
            lines.append(f"| {LABELS.get(m, m)} | {step} | " + " | ".join(cells) + " |")
    return lines


def figure(out: dict) -> "plot.Image.Image":
    res, ims = out["results"], out["images"]
    cfg = res["config"]
    k = cfg["eval"]["samples_per_prompt"]
    n = cfg["eval"]["grid_prompts"]
    idx = [i * k for i in range(min(n, len(res["prompts"]) // max(k, 1)))]
    header = [res["prompts"][i].replace("a sks shape, ", "") for i in idx]
    rows = [("references", list(ims["references"]) + [np.full_like(ims["references"][0], 255)] * (len(idx) - len(ims["references"])))]
    rows[0] = (rows[0][0], rows[0][1][:max(len(idx), len(ims["references"]))])
    rows.append((LABELS["prior"], [ims["prior"][i] for i in idx]))
    for m in res["runs"]:
        if m in ims:
            rows.append((LABELS.get(m, m) + f" s{cfg['seeds'][0]}", [ims[m][i] for i in idx]))
    parts = [plot.grid(rows, header=header)]
    drift_rows = [(LABELS["prior"], list(ims["prior_drift"][:n]))]
    for m in res["runs"]:
        if m + "_drift" in ims:
            drift_rows.append((LABELS.get(m, m), list(ims[m + "_drift"][:n])))
    parts.append(plot.grid(drift_rows, header=[p for p in res["drift_prompts"][:n]]))
    methods = list(res["runs"])
    charts = []
    for key in ("identity", "identity_loose", "context", "layout", "pos_spread", "drift_px", "eps_gap"):
        series = {}
        for m in methods:
            runs = res["runs"][m]
            steps = [e["step"] for e in runs[0]["evals"]]
            vals = np.array([[e.get(key, np.nan) for e in r["evals"]] for r in runs], float)
            std = vals.std(0, ddof=1) if len(runs) > 1 else np.zeros(vals.shape[1])
            series[m] = ([0] + steps, [res["prior"].get(key, 0.0)] + list(vals.mean(0)), [0.0] + list(std))
        charts.append(plot.line_chart(series, key, xlabel="steps"))
    gam = {}
    for m in methods:
        g = np.array([r["final_gamma"] for r in res["runs"][m]], float)
        gam[m] = (list(range(g.shape[1])), list(g.mean(0)), list(g.std(0, ddof=1)) if len(g) > 1 else None)
    charts.append(plot.line_chart(gam, "final gamma per timestep bin", xlabel="bin"))
    lows = {}
    for m in methods:
        h = np.array([[ev["gamma"][0] for ev in r["history"]] for r in res["runs"][m]], float)
        lows[m] = (list(range(1, h.shape[1] + 1)), list(h.mean(0)), None)
    charts.append(plot.line_chart(lows, "gamma of bin 0 (t<100) over training", xlabel="steps"))
    chart_rows = [plot.stack(charts[i:i + 4], vertical=False) for i in range(0, len(charts), 4)]
    parts.append(plot.legend(["prior"] + methods, LABELS, chart_rows[0].width))
    parts += chart_rows
    return plot.stack(parts)


def _compact_history(results: dict) -> dict:
    """results with each run's per-step history rounded to 6 significant digits (a third of the
    file; every metric in the report comes from the evaluations, which are kept exact)."""
    def rnd(v):
        return float(f"{v:.6g}") if isinstance(v, float) else [rnd(x) for x in v] if isinstance(v, list) else v
    out = dict(results)
    out["runs"] = {m: [{**r, "history": [{k: rnd(v) for k, v in h.items()} for h in r["history"]]} for r in runs]
                   for m, runs in results["runs"].items()}
    return out


def write_results(path: Path, results: dict) -> None:
    """results.json: settings and evaluations indented, one line per training step."""
    res = _compact_history(results)
    steps: dict[str, str] = {}
    for m, runs in res["runs"].items():
        for i, r in enumerate(runs):
            marker = f"@history:{m}:{i}@"
            steps[json.dumps(marker)] = "[\n" + ",\n".join(
                json.dumps(h, separators=(",", ":"), default=float) for h in r["history"]) + "]"
            r["history"] = marker
    text = json.dumps(res, indent=1, default=float)
    for quoted, block in steps.items():
        text = text.replace(quoted, block, 1)
    save_text(path, text + "\n")


def merge(dirs: list[Path]) -> dict:
    """One {"results", "images"} from runs of the same config that differ only in their seeds and
    methods (e.g. one process per method and seed). Runs are ordered by seed; each method's
    images come from its lowest seed, as in a single-process run."""
    parts = [read_results(d) for d in dirs]
    strip = lambda cfg: {k: v for k, v in cfg.items() if k not in ("seeds", "methods")}  # noqa: E731
    for d, p in zip(dirs[1:], parts[1:]):
        if strip(p["config"]) != strip(parts[0]["config"]):
            raise SystemExit(f"{d}: its config differs from {dirs[0]}'s in more than the seeds and methods")
    found = {m for p in parts for m in p["runs"]}
    methods = [m for m in METHODS if m in found]
    res = json.loads(json.dumps(parts[0]))
    res["config"]["methods"] = methods
    res["config"]["seeds"] = sorted({s for p in parts for s in p["config"]["seeds"]})
    res["runs"] = {m: sorted((r for p in parts for r in p["runs"].get(m, [])), key=lambda r: r["seed"])
                   for m in methods}
    for m, runs in res["runs"].items():
        seeds = [r["seed"] for r in runs]
        if len(set(seeds)) != len(seeds):
            raise SystemExit(f"method {m} has seed(s) {sorted(s for s in set(seeds) if seeds.count(s) > 1)} twice")
    res["seconds"] = max(p["seconds"] for p in parts)
    res["seconds_total"] = sum(p.get("seconds_total", p["seconds"]) for p in parts)
    res["merged_from"] = [str(d) for d in dirs]
    res["smoke"] = any(p.get("smoke") for p in parts)
    ims: dict[str, np.ndarray] = {}
    by_first_seed = sorted(zip(dirs, parts), key=lambda dp: min(dp[1]["config"]["seeds"]))
    for d, p in by_first_seed:
        if not (d / "images.npz").exists():  # a results-only copy: its runs count, no images
            continue
        with np.load(d / "images.npz") as z:
            for k in z.files:
                ims.setdefault(k, z[k])
    return {"results": res, "images": ims}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="quality/configs/default.json")
    ap.add_argument("--out", default="quality/report")
    ap.add_argument("--quick", action="store_true", help="smoke test: 1 seed, 2 methods, a few steps")
    ap.add_argument("--untrained-prior", action="store_true", help="random prior (no assets needed)")
    ap.add_argument("--prior", default=None, help="override the config's prior folder")
    ap.add_argument("--device", default=None)
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="override the config's training seeds")
    ap.add_argument("--methods", nargs="+", default=None, help="override the config's methods")
    ap.add_argument("--replot", action="store_true",
                    help="only rewrite report.md and figure.png from --out's results.json and images.npz")
    ap.add_argument("--merge", nargs="+", default=None, metavar="DIR",
                    help="merge the finished reports in DIR... (same config, other seeds / methods) into --out")
    args = ap.parse_args(argv)
    if args.merge:
        out = merge([Path(d) for d in args.merge])
        dest = Path(args.out)
        dest.mkdir(parents=True, exist_ok=True)
        write_results(dest / "results.json", out["results"])
        np.savez_compressed(dest / "images.npz", **out["images"])
        save_text(dest / "report.md", markdown(out, bool(out["results"]["smoke"])))
        figure(out).save(dest / "figure.png")
        print(f"merged {len(args.merge)} reports into {dest}")
        return 0
    if args.replot:
        dest = Path(args.out)
        res = read_results(dest)
        with np.load(dest / "images.npz") as z:
            ims = {k: z[k] for k in z.files}
        out = {"results": res, "images": ims}
        save_text(dest / "report.md", markdown(out, bool(res.get("smoke"))))
        figure(out).save(dest / "figure.png")
        return 0
    over = {}
    if args.prior:
        over["prior"] = args.prior
    if args.device:
        over["device"] = args.device
    if args.seeds:
        over["seeds"] = args.seeds
    if args.methods:
        over["methods"] = args.methods
    cfg = load_config(args.config, over, quick=args.quick)
    started = time.time()
    dest = Path(args.out)
    dest.mkdir(parents=True, exist_ok=True)
    smoke = args.quick or args.untrained_prior

    def write(out: dict, partial: bool = False) -> None:
        out["results"]["smoke"] = smoke
        write_results(dest / "results.json", out["results"])
        np.savez_compressed(dest / "images.npz", **out["images"])
        text = markdown(out, smoke)
        if partial:
            text = text.replace("# APT personalization benchmark", "# APT personalization benchmark "
                                "(PARTIAL: still running, not every seed/method is in yet)", 1)
        save_text(dest / "report.md", text)
        figure(out).save(dest / "figure.png")

    out = run_benchmark(cfg, untrained=args.untrained_prior, on_run=lambda o: write(o, partial=True))
    write(out)
    print(f"wrote {dest / 'report.md'}, {dest / 'results.json'}, {dest / 'figure.png'} "
          f"in {time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
