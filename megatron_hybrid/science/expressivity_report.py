"""The expressivity grid's outputs: ``expressivity.json`` (every cell + mean/std/min/max over
seeds per task, architecture and length), ``expressivity.md`` (one table per task, with the
no-lookup shortcut where a task has one) and ``expressivity.png`` (accuracy vs test length per
architecture, one panel per task)."""

from __future__ import annotations

import dataclasses
import json
import math
import os

import numpy as np

from megatron_hybrid.science.architectures import architectures
from megatron_hybrid.science.grid_config import GridConfig, TaskSpec


def summarise(results: list[dict]) -> dict:
    """task -> arch -> length -> metric -> {mean, std, min, max, n} over seeds."""
    groups: dict = {}
    for r in results:
        for length, m in r["metrics"].items():
            for metric, v in m.items():
                if not metric.startswith(("accuracy", "seq_accuracy")) or v is None:
                    continue
                groups.setdefault(r["task"], {}).setdefault(r["arch"], {}).setdefault(
                    length, {}
                ).setdefault(metric, []).append(v)
    out: dict = {}
    for task, by_arch in groups.items():
        for arch, by_len in by_arch.items():
            for length, by_metric in by_len.items():
                for metric, vals in by_metric.items():
                    a = np.asarray(vals, dtype=float)
                    out.setdefault(task, {}).setdefault(arch, {}).setdefault(length, {})[metric] = {
                        "mean": float(a.mean()),
                        "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0,
                        "min": float(a.min()),
                        "max": float(a.max()),
                        "n": len(a),
                    }
    return out


def headline_metric(task: str) -> str:
    """What the plot shows per task (a generator name): state recall on examples where the
    pointer moved (recall alone cannot answer those), elsewhere accuracy over all answers."""
    return "accuracy_moved" if task == "state_recall" else "accuracy"


def shortcut_accuracy(spec: TaskSpec) -> float | None:
    """Accuracy of the best answer that needs no lookup at all, where a task has one worth
    drawing: state recall answered with the majority bit of the whole memory (ties: a coin).
    Exact, from the binomial distribution of the m bits; the same on moved examples. A model at
    this line has learned a statistic of the context, not the pointer."""
    if spec.task != "state_recall":
        return None
    m = dict(spec.options).get("state_recall_bits", 16)
    return sum(math.comb(m, k) * max(k, m - k) for k in range(m + 1)) / (m * 2**m)


def write_outputs(grid: GridConfig, results: list[dict], out: str, pending: int = 0) -> dict:
    summary = summarise(results)
    archs = architectures(grid.shape.depth)
    doc = {
        "grid": {
            "tasks": {k: dataclasses.asdict(v) for k, v in grid.tasks.items()},
            "archs": grid.archs,
            "seeds": grid.seeds,
            "shape": dataclasses.asdict(grid.shape),
            "train_iters": grid.train_iters,
            "global_batch_size": grid.global_batch_size,
            "lr": grid.lr,
            "eval_examples": grid.eval_examples,
        },
        "pending": pending,
        "params": {r["arch"]: r["params"] for r in results},
        "summary": summary,
        "cells": results,
    }
    with open(os.path.join(out, "expressivity.json"), "w") as f:
        json.dump(doc, f, indent=1)
    lines = [
        "# Expressivity suite",
        "",
        *([f"**Incomplete: {pending} cells not run yet.**", ""] if pending else []),
        f"{len(grid.seeds)} seeds per cell; mean ± std (min–max) over seeds. {grid.train_iters} "
        f"steps x {grid.global_batch_size} examples, lr {grid.lr}; {grid.eval_examples} test "
        "examples per length. Parameters: "
        + ", ".join(f"{a} {p:,}" for a, p in doc["params"].items()),
        "",
    ]
    for task, spec in grid.tasks.items():
        metrics = ["accuracy"] + (["accuracy_moved"] if spec.task == "state_recall" else [])
        for metric in metrics:
            lines += [
                f"## {task}: {metric.replace('_', ' ')} (trained on lengths "
                f"{spec.train_min_length}..{spec.train_length})",
                "",
                "| architecture | " + " | ".join(f"len {n}" for n in spec.eval_lengths) + " |",
                "|---|" + "---|" * len(spec.eval_lengths),
            ]
            for arch in grid.archs:
                row = summary.get(task, {}).get(arch, {})
                cells = []
                for n in spec.eval_lengths:
                    s = row.get(str(n), {}).get(metric)
                    cells.append(
                        f"{s['mean']:.3f} ± {s['std']:.3f} ({s['min']:.2f}–{s['max']:.2f})"
                        if s
                        else "–"
                    )
                lines.append(f"| {archs[arch].label} | " + " | ".join(cells) + " |")
            shortcut = shortcut_accuracy(spec)
            if shortcut is not None:
                lines += ["", f"No-lookup shortcut (the memory's majority bit): {shortcut:.3f}."]
            lines.append("")
    with open(os.path.join(out, "expressivity.md"), "w") as f:
        f.write("\n".join(lines))
    plot(grid, summary, os.path.join(out, "expressivity.png"))
    return doc


def plot(grid: GridConfig, summary: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    archs = architectures(grid.shape.depth)
    tasks = list(grid.tasks)
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        spec = grid.tasks[task]
        metric = headline_metric(spec.task)
        for arch in grid.archs:
            xs, mean, lo, hi = [], [], [], []
            for n in spec.eval_lengths:
                s = summary.get(task, {}).get(arch, {}).get(str(n), {}).get(metric)
                if s:
                    xs.append(n)
                    mean.append(s["mean"])
                    lo.append(s["min"])
                    hi.append(s["max"])
            if xs:
                (line,) = ax.plot(xs, mean, marker="o", label=archs[arch].label)
                ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.15)
        ax.axvline(spec.train_length, color="grey", ls=":", lw=1)
        shortcut = shortcut_accuracy(spec)
        if shortcut is not None:
            ax.axhline(shortcut, color="black", ls="--", lw=1, label="majority-bit shortcut")
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(spec.eval_lengths), [str(n) for n in spec.eval_lengths])
        ax.minorticks_off()
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("test length (dotted: longest trained)")
        title = task + (" (a moved)" if metric == "accuracy_moved" else "")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"accuracy (mean of {len(grid.seeds)} seeds, band min–max)")
    for ax in axes[0]:  # the architectures' legend once; a panel's own lines in that panel
        handles, labels = ax.get_legend_handles_labels()
        keep = [
            (h, lab) for h, lab in zip(handles, labels)
            if ax is axes[0][-1] or lab not in {a.label for a in archs.values()}
        ]  # fmt: skip
        if keep:
            ax.legend(*zip(*keep), fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
