"""The report's numbers: pooled intervals against a hand computation, paired deltas, a lone run's interval
is its own, files and the terminal table, failures listed and never averaged in."""
import itertools

import numpy as np
import pandas as pd
import pytest
from rich.console import Console

from medssl.evaluate.metrics import classification_metrics
from medssl.evaluate.report import build_report, summarise


def write_child(folder, key, patients, labels, scores, threshold=0.5) -> str:
    """A child's test predictions as the ladder writes them (evaluate.predict.write_evaluation)."""
    path = folder / f"{key.replace('/', '__')}.csv"
    pd.DataFrame({"image_id": patients, "label": labels, "patient_id": patients, "score": scores,
                  "predicted": (np.asarray(scores) >= threshold).astype(int)}).to_csv(path, index=False)
    return str(path)


def row(key, rung, arm, repeat, seed, predictions, n=4, **extra) -> dict:
    return {"key": key, "rung": rung, "protocol": "finetune", "arm": arm, "repeat": repeat, "seed": seed,
            "n_labelled": n, "status": "ok", "error": "", "predictions": predictions, **extra}


# two split repeats with 4 test patients each; per repeat two hand-picked resamples (patient codes, in the
# order of the prediction file): the whole set, and one with a patient drawn twice and one left out
REPEATS = {0: (["a", "b", "c", "d"], [0, 0, 1, 1], [[0, 1, 2, 3], [0, 2, 2, 3]]),
           1: (["e", "f", "g", "h"], [0, 1, 0, 1], [[0, 1, 2, 3], [1, 1, 2, 3]])}
SSL_SCORES = {(0, 0): [.1, .6, .4, .9], (0, 1): [.2, .3, .8, .1], (1, 0): [.3, .7, .5, .4], (1, 1): [.5, .5, .2, .9]}


def hand_ladder(tmp_path) -> tuple[pd.DataFrame, dict]:
    rows = []
    for (repeat, seed), scores in SSL_SCORES.items():
        patients, labels, _ = REPEATS[repeat]
        for arm, s in (("ssl", scores), ("scratch", [0.5] * 4)):
            key = f"r/rep{repeat}/seed{seed}/{arm}"
            rows.append(row(key, "per_class_2", arm, repeat, seed, write_child(tmp_path, key, patients, labels, s)))
    draws = {tuple(sorted(p)): np.array(d) for p, _, d in REPEATS.values()}
    return pd.DataFrame(rows), draws


def test_pooled_interval_and_paired_delta_by_hand(tmp_path):
    results, draws = hand_ladder(tmp_path)
    summary = summarise(results, n_boot=2, draws=draws).set_index("arm")
    # AUROC (positive-negative pairs won, ties half) on [whole set, second resample] of each run:
    # rep0 seed0: c>a, d>a, d>b of 4 pairs = .75; resample a, c, c, d: c and d beat a = 1
    # rep0 seed1: c beats a and b = .5; resample: c (twice) beats a, d does not = 2/3
    # rep1 seed0: f>e, f>g, h>e = .75; resample f, f, g, h: f beats g twice, h does not = 2/3
    # rep1 seed1: f ties e (.5), f>g, h>e, h>g = .875; resample: f, f and h all beat g = 1
    ssl = summary.loc["ssl"]
    pooled = sorted([.75, 1, .5, 2 / 3, .75, 2 / 3, .875, 1])
    # numpy's linear percentile over 8 pooled values: rank 0.025 * 7 = .175 and 0.975 * 7 = 6.825
    assert ssl["auroc"] == pytest.approx((.75 + .5 + .75 + .875) / 4)
    assert ssl["auroc_ci_low"] == pytest.approx(pooled[0] + .175 * (pooled[1] - pooled[0]))
    assert ssl["auroc_ci_high"] == pytest.approx(1.0)
    assert (ssl["runs"], ssl["seeds"], ssl["repeats"], ssl["replicates"]) == (4, 2, 2, 8)
    # scratch scores every patient .5: AUROC .5 on every resample, so SSL - scratch = SSL - .5 per resample
    assert summary.loc["scratch", "auroc_ci_low"] == summary.loc["scratch", "auroc_ci_high"] == 0.5
    assert ssl["delta_auroc_vs_scratch"] == pytest.approx(ssl["auroc"] - 0.5)
    assert ssl["delta_auroc_vs_scratch_ci_low"] == pytest.approx(0 + .175 * (1 / 6))
    assert ssl["delta_auroc_vs_scratch_ci_high"] == pytest.approx(0.5)
    assert ssl["pairs_vs_scratch"] == 4
    # balanced accuracy at .5 (rep0 seed0 calls b, d: 1/2 of negatives right, 1/2 of positives) pools likewise
    assert 0 <= ssl["balanced_accuracy_ci_low"] <= ssl["balanced_accuracy"] <= ssl["balanced_accuracy_ci_high"]


def test_a_lone_run_keeps_its_own_interval(tmp_path):
    rng = np.random.default_rng(1)
    patients = [f"p{i // 2}" for i in range(40)]
    labels = np.array([i // 2 % 2 for i in range(40)])
    scores = np.clip(0.35 * labels + rng.random(40) * 0.65, 0, 1)
    path = write_child(tmp_path, "one", [f"i{i}" for i in range(40)], labels, scores)
    frame = pd.read_csv(path).assign(patient_id=patients)
    frame.to_csv(path, index=False)
    results = pd.DataFrame([row("one", "r", "ssl", 0, 3, path, bootstrap_seed=3, bootstrap_n=50)])
    own = classification_metrics(labels, scores, 0.5, groups=patients, n_boot=50, seed=3)
    summary = summarise(results, n_boot=50).iloc[0]
    for name in ("auroc", "auprc", "balanced_accuracy", "sensitivity", "specificity", "f1"):
        assert summary[name] == pytest.approx(own[name])
        assert (summary[f"{name}_ci_low"], summary[f"{name}_ci_high"]) == pytest.approx(
            (own[f"{name}_ci_low"], own[f"{name}_ci_high"])), name


def fake_ladder(tmp_path) -> pd.DataFrame:
    """2 rungs x 2 repeats x 2 seeds x arms {ssl, scratch, features}, random binary predictions, + a failure."""
    rng = np.random.default_rng(0)
    rows = []
    for (rung, n), repeat, seed, arm in itertools.product([("per_class_5", 5), ("per_class_25", 25)], [0, 1],
                                                         [0, 1], ["ssl", "scratch", "features"]):
        patients = [f"rep{repeat}-p{i}" for i in range(30)]
        labels = np.arange(30) % 2
        lift = {"ssl": 0.4, "scratch": 0.0, "features": 0.1}[arm]
        scores = np.clip(lift * labels + rng.random(30) * (1 - lift), 0, 1)
        key = f"{rung}/rep{repeat}/seed{seed}/{arm}"
        rows.append(row(key, rung, arm, repeat, seed, write_child(tmp_path, key, patients, labels, scores), 4 * n,
                        ece=rng.random(), auroc_ci_low=0.0, auroc_ci_high=1.0,  # per-run limits: never averaged
                        n_labelled_patients=2 * n, n_patients_used=2 * n + (9 if n == 5 else 0),
                        labels_note="uses 9 extra validation labels" if n == 5 else "", positive_class="bleed"))
    rows.append({"key": "per_class_50/rep0/seed0/finetune/ssl", "rung": "per_class_50", "seed": 0,
                 "protocol": "finetune", "arm": "ssl", "n_labelled": 50, "status": "failed",
                 "error": "the training subset lacks class 1"})
    return pd.DataFrame(rows)


def test_report_files_table_and_verdict(tmp_path):
    results = fake_ladder(tmp_path)
    results.to_csv(tmp_path / "results.csv", index=False)
    results = pd.read_csv(tmp_path / "results.csv")  # as the pipeline reads it back
    console = Console(record=True, width=300)  # wide enough that no verdict line wraps
    paths = build_report(results, tmp_path / "report", console=console, n_boot=200)
    for name in ("summary_csv", "table_md", "table_html", "curve_png", "verdict_md"):
        assert paths[name].is_file() and paths[name].stat().st_size > 0
    assert paths["curve_png"].read_bytes()[:4] == b"\x89PNG"
    summary = pd.read_csv(paths["summary_csv"])
    assert len(summary) == 6 and set(summary["runs"]) == {4} and "per_class_50" not in summary["rung"].tolist()
    ok = results[results["status"] == "ok"]
    for _, got in summary.iterrows():
        part = ok[(ok["rung"] == got["rung"]) & (ok["arm"] == got["arm"])]
        assert got["ece"] == pytest.approx(part["ece"].mean())  # a point-only metric: the mean of the runs
        assert (got["auroc_ci_low"], got["auroc_ci_high"]) != (0.0, 1.0)  # pooled, not averaged limits
        assert got["auroc_ci_low"] < got["auroc"] < got["auroc_ci_high"]
    ssl = summary[(summary["arm"] == "ssl") & (summary["rung"] == "per_class_25")].iloc[0]
    assert ssl["delta_auroc_vs_scratch_ci_low"] > 0  # lift .4 vs none on 30 patients x 4 runs
    md, page, text = paths["table_md"].read_text(), paths["table_html"].read_text(), console.export_text()
    auroc_cell = f"{ssl['auroc']:.3f} [{ssl['auroc_ci_low']:.3f}, {ssl['auroc_ci_high']:.3f}]"
    assert auroc_cell in md and auroc_cell in page
    assert f"{ssl['auroc']:.3f}" in text and f"[{ssl['auroc_ci_low']:.3f}, {ssl['auroc_ci_high']:.3f}]" in text
    verdict = paths["verdict_md"].read_text()
    assert f"internal · per_class_25 · finetune: SSL beats scratch" in verdict and verdict.splitlines()[0] in text
    assert verdict.splitlines()[0].endswith("[uses 9 extra validation labels]")  # validation: split is named
    assert "| 10 labelled patients |" in md and "| 19 |" in md  # the budget, and every labelled patient used
    assert "positive class: bleed." in md and "positive class: bleed." in page
    assert f"{ssl['delta_auroc_vs_scratch']:+.2f} AUROC [{ssl['delta_auroc_vs_scratch_ci_low']:.2f}" in verdict
    assert "per_class_50/rep0/seed0/finetune/ssl" in md and "lacks class 1" in page  # failures reported


def test_old_results_name_the_frozen_random_linear_arm_and_missing_predictions_give_no_interval(tmp_path):
    rows = [{"key": f"r/seed0/{p}/{i}", "rung": "r", "seed": 0, "protocol": p, "init": i, "n_labelled": 10,
             "status": "ok", "auroc": 0.6, "auroc_ci_low": 0.4, "auroc_ci_high": 0.8}
            for p in ("linear", "finetune") for i in ("scratch", "ssl")]
    summary = summarise(pd.DataFrame(rows))
    assert set(zip(summary["protocol"], summary["arm"])) == {("linear", "random_features"), ("linear", "ssl"),
                                                            ("finetune", "scratch"), ("finetune", "ssl")}
    assert summary["auroc_ci_low"].isna().all() if "auroc_ci_low" in summary else True
    assert (summary["ci_method"] == "no predictions on disk: no interval").all()


def test_summary_of_only_failures_is_empty_but_report_still_written(tmp_path):
    results = fake_ladder(tmp_path).tail(1)
    assert summarise(results).empty
    paths = build_report(results, tmp_path, console=Console(file=open(tmp_path / "out.txt", "w")))
    assert "lacks class 1" in paths["table_md"].read_text() and "curve_png" not in paths
