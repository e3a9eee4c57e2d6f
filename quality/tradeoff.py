"""Compare two methods at matched identity: the overfitting trade-off along their training curves.

A method that only learns more slowly looks better than the baseline at equal *steps*; the paper's
claim is about equal *identity*. Each method's curve runs through its evaluation steps (mean over
training seeds), starting at the prior (step 0). For every evaluation step of `other`, the
baseline's curve is read, by linear interpolation, at the same identity (x); the difference in each
metric (y) is `other - base` there. Seeds are resampled (bootstrap, each method independently) for
an interval of that difference.

    python -m quality.tradeoff quality/report_border_seeds8 --base baseline --other ata

writes tradeoff.md and tradeoff.png (--name) into the report folder (results.json is read only).
--base-from DIR takes the base method's runs from another report of the same task and prior (e.g.
a baseline evaluated at other steps or with more seeds); the output names both folders.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

import numpy as np

from . import plot
from .task import LABELS
from .textio import read_results, save_text

METRICS = ("context", "style", "layout", "pos_spread", "id_shape", "drift_px", "drift_attr", "eps_dev")
HIGHER_IS_BETTER = {"context": True, "style": True, "layout": True, "pos_spread": True, "id_shape": True,
                    "drift_px": False, "drift_attr": False, "eps_dev": False}


def mean_curve(runs: Sequence[dict], key: str, prior: float) -> np.ndarray:
    """(S + 1,) mean over runs of `key` at step 0 (the prior's value) and each evaluation step."""
    vals = np.array([[e[key] for e in r["evals"]] for r in runs], float)  # (runs, S)
    return np.concatenate([[prior], vals.mean(0)])


def read_at(xs: np.ndarray, ys: np.ndarray, x: float) -> float:
    """y of the polyline through (xs[i], ys[i]) in step order, at its first point with abscissa x.

    Returns NaN when the curve never reaches x (the other method got further than this one).
    """
    for i in range(len(xs) - 1):
        a, b = xs[i], xs[i + 1]
        if min(a, b) <= x <= max(a, b):
            if a == b:
                return float(ys[i + 1] if x == b else ys[i])
            return float(ys[i] + (x - a) / (b - a) * (ys[i + 1] - ys[i]))
    return float("nan")


def matched(res: dict, base: str, other: str, x_key: str = "ref_identity",
            metrics: Sequence[str] = METRICS) -> list[dict]:
    """Per evaluation step of `other`: its x and metrics, the base's metrics read at that x."""
    prior = res["prior"]
    rb, ro = res["runs"][base], res["runs"][other]
    steps = [0] + [e["step"] for e in ro[0]["evals"]]
    x0 = prior.get(x_key, 0.0)
    xb, xo = mean_curve(rb, x_key, x0), mean_curve(ro, x_key, x0)
    curves = {k: (mean_curve(ro, k, prior.get(k, 0.0)), mean_curve(rb, k, prior.get(k, 0.0))) for k in metrics}
    rows = []
    for i in range(1, len(steps)):
        row = {"step": steps[i], x_key: float(xo[i])}
        for k, (yo, yb) in curves.items():
            at = read_at(xb, yb, xo[i])
            row[k] = (float(yo[i]), at, float(yo[i] - at))
        rows.append(row)
    return rows


def bootstrap(res: dict, base: str, other: str, x_key: str = "ref_identity",
              metrics: Sequence[str] = METRICS, n: int = 2000, seed: int = 0,
              level: float = 0.9) -> list[dict[str, tuple[float, float, float]]]:
    """Per evaluation step of `other`: {metric: (lo, hi, share of resamples that are defined)} of
    the matched difference when each method's seeds are resampled with replacement."""
    rng = np.random.default_rng(seed)
    rb, ro = res["runs"][base], res["runs"][other]
    draws: list[dict[str, list[float]]] = [{k: [] for k in metrics} for _ in ro[0]["evals"]]
    for _ in range(n):
        sample = dict(res, runs={base: [rb[j] for j in rng.integers(0, len(rb), len(rb))],
                                 other: [ro[j] for j in rng.integers(0, len(ro), len(ro))]})
        for i, row in enumerate(matched(sample, base, other, x_key, metrics)):
            for k in metrics:
                draws[i][k].append(row[k][2])
    out = []
    for d in draws:
        cell = {}
        for k, v in d.items():
            v = np.array(v)
            ok = v[~np.isnan(v)]
            lo, hi = (np.quantile(ok, [(1 - level) / 2, (1 + level) / 2]) if len(ok) else (np.nan, np.nan))
            cell[k] = (float(lo), float(hi), len(ok) / len(v))
        out.append(cell)
    return out


def markdown(res: dict, base: str, other: str, x_key: str = "ref_identity", n_boot: int = 2000,
             figure_file: str = "tradeoff.png") -> str:
    rows = matched(res, base, other, x_key)
    ci = bootstrap(res, base, other, x_key, n=n_boot)
    nb, no = len(res["runs"][base]), len(res["runs"][other])
    lb, lo = LABELS.get(base, base), LABELS.get(other, other)
    lines = [f"# {lo} vs {lb} at matched {x_key}", "",
             f"For each evaluation step of {lo} (mean over {no} seeds), {lb}'s mean curve ({nb} seeds, "
             f"from the prior at step 0 through its evaluation steps) is read by linear interpolation "
             f"at the same {x_key}. Cells: {lo} / {lb} at that {x_key} / difference [90 % bootstrap "
             "interval over seeds]. A difference that favours "
             f"{lo} is marked **+**, one against it **−**, when the interval excludes 0 and {lb}'s "
             f"resampled curve reaches that {x_key} in more than 95 % of the resamples; '—' where "
             f"{lb}'s curve does not reach that {x_key}.", ""]
    lines += [f"| {lo} step | {x_key} | " + " | ".join(METRICS) + " |", "|" + "---|" * (len(METRICS) + 2)]
    for row, c in zip(rows, ci):
        cells = []
        for k in METRICS:
            yo, yb, diff = row[k]
            lo_, hi_, share = c[k]
            if np.isnan(diff):
                cells.append(f"{yo:.3f} / —")
                continue
            mark = ""
            if share > 0.95 and (lo_ > 0 or hi_ < 0):
                mark = " **+**" if (lo_ > 0) == HIGHER_IS_BETTER[k] else " **−**"
            cells.append(f"{yo:.3f} / {yb:.3f} / {diff:+.3f} [{lo_:+.3f}, {hi_:+.3f}]{mark}")
        lines.append(f"| {row['step']} | {row[x_key]:.3f} | " + " | ".join(cells) + " |")
    lines += ["", f"![trade-off]({figure_file})", ""]
    return "\n".join(lines)


def figure(res: dict, methods: Sequence[str], x_key: str = "ref_identity",
           metrics: Sequence[str] = ("context", "style", "id_shape", "eps_dev")) -> "plot.Image.Image":
    """One chart per metric: y against x along each method's mean curve (prior at the start)."""
    charts = []
    for k in metrics:
        series = {m: (list(mean_curve(res["runs"][m], x_key, res["prior"].get(x_key, 0.0))),
                      list(mean_curve(res["runs"][m], k, res["prior"].get(k, 0.0))), None) for m in methods}
        charts.append(plot.line_chart(series, f"{k} vs {x_key}", xlabel=x_key))
    row = plot.stack(charts, vertical=False)
    return plot.stack([plot.legend(list(methods), LABELS, row.width), row])


def with_base_from(res: dict, other: dict, base: str) -> dict:
    """res with `base`'s runs taken from `other`, which must be the same task (prior, concept,
    prompts, reference caption) so that the curves are comparable."""
    for key in ("reference_caption", "prompts", "drift_prompts"):
        if res[key] != other[key]:
            raise SystemExit(f"--base-from: the two reports differ in {key}; compare only the same task.")
    for key in ("prior", "concept"):
        if res["config"][key] != other["config"][key]:
            raise SystemExit(f"--base-from: the two reports differ in config '{key}'.")
    return dict(res, runs={**res["runs"], base: other["runs"][base]})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("report", type=Path, help="a quality.run output folder (results.json)")
    p.add_argument("--base", default="baseline")
    p.add_argument("--other", default="ata")
    p.add_argument("--x", default="ref_identity", help="the metric to match (default ref_identity)")
    p.add_argument("--bootstrap", type=int, default=2000, help="resamples for the intervals")
    p.add_argument("--base-from", type=Path, help="another report folder to take the base method's runs from")
    p.add_argument("--name", default="tradeoff", help="output file names: NAME.md, NAME.png")
    args = p.parse_args(argv)
    res = read_results(args.report)
    source = f"`{args.report}`"
    if args.base_from:
        res = with_base_from(res, read_results(args.base_from), args.base)
        source = f"{args.other} from `{args.report}`, {args.base} from `{args.base_from}`"
    text = markdown(res, args.base, args.other, args.x, args.bootstrap, f"{args.name}.png")
    text = text.replace("\n\n", f"\n\nRuns: {source}.\n\n", 1)
    save_text(args.report / f"{args.name}.md", text)
    figure(res, [args.base, args.other], args.x).save(args.report / f"{args.name}.png")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
