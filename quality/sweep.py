"""One setting against others across report folders: a sweep's table, per seed and over checkpoints.

A single run's identity at its last checkpoint is a noisy readout: with a constant learning rate
the LoRA keeps moving, and one seed's ref_identity can go 0.31 -> 1.0 -> 0.5 over its last three
evaluations. Averaging each run over its evaluation steps (250, 500, 750, 1000 in the benchmark)
reads the whole curve, and comparing seeds pairwise (the same seed draws the same LoRA init,
timesteps and noise under every setting) removes the seed-to-seed spread.

    python -m quality.sweep --metric ref_identity \\
        --row "lambda_AA 0=quality/report_world128c_rs001:ata_rs" \\
        --row "lambda_AA 1=quality/report_world128c_apt_rs001:apt" --out /tmp/sweep.md

Each --row is LABEL=REPORT_DIR:METHOD (several dirs joined with '+' pool their seeds). The first
row is the reference for the paired differences. Prints one markdown table per --metric (comma-
separated); --out writes them too. With --overview it prints instead two compact tables, a row per
setting and a column per metric: the value at the last step, and the mean over evaluation steps.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .textio import print_and_save, read_results


@dataclass
class Setting:
    label: str
    source: str
    evals: dict[int, list[dict]]  # seed -> the run's evaluations, one per step
    steps: list[int]
    prior: dict | None = None  # the prior's (no LoRA) metrics, from the first report

    def curves(self, metric: str) -> dict[int, list[float]]:
        """seed -> `metric` at each evaluation step."""
        return {seed: [float(e[metric]) for e in evals] for seed, evals in self.evals.items()}


def parse_row(spec: str) -> tuple[str, list[Path], str]:
    """'LABEL=DIR[+DIR...]:METHOD' -> (label, dirs, method)."""
    label, _, rest = spec.partition("=")
    dirs, _, method = rest.rpartition(":")
    if not label or not dirs or not method:
        raise SystemExit(f"--row {spec!r}: expected LABEL=REPORT_DIR:METHOD")
    return label, [Path(d) for d in dirs.split("+")], method


def load_setting(label: str, dirs: list[Path], method: str) -> Setting:
    evals, steps, prior = {}, None, None
    for d in dirs:
        results = read_results(d)
        prior = prior or results.get("prior")
        runs = results["runs"].get(method)
        if not runs:
            raise SystemExit(f"{d}: no runs of method {method!r}")
        for run in runs:
            run_steps = [e["step"] for e in run["evals"]]
            if steps is not None and run_steps != steps:
                raise SystemExit(f"{d}: evaluation steps {run_steps} differ from {steps}")
            steps = run_steps
            evals[int(run["seed"])] = run["evals"]
    return Setting(label, "+".join(str(d) for d in dirs) + f":{method}", dict(sorted(evals.items())), steps,
                   prior)


def summarise(curves: dict[int, list[float]], ref: dict[int, list[float]] | None) -> dict:
    """Final and over-checkpoint means (± sample std over seeds) of seed -> curve, each seed's swing
    |last - second-to-last| (how much the final readout depends on where the run stopped) and, against `ref`,
    the mean paired difference of the over-checkpoint value on the seeds both have, with how many
    seeds are lower."""
    final = np.array([c[-1] for c in curves.values()])
    over = {seed: float(np.mean(c)) for seed, c in curves.items()}
    swing = np.array([abs(c[-1] - c[-2]) if len(c) > 1 else 0.0 for c in curves.values()])
    out = {"seeds": list(curves), "final": final, "over": np.array(list(over.values())), "per_seed": over,
           "swing": swing}
    if ref is not None:
        common = [seed for seed in curves if seed in ref]
        diffs = np.array([over[seed] - float(np.mean(ref[seed])) for seed in common])
        out["paired"] = (common, diffs)
    return out


def _ms(x: np.ndarray) -> str:
    return f"{x.mean():.3f} ± {x.std(ddof=1):.3f}" if len(x) > 1 else f"{x.mean():.3f}"


def table(settings: list[Setting], metric: str) -> str:
    ref = settings[0]
    steps = ref.steps
    lines = [f"`{metric}`: at step {steps[-1]} and averaged over the evaluation steps {steps} "
             f"(mean ± sample std over seeds); swing: the mean over seeds of |step {steps[-1]} - step "
             f"{steps[-2] if len(steps) > 1 else steps[-1]}|; paired: the over-steps difference to **{ref.label}** "
             "on the seeds both have, and how many of them are lower.", "",
             "| setting | seeds | at step %d | swing | over steps | per seed (over steps) | paired vs first |" % steps[-1],
             "|---|---|---|---|---|---|---|"]
    ref_curves = ref.curves(metric)
    for i, s in enumerate(settings):
        r = summarise(s.curves(metric), ref_curves if i else None)
        per_seed = " / ".join(f"{v:.2f}" for v in r["per_seed"].values())
        paired = "—"
        if "paired" in r and len(r["paired"][0]):
            common, d = r["paired"]
            paired = f"{d.mean():+.3f} ({int((d < 0).sum())} of {len(common)} lower)"
        lines.append(f"| {s.label} | {','.join(map(str, r['seeds']))} | {_ms(r['final'])} | {r['swing'].mean():.3f} "
                     f"| {_ms(r['over'])} "
                     f"| {per_seed} | {paired} |")
    lines += ["", "Sources: " + "; ".join(f"{s.label}: `{s.source}`" for s in settings)]
    return "\n".join(lines) + "\n"


def overview(settings: list[Setting], metrics: list[str], reading: str) -> str:
    """A row per setting, a column per metric: mean ± sample std over seeds of the value at the last
    evaluation step (reading "final") or of each run's mean over its evaluation steps ("over"); first
    the prior's own value (no LoRA) when the first setting's report has it."""
    steps = settings[0].steps
    what = f"at step {steps[-1]}" if reading == "final" else f"averaged over the evaluation steps {steps}"
    lines = [f"{what} (mean ± sample std over seeds):", "",
             "| setting | seeds | " + " | ".join(f"`{m}`" for m in metrics) + " |",
             "|---|---|" + "---|" * len(metrics)]
    if settings[0].prior:
        lines.append("| prior (no LoRA) | — | " + " | ".join(f"{settings[0].prior[m]:.3f}" for m in metrics) + " |")
    for s in settings:
        cells = [_ms(summarise(s.curves(m), None)[reading]) for m in metrics]
        lines.append(f"| {s.label} | {','.join(map(str, s.evals))} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--metric", default="ref_identity", help="one metric, or several joined by commas")
    ap.add_argument("--row", action="append", required=True, metavar="LABEL=DIR:METHOD")
    ap.add_argument("--out", help="also write the table to this markdown file")
    ap.add_argument("--overview", action="store_true",
                    help="two compact tables (last step, over steps), a column per metric")
    args = ap.parse_args(argv)
    settings = [load_setting(*parse_row(spec)) for spec in args.row]
    if any(s.steps != settings[0].steps for s in settings):
        raise SystemExit("every setting must be evaluated at the same steps")
    metrics = args.metric.split(",")
    if args.overview:
        text = "\n".join(overview(settings, metrics, r) for r in ("final", "over"))
        text += "\nSources: " + "; ".join(f"{s.label}: `{s.source}`" for s in settings) + "\n"
    else:
        text = "\n".join(table(settings, metric) for metric in metrics)
    print_and_save(text, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
