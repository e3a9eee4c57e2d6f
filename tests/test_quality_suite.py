"""The multi-concept suite: references that vary, its statistics against hand-computed values, and a
smoke run of `python -m quality.suite --quick` (untrained prior, a few steps)."""

from __future__ import annotations

import math

import pytest

from quality import suite, suite_defaults, suite_stats as st
from quality.task import load_config, reference_attrs, reference_captions, reference_scenes, varies
from quality.textio import read_results


def _cfg(**concept):
    cfg = load_config(None)
    cfg["concept"].update(concept)
    return cfg


def test_a_listed_attribute_varies_across_the_references_and_their_captions():
    cfg = _cfg(background=["white", "mint", "sky", "sand"], position="top left", n_images=4)
    assert varies(cfg) == ["background"]
    assert reference_attrs(cfg, 1)["background"] == "mint" and reference_attrs(cfg, 1)["position"] == "top left"
    assert reference_captions(cfg) == [f"a sks shape on a {bg} background" for bg in ("white", "mint", "sky", "sand")]
    assert [s.background for s in reference_scenes(cfg)] == ["white", "mint", "sky", "sand"]
    assert {s.position for s in reference_scenes(cfg)} == {"top left"}
    layouts = _cfg(position=["top left", "centre", "bottom right"], size_name=["small", "large", "small"], n_images=3)
    assert [(s.position, s.size_name) for s in reference_scenes(layouts)] == \
        [("top left", "small"), ("centre", "large"), ("bottom right", "small")]
    assert len(set(reference_captions(layouts))) == 1  # the caption does not name the layout
    with pytest.raises(ValueError, match="lists 2 values for 4 references"):
        reference_attrs(_cfg(background=["white", "mint"], n_images=4), 0)


def _run(seed, *points):
    """A run whose evaluations are (ref_identity_loose, context) at successive steps."""
    return {"seed": seed, "evals": [{"step": 100 * (i + 1), "ref_identity_loose": x, "context": y}
                                    for i, (x, y) in enumerate(points)], "final_gamma": []}


def _entry(base_runs, apt_runs, prior_context=0.8):
    return {"concept": "c", "rate": 1e-3,
            "results": {"prior": {"ref_identity_loose": 0.0, "context": prior_context},
                        "runs": {"baseline": base_runs, "apt": apt_runs}}}


def test_pair_differences_at_equal_steps_and_at_matched_likeness():
    entry = _entry([_run(0, (0.2, 0.7), (0.6, 0.5)), _run(1, (0.1, 0.6), (0.3, 0.4))],
                   [_run(0, (0.1, 0.7), (0.4, 0.5)), _run(1, (0.2, 0.9), (0.5, 0.6))])
    # equal steps: APT's last minus DreamBooth-LoRA's last, per seed
    assert st.pair_differences(entry, "context") == pytest.approx({0: 0.0, 1: 0.2})
    # matched: seed 0's DB curve (0, 0.8) -> (0.2, 0.7) -> (0.6, 0.5) read at APT's x 0.4 is 0.6
    got = st.pair_differences(entry, "context", matched=True)
    assert got[0] == pytest.approx(0.5 - 0.6)
    # seed 1's DB got less far (0.3) than APT (0.5): APT's curve (0, 0.8) -> (0.2, 0.9) -> (0.5, 0.6) is read
    # at 0.3, a third of the way from 0.9 to 0.6: 0.8
    assert got[1] == pytest.approx(0.8 - 0.4)
    # the curve starts at the prior's own likeness, and APT at or below it matches nothing
    entry["results"]["prior"]["ref_identity_loose"] = 0.1
    entry["results"]["runs"]["apt"][0]["evals"][-1]["ref_identity_loose"] = 0.15
    got = st.pair_differences(entry, "context", matched=True)
    assert got[0] == pytest.approx(0.5 - 0.75)  # halfway from (0.1, 0.8) to (0.2, 0.7); from x = 0 it would be 0.725
    entry["results"]["runs"]["apt"][0]["evals"][-1]["ref_identity_loose"] = 0.1
    assert math.isnan(st.pair_differences(entry, "context", matched=True)[0])


def test_matched_likeness_is_symmetric_so_chance_differences_cancel():
    """Two runs of one method, paired both ways round: at matched likeness their differences must cancel.
    Reading only the base's curve at the other's likeness dropped the pair where the base got less far
    and kept its mirror image, a bias toward whatever the base's curve does early (less drift, more context)."""
    further, behind = _run(0, (0.2, 0.7), (0.6, 0.5)), _run(0, (0.1, 0.7), (0.4, 0.5))
    entry = _entry([further, dict(behind, seed=1)], [behind, dict(further, seed=1)])
    got = st.pair_differences(entry, "context", matched=True)
    assert got[0] == pytest.approx(0.5 - 0.6)  # the base read at 0.4 on its curve
    assert got[1] == pytest.approx(0.6 - 0.5)  # the other read at 0.4 on its curve
    assert st.pooled({"c": got})[0] == pytest.approx(0.0)
    # equal final likeness: both at their last step, not the base's first pass through that likeness
    tie = _entry([_run(0, (0.4, 0.9), (0.2, 0.8), (0.4, 0.3))], [_run(0, (0.1, 0.6), (0.2, 0.6), (0.4, 0.5))])
    assert st.pair_differences(tie, "context", matched=True)[0] == pytest.approx(0.5 - 0.3)


def test_pooled_difference_and_its_two_level_interval():
    mean, lo, hi, n = st.pooled({"a": {0: 1.0, 1: 3.0}, "b": {0: 2.0, 1: float("nan")}})
    assert (mean, n) == (2.0, 3)
    assert 1.0 <= lo < 2.0 < hi <= 3.0
    assert st.pooled({"a": {0: 1.0, 1: 1.0}, "b": {0: 1.0}})[:3] == (1.0, 1.0, 1.0)
    # one concept far off moves the interval more than its single pair would under a flat bootstrap
    spread = st.pooled({"a": {0: 0.0, 1: 0.0, 2: 0.0}, "b": {0: 0.0, 1: 0.0, 2: 0.0}, "c": {0: 3.0, 1: 3.0, 2: 3.0}})
    assert spread[0] == pytest.approx(1.0) and spread[2] >= 2.0 and spread[1] == 0.0  # flat: hi about 1.8


def test_concept_votes_and_the_verdict_follow_the_metric_direction():
    diffs = {"a": {0: 0.1, 1: 0.3}, "b": {0: -0.2}, "c": {0: 0.0}, "d": {0: 0.05}}
    diffs["e"] = {0: float("nan")}
    assert st.concept_votes(diffs, higher_is_better=True) == (2, 1, 1, 1)
    assert st.concept_votes(diffs, higher_is_better=False) == (1, 2, 1, 1)
    assert st.verdict((0.1, 0.05, 0.2, 6), (4, 2, 0, 0), True) == "holds"
    assert st.verdict((0.1, 0.05, 0.2, 6), (3, 3, 0, 0), True) == "unclear"  # not ahead in most concepts
    assert st.verdict((0.1, 0.05, 0.2, 2), (2, 0, 0, 4), True) == "unclear"  # two concepts with data of six
    assert st.verdict((0.1, -0.01, 0.2, 6), (6, 0, 0, 0), True) == "unclear"  # the interval holds 0
    assert st.verdict((0.1, 0.05, 0.2, 6), (1, 5, 0, 0), False) == "against"  # drift up: against APT
    assert st.verdict((-0.1, -0.2, -0.05, 6), (5, 1, 0, 0), False) == "holds"  # drift down


def test_a_variant_of_the_defaults_is_named_by_its_changes_and_judged_on_every_verdict():
    base = {"train": {"steps": 600, "learning_rate": 1e-3}, "augment": {"p_max": 1.0, "fill": "border"}}
    other = {"train": {"steps": 600, "learning_rate": 1e-3}, "augment": {"p_max": 0.5, "fill": "border"}}
    assert suite_defaults.config_changes(base, other, "apt_config.") == ["apt_config.augment.p_max: 1.0 -> 0.5"]
    assert suite_defaults.config_changes({"a": 1}, {"b": 2}) == ["a: 1 -> default", "b: default -> 2"]
    rows = lambda *v: [{"verdict": x} for x in v]  # noqa: E731
    assert suite_defaults.decision(rows("unclear", "holds", "unclear")) == "better"
    assert suite_defaults.decision(rows("holds", "against")) == "mixed"  # a gain somewhere bought with a loss elsewhere
    assert suite_defaults.decision(rows("unclear", "against")) == "worse"
    assert suite_defaults.decision(rows("unclear", "unclear")) == "no difference"


def test_the_overview_names_the_change_and_a_rate_the_variant_did_not_run():
    def runs(layout):
        return [{"seed": k, "evals": [{"step": 600, **{m: 0.5 for m in st.METRICS}, "layout": layout}]} for k in range(3)]

    def entry(rate, base, other):
        cfg = {"apt_config": {"train": {"steps": 600}, "augment": {"p_max": 0.5} if other else {}}}
        return {"concept": "c", "rate": rate, "results": {"config": cfg, "prior": {}, "runs": {"apt": runs(0.6), **(
            {"base": runs(0.5)} if base else {})}}}

    base = {"entries": [entry(1e-3, False, False), entry(2e-3, False, False)]}
    variant = {"entries": [entry(1e-3, True, True)],
               "compare": {"base": "base", "other": "apt", "base_method": "apt", "base_folder": "defaults"}}
    row = next(ln for ln in suite_defaults.overview([("quality/report_v", variant, base)]).splitlines() if "`report_v`" in ln)
    assert row.startswith("| `report_v` | apt_config.augment.p_max: default -> 0.5 | 0.001 | step 600 |")
    assert "+0.100 (1/0) **holds**" in row  # layout: every seed +0.1 in the one concept
    assert row.rstrip().endswith("| better (lr 0.002 not run) |")


def test_a_run_is_reused_only_when_finished_with_the_same_config_and_prior(tmp_path):
    import json

    cfg = load_config(None)
    cfg["methods"], cfg["eval"]["steps"] = ["baseline", "apt"], [2, 4]
    run = {"evals": [{"step": 2}, {"step": 4}]}
    res = {"config": dict(cfg, seeds=[1]), "smoke": False, "runs": {"baseline": [run], "apt": [run]}}

    def finished(results, untrained=False):
        (tmp_path / "results.json").write_text(json.dumps(results))
        return suite._finished(tmp_path, cfg, untrained)

    assert finished(res)
    assert not finished(res, untrained=True)  # made with the trained prior, asked for the untrained one
    assert not finished(dict(res, runs={"baseline": [run]}))  # partial: APT not trained yet
    assert not finished(dict(res, runs={"baseline": [run], "apt": [{"evals": [{"step": 2}]}]}))
    other = json.loads(json.dumps(cfg))
    other["concept_prompts"] = [{"background": "pink"}]
    assert not finished(dict(res, config=other))  # the config changed since


def test_suite_smoke_run_writes_a_report_over_both_kinds_of_concept(tmp_path):
    out = tmp_path / "report"
    assert suite.main(["--quick", "--untrained-prior", "--out", str(out), "--work", str(tmp_path / "work"),
                       "--jobs", "2"]) == 0
    data = read_results(out)
    names = [e["concept"] for e in data["entries"]]
    assert names == ["blue_cross", "red_cross_layouts"] and data["quick"]
    layouts = data["entries"][1]["results"]
    assert len({r["position"] for r in layouts["references"]}) == 4
    assert set(layouts["runs"]) == {"baseline", "apt"} and all(len(r[0]["evals"]) == 2 for r in layouts["runs"].values())
    text = (out / "report.md").read_text(encoding="utf-8")
    assert "Smoke run" in text and "red_cross_layouts" in text and "at matched likeness" in text
    assert (out / "figure.png").stat().st_size > 0
    # a finished (concept, rate, seed) is not trained again
    done = tmp_path / "work" / "blue_cross_lr0.001" / "seed0" / "results.json"
    before = done.stat().st_mtime_ns
    assert suite.main(["--quick", "--untrained-prior", "--out", str(out), "--work", str(tmp_path / "work")]) == 0
    assert done.stat().st_mtime_ns == before
    # --base-from: the same APT runs against themselves differ by exactly 0 everywhere
    again = tmp_path / "again"
    assert suite.main(["--quick", "--untrained-prior", "--out", str(again), "--work", str(tmp_path / "work"),
                       "--base-from", f"{out}:apt"]) == 0
    data = read_results(again)
    assert st.compared(data)[:2] == ("base", "apt")
    means = [row["pooled"][0] for row in st.table(data, 1e-3, matched=False)]
    assert means and all(m == 0.0 or math.isnan(m) for m in means)
    assert "apt of report vs apt here" in (again / "report.md").read_text(encoding="utf-8")
    # the defaults' overview of variant suites: APT against itself changes nothing and differs in nothing
    assert suite_defaults.main([str(again), "--out", str(tmp_path / "defaults.md")]) == 0
    row = next(ln for ln in (tmp_path / "defaults.md").read_text(encoding="utf-8").splitlines() if "`again`" in ln)
    assert "| — |" in row and row.rstrip().endswith("| no difference |")
    with pytest.raises(SystemExit, match="not a variant suite"):
        suite_defaults.main([str(out), "--out", str(tmp_path / "x.md")])


def test_stop_rule_best_step_crossing_and_hits():
    from quality import stop_rule as sr

    evals = [{"step": 200, "ref_identity_loose": 0.2, "context": 0.8, "layout": 1.0},   # 0.2 + 0.9 = 1.1
             {"step": 400, "ref_identity_loose": 0.5, "context": 0.6, "layout": 0.8},   # 0.5 + 0.7 = 1.2
             {"step": 600, "ref_identity_loose": 0.6, "context": 0.4, "layout": 0.8}]   # 0.6 + 0.6 = 1.2
    assert sr.best_step(evals) == 400  # the earliest of the best
    low = lambda step, g: [step, g, g, g] + [0.0] * 7  # noqa: E731 - bins 0-2 at g
    trace = [low(10, 0.1), low(20, 0.2), [30, 0.9, 0.9, 0.0] + [1.0] * 7, low(300, 0.55), low(500, 0.8)]
    assert sr.crossing(trace, 0.5) == 30  # (0.9 + 0.9 + 0.0) / 3 = 0.6; the high-noise bins do not count
    assert sr.crossing(trace, 0.7) == 500 and sr.crossing(trace, 0.9) is None
    assert sr.predicted(trace, [200, 400, 600], 0.7) == 400  # 500 is as near 400 as 600: the earlier
    assert sr.predicted(trace, [200, 400, 600], 0.9) == 600  # never crossed: the last step
    entry = {"concept": "c", "results": {"runs": {"apt": [{"evals": evals, "gamma_trace": trace}]}}}
    _, hits = sr.table([entry])
    assert [h for h, _ in hits["always step 400"]["c"]] == [True] and hits["always step 600"]["c"][0][0] is False
    assert hits["low-noise gamma >= 0.7"]["c"][0][0] is True and hits["low-noise gamma >= 0.5"]["c"][0][0] is False
    # regret: the score given away against the best step (1.2): stopping at 200 (1.1) gives away 0.1
    assert sr.regret(evals, 200) == 0.1 and sr.regret(evals, 600) == 0.0
    assert hits["always step 200"]["c"] == [(False, 0.1)] and hits["low-noise gamma >= 0.5"]["c"] == [(False, 0.1)]
    # the loss weight left, 1 - mean gamma of all 10 bins: at step 30 (0.9 + 0.9 + 7 x 1.0) / 10 = 0.88 -> 0.12 left
    assert sr.weight_crossing(trace, 0.8) == 30
    assert hits["loss weight left <= 0.8"]["c"] == [(False, 0.1)]  # 30 -> step 200
    # without that row: step 10 3 x 0.1 / 10 -> 0.97 left, 20 -> 0.94, 300 -> 0.835, 500 -> 0.76
    smooth = [row for row in trace if row[0] != 30]
    assert sr.weight_crossing(smooth, 0.8) == 500 and sr.weight_crossing(smooth, 0.85) == 300
    assert sr.weight_crossing(smooth, 0.95) == 20 and sr.weight_crossing(smooth, 0.7) is None
    assert sr.weight_crossing([[5] + [0.5] * 10], 0.5) == 5 and sr.crossing([[5] + [0.5] * 10], 0.5) == 5  # reaching counts
    _, hits = sr.table([{"concept": "c", "results": {"runs": {"apt": [{"evals": evals, "gamma_trace": smooth}]}}}])
    assert hits["loss weight left <= 0.8"]["c"] == [(True, 0.0)]  # 500 -> step 400 (the earlier of 400 and 600)


def test_stop_rule_plateau_compares_a_runs_move_with_the_concepts_spread():
    from quality import stop_rule as sr

    evals = [{"step": s, "ref_identity_loose": 0.0, "context": 0.0, "layout": 0.0} for s in (200, 600)]
    low = lambda step, g: [step, g, g, g] + [0.0] * 7  # noqa: E731
    run = lambda g200, g600: {"evals": evals, "gamma_trace": [low(10, 0.0), low(200, g200), low(600, g600)]}  # noqa: E731
    entries = [{"concept": "a", "results": {"runs": {"apt": [run(0.2, 0.3), run(0.2, 0.1)]}}},  # moves 0.1, 0.1
               {"concept": "b", "results": {"runs": {"apt": [run(0.8, 0.9)]}}}]  # moves 0.1; ends at 0.9
    move, spread = sr.plateau(entries)
    assert round(move, 9) == 0.1  # the median of |0.3 - 0.2|, |0.1 - 0.2|, |0.9 - 0.8|; the step-10 row is not read
    assert round(spread, 9) == 0.7  # b's 0.9 minus a's mean (0.3 + 0.1) / 2 = 0.2



def test_base_from_pairs_other_seeds_in_order(tmp_path):
    """A suite run on other seeds (a placebo: the same config, only the seeds changed) is paired with
    the base's seeds in order; the base's runs are relabelled, not changed."""
    from quality import suite, suite_defaults, suite_stats as st

    def entry(seeds, values):
        runs = [{"seed": s, "evals": [{"step": 600, **{k: v for k in st.METRICS}}]} for s, v in zip(seeds, values)]
        cfg = {"seeds": sorted(seeds), "apt_config": {"train": {"steps": 600}}}
        return {"concept": "c", "rate": 0.001, "results": {"prompts": [], "drift_prompts": [], "reference_caption": "x",
                                                          "prior": {}, "config": cfg, "runs": {"apt": runs}}}

    suite.save_results(tmp_path, {"entries": [entry([0, 1, 2], [0.1, 0.2, 0.3])]})
    data = {"entries": [entry([5, 3, 4], [0.9, 0.4, 0.8])]}  # seed 3 pairs with 0, 4 with 1, 5 with 2
    suite.with_base_from(data, f"{tmp_path}:apt", "apt")
    assert st.pair_differences(data["entries"][0], "context", False, "base", "apt") == \
        {3: 0.4 - 0.1, 4: 0.8 - 0.2, 5: 0.9 - 0.3}
    assert data["compare"]["base_label"] == "apt of " + tmp_path.name + " (seeds 0, 1, 2 paired with 3, 4, 5)"
    base_data = {"entries": [entry([0, 1, 2], [0.1, 0.2, 0.3])]}
    row = suite_defaults.overview([(str(tmp_path / "placebo"), data, base_data)]).splitlines()[6]
    assert row.startswith("| `placebo` | seeds: [0, 1, 2] -> [3, 4, 5] | 0.001 | step 600 |")
    # +0.3, +0.6, +0.6 in the one concept: the 5 higher-is-better metrics hold, the 3 drifts go against;
    # at matched likeness (no prior likeness: the base's curve starts at 0) every pair is undefined
    assert row.endswith(" | placebo: 8 verdicts in 15 cells, each one false |")
    short = {"entries": [entry([3, 4], [0.0, 0.0])]}
    with pytest.raises(SystemExit, match="seeds"):
        suite.with_base_from(short, f"{tmp_path}:apt", "apt")
