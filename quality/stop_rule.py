"""Does the overfitting indicator say when to stop? A test on the concept suite's APT runs.

For every (concept, rate, seed) APT run, the *best step* is the evaluation step with the best
trade-off, score = likeness (ref_identity_loose) + mean(context, layout) (equal weights; ties: the
earliest). A *gamma rule* stops where the mean gamma of the low-noise bins (where memorisation
shows first) first reaches a level; its prediction is the evaluation step nearest that crossing
(the last one if gamma never gets there). It is compared with the fixed rules "always stop at step
s". The indicator earns a "recommended step" only if a gamma rule hits the best step more often
than the best fixed rule, pooled and in more than half the concepts; the level and the fixed step
are picked on the same runs, so even then it is optimistic.
"""

from __future__ import annotations

import numpy as np

LOW_BINS = (0, 1, 2)  # bins 0-2 of 10: the lowest noise levels
LEVELS = (0.3, 0.5, 0.7, 0.9)
EVERY = 10  # the suite keeps gamma every EVERY steps


def score(e: dict) -> float:
    return round(float(e["ref_identity_loose"] + (e["context"] + e["layout"]) / 2), 9)  # equal scores tie


def best_step(evals: list[dict]) -> int:
    """The evaluation step with the highest score (the earliest of equals)."""
    scores = [score(e) for e in evals]
    return int(evals[int(np.argmax(scores))]["step"])


def crossing(trace: list[list[float]], level: float, bins=LOW_BINS) -> int | None:
    """First step whose low-bin mean gamma reaches `level`; trace rows are [step, gamma_0 .. gamma_B-1]."""
    for row in trace:
        if float(np.mean([row[1 + b] for b in bins])) >= level:
            return int(row[0])
    return None


def predicted(trace: list[list[float]], steps: list[int], level: float) -> int:
    at = crossing(trace, level)
    if at is None:
        return steps[-1]
    return min(steps, key=lambda s: (abs(s - at), s))


def rules(steps: list[int]) -> dict[str, callable]:
    out = {f"always step {s}": (lambda run, s=s: s) for s in steps}
    out.update({f"low-noise gamma >= {lv:g}": (lambda run, lv=lv: predicted(run["gamma_trace"], steps, lv))
                for lv in LEVELS})
    return out


def table(entries: list[dict]) -> tuple[list[str], dict[str, dict[str, list[bool]]]]:
    """(concepts, {rule: {concept: [hit per (rate, seed) APT run]}})."""
    concepts = list(dict.fromkeys(e["concept"] for e in entries))
    hits: dict[str, dict[str, list[bool]]] = {}
    for e in entries:
        for run in e["results"]["runs"].get("apt", []):
            if not run.get("gamma_trace") or not run["evals"]:
                continue
            steps = [int(x["step"]) for x in run["evals"]]
            best = best_step(run["evals"])
            for name, rule in rules(steps).items():
                hits.setdefault(name, {}).setdefault(e["concept"], []).append(rule(run) == best)
    return concepts, hits


def report(entries: list[dict]) -> list[str]:
    concepts, hits = table(entries)
    if not hits:
        return []
    rate = {name: float(np.mean([h for per in by.values() for h in per])) for name, by in hits.items()}
    fixed = max(v for k, v in rate.items() if k.startswith("always"))
    lines = ["## Does the indicator say when to stop?", "",
             "Best step of each APT run: the evaluation step with the highest likeness + mean(context, layout). "
             "Each rule's share of runs (all rates and seeds) where it stops at that step, per concept and pooled:",
             "", "| rule | pooled | " + " | ".join(concepts) + " |", "|---|---|" + "---|" * len(concepts)]
    for name, by in hits.items():
        cells = [f"{np.mean(by[c]):.2f}" if by.get(c) else "—" for c in concepts]
        lines.append(f"| {name} | {rate[name]:.2f} | " + " | ".join(cells) + " |")
    gamma_rules = [k for k in hits if not k.startswith("always")]
    best_gamma = max(gamma_rules, key=lambda k: rate[k])
    best_fixed = max((k for k in hits if k.startswith("always")), key=lambda k: rate[k])
    per = {c: (np.mean(hits[best_gamma][c]), np.mean(hits[best_fixed][c])) for c in concepts
           if hits[best_gamma].get(c) and hits[best_fixed].get(c)}
    ahead = sum(g > f for g, f in per.values())
    behind = sum(g < f for g, f in per.values())
    offered = rate[best_gamma] > fixed and ahead > len(concepts) / 2
    lines += ["", f"Best gamma rule: *{best_gamma}*, {rate[best_gamma]:.2f} against {fixed:.2f} for the best fixed "
              f"rule (*{best_fixed}*); per concept ahead of it in {ahead}, behind in {behind}, level in "
              f"{len(per) - ahead - behind} of {len(concepts)}. "
              + ("It lands nearer the best step than any fixed step: a candidate for a recommended-step mark."
                 if offered else "The indicator does not say when to stop better than a fixed step here: "
                 "nothing is offered on its strength."), ""]
    return lines
