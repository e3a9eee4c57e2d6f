"""The defaults on the suite: variant suites (`quality.suite --base-from quality/report_suite:apt`)
against APT with the product's defaults, in one table, with a decision per variant.

    python -m quality.suite_defaults quality/report_suite_ata ... --out quality/report_suite/defaults.md

The statistics (pairs, pooled intervals, verdicts) are `suite_stats`'.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from .suite_stats import MEANING, METRICS, rates, table


def config_changes(base: dict, other: dict, prefix: str = "") -> list[str]:
    """'key: base -> other' for every leaf where two (nested) configs differ ('default' where one
    leaves the key out)."""
    out = []
    for k in sorted(set(base) | set(other)):
        a, b = base.get(k), other.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_changes(a, b, f"{prefix}{k}.")
        elif a != b:  # a key a config leaves out is apt_core's default
            out.append(f"{prefix}{k}: {'default' if a is None else a} -> {'default' if b is None else b}")
    return out


def decision(rows: Sequence[dict]) -> str:
    """A variant of the defaults from its verdicts against them (every rate, both readings): 'better'
    if something holds and nothing goes against it, 'worse' in the mirror case, else 'mixed' or
    'no difference'. Only 'better' may change a default."""
    verdicts = {r["verdict"] for r in rows}
    if "holds" in verdicts:
        return "mixed" if "against" in verdicts else "better"
    return "worse" if "against" in verdicts else "no difference"


def overview(variants: Sequence[tuple[str, dict, dict]]) -> str:
    """One table for several variant suites, each compared with the defaults' runs (quality.suite
    --base-from): (folder, its data, the base folder's data) -> markdown."""
    lines = ["# The defaults on the suite: each variant against APT with the product's defaults", "",
             "Each row is a variant suite (`quality.suite --base-from quality/report_suite:apt`) minus APT with "
             "the defaults, pooled over concept x seed like the suite's report: the difference, the concepts "
             "where the variant is ahead/behind, and **holds** / **against** when the 95 % interval excludes 0 "
             "and most concepts agree. A variant is *better* when something holds and nothing goes against it "
             "at any rate it ran, at the last step or at matched likeness; only a better variant may change a "
             "default.", "",
             "| variant (report) | change | lr | reading | " + " | ".join(METRICS) + " | decision |",
             "|---|---|---|---|" + "---|" * len(METRICS) + "---|"]
    for folder, data, base_data in variants:
        comp = data.get("compare") or {}
        first = data["entries"][0]["results"]["config"]
        base_cfg = next(e["results"]["config"] for e in base_data["entries"]
                        if e["concept"] == data["entries"][0]["concept"] and e["rate"] == data["entries"][0]["rate"])
        change = config_changes(base_cfg.get("apt_config", {}), first.get("apt_config", {}), "apt_config.")
        other_seeds = first.get("seeds") != base_cfg.get("seeds")
        other_method = comp.get("other") != comp.get("base_method")
        placebo = other_seeds and not change and not other_method  # the same config on other seeds
        if other_seeds:
            change.insert(0, f"seeds: {base_cfg.get('seeds')} -> {first.get('seeds')}")
        if other_method:
            change.insert(0, f"method: {comp.get('base_method')} -> {comp.get('other')}")
        ran = rates(data)
        rows = [(rate, matched, table(data, rate, matched)) for rate in ran for matched in (False, True)]
        verdict_of = decision([r for *_, rs in rows for r in rs])
        if placebo:  # every verdict is a false one
            cells = [r for *_, rs in rows for r in rs]
            n = sum(r["verdict"] != "unclear" for r in cells)
            verdict_of = f"placebo: {n} verdicts in {len(cells)} cells, each one false"
        missing = [f"{r:g}" for r in rates(base_data) if r not in ran]
        if missing:  # a screen at fewer rates can reject a change, not make one
            verdict_of += f" (lr {', '.join(missing)} not run)"
        steps = first["apt_config"]["train"]["steps"]
        for i, (rate, matched, rs) in enumerate(rows):
            by = {r["metric"]: r for r in rs}
            cells = []
            for k in METRICS:
                if k not in by:
                    cells.append("—")
                    continue
                m, *_ = by[k]["pooled"]
                a, b, *_ = by[k]["votes"]
                mark = {"holds": " **holds**", "against": " **against**", "unclear": ""}[by[k]["verdict"]]
                cells.append(f"{m:+.3f} ({a}/{b}){mark}")
            head = (f"`{Path(folder).name}`", "<br>".join(change) or "—") if i == 0 else ("", "")
            lines.append(f"| {head[0]} | {head[1]} | {rate:g} | {'matched likeness' if matched else f'step {steps}'} | "
                         + " | ".join(cells) + f" | {verdict_of if i == 0 else ''} |")
    lines += ["", "Cells: variant − defaults (concepts ahead/behind). Metrics: "
              + "; ".join(f"`{k}` {v}" for k, v in MEANING.items()) + ".", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import argparse

    from .textio import read_results, save_text

    p = argparse.ArgumentParser(prog="python -m quality.suite_defaults",
                                description="One table of variant suites against the defaults' suite.")
    p.add_argument("folders", nargs="+", help="variant suite reports (run with --base-from)")
    p.add_argument("--out", required=True, help="the markdown file to write")
    args = p.parse_args(argv)
    variants, bases = [], {}  # the variants share one base: read it once
    for folder in args.folders:
        data = read_results(folder)
        base = (data.get("compare") or {}).get("base_folder")
        if not base:
            raise SystemExit(f"{folder}: not a variant suite (run quality.suite with --base-from)")
        if base not in bases:
            bases[base] = read_results(base)
        variants.append((folder, data, bases[base]))
    text = overview(variants)
    save_text(Path(args.out), text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
