"""Does the overfitting indicator say when to stop? A test on the concept suite's APT runs.

For every (concept, rate, seed) APT run, the *best step* is the evaluation step with the best
trade-off, score = likeness (ref_identity_loose) + mean(context, layout) (equal weights; ties: the
earliest). A *gamma rule* stops where a reading of gamma first reaches a level: the mean gamma of the
low-noise bins (where memorisation shows first), or the loss weight left (1 - the mean gamma of all
bins: the mean of APT's loss weights 1 - gamma_b with no floor) falling to a level. Its prediction is
the evaluation step nearest that crossing (the last one if it never gets there). It is compared with
the fixed rules "always stop at step s", by how often it stops at the best step (*hits*) and by the
score it gives away against the best step (*regret*). The indicator earns a "recommended step" only
if a gamma rule beats the best fixed rule on both, pooled, and hits more often in more than half the
concepts; the levels and the fixed step are picked on the same runs, so even then it is optimistic.
"""

from __future__ import annotations

import numpy as np

LOW_BINS = (0, 1, 2)  # bins 0-2 of 10: the lowest noise levels
LEVELS = (0.3, 0.5, 0.7, 0.9)  # low-noise gamma reaching
WEIGHT_LEVELS = (0.9, 0.8, 0.7, 0.6)  # loss weight left falling to
EVERY = 10  # the suite keeps gamma every EVERY steps


def score(e: dict) -> float:
    return round(float(e["ref_identity_loose"] + (e["context"] + e["layout"]) / 2), 9)  # equal scores tie


def best_step(evals: list[dict]) -> int:
    """The evaluation step with the highest score (the earliest of equals)."""
    scores = [score(e) for e in evals]
    return int(evals[int(np.argmax(scores))]["step"])


def regret(evals: list[dict], step: int) -> float:
    """The score given away by stopping at `step` (an evaluation step) instead of the best step (>= 0)."""
    at = {int(e["step"]): score(e) for e in evals}
    return round(max(at.values()) - at[step], 9)


def low_gamma(row: list[float], bins=LOW_BINS) -> float:
    """A trace row [step, gamma_0 .. gamma_B-1] -> the mean gamma of `bins`."""
    return float(np.mean([row[1 + b] for b in bins]))


def weight_left(row: list[float]) -> float:
    """A trace row -> 1 - the mean gamma of all bins."""
    return 1.0 - float(np.mean(row[1:]))


def _first(trace: list[list[float]], reached) -> int | None:
    """The step of the first trace row for which `reached(row)` is true (None if none is)."""
    return next((int(row[0]) for row in trace if reached(row)), None)


def crossing(trace: list[list[float]], level: float, bins=LOW_BINS) -> int | None:
    """First step whose low-bin mean gamma reaches `level`; trace rows are [step, gamma_0 .. gamma_B-1]."""
    return _first(trace, lambda row: low_gamma(row, bins) >= level)


def weight_crossing(trace: list[list[float]], level: float) -> int | None:
    """First step whose loss weight left (`weight_left`) falls to `level` or below."""
    return _first(trace, lambda row: weight_left(row) <= level)


def nearest(steps: list[int], at: int | None) -> int:
    """The evaluation step nearest a crossing at step `at` (the earlier of two as near; the last if None)."""
    if at is None:
        return steps[-1]
    return min(steps, key=lambda s: (abs(s - at), s))


def predicted(trace: list[list[float]], steps: list[int], level: float) -> int:
    return nearest(steps, crossing(trace, level))


def rules(steps: list[int]) -> dict[str, callable]:
    out = {f"always step {s}": (lambda run, s=s: s) for s in steps}
    out.update({f"low-noise gamma >= {lv:g}": (lambda run, lv=lv: predicted(run["gamma_trace"], steps, lv))
                for lv in LEVELS})
    out.update({f"loss weight left <= {lv:g}": (lambda run, lv=lv: nearest(steps, weight_crossing(run["gamma_trace"], lv)))
                for lv in WEIGHT_LEVELS})
    return out


def _apt_runs(entries: list[dict]):
    for e in entries:
        for run in e["results"]["runs"].get("apt", []):
            if run.get("gamma_trace") and run["evals"]:
                yield e, run


def table(entries: list[dict]) -> tuple[list[str], dict[str, dict[str, list[tuple[bool, float]]]]]:
    """(concepts, {rule: {concept: [(hit, regret) per (rate, seed) APT run]}})."""
    concepts = list(dict.fromkeys(e["concept"] for e in entries))
    out: dict[str, dict[str, list[tuple[bool, float]]]] = {}
    for e, run in _apt_runs(entries):
        steps = [int(x["step"]) for x in run["evals"]]
        best = best_step(run["evals"])
        for name, rule in rules(steps).items():
            at = rule(run)
            out.setdefault(name, {}).setdefault(e["concept"], []).append((at == best, regret(run["evals"], at)))
    return concepts, out


def plateau(entries: list[dict]) -> tuple[float, float]:
    """Whether gamma tells steps or concepts apart: (the median over APT runs of |change| of the low-noise
    gamma from the first evaluation step to the last; the range across concepts of their mean low-noise
    gamma at the last evaluation step)."""
    moves, last = [], {}
    for e, run in _apt_runs(entries):
        by_step = {int(r[0]): low_gamma(r) for r in run["gamma_trace"]}
        first, end = int(run["evals"][0]["step"]), int(run["evals"][-1]["step"])
        if first in by_step and end in by_step:
            moves.append(abs(by_step[end] - by_step[first]))
            last.setdefault(e["concept"], []).append(by_step[end])
    if not moves:
        return float("nan"), float("nan")
    means = [float(np.mean(v)) for v in last.values()]
    return float(np.median(moves)), max(means) - min(means)


def report(entries: list[dict]) -> list[str]:
    concepts, rows = table(entries)
    if not rows:
        return []
    hit = {name: float(np.mean([h for per in by.values() for h, _ in per])) for name, by in rows.items()}
    lost = {name: float(np.mean([r for per in by.values() for _, r in per])) for name, by in rows.items()}
    lines = ["## Does the indicator say when to stop?", "",
             "Best step of each APT run: the evaluation step with the highest likeness + mean(context, layout). "
             "Each rule's share of runs (all rates and seeds) where it stops at that step (hits), per concept and "
             "pooled, and the score it gives away against the best step (regret, pooled mean):",
             "", "| rule | regret | hits pooled | " + " | ".join(concepts) + " |", "|---|---|---|" + "---|" * len(concepts)]
    for name, by in rows.items():
        cells = [f"{np.mean([h for h, _ in by[c]]):.2f}" if by.get(c) else "—" for c in concepts]
        lines.append(f"| {name} | {lost[name]:.3f} | {hit[name]:.2f} | " + " | ".join(cells) + " |")
    fixed = [k for k in rows if k.startswith("always")]
    best_gamma = max((k for k in rows if k not in fixed), key=lambda k: (hit[k], -lost[k]))
    best_fixed = max(fixed, key=lambda k: (hit[k], -lost[k]))
    least_fixed = min(lost[k] for k in fixed)
    per = {c: (np.mean([h for h, _ in rows[best_gamma][c]]), np.mean([h for h, _ in rows[best_fixed][c]]))
           for c in concepts if rows[best_gamma].get(c) and rows[best_fixed].get(c)}
    ahead = sum(g > f for g, f in per.values())
    behind = sum(g < f for g, f in per.values())
    offered = hit[best_gamma] > hit[best_fixed] and lost[best_gamma] < least_fixed and ahead > len(concepts) / 2
    move, spread = plateau(entries)
    lines += ["", f"Best gamma rule: *{best_gamma}*, hits {hit[best_gamma]:.2f} and regret {lost[best_gamma]:.3f} "
              f"against {hit[best_fixed]:.2f} for the best fixed rule (*{best_fixed}*) and a regret of "
              f"{least_fixed:.3f} for the fixed rule that gives away least; per concept ahead of it in {ahead}, "
              f"behind in {behind}, level in {len(per) - ahead - behind} of {len(concepts)}. "
              + ("It lands nearer the best step than any fixed step: a candidate for a recommended-step mark."
                 if offered else "The indicator does not say when to stop better than a fixed step here: "
                 "nothing is offered on its strength."), "",
              f"Why: from the first evaluation step to the last, a run's low-noise gamma moves by {move:.2f} (median "
              f"over the runs), while the concepts' low-noise gamma at the last step spans {spread:.2f}. "
              "Gamma tells the concepts apart more than the steps of one run.", ""]
    return lines
