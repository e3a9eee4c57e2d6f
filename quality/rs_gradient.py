"""How hard Representation Stabilization pulls against learning the concept, measured on the LoRA.

Trains one benchmark run and, at the given steps, takes the gradients of the two parts of the
objective with respect to the LoRA parameters on a fixed set of draws (every reference, timesteps
spread evenly over the 10 bins, fixed noise; no augmentation, so both terms see the concept as the
references show it):

    g_dn = d/dtheta (weighted denoising loss)      g_rs = d/dtheta L_RS   (L_RS before lambda_RS)

and reports, averaged over the draws, |g_dn|, lambda_RS * |g_rs| and cos(g_dn, g_rs) (RS opposes
the denoising update where the cosine is positive: the optimizer steps along -g_dn - lambda g_rs),
their cosines with the LoRA's displacement from its start (what the run has learned so far), the
raw RS value per hooked stage, and the same per timestep bin. Run it along +ATA's path (RS hooked,
lambda_RS 0) to see what RS *would* do to a run that learns the concept:

    python -m quality.rs_gradient --config quality/configs/world128c.json --method ata_rs \\
        --set '{"regularizers": {"lambda_rs": 0}}' --at 0,100,250,500,1000 --out /tmp/rsg_ata

Writes `rs_gradient.json` in --out and prints one line per measured step.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from .bench import load_config_with_sets
from .diagnose import prepare_run


def fixed_draws(n_refs: int, latent_shape: tuple[int, ...], per_bin: int, bins: int = 10,
                num_timesteps: int = 1000, seed: int = 321) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """(reference index, t (1,), noise (1, *latent_shape)) for `per_bin` draws in each bin."""
    g = torch.Generator().manual_seed(seed)
    width = num_timesteps // bins
    draws = []
    for b in range(bins):
        for k in range(per_bin):
            t = torch.randint(b * width, (b + 1) * width, (1,), generator=g)
            draws.append((k % n_refs, t, torch.randn((1, *latent_shape), generator=g)))
    return draws


def _flat(grads) -> torch.Tensor:
    return torch.cat([g.reshape(-1).float() for g in grads])


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    na, nb = float(a.norm()), float(b.norm())
    return float(a @ b) / (na * nb) if na > 0 and nb > 0 else 0.0


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def measure_draw(trainer, index: int, t: torch.Tensor, noise: torch.Tensor) -> dict:
    """The two gradients (flat (P,) fp32) and the loss values of one draw on reference `index`."""
    params = list(trainer.lora.parameters())
    ex = trainer.dataset.examples[index]
    dev = trainer.device
    cond = ex.cond.to(dev, trainer.unet_dtype)
    bins = trainer.indicator.bin_of(t)
    trainer.probe.begin_step(cond.aligned_tokens)
    try:
        terms = trainer.batch_losses(ex.latent[None].to(dev, torch.float32), cond, t, noise.to(dev),
                                     trainer.indicator.gamma_for(bins))
        layer_terms = trainer.probe.rs_layer_terms()
        prior_stats = trainer.probe.prior_stats()
        rs_raw = torch.stack([v for _, v in layer_terms]).mean()
        g_dn = _flat(torch.autograd.grad(terms.denoise, params, retain_graph=True))
        g_rs = _flat(torch.autograd.grad(rs_raw, params, allow_unused=True, materialize_grads=True))
    finally:
        trainer.probe.end_step()
    return {"bin": int(bins[0]), "g_dn": g_dn, "g_rs": g_rs, "dn_value": float(terms.denoise.detach()),
            "ft_value": float(terms.loss_ft.detach().mean()), "pre_value": float(terms.loss_pre.mean()),
            "rs_value": float(rs_raw.detach()), "rs_layers": {n: float(v.detach()) for n, v in layer_terms},
            "prior_scale": {n: float(mu.pow(2).mean() + sd.pow(2).mean()) for n, (mu, sd) in prior_stats.items()}}


def gradient_parts(trainer, draws) -> dict:
    """`measure_draw` over `draws`, averaged: {"dn": (P,) mean g_dn, "rs": (P,) mean g_rs (lambda 1),
    "bins": {b: {"dn", "rs", "ft_value", "pre_value"}} per-bin means, "dn_value" / "ft_value" /
    "pre_value" (weighted / fine-tuned / prior denoising loss), "rs_value" (L_RS), "rs_layers"
    {stage: term}, "prior_scale" {stage: the prior's mean mu^2 + sigma^2, the size RS compares with}}."""
    rows = [measure_draw(trainer, i, t, noise) for i, t, noise in draws]

    def average(rs):
        return {"dn": torch.stack([r["g_dn"] for r in rs]).mean(0), "rs": torch.stack([r["g_rs"] for r in rs]).mean(0),
                **{k: _mean(r[k] for r in rs) for k in ("dn_value", "ft_value", "pre_value", "rs_value")}}

    out = average(rows)
    out["bins"] = {b: average([r for r in rows if r["bin"] == b]) for b in sorted({r["bin"] for r in rows})}
    for key in ("rs_layers", "prior_scale"):
        out[key] = {n: _mean(r[key][n] for r in rows) for n in rows[0][key]}
    return out


def summarise(parts: dict, lam: float, displacement: torch.Tensor) -> dict:
    dn, rs = parts["dn"], parts["rs"]
    keys = ("dn_value", "ft_value", "pre_value", "rs_value", "rs_layers", "prior_scale")
    return {**{k: parts[k] for k in keys},
            "dn_norm": float(dn.norm()), "rs_norm_lambda": lam * float(rs.norm()), "rs_norm": float(rs.norm()),
            "cos_dn_rs": _cos(dn, rs), "cos_dn_disp": _cos(dn, displacement),
            "cos_rs_disp": _cos(rs, displacement), "disp_norm": float(displacement.norm()),
            "bins": [{"bin": b, "dn_norm": float(v["dn"].norm()), "rs_norm": float(v["rs"].norm()),
                      "cos_dn_rs": _cos(v["dn"], v["rs"]), "ft_value": v["ft_value"], "pre_value": v["pre_value"],
                      "rs_value": v["rs_value"]} for b, v in parts["bins"].items()]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--method", default="ata_rs", help="needs RS on (ata_rs or apt); set lambda_RS 0 "
                    "with --set to follow +ATA's path")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--at", default="0,100,250,500,1000", help="steps at which to measure")
    ap.add_argument("--per-bin", type=int, default=4, help="draws per timestep bin")
    ap.add_argument("--set", action="append", default=[], metavar="JSON", help="apt_config overrides")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    cfg, over = load_config_with_sets(args.config, args.set)
    at = sorted({int(s) for s in args.at.split(",")})
    t0 = time.time()
    run = prepare_run(cfg, args.method, args.seed)
    trainer = run.trainer
    if not trainer.probe.rs:
        raise SystemExit(f"method {args.method!r} does not hook RS; use ata_rs or apt (lambda_RS 0 to follow +ATA)")
    lam = trainer.config.regularizers.lambda_rs
    draws = fixed_draws(len(run.dataset), tuple(run.dataset.examples[0].latent.shape), args.per_bin)
    start = _flat([p.detach() for p in trainer.lora.parameters()]).clone()
    rows = []
    try:
        for step in at:
            while trainer.step_idx < step:
                trainer.train_step()
            disp = _flat([p.detach() for p in trainer.lora.parameters()]) - start
            row = {"step": step, **summarise(gradient_parts(trainer, draws), lam, disp),
                   "gamma": trainer.indicator.gammas()}
            rows.append(row)
            print(f"step {step:5d}: loss ft {row['ft_value']:.4f} pre {row['pre_value']:.4f} weighted "
                  f"{row['dn_value']:.4f} |g_dn| {row['dn_norm']:.3g}  L_RS {row['rs_value']:.2e} "
                  f"|g_rs| {row['rs_norm']:.3g}  "
                  f"cos(dn,rs) {row['cos_dn_rs']:+.2f}  cos(dn,disp) {row['cos_dn_disp']:+.2f} "
                  f"cos(rs,disp) {row['cos_rs_disp']:+.2f}  |disp| {row['disp_norm']:.3g}", flush=True)
    finally:
        trainer.close()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"config": args.config, "method": args.method, "seed": args.seed, "overrides": over,
              "lambda_rs": lam, "draws": len(draws), "rows": rows, "seconds": round(time.time() - t0, 1)}
    (out / "rs_gradient.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
