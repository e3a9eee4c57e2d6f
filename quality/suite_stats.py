"""The suite's statistics: APT minus DreamBooth-LoRA per concept and pooled over concept x seed.

Pairs are (concept, seed): both methods trained on the same references, seed and draws. A
difference is APT's value minus DreamBooth-LoRA's, at the last evaluation step ("at equal steps")
or at matched likeness (`matched_difference`: at the lower of the two runs' final
ref_identity_loose; the run that got further is read along its curve, from the prior at step 0
through its evaluation steps, by linear interpolation where it first gets there; undefined where
either learned no likeness beyond the prior's). Pooled intervals are a two-level percentile
bootstrap (concepts resampled with replacement, then seeds within each): with six designed
concepts they are rough, and many metrics are read at once, so a verdict is a screen, not a
proof. A result *holds* when the pooled 95 % interval excludes 0 in APT's favour and APT is ahead
in more than half of all concepts (a concept without a defined pair counts against that);
*against* in the mirror case.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np

from . import stop_rule
from .tradeoff import mean_curve, read_at

BASE, APT = "baseline", "apt"
X_KEY = "ref_identity_loose"  # the likeness: the concept drawn for the references' own caption
METRICS = ("ref_identity_loose", "identity_loose", "context", "style", "layout", "drift_px", "drift_attr", "eps_dev")
HIGHER_IS_BETTER = {"ref_identity_loose": True, "identity_loose": True, "context": True, "style": True,
                    "layout": True, "drift_px": False, "drift_attr": False, "eps_dev": False}
MEANING = {
    "ref_identity_loose": "likeness: the concept drawn for the references' own caption",
    "identity_loose": "the concept drawn for prompts that put it in a new context",
    "context": "the prompt's background and style drawn",
    "style": "the prompt's style drawn (flat, outlined, striped)",
    "layout": "the prompt's position and size drawn",
    "drift_px": "pixel change on prompts without the concept (lower = better)",
    "drift_attr": "attributes changed on prompts without the concept (lower = better)",
    "eps_dev": "noise-prediction change on world images without the concept (lower = better)",
}
LEVEL = 0.95
TIE = 5e-4  # a concept whose mean difference is smaller counts as level (metrics are fractions ~0.05-1)


def compared(data: dict) -> tuple[str, str, str, str]:
    """(base method, other method, base label, other label) of a suite's results: DreamBooth-LoRA
    and APT unless the suite was compared with another report's runs (quality.suite --base-from)."""
    c = data.get("compare") or {}
    return (c.get("base", BASE), c.get("other", APT), c.get("base_label", "DreamBooth-LoRA"),
            c.get("other_label", "APT"))


def pair_differences(entry: dict, metric: str, matched: bool = False, base_method: str = BASE,
                     other: str = APT) -> dict[int, float]:
    """{seed: other - base} (APT - DreamBooth-LoRA) of `metric` for one (concept, rate) entry's results."""
    res = entry["results"]
    base = {r["seed"]: r for r in res["runs"][base_method]}
    out = {}
    for run in res["runs"][other]:
        b = base.get(run["seed"])
        if b is None or not run["evals"] or not b["evals"]:
            continue
        if matched:
            out[run["seed"]] = matched_difference(run, b, metric, res["prior"])
        else:
            out[run["seed"]] = float(run["evals"][-1][metric]) - float(b["evals"][-1][metric])
    return out


def matched_difference(run: dict, base: dict, metric: str, prior: dict) -> float:
    """run − base of `metric` at the lower of their two final likenesses: the run that got further is
    read along its own curve (the prior at step 0, then its evaluation steps) where it first reaches
    the other's final likeness, the other at its last step; equal likeness, both at their last step.
    Symmetric, so runs that differ by chance alone differ by nothing on average. NaN when either
    learned no likeness beyond the prior's."""
    x0 = float(prior.get(X_KEY, 0.0))
    end_r, end_b = run["evals"][-1], base["evals"][-1]
    lo = min(float(end_r[X_KEY]), float(end_b[X_KEY]))
    if lo <= x0:
        return float("nan")

    def along(r: dict) -> float:
        return read_at(mean_curve([r], X_KEY, x0), mean_curve([r], metric, prior.get(metric, 0.0)), lo)

    at_r = float(end_r[metric]) if float(end_r[X_KEY]) == lo else along(run)
    at_b = float(end_b[metric]) if float(end_b[X_KEY]) == lo else along(base)
    return at_r - at_b


def pooled(diffs: dict[str, dict[int, float]], n_boot: int = 4000, seed: int = 0,
           level: float = LEVEL) -> tuple[float, float, float, int]:
    """(mean, lo, hi, n) of the pairs' differences ({concept: {seed: d}}, NaN dropped), with the
    two-level bootstrap interval (concepts, then seeds within each concept)."""
    groups = [np.array([d for d in per.values() if not math.isnan(d)]) for per in diffs.values()]
    groups = [g for g in groups if len(g)]
    if not groups:
        return float("nan"), float("nan"), float("nan"), 0
    allv = np.concatenate(groups)
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    for i in range(n_boot):
        picked = [groups[j] for j in rng.integers(0, len(groups), len(groups))]
        means[i] = np.concatenate([g[rng.integers(0, len(g), len(g))] for g in picked]).mean()
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(allv.mean()), float(lo), float(hi), int(len(allv))


def concept_votes(diffs: dict[str, dict[int, float]], higher_is_better: bool) -> tuple[int, int, int, int]:
    """(concepts where APT is ahead, behind, level, without a defined pair) by the mean of their
    seeds' differences."""
    ahead = behind = level = missing = 0
    for per in diffs.values():
        v = [d for d in per.values() if not math.isnan(d)]
        if not v:
            missing += 1
            continue
        m = float(np.mean(v))
        if abs(m) < TIE:
            level += 1
        elif (m > 0) == higher_is_better:
            ahead += 1
        else:
            behind += 1
    return ahead, behind, level, missing


def verdict(mean_lo_hi: Sequence[float], votes: tuple[int, int, int, int], higher_is_better: bool) -> str:
    """'holds' / 'against' / 'unclear': the pooled interval and most of all concepts must agree."""
    _, lo, hi, *_ = mean_lo_hi
    ahead, behind, level, missing = votes
    n = ahead + behind + level + missing
    if math.isnan(lo) or n == 0:
        return "unclear"
    favours = lo > 0 if higher_is_better else hi < 0
    opposes = hi < 0 if higher_is_better else lo > 0
    if favours and ahead > n / 2:
        return "holds"
    if opposes and behind > n / 2:
        return "against"
    return "unclear"


def rates(data: dict) -> list[float]:
    return sorted({e["rate"] for e in data["entries"]})


def table(data: dict, rate: float, matched: bool) -> list[dict]:
    """One row per metric: pooled mean and interval, concept votes, verdict, per-concept means."""
    entries = [e for e in data["entries"] if e["rate"] == rate]
    base, other, *_ = compared(data)
    rows = []
    for k in METRICS:
        if matched and k == X_KEY:
            continue
        diffs = {e["concept"]: pair_differences(e, k, matched, base, other) for e in entries}
        stat = pooled(diffs)
        votes = concept_votes(diffs, HIGHER_IS_BETTER[k])
        per = {c: (float(np.nanmean(list(v.values()))) if v and not all(math.isnan(x) for x in v.values())
                   else float("nan")) for c, v in diffs.items()}
        rows.append({"metric": k, "pooled": stat, "votes": votes, "verdict": verdict(stat, votes, HIGHER_IS_BETTER[k]),
                     "per_concept": per})
    return rows


def method_means(entry: dict, method: str, metric: str) -> float:
    vals = [r["evals"][-1][metric] for r in entry["results"]["runs"][method] if r["evals"]]
    return float(np.mean(vals)) if vals else float("nan")


def describe(entry: dict) -> str:
    con = entry["results"]["config"]["concept"]
    parts = []
    for k in ("style", "background", "position", "size_name"):
        v = con[k]
        parts.append("/".join(v) + " (varies)" if isinstance(v, list) else v)
    return f"{con['colour']} {con['shape']}; " + ", ".join(parts)


def report(data: dict) -> str:
    entries = data["entries"]
    concepts = list(dict.fromkeys(e["concept"] for e in entries))
    base, other, label_b, label_o = compared(data)
    seeds = sorted({r["seed"] for e in entries for r in e["results"]["runs"][other]})
    first = entries[0]["results"]["config"]
    steps = first["apt_config"]["train"]["steps"]
    lines = ["# APT across concepts: the multi-concept suite", ""]
    if data.get("quick") or data.get("untrained_prior"):
        lines += ["**Smoke run (quick settings or an untrained prior): the numbers below say nothing about "
                  "quality.**", ""]
    lines += [
        f"{label_b} vs {label_o} on {len(concepts)} concepts x {len(seeds)} seeds, "
        f"{steps} steps, at learning rates {', '.join(f'{r:g}' for r in rates(data))}; prior "
        f"`{first['prior']}`. Command: `{data['command']}` ({_times(data)}).", "",
        f"Differences are {label_o} minus {label_b} over (concept, seed) pairs; intervals are "
        f"{LEVEL:.0%} two-level bootstrap intervals (concepts, then seeds); 'ahead / behind' counts concepts by "
        "the mean of their seeds (and lists concepts without a defined pair). A result **holds** when the interval "
        f"excludes 0 in {label_o}'s favour and it is ahead in more than half of all concepts, **against** in the mirror "
        "case, otherwise *unclear*. With six designed concepts and many metrics read at once, a verdict is a "
        "screen, not a proof.", "",
        "| concept | references |", "|---|---|"]
    seen = set()
    for e in entries:
        if e["concept"] not in seen:
            seen.add(e["concept"])
            lines.append(f"| {e['concept']} | {describe(e)}; caption `{e['results']['reference_caption']}` |")
    lines.append("")
    for rate in rates(data):
        for matched in (False, True):
            title = "at matched likeness (each pair read at the lower of its two final ref_identity_loose)" if matched \
                else f"at step {steps}"
            lines += [f"## lr {rate:g}, {title}", "",
                      f"| metric | pooled {label_o} − {label_b} [interval] (pairs) | concepts ahead / behind / level / none | "
                      "verdict | "
                      + " | ".join(concepts) + " |",
                      "|---|---|---|---|" + "---|" * len(concepts)]
            for row in table(data, rate, matched):
                m, lo, hi, n = row["pooled"]
                cells = [f"{row['per_concept'].get(c, float('nan')):+.3f}" for c in concepts]
                mark = {"holds": "**holds**", "against": "**against**", "unclear": "unclear"}[row["verdict"]]
                lines.append(f"| {row['metric']} | {m:+.3f} [{lo:+.3f}, {hi:+.3f}] ({n}) | "
                             f"{'/'.join(map(str, row['votes']))} | {mark} | " + " | ".join(cells) + " |")
            lines.append("")
        lines += [f"Means at step {steps}, lr {rate:g} ({label_b} → {label_o}):", "",
                  "| concept | " + " | ".join(METRICS) + " |", "|---|" + "---|" * len(METRICS)]
        for e in (e for e in entries if e["rate"] == rate):
            cells = [f"{method_means(e, base, k):.3f} → {method_means(e, other, k):.3f}" for k in METRICS]
            lines.append(f"| {e['concept']} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += long_run_check(data) if (base, other) == (BASE, APT) else []
    lines += stop_rule.report(entries)
    lines += ["Metrics:", ""] + [f"- `{k}`: {v}" for k, v in MEANING.items()] + ["", "![suite](figure.png)", ""]
    return "\n".join(lines)


def _times(data: dict) -> str:
    """The suite's cost in words: its processes' own times (what a rerun that reuses them does not
    show) and this invocation's wall time."""
    proc = sum(e["results"].get("seconds_total", e["results"].get("seconds", 0.0)) for e in data["entries"])
    n = sum(len(next(iter(e["results"]["runs"].values()))) for e in data["entries"])
    text = (f"{n} single-thread processes of {proc / 60:.0f} min in all, about {proc / 60 / data['jobs']:.0f} min "
            f"with {data['jobs']} at a time; this invocation: {data['seconds'] / 60:.0f} min wall")
    return text + (f"; {data['seconds_note']}" if data.get("seconds_note") else "")


def long_run_check(data: dict) -> list[str]:
    """Whether the suite's shorter runs rank the methods as the benchmark's 1000-step reports of the
    same concept do: the direction of APT − DB-LoRA per metric at the last step of each."""
    from .textio import read_results

    lines = []
    for concept, by_rate in (data.get("long_runs") or {}).items():
        for rate_s, folder in by_rate.items():
            entry = next((e for e in data["entries"] if e["concept"] == concept and e["rate"] == float(rate_s)), None)
            if entry is None:
                continue
            path = Path(folder) if Path(folder).is_absolute() else Path(__file__).resolve().parents[1] / folder
            try:
                long = {"results": read_results(path)}
            except FileNotFoundError:
                lines += [f"(`{folder}`, the 1000-step report to check the ranking against, is missing.)", ""]
                continue
            n_long = len(long["results"]["runs"][APT])
            steps = long["results"]["config"]["apt_config"]["train"]["steps"]
            short = entry["results"]["config"]["apt_config"]["train"]["steps"]
            lines += [f"### Shorter runs against `{folder}` ({concept}, lr {float(rate_s):g})", "",
                      f"APT − DB-LoRA at the last step: {steps} steps x {n_long} seeds there, {short} steps x "
                      f"{len(entry['results']['runs'][APT])} seeds here (pre-encoded augmentation variants here, "
                      "encoded every step there).", "",
                      f"| metric | {steps} steps [interval over seeds] | {short} steps | same direction |",
                      "|---|---|---|---|"]
            agree = total = 0
            for k in METRICS:
                lm, llo, lhi, _ = pooled({concept: pair_differences(long, k)})
                sm = pooled({concept: pair_differences(entry, k)})[0]
                same = "—" if abs(lm) < TIE or abs(sm) < TIE else ("yes" if (lm > 0) == (sm > 0) else "**no**")
                if same != "—":
                    total += 1
                    agree += same == "yes"
                lines.append(f"| {k} | {lm:+.3f} [{llo:+.3f}, {lhi:+.3f}] | {sm:+.3f} | {same} |")
            lines += ["", f"Same direction in {agree} of {total} metrics (— : a difference under {TIE:g}).", ""]
    return lines


def figure(data: dict):
    """Per rate and metric: each concept's mean difference (dots) and the pooled interval (bar)."""
    from PIL import Image, ImageDraw

    from .plot import _FONT, stack

    panels = []
    concepts = list(dict.fromkeys(e["concept"] for e in data["entries"]))
    *_, label_b, label_o = compared(data)
    for rate in rates(data):
        rows = table(data, rate, matched=False)
        w, row_h, left = 620, 22, 150
        img = Image.new("RGB", (w, 30 + row_h * len(rows)), "white")
        d = ImageDraw.Draw(img)
        d.text((4, 4), f"lr {rate:g}, last step: {label_o} - {label_b}; concepts (dots), pooled 95% interval (bar); "
               "right = better", fill="black", font=_FONT)
        span = max([abs(v) for r in rows for v in (*r["pooled"][1:3], *r["per_concept"].values())
                    if not math.isnan(v)] + [1e-3])
        cx, half = left + (w - left - 10) // 2, (w - left - 20) // 2
        d.line([(cx, 24), (cx, img.height)], fill=(180, 180, 180))
        for i, r in enumerate(rows):
            y = 30 + i * row_h + row_h // 2
            sign = 1 if HIGHER_IS_BETTER[r["metric"]] else -1
            d.text((4, y - 6), r["metric"], fill="black", font=_FONT)
            _, lo, hi, _ = r["pooled"]
            if not math.isnan(lo):
                a, b = sorted((cx + sign * lo / span * half, cx + sign * hi / span * half))
                d.rectangle([a, y - 4, b, y + 4], fill=(170, 200, 235))
            for j, c in enumerate(concepts):
                v = r["per_concept"].get(c, float("nan"))
                if not math.isnan(v):
                    x = cx + sign * v / span * half
                    d.ellipse([x - 2, y - 2 + (j % 3 - 1) * 3, x + 2, y + 2 + (j % 3 - 1) * 3], fill=(31, 119, 180))
        panels.append(img)
    return stack(panels)
