"""The segmentation ladder's report: per-rung Dice of SSL and scratch pooled over seeds with patient-bootstrap
intervals, the paired SSL - scratch difference, the label-efficiency curve in Dice, and prediction overlays.

Pooling: a patient's Dice at one (rung, arm) is its mean over the rung's seeds (each seed = another draw of
labelled patients and another initialisation); the interval resamples test patients of those means, so it
covers test-patient variance with the seed variance averaged in, and is labelled so. The paired difference is
taken per patient (SSL - scratch on the same patient and seed) before the same resampling.
Figures use matplotlib's Figure with the Agg canvas, never pyplot (no global state; headless servers).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from medssl.evaluate.seg_metrics import patient_interval
from medssl.ingest.csv_safe import write_csv

COLOURS = {"ssl": "tab:blue", "scratch": "tab:orange"}


def pooled_summary(scores: pd.DataFrame, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """scores: rows (rung, n_labelled, seed, init, patient_id, image_id, class, dice, ...) of every child ->
    one row per (rung, init) with mean Dice [low, high] and, on SSL rows, delta_dice [low, high]."""
    per_patient = (scores.groupby(["rung", "init", "seed", "patient_id"])["dice"].mean()
                   .groupby(level=["rung", "init", "patient_id"]).mean())
    rows = []
    for (rung, init), values in per_patient.groupby(level=["rung", "init"]):
        values = values.droplevel(["rung", "init"]).dropna()   # patients with no structure to score
        low, high = patient_interval(values.to_numpy(), values.index, n_boot, seed, 0.05)
        part = scores[(scores["rung"] == rung) & (scores["init"] == init)]
        rows.append({"rung": rung, "init": init, "n_labelled": int(part["n_labelled"].median()),
                     "seeds": int(part["seed"].nunique()), "test_patients": len(values),
                     "dice": float(values.mean()), "dice_low": low, "dice_high": high})
    out = pd.DataFrame(rows)
    deltas = []
    for rung in out["rung"].unique() if len(out) else []:
        if {"ssl", "scratch"} <= set(out.loc[out["rung"] == rung, "init"]):
            a, b = per_patient.loc[(rung, "ssl")], per_patient.loc[(rung, "scratch")]
            diff = (a - b.reindex(a.index)).dropna()
            low, high = patient_interval(diff.to_numpy(), diff.index, n_boot, seed, 0.05)
            deltas.append({"rung": rung, "init": "ssl", "delta_dice": float(diff.mean()),
                           "delta_dice_low": low, "delta_dice_high": high})
    if deltas:
        out = out.merge(pd.DataFrame(deltas), on=["rung", "init"], how="left")
    return out.sort_values(["n_labelled", "init"]).reset_index(drop=True)


def dice_curve(summary: pd.DataFrame, title: str = "label efficiency (Dice)") -> Figure:
    """Mean test Dice against labelled volumes per rung, SSL vs scratch, with the pooled intervals."""
    fig = Figure(figsize=(5.2, 4.0))
    ax = fig.add_subplot()
    for init, part in summary.groupby("init"):
        part = part.sort_values("n_labelled")
        err = np.vstack([part["dice"] - part["dice_low"], part["dice_high"] - part["dice"]])
        ax.errorbar(part["n_labelled"], part["dice"], yerr=np.nan_to_num(err), marker="o", capsize=3,
                    label=f"{init} init", color=COLOURS.get(init))
    ax.set(xlabel="labelled training volumes (rung)", ylabel="test Dice (mean over patients)", title=title,
           ylim=(0, 1))
    ax.set_xscale("log")
    ticks = sorted(summary["n_labelled"].unique())
    ax.set_xticks(ticks, [str(int(t)) for t in ticks])
    ax.minorticks_off()
    ax.legend(fontsize=8)
    fig.text(0.01, 0.01, "bars: 95% patient bootstrap of seed-averaged Dice", fontsize=6, color="grey")
    fig.tight_layout()
    return fig


def overlay_figure(image: np.ndarray, truth: np.ndarray, pred: np.ndarray, n_slices: int, title: str) -> Figure:
    """image (C, *spatial), truth / pred (*spatial) labels: contours of truth (green) and prediction (red)
    on `n_slices` axial slices through the structure (a 2D image is its own single slice)."""
    image = np.asarray(image[0], np.float32)
    if image.ndim == 2:
        image, truth, pred, picks = image[..., None], truth[..., None], pred[..., None], [0]
    else:
        weight = (truth > 0).sum(axis=(0, 1)) + (pred > 0).sum(axis=(0, 1))
        idx = np.flatnonzero(weight) if weight.any() else np.arange(image.shape[2])
        picks = sorted({int(i) for i in np.quantile(idx, np.linspace(0.2, 0.8, max(1, n_slices))).round()})
    fig = Figure(figsize=(3.0 * len(picks), 3.2))
    for n, k in enumerate(picks):
        ax = fig.add_subplot(1, len(picks), n + 1)
        ax.imshow(image[:, :, k].T, cmap="gray", origin="lower")   # RAS: x to the right, y (anterior) up
        for labels, colour in ((truth, "lime"), (pred, "red")):
            if (labels[:, :, k] > 0).any():
                ax.contour((labels[:, :, k] > 0).T.astype(float), levels=[0.5], colors=colour, linewidths=0.8)
        ax.set_axis_off()
        ax.set_title(f"slice {k}", fontsize=7)
    fig.suptitle(f"{title}  (green: truth, red: prediction)", fontsize=8)
    fig.tight_layout()
    return fig


def write_report(summary: pd.DataFrame, out_dir: Path) -> dict[str, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table, curve = out_dir / "seg_summary.csv", out_dir / "dice_curve.png"
    write_csv(summary, table)
    dice_curve(summary).savefig(curve, dpi=120)
    return {"table": table, "curve": curve}


def render_table(summary: pd.DataFrame) -> str:
    lines = ["rung            init     vols  test pts  Dice [95% CI]          SSL - scratch [95% CI]"]
    for _, r in summary.iterrows():
        delta = (f"{r['delta_dice']:+.3f} [{r['delta_dice_low']:+.3f}, {r['delta_dice_high']:+.3f}]"
                 if "delta_dice" in r and pd.notna(r.get("delta_dice")) else "")
        lines.append(f"{r['rung']:<15} {r['init']:<8} {r['n_labelled']:>4}  {r['test_patients']:>8}  "
                     f"{r['dice']:.3f} [{r['dice_low']:.3f}, {r['dice_high']:.3f}]   {delta}")
    return "\n".join(lines)
