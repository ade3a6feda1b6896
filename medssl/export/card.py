"""The model card logged with every registered model: what the model is for, what it was trained on (counts,
never identifiers), the label budget behind it, its measured performance with intervals, how it compares with
the baselines, and its known limits. Plain Markdown, built from the model's spec and the ladder's numbers."""
from __future__ import annotations

import math

from medssl.export.spec import ModelSpec


def _number(value) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def _interval(metrics: dict, name: str) -> str:
    value = metrics.get(name)
    low, high = metrics.get(f"{name}_ci_low"), metrics.get(f"{name}_ci_high")
    if low is None or high is None:
        return _number(value)
    return f"{_number(value)} [{_number(low)}, {_number(high)}]"


def _metrics_table(sites: dict[str, dict]) -> list[str]:
    names = ["auroc", "balanced_accuracy", "sensitivity", "specificity", "auprc"]
    shown = [n for n in names if any(n in m for m in sites.values())]
    if not sites or not shown:
        return ["No evaluation was recorded with this model."]
    lines = ["| set | " + " | ".join(shown) + " |", "|---|" + "---|" * len(shown)]
    lines += [f"| {site} | " + " | ".join(_interval(m, n) for n in shown) + " |" for site, m in sites.items()]
    return lines


def _deltas_table(deltas: dict[str, dict]) -> list[str]:
    if not deltas:
        return ["No paired comparison was recorded with this model."]
    lines = ["| compared with | Δ AUROC [95% CI] | paired on |", "|---|---|---|"]
    for arm, d in deltas.items():
        lines.append(f"| {arm} | {d.get('delta', float('nan')):+.3f} [{_number(d.get('ci_low'))}, "
                     f"{_number(d.get('ci_high'))}] | {d.get('paired_on', 'the same test patients')} |")
    return lines


def model_card(spec: ModelSpec, *, data: dict | None = None, sites: dict[str, dict] | None = None,
               deltas: dict[str, dict] | None = None, limits: list[str] | None = None) -> str:
    """`data`: counts (e.g. {"pretraining images": 640, "test patients": 90}); `sites`: {"internal": metrics,
    "<external site>": metrics} with *_ci_low/_ci_high; `deltas`: {"scratch": {"delta", "ci_low", "ci_high"}}."""
    arch, labels, lineage, pre = spec.architecture, spec.labels, spec.lineage, spec.preprocess
    budget = (f"{lineage.labelled_patients} labelled patients" if lineage.labelled_patients is not None
              else "not recorded")
    shape = (f"{arch.input_dims}D input" if arch.features is not None
             else f"2D, every axial slice of a volume, {arch.slice_pooling}-pooled" if arch.slice_pooling
             else f"{arch.spatial_dims}D")
    lines = [f"# Model card: {labels.column} classifier ({arch.describe()}, {shape})", "",
             "## Intended use",
             f"Research use: classifying scans for `{labels.column}` ({', '.join(labels.names)})"
             + (f"; binary scores describe **{labels.positive}**" if labels.positive else "") + ". "
             "Not for clinical decisions until a reviewer has approved it for diagnostic evaluation.", "",
             "## Inputs and preprocessing",
             f"- modalities seen in training: {', '.join(spec.inputs.modalities) or 'not recorded'}; "
             f"scans of {', '.join(map(str, spec.inputs.image_dims)) or arch.spatial_dims}D",
             f"- RAS orientation, spacing {pre.spacing or 'native'} mm, size {pre.size or 'native'}, "
             f"modality-aware intensity normalisation (CT window {list(pre.ct_window)}, MR percentiles "
             f"{list(pre.mr_percentiles)}); the served model replays exactly this chain",
             (f"- operating point (binary): {spec.threshold:.3f}, chosen inside the rung's own labels"
              if spec.threshold is not None else "- calls: the most probable class (multi-class)"), "",
             "## Data (counts only; no identifiers)"]
    lines += [f"- {k}: {v}" for k, v in (data or {}).items()] or ["- not recorded"]
    lines += ["", "## Label budget",
              f"- rung `{lineage.rung or '—'}`, arm `{lineage.arm or '—'}`, seed {lineage.seed}, "
              f"protocol `{lineage.protocol or '—'}`: {budget}",
              f"- pretraining run `{lineage.pretrain_run_id or '—'}`, manifest digest `{lineage.manifest_digest or '—'}`",
              "", "## Performance (95% intervals)", *_metrics_table(sites or {}),
              "", "## Compared with the baselines (paired, same patients)", *_deltas_table(deltas or {}),
              "", "## Known limits",
              *[f"- {text}" for text in (limits or []) + [
                  "intervals from few test patients are wide; read the interval, not the point",
                  "scans unlike the training data (other modality, dimensionality, field of view or protocol) "
                  "are refused or may be scored poorly; validate on each new site first"]]]
    return "\n".join(lines) + "\n"
