"""The matched-identity comparison of quality.tradeoff against hand-computed values."""

import math

import numpy as np
import pytest

from quality.tradeoff import bootstrap, markdown, matched, mean_curve, read_at


def _run(points):
    """points: [(step, ref_identity, context)] -> one run's results."""
    return {"evals": [{"step": s, "ref_identity": x, "context": y} for s, x, y in points]}


def _res(base_runs, other_runs):
    return {"prior": {"context": 0.8}, "runs": {"baseline": base_runs, "ata": other_runs}}


def test_read_at_follows_the_curve_in_step_order():
    xs, ys = np.array([0.0, 0.2, 0.6, 0.4]), np.array([0.8, 0.7, 0.5, 0.3])
    assert read_at(xs, ys, 0.1) == pytest.approx(0.75)
    assert read_at(xs, ys, 0.5) == pytest.approx(0.55)  # first crossing: 0.7 + 3/4 * (0.5 - 0.7)
    assert math.isnan(read_at(xs, ys, 0.7))
    assert read_at(np.array([0.0, 0.2, 0.2]), np.array([0.8, 0.7, 0.6]), 0.2) == pytest.approx(0.7)


def test_matched_reads_the_base_curve_at_the_other_methods_identity():
    base = [_run([(500, 0.2, 0.7), (1000, 0.6, 0.5)]), _run([(500, 0.4, 0.7), (1000, 0.6, 0.3)])]
    other = [_run([(500, 0.1, 0.8), (1000, 0.4, 0.6)])]
    res = _res(base, other)
    assert mean_curve(base, "context", 0.8).tolist() == pytest.approx([0.8, 0.7, 0.4])
    rows = matched(res, "baseline", "ata", metrics=["context"])
    # base mean curve: (0, 0.8) -> (0.3, 0.7) -> (0.6, 0.4)
    assert rows[0]["step"] == 500 and rows[0]["ref_identity"] == pytest.approx(0.1)
    yo, yb, diff = rows[0]["context"]
    assert (yo, yb, diff) == pytest.approx((0.8, 0.8 - 0.1 / 0.3 * 0.1, 0.1 / 0.3 * 0.1))
    yo, yb, diff = rows[1]["context"]
    assert (yo, yb, diff) == pytest.approx((0.6, 0.6, 0.0))  # 0.4 is 1/3 of the way from 0.3 to 0.6


def test_bootstrap_interval_and_report():
    same = [_run([(500, 0.2, 0.6), (1000, 0.4, 0.5)])] * 3
    better = [_run([(500, 0.2, 0.7), (1000, 0.4, 0.6)])] * 3
    ci = bootstrap(_res(same, better), "baseline", "ata", metrics=["context"], n=50)
    assert ci[0]["context"] == pytest.approx((0.1, 0.1, 1.0)) and ci[1]["context"] == pytest.approx((0.1, 0.1, 1.0))
    res = _res(same, better)
    for runs in res["runs"].values():
        for r in runs:
            for e in r["evals"]:
                e.update({k: 0.0 for k in ("style", "layout", "pos_spread", "id_shape", "drift_px",
                                           "drift_attr", "eps_dev")})
    text = markdown(res, "baseline", "ata", n_boot=20)
    assert "0.700 / 0.600 / +0.100 [+0.100, +0.100] **+**" in text


def test_base_runs_from_another_report_of_the_same_task_only():
    from quality.tradeoff import with_base_from
    task = {"reference_caption": "a sks shape", "prompts": ["p"], "drift_prompts": ["d"],
            "config": {"prior": "quality/assets/prior", "concept": {"shape": "cross"}}}
    a = dict(task, runs={"ata": ["a"], "baseline": ["old"]})
    b = dict(task, runs={"baseline": ["new1", "new2"]})
    assert with_base_from(a, b, "baseline")["runs"] == {"ata": ["a"], "baseline": ["new1", "new2"]}
    with pytest.raises(SystemExit, match="prompts"):
        with_base_from(a, dict(b, prompts=["q"]), "baseline")
