"""The scaling ladder's outputs from its finished rungs: the power-law fit per architecture,
the compute multiplier (fitted, with a bootstrap interval, and read off the measured rungs
without a fit), ``scaling_ladder.json``, ``.md`` and ``.png``."""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict
from typing import TYPE_CHECKING

from megatron_hybrid.science.fit import bootstrap_multiplier, compute_multiplier, fit_power_law

if TYPE_CHECKING:
    from megatron_hybrid.science.ladder import LadderConfig

ARCH_LABELS = {"transformer": "transformer (*-)", "hybrid": "3:1 hybrid GGG* β∈(0,2)"}


def report(cfg: LadderConfig, plans: list[dict], out: str, bootstrap: int = 1000) -> dict:
    """Fit, multiplier, tables and plot from the finished rungs (whatever is there)."""
    done = {}
    for p in plans:
        path = os.path.join(out, "rungs", p["name"] + ".json")
        if os.path.isfile(path):
            with open(path) as f:
                done[p["name"]] = json.load(f)
    fits, points = {}, {}
    for arch in cfg.archs:
        rs = sorted((r for r in done.values() if r["arch"] == arch), key=lambda r: r["flops"])
        points[arch] = ([r["flops"] for r in rs], [r["val_loss"] for r in rs])
        if len(rs) >= 2:
            fits[arch] = fit_power_law(*points[arch])
    multiplier = None
    if {"transformer", "hybrid"} <= set(fits):
        at = min(max(points["transformer"][0]), max(points["hybrid"][0]))
        multiplier = bootstrap_multiplier(
            points["transformer"], points["hybrid"], at, n=bootstrap, seed=cfg.seed
        )
    by_rung = []
    if multiplier:
        for c, loss in zip(*points["transformer"]):
            by_rung.append(
                {
                    "compute": c,
                    "loss": loss,
                    "fitted": compute_multiplier(fits["transformer"], fits["hybrid"], c),
                    "measured": _interpolated_multiplier(c, loss, *points["hybrid"]),
                }
            )
    doc = {
        "config": asdict(cfg),
        "rungs": [done.get(p["name"], {**p, "val_loss": None}) for p in plans],
        "pending": [p["name"] for p in plans if p["name"] not in done],
        "fits": {k: asdict(v) for k, v in fits.items()},
        "compute_multiplier": multiplier,
        "multiplier_by_rung": by_rung,
    }
    with open(os.path.join(out, "scaling_ladder.json"), "w") as f:
        json.dump(doc, f, indent=1)
    with open(os.path.join(out, "scaling_ladder.md"), "w") as f:
        f.write(markdown(doc))
    if fits:
        plot(doc, os.path.join(out, "scaling_ladder.png"))
    return doc


def _interpolated_multiplier(c: float, loss: float, h_compute, h_loss) -> float | None:
    """C / the hybrid compute that reaches ``loss``, read off the hybrid's measured rungs
    (piecewise linear in log C; no fit). None when ``loss`` is outside their range."""
    pts = sorted(zip(h_compute, h_loss))
    for (c0, l0), (c1, l1) in zip(pts, pts[1:]):
        if min(l0, l1) <= loss <= max(l0, l1) and l0 != l1:
            t = (loss - l0) / (l1 - l0)
            return c / math.exp(math.log(c0) + t * (math.log(c1) - math.log(c0)))
    return None


def markdown(doc: dict) -> str:
    c = doc["config"]
    lines = [
        "# Scaling ladder",
        "",
        f"{c['tokens_per_param']:g} tokens per parameter, seq {c['seq_length']}, batch "
        f"{c['global_batch_size']}; validation loss after training; FLOPs = our model's "
        "training FLOPs/token x tokens.",
        "",
    ]
    if doc["pending"]:
        lines += [f"**Incomplete: {len(doc['pending'])} rungs pending: {', '.join(doc['pending'])}.**", ""]  # fmt: skip
    lines += [
        "| rung | pattern | params | non-emb params | tokens | steps | FLOPs | val loss |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in doc["rungs"]:
        val = f"{r['val_loss']:.4f}" if r.get("val_loss") is not None else "pending"
        lines.append(
            f"| {r['name']} | `{r['pattern']}` | {r['params'] / 1e6:.2f} M | "
            f"{r['params_non_embedding'] / 1e6:.2f} M | {r['tokens']:,} | "
            f"{r['train_iters']} | {r['flops']:.3e} | {val} |"
        )
    lines += ["", "## Fits L(C) = a·C^-b + e", ""]
    for arch, f in doc["fits"].items():
        note = "" if f["params"] == 3 else " (e fixed at 0: fewer than 3 rungs)"
        lines.append(f"- {arch}: a = {f['a']:.4g}, b = {f['b']:.4f}, e = {f['e']:.4f}{note}")
    m = doc["compute_multiplier"]
    if m and m["low"] is not None:
        lines += [
            "",
            f"**Compute multiplier** (transformer compute / hybrid compute at equal loss, at "
            f"C = {m['at_compute']:.3e}): **{m['multiplier']:.3f}**, "
            f"{100 * m['level']:.0f}% bootstrap interval [{m['low']:.3f}, {m['high']:.3f}] "
            f"({m['draws']} residual-bootstrap draws). > 1 means the hybrid is cheaper: it "
            f"needs {1 / m['multiplier'] if m['multiplier'] else float('inf'):.2f}x the "
            "transformer's compute for the same loss (the paper: 35% fewer tokens for "
            "Common Crawl loss parity, i.e. about 1.54).",
        ]
        if any(f["params"] == 2 for f in doc["fits"].values()):
            lines.append("(Two-point fits leave no residuals: the interval is degenerate.)")
        exact = [a for a, f in doc["fits"].items() if f["params"] == 3 and _n_points(doc, a) == 3]
        if exact:
            lines.append(
                f"({', '.join(exact)}: 3 rungs for 3 parameters, the curve passes through every "
                "point, so the interval holds only the other architecture's residuals.)"
            )
    if doc.get("multiplier_by_rung"):
        lines += [
            "",
            "Multiplier at each transformer rung (its compute and loss): from the fits, and read "
            "off the hybrid's measured rungs without a fit (log-linear between neighbours; "
            "- where the loss lies outside them).",
            "",
            "| transformer FLOPs | its loss | fitted | measured |",
            "|---|---|---|---|",
        ]
        for r in doc["multiplier_by_rung"]:
            meas = f"{r['measured']:.2f}" if r["measured"] is not None else "-"
            lines.append(f"| {r['compute']:.3e} | {r['loss']:.4f} | {r['fitted']:.2f} | {meas} |")
    return "\n".join(lines) + "\n"


def _n_points(doc: dict, arch: str) -> int:
    return sum(1 for r in doc["rungs"] if r["arch"] == arch and r.get("val_loss") is not None)


def plot(doc: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from megatron_hybrid.science.fit import PowerLaw

    fig, ax = plt.subplots(figsize=(6, 4.2))
    for arch, f in doc["fits"].items():
        rs = [r for r in doc["rungs"] if r["arch"] == arch and r.get("val_loss") is not None]
        cs = np.array([r["flops"] for r in rs])
        (pts,) = ax.plot(cs, [r["val_loss"] for r in rs], "o", label=ARCH_LABELS.get(arch, arch))
        law = PowerLaw(**f)
        grid = np.geomspace(cs.min() / 1.5, cs.max() * 1.5, 100)
        ax.plot(grid, law(grid), "-", color=pts.get_color(), alpha=0.7)
    m = doc["compute_multiplier"]
    if m and m["low"] is not None:
        ax.set_title(
            f"compute multiplier {m['multiplier']:.2f} [{m['low']:.2f}, {m['high']:.2f}]",
            fontsize=10,
        )
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel("validation loss")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
