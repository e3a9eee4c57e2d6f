"""The multi-concept suite: DreamBooth-LoRA vs APT on several concepts, seeds and learning rates.

    python -m quality.suite --config quality/configs/suite.json --out quality/report_suite --jobs 2
    python -m quality.suite --quick --untrained-prior --out /tmp/suite_smoke      # smoke test, < 1 min

The config is a benchmark config (task.py) plus a "suite" entry: "rates" (learning rates) and
"concepts" ({name: overrides of the base config: concept, concept_prompts, drift_prompts}). Every
(concept, rate, seed) is one `quality.run` process training every method; `--jobs` of them run at
once, each on one thread. The runs of one (concept, rate) are merged into `--work`/<concept>_lr<rate>
(quality.run's report, results and images: large, not for git); the suite's report (report.md,
figure.png, results.json.xz: small) goes into --out. The statistics are in `suite_stats.py`.
A finished (concept, rate, seed) is not run again: rerun the command to continue an interrupted suite.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from . import stop_rule, suite_stats
from .task import load_config, merge_config, quick_config
from .textio import read_results, save_text

ROOT = Path(__file__).resolve().parents[1]


def expand(cfg: dict, quick: bool = False) -> dict[tuple[str, float], dict]:
    """{(concept, rate): the full benchmark config of that concept at that learning rate}."""
    suite = cfg["suite"]
    names = list(suite["concepts"])
    rates = list(suite["rates"])
    if quick:  # the first concept and the last (whose references vary in the committed suite)
        names, rates = list(dict.fromkeys([names[0], names[-1]])), rates[:1]
    base = {k: v for k, v in cfg.items() if k not in ("suite", "_comment")}
    out = {}
    for name in names:
        for rate in rates:
            c = merge_config(base, suite["concepts"][name])
            c = merge_config(c, {"apt_config": {"train": {"learning_rate": rate}}})
            if quick:
                c = quick_config(c, keep_images=True)
            c["suite_entry"] = {"concept": name, "rate": rate}
            out[name, rate] = c
    return out


def run_dir(work: Path, name: str, rate: float) -> Path:
    return work / f"{name}_lr{rate:g}"


def _task(cfg: dict) -> str:
    """A config as compared for reuse: everything but the seeds, JSON-normalised."""
    return json.dumps({k: v for k, v in cfg.items() if k != "seeds"}, sort_keys=True)


def _finished(out: Path, cfg: dict, untrained: bool) -> bool:
    """Whether `out` holds a finished run of this very config and prior: every method with every
    evaluation step (quality.run also writes a partial results.json after each method)."""
    try:
        res = read_results(out)
    except (FileNotFoundError, ValueError):
        return False
    if _task(res.get("config", {})) != _task(json.loads(json.dumps(cfg))) or bool(res.get("smoke")) != untrained:
        return False
    want = len(set(cfg["eval"]["steps"]))
    return all(len(res["runs"].get(m, [])) == 1 and len(res["runs"][m][0]["evals"]) == want for m in cfg["methods"])


def _job(cfg: dict, folder: Path, seed: int, untrained: bool, log) -> Path:
    """One quality.run process for one seed; returns its output folder (kept when it finished)."""
    out = folder / f"seed{seed}"
    if _finished(out, cfg, untrained):
        return out
    out.mkdir(parents=True, exist_ok=True)
    cfg_file = folder / "config.json"
    cmd = [sys.executable, "-m", "quality.run", "--config", str(cfg_file), "--seeds", str(seed), "--out", str(out)]
    if untrained:
        cmd.append("--untrained-prior")
    started = time.time()
    with open(out / "run.log", "w", encoding="utf-8") as f:
        rc = subprocess.call(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                             env=dict(os.environ, OMP_NUM_THREADS="1"))
    if rc != 0 or not _finished(out, cfg, untrained):
        raise RuntimeError(f"{' '.join(cmd)} failed (rc {rc}); see {out / 'run.log'}")
    log(f"{folder.name} seed {seed}: {time.time() - started:.0f} s")
    return out


def run_suite(cfg: dict, work: Path, jobs: int, untrained: bool = False, quick: bool = False,
              log=print) -> dict[tuple[str, float], dict]:
    """Run every (concept, rate, seed) not run yet; merge each (concept, rate). Returns their results."""
    configs = expand(cfg, quick)
    tasks = []
    for (name, rate), c in configs.items():
        folder = run_dir(work, name, rate)
        folder.mkdir(parents=True, exist_ok=True)
        save_text(folder / "config.json", json.dumps(c, indent=1))
        tasks += [(c, folder, seed) for seed in c["seeds"]]
    log(f"{len(configs)} (concept, rate) x seeds = {len(tasks)} processes, {jobs} at a time")
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        done = list(pool.map(lambda t: _job(*t, untrained, log), tasks))
    results = {}
    for (name, rate), c in configs.items():
        folder = run_dir(work, name, rate)
        seeds = [d for d in done if d.parent == folder]
        cmd = [sys.executable, "-m", "quality.run", "--merge", *map(str, seeds), "--out", str(folder / "merged")]
        subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        results[name, rate] = read_results(folder / "merged")
    return results


def slim(results: dict) -> dict:
    """What the suite's committed results keep of one (concept, rate): config, prompts, the prior's
    metrics and each run's evaluations, final gamma and gamma every 10 steps (not the rest of the history)."""
    keep = {k: results[k] for k in ("config", "reference_caption", "references", "prompts", "drift_prompts",
                                    "identity_ceiling", "prior", "seconds", "seconds_total") if k in results}
    keep["runs"] = {m: [{"seed": r["seed"], "evals": r["evals"], "final_gamma": r["final_gamma"],
                         "gamma_trace": [[h["step"], *(round(g, 4) for g in h["gamma"])] for h in r["history"]
                                         if h["step"] % stop_rule.EVERY == 0]} for r in runs]
                    for m, runs in results["runs"].items()}
    return keep


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m quality.suite", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="quality/configs/suite.json")
    p.add_argument("--out", default="quality/report_suite", help="the suite's report folder (small files)")
    p.add_argument("--work", help="where the runs go (default: output/suite/<name of --out>)")
    p.add_argument("--jobs", type=int, default=2, help="processes at once (one thread each)")
    p.add_argument("--quick", action="store_true", help="smoke test: 2 concepts (the first and the last), 1 rate, "
                   "1 seed, a few steps")
    p.add_argument("--untrained-prior", action="store_true", help="random prior (no assets needed)")
    p.add_argument("--report-only", action="store_true", help="rebuild the report from --out's results")
    p.add_argument("--base-from", metavar="DIR:METHOD",
                   help="compare this suite's --other runs with METHOD's runs of the suite report in DIR (same "
                        "concepts, rates and seeds), e.g. a variant of APT against quality/report_suite:apt")
    p.add_argument("--other", default="apt", help="with --base-from: this suite's method to compare (default apt)")
    args = p.parse_args(argv)
    out = Path(args.out)
    if args.report_only:
        data = read_results(out)
    else:
        cfg = load_config(args.config)
        work = Path(args.work).resolve() if args.work else ROOT / "output" / "suite" / out.name
        started = time.time()
        results = run_suite(cfg, work, args.jobs, args.untrained_prior, args.quick)
        data = {"command": "python -m quality.suite " + " ".join(argv if argv is not None else sys.argv[1:]),
                "seconds": round(time.time() - started, 1), "jobs": args.jobs, "quick": args.quick,
                "untrained_prior": args.untrained_prior,
                "long_runs": {} if args.quick else cfg["suite"].get("long_runs", {}),
                "entries": [{"concept": n, "rate": r, "results": slim(res)} for (n, r), res in results.items()]}
        if args.base_from:
            with_base_from(data, args.base_from, args.other)
        out.mkdir(parents=True, exist_ok=True)
        save_results(out, data)
    text = suite_stats.report(data)
    save_text(out / "report.md", text)
    suite_stats.figure(data).save(out / "figure.png")
    print(text)
    return 0


def with_base_from(data: dict, spec: str, other: str) -> None:
    """Add METHOD's runs of the suite report DIR ("DIR:METHOD") to each entry as the base to compare
    `other` with; the prompts, references and prior must be the same. A suite run on other seeds (a
    placebo) is paired with DIR's seeds in sorted order."""
    folder, _, method = spec.rpartition(":")
    base = {(e["concept"], e["rate"]): e["results"] for e in read_results(folder)["entries"]}
    label = f"{method} of {Path(folder).name}"
    for e in data["entries"]:
        b = base.get((e["concept"], e["rate"]))
        if b is None:
            raise SystemExit(f"--base-from: {folder} has no {e['concept']} at lr {e['rate']:g}")
        for key in ("prompts", "drift_prompts", "reference_caption"):
            if b.get(key) != e["results"].get(key):
                raise SystemExit(f"--base-from: {folder} differs in {key} for {e['concept']}")
        theirs = sorted(r["seed"] for r in b["runs"][method])
        ours = sorted(r["seed"] for r in e["results"]["runs"][other])
        if len(theirs) != len(ours):
            raise SystemExit(f"--base-from: {folder} has seeds {theirs} for {e['concept']}, this suite {ours}")
        relabel = dict(zip(theirs, ours))  # other seeds (a placebo) pair in order
        e["results"]["runs"]["base"] = [dict(r, seed=relabel[r["seed"]]) for r in b["runs"][method]]
        if theirs != ours:
            label = (f"{method} of {Path(folder).name} (seeds {', '.join(map(str, theirs))} paired with "
                     f"{', '.join(map(str, ours))})")
    data["compare"] = {"base": "base", "other": other, "base_label": label,
                       "other_label": f"{other} here", "base_folder": folder, "base_method": method}


def save_results(out: Path, data: dict) -> None:
    """results.json.xz: every (concept, rate)'s slimmed results (read back by textio.read_results)."""
    import lzma

    raw = json.dumps(data, separators=(",", ":")).encode()
    tmp = out / "results.json.xz.tmp"
    tmp.write_bytes(lzma.compress(raw, preset=9))
    tmp.replace(out / "results.json.xz")


if __name__ == "__main__":
    raise SystemExit(main())
