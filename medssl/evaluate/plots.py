"""Figures for one evaluated model (ROC, precision-recall, confusion matrix) and for the whole ladder.

Figures are built on `matplotlib.figure.Figure` with the Agg canvas, never pyplot: no global state, no
display needed, safe in worker threads and on headless servers.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from sklearn import metrics as skm

ARM_COLOURS = {"ssl": "tab:blue", "scratch": "tab:orange", "features": "tab:green", "random_features": "tab:grey"}
ARM_NAMES = {"ssl": "SSL init", "scratch": "scratch", "features": "engineered features",
             "random_features": "random features (frozen random encoder)"}


def roc_figure(y_true, score, title: str = "") -> Figure:
    """Binary: one ROC curve; multi-class (score (N, K)): one-vs-rest curve per class."""
    fig = Figure(figsize=(4.5, 4.2))
    ax = fig.add_subplot()
    for name, y, s in _one_vs_rest(y_true, score):
        fpr, tpr, _ = skm.roc_curve(y, s)
        ax.plot(fpr, tpr, label=f"{name} AUROC {skm.auc(fpr, tpr):.3f}")
    ax.plot([0, 1], [0, 1], ls=":", c="grey", lw=1)
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title=title or "ROC", xlim=(0, 1), ylim=(0, 1.02))
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig


def pr_figure(y_true, score, title: str = "") -> Figure:
    fig = Figure(figsize=(4.5, 4.2))
    ax = fig.add_subplot()
    for name, y, s in _one_vs_rest(y_true, score):
        precision, recall, _ = skm.precision_recall_curve(y, s)
        ax.step(recall, precision, where="post", label=f"{name} AP {skm.average_precision_score(y, s):.3f}")
        ax.axhline(np.mean(y), ls=":", c="grey", lw=1)  # a chance-level classifier's precision
    ax.set(xlabel="recall (sensitivity)", ylabel="precision", title=title or "Precision-recall",
           xlim=(0, 1), ylim=(0, 1.02))
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    return fig


def confusion_figure(cm: np.ndarray, class_names: list[str] | None = None, title: str = "") -> Figure:
    k = cm.shape[0]
    names = class_names or [str(i) for i in range(k)]
    fig = Figure(figsize=(1.2 * k + 2.2, 1.2 * k + 1.6))
    ax = fig.add_subplot()
    ax.imshow(cm, cmap="Blues")
    for t in range(k):
        for p in range(k):
            colour = "white" if cm[t, p] > cm.max() / 2 else "black"
            ax.text(p, t, str(int(cm[t, p])), ha="center", va="center", color=colour)
    ax.set(xticks=range(k), yticks=range(k), xticklabels=names, yticklabels=names,
           xlabel="predicted", ylabel="true", title=title or "Confusion matrix (test)")
    fig.tight_layout()
    return fig


def label_efficiency_figure(summary: pd.DataFrame, metric: str = "auroc", x: str = "n_labelled") -> Figure:
    """One panel per (site, protocol): metric vs labelled budget per arm, bands = pooled 95% intervals.

    `summary` rows: site, protocol, arm, <x> (the budget), <metric>, <metric>_ci_low, <metric>_ci_high. Arms that
    have no protocol of their own (protocol "-", e.g. engineered features) appear in every panel of their site.
    """
    summary = summary if "site" in summary else summary.assign(site="internal")
    panels = [(s, p) for s, p in dict.fromkeys(zip(summary["site"], summary["protocol"])) if p != "-"]
    panels = panels or list(dict.fromkeys(zip(summary["site"], summary["protocol"])))
    fig = Figure(figsize=(5 * max(len(panels), 1), 4.2))
    for i, (site, protocol) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        here = summary[(summary["site"] == site) & summary["protocol"].isin([protocol, "-"])]
        for arm, part in here.groupby("arm", sort=False):
            part = part.sort_values(x)
            colour = ARM_COLOURS.get(arm)
            ax.plot(part[x], part[metric], marker="o", color=colour, label=ARM_NAMES.get(arm, arm))
            if f"{metric}_ci_low" in part:
                ax.fill_between(part[x], part[f"{metric}_ci_low"], part[f"{metric}_ci_high"],
                                color=colour, alpha=0.15, lw=0)
        ax.set_xscale("log")
        ticks = sorted(here[x].dropna().unique())
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])  # the rungs themselves, not powers of ten
        ax.minorticks_off()
        unit = here["budget_unit"].iloc[0] if "budget_unit" in here and len(here) else "labelled (rung budget)"
        ax.set(xlabel=str(unit), ylabel=f"test {metric.upper()}",
               title=protocol if site == "internal" else f"{site}: {protocol}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def save(fig: Figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def _one_vs_rest(y_true, score):
    y_true, score = np.asarray(y_true, int), np.asarray(score, float)
    if score.ndim == 1:
        return [("", y_true, score)]
    return [(f"class {k}", (y_true == k).astype(int), score[:, k]) for k in range(score.shape[1])]
