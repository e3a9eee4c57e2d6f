"""How hard the regularizers (RS, AA) pull against learning the concept, measured on the LoRA.

Trains one benchmark run and, at the given steps, takes the gradients of the parts of the
objective with respect to the LoRA parameters on a fixed set of draws (every reference, timesteps
spread evenly over the 10 bins, fixed noise; no augmentation, so every term sees the concept as the
references show it):

    g_dn = d/dtheta (weighted denoising loss)    g_rs = d/dtheta L_RS    g_aa = d/dtheta L_AA
    (L_RS and L_AA before their lambdas; each regularizer is measured when the method hooks it)

and reports, averaged over the draws, the norms, cos(g_dn, g_reg) (a regularizer opposes the
denoising update where the cosine is positive: the optimizer steps along -g_dn - lambda g_reg),
their cosines with the LoRA's displacement from its start (what the run has learned so far), the
raw RS value per hooked stage, the same per timestep bin, and for AA the attention each prompt
token receives in the prior and the fine-tuned pass with its share of L_AA. Run it at lambda 0 to
see what a regularizer *would* do to a run that learns the concept without it:

    python -m quality.reg_gradient --config quality/configs/world128c.json --method apt \\
        --set '{"regularizers": {"lambda_rs": 0, "lambda_aa": 0}}' --at 0,100,250,500,1000 --out /tmp/rg

Writes `reg_gradient.json` in --out and prints one line per measured step.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from .task import load_config_with_sets
from .diagnose import prepare_run

TERMS = ("rs", "aa")


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


def token_aa_shares(prior: torch.Tensor, ft: torch.Tensor, token_mask: torch.Tensor, distance: str = "kl",
                    eps: float = 1e-8) -> torch.Tensor:
    """Each token's term of AA's distance, averaged over batch, heads and queries: for "kl" the
    renormalised KL(prior || ft), for "mse" the squared difference over the valid-token count.
    prior, ft: (B, h, Q, K) probabilities; token_mask: (B, K) bool -> (K,). Summed over K it is
    `aa_layer_loss(ft, prior, token_mask, distance)` (without head averaging)."""
    m = token_mask.to(prior.device)[:, None, None, :].float()
    if distance == "mse":
        return ((ft.float() - prior.float()).pow(2) * m / m.sum(-1, keepdim=True).clamp(min=1.0)).mean(dim=(0, 1, 2))
    p = prior.float() * m
    r = ft.float() * m
    p, r = p / p.sum(-1, keepdim=True).clamp(min=eps), r / r.sum(-1, keepdim=True).clamp(min=eps)
    return (p * ((p + eps).log() - (r + eps).log()) * m).mean(dim=(0, 1, 2))


class AttentionRecorder:
    """Listens to the probe's attention maps for one draw: per-token mass (mean over hooked layers,
    heads and queries) of the prior and fine-tuned passes, and each token's share of L_AA."""

    def __init__(self, probe):
        self.probe = probe
        self._record = probe.record_attention
        probe.record_attention = self._listen  # the backbone looks the method up on each call
        self._prior: dict[str, torch.Tensor] = {}
        self.rows: list[dict[str, torch.Tensor]] = []
        self.listening = False  # only while a draw is measured, not during training steps

    def _listen(self, name: str, probs: torch.Tensor) -> None:
        phase = self.probe.phase if self.listening else None
        if phase == "prior":
            self._prior[name] = probs.detach()
        elif phase == "ft" and name in self._prior:
            prior, ft = self._prior.pop(name), probs.detach()
            self.rows.append({"prior": prior.float().mean(dim=(0, 1, 2)), "ft": ft.float().mean(dim=(0, 1, 2)),
                              "share": token_aa_shares(prior, ft, self.probe.token_mask,
                                                       self.probe.aa_distance)})
        self._record(name, probs)

    def reset(self) -> None:
        self.rows, self._prior = [], {}

    def take(self) -> dict[str, torch.Tensor]:
        """{"prior", "ft", "share"}: (K,) averaged over the layers recorded since the last reset."""
        rows = self.rows
        self.reset()
        return {k: torch.stack([r[k] for r in rows]).mean(0) for k in ("prior", "ft", "share")}

    def close(self) -> None:
        del self.probe.record_attention


def measure_draw(trainer, index: int, t: torch.Tensor, noise: torch.Tensor,
                 attention: AttentionRecorder | None = None) -> dict:
    """The gradients (flat (P,) fp32) and loss values of one draw on reference `index`."""
    params = list(trainer.lora.parameters())
    ex = trainer.dataset.examples[index]
    dev = trainer.device
    cond = ex.cond.to(dev, trainer.unet_dtype)
    bins = trainer.indicator.bin_of(t)
    hooked = [k for k in TERMS if getattr(trainer.probe, k)]
    if attention is not None:
        attention.reset()
        attention.listening = True
    trainer.probe.begin_step(cond.aligned_tokens)
    try:
        terms = trainer.batch_losses(ex.latent[None].to(dev, torch.float32), cond, t, noise.to(dev),
                                     trainer.indicator.gamma_for(bins))
        layer_terms = trainer.probe.rs_layer_terms()
        prior_stats = trainer.probe.prior_stats()
        row = {"bin": int(bins[0]), "g_dn": _flat(torch.autograd.grad(terms.denoise, params, retain_graph=True)),
               "dn_value": float(terms.denoise.detach()), "ft_value": float(terms.loss_ft.detach().mean()),
               "pre_value": float(terms.loss_pre.mean())}
        for i, k in enumerate(hooked):
            raw = getattr(terms, f"{k}_raw")
            row[f"g_{k}"] = _flat(torch.autograd.grad(raw, params, allow_unused=True, materialize_grads=True,
                                                      retain_graph=i + 1 < len(hooked)))
            row[f"{k}_value"] = float(raw.detach())
    finally:
        trainer.probe.end_step()
        if attention is not None:
            attention.listening = False
    row["rs_layers"] = {n: float(v.detach()) for n, v in layer_terms}
    row["prior_scale"] = {n: float(mu.pow(2).mean() + sd.pow(2).mean()) for n, (mu, sd) in prior_stats.items()}
    if attention is not None:
        row["tokens"] = attention.take()
    return row


def gradient_parts(trainer, draws, attention: AttentionRecorder | None = None) -> dict:
    """`measure_draw` over `draws`, averaged: {"dn": (P,) mean g_dn, "rs" / "aa": (P,) mean gradient
    of the raw term (when hooked), "bins": {b: the same per bin}, "dn_value" / "ft_value" /
    "pre_value" (weighted / fine-tuned / prior denoising loss), "rs_value" / "aa_value" (raw terms),
    "rs_layers" {stage: term}, "prior_scale" {stage: the prior's mean mu^2 + sigma^2, the size RS
    compares with}, "tokens" {"prior", "ft", "share"}: (K,) attention per token, when AA is hooked}."""
    rows = [measure_draw(trainer, i, t, noise, attention) for i, t, noise in draws]
    grads = [k for k in ("dn", *TERMS) if f"g_{k}" in rows[0]]
    values = [k for k in ("dn_value", "ft_value", "pre_value", "rs_value", "aa_value") if k in rows[0]]

    def average(rs):
        return {**{k: torch.stack([r[f"g_{k}"] for r in rs]).mean(0) for k in grads},
                **{k: _mean(r[k] for r in rs) for k in values}}

    out = average(rows)
    out["bins"] = {b: average([r for r in rows if r["bin"] == b]) for b in sorted({r["bin"] for r in rows})}
    for key in ("rs_layers", "prior_scale"):
        out[key] = {n: _mean(r[key][n] for r in rows) for n in rows[0][key]}
    if attention is not None:
        out["tokens"] = {k: torch.stack([r["tokens"][k] for r in rows]).mean(0) for k in ("prior", "ft", "share")}
    return out


def summarise(parts: dict, lambdas: dict[str, float], displacement: torch.Tensor,
              token_labels: list[str] | None = None) -> dict:
    dn = parts["dn"]
    keys = ("dn_value", "ft_value", "pre_value", "rs_value", "aa_value", "rs_layers", "prior_scale")
    out = {**{k: parts[k] for k in keys if k in parts},
           "dn_norm": float(dn.norm()), "cos_dn_disp": _cos(dn, displacement), "disp_norm": float(displacement.norm())}
    for k in TERMS:
        if k in parts:
            g = parts[k]
            out.update({f"{k}_norm": float(g.norm()), f"{k}_norm_lambda": lambdas[k] * float(g.norm()),
                        f"cos_dn_{k}": _cos(dn, g), f"cos_{k}_disp": _cos(g, displacement)})
    out["bins"] = []
    for b, v in parts["bins"].items():
        row = {"bin": b, "dn_norm": float(v["dn"].norm()), "ft_value": v["ft_value"], "pre_value": v["pre_value"]}
        for k in TERMS:
            if k in v:
                row.update({f"{k}_norm": float(v[k].norm()), f"cos_dn_{k}": _cos(v["dn"], v[k]),
                            f"{k}_value": v[f"{k}_value"]})
        out["bins"].append(row)
    if "tokens" in parts:
        n = len(token_labels)
        out["tokens"] = [{"token": token_labels[i], **{k: float(parts["tokens"][k][i]) for k in ("prior", "ft", "share")}}
                         for i in range(n)]
    return out


def caption_tokens(run) -> list[str]:
    """tokenizer_1's tokens of the references' caption from BOS through the first EOS (AA's token set)."""
    tok = run.components.tokenizer_1
    ids = tok(run.ref_caption).input_ids
    return tok.convert_ids_to_tokens(ids[:ids.index(tok.eos_token_id) + 1])


def _line(row: dict) -> str:
    parts = [f"step {row['step']:5d}: loss ft {row['ft_value']:.4f} pre {row['pre_value']:.4f} weighted "
             f"{row['dn_value']:.4f} |g_dn| {row['dn_norm']:.3g} cos(dn,disp) {row['cos_dn_disp']:+.2f}"]
    for k in TERMS:
        if f"{k}_value" in row:
            parts.append(f"L_{k.upper()} {row[f'{k}_value']:.2e} |g_{k}| {row[f'{k}_norm']:.3g} "
                         f"cos(dn,{k}) {row[f'cos_dn_{k}']:+.2f} cos({k},disp) {row[f'cos_{k}_disp']:+.2f}")
    return "  ".join(parts + [f"|disp| {row['disp_norm']:.3g}"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--method", default="ata_rs", help="a method that hooks RS and/or AA (ata_rs, apt); "
                    "set their lambdas to 0 with --set to follow +ATA's path")
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
    if not trainer.probe.active:
        raise SystemExit(f"method {args.method!r} hooks neither RS nor AA; use ata_rs or apt "
                         "(lambdas 0 to follow +ATA)")
    regs = trainer.config.regularizers
    lambdas = {"rs": regs.lambda_rs, "aa": regs.lambda_aa}
    draws = fixed_draws(len(run.dataset), tuple(run.dataset.examples[0].latent.shape), args.per_bin)
    attention = AttentionRecorder(trainer.probe) if trainer.probe.aa else None
    labels = caption_tokens(run) if attention else None
    start = _flat([p.detach() for p in trainer.lora.parameters()]).clone()
    rows = []
    try:
        for step in at:
            while trainer.step_idx < step:
                trainer.train_step()
            disp = _flat([p.detach() for p in trainer.lora.parameters()]) - start
            row = {"step": step, **summarise(gradient_parts(trainer, draws, attention), lambdas, disp, labels),
                   "gamma": trainer.indicator.gammas()}
            rows.append(row)
            print(_line(row), flush=True)
    finally:
        if attention is not None:
            attention.close()
        trainer.close()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"config": args.config, "method": args.method, "seed": args.seed, "overrides": over,
              "lambda_rs": regs.lambda_rs, "lambda_aa": regs.lambda_aa, "draws": len(draws), "rows": rows,
              "seconds": round(time.time() - t0, 1)}
    (out / "reg_gradient.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
