"""External sites: labels matched to training by name (a mismatch names both sides), every kept model scored
on the site's images, runs without a model listed, and the site's rows beside the internal ones."""
import numpy as np
import pandas as pd
import pytest
import torch

from medssl.config import EncoderConfig
from medssl.errors import DataError
from medssl.evaluate.external import model_source, score_site, training_codes
from medssl.evaluate.predict import save_classifier, score_dataset
from medssl.evaluate.report import summarise
from medssl.models.classifier import Classifier
from medssl.models.encoders import build_encoder
from medssl.train.loaders import ImageDataset
from test_ladder import EDGE, cohort  # noqa: E402 - the ladder tests' tiny cohort

TRAINING = {0: "bleed", 1: "normal"}


def test_site_labels_are_matched_by_name_and_a_mismatch_lists_both():
    df = pd.DataFrame({"image_id": ["a", "b", "c"], "label": [0, 1, pd.NA]})
    flipped = {"label_names": {"label": {0: "normal", 1: "bleed"}}}  # the site's own alphabet differs
    assert training_codes(df, flipped, "label", TRAINING, "siteB").tolist() == [1, 0, pd.NA]
    other = {"label_names": {"label": {0: "haemorrhage", 1: "normal"}}}
    with pytest.raises(DataError, match=r"site \['haemorrhage', 'normal'\], training \['bleed', 'normal'\]"):
        training_codes(df, other, "label", TRAINING, "siteB")


def _kept_model(folder, seed: int) -> str:
    cfg = EncoderConfig(name="vit", patch_size=8, hidden_size=16, num_layers=1, num_heads=2, mlp_dim=16)
    torch.manual_seed(seed)
    model = Classifier(build_encoder(cfg, 2, [EDGE, EDGE]), 2, threshold=0.4, spatial_dims=2)
    folder.mkdir(parents=True)
    (folder / "predictions.csv").write_text("image_id\n")  # the internal file; only its folder matters here
    save_classifier(folder / "model.pt", model, {"encoder": cfg.model_dump(), "spatial_dims": 2,
                                                 "img_size": [EDGE, EDGE]})
    return str(folder / "predictions.csv")


def test_every_kept_model_is_scored_and_the_site_sits_beside_the_internal_rows(tmp_path):
    cache, df = cohort(2, n_patients=12, seed=1)  # the external site: other images, other patients
    codes = df["label"].astype("Int64")
    rows = []
    for repeat, seed in ((0, 0), (0, 1)):
        for arm in ("ssl", "scratch"):
            key = f"r{repeat}/per_class_2/seed{seed}/{arm}/finetune"
            path = _kept_model(tmp_path / "ladder" / key.replace("/", "__"), 10 * seed + (arm == "ssl"))
            rows.append({"key": key, "rung": "per_class_2", "repeat": repeat, "seed": seed, "arm": arm,
                         "protocol": "finetune", "status": "ok", "predictions": path, "n_labelled": 4})
    rows.append({"key": "r0/per_class_2/seed0/features/linear", "rung": "per_class_2", "repeat": 0, "seed": 0,
                 "arm": "features", "protocol": "linear", "status": "ok", "predictions": "", "n_labelled": 4})
    results = pd.DataFrame(rows)
    scored = score_site("siteB", results, cache, df, codes, tmp_path / "siteB")
    assert (tmp_path / "siteB" / "scores.csv").is_file()
    kept = scored.set_index("key")
    assert kept.loc["r0/per_class_2/seed0/features/linear", "status"] == "not scored"
    assert "no model kept" in kept.loc["r0/per_class_2/seed0/features/linear", "error"]
    first = kept.loc["r0/per_class_2/seed1/ssl/finetune"]
    assert first["status"] == "ok" and first["n_external_images"] == len(df)
    frame = pd.read_csv(first["predictions"])
    from medssl.evaluate.predict import load_model
    model = load_model(model_source(results.iloc[2]))
    ids, probs = score_dataset(model, ImageDataset(cache, list(df["image_id"]), list(df["label"]), spatial_dims=2))
    assert frame["image_id"].tolist() == ids and np.allclose(frame["score"], probs[:, 1], atol=1e-6)
    assert (frame["predicted"] == (probs[:, 1] >= 0.4)).all()  # the model's own operating point
    assert frame["label"].tolist() == df["label"].tolist()
    assert frame["patient_id"].tolist() == df["patient_id"].tolist()

    summary = summarise(results.assign(predictions=""), n_boot=50, external={"siteB": scored})
    site = summary[summary["site"] == "siteB"].set_index("arm")
    assert set(site.index) == {"ssl", "scratch"}  # the features run had nothing to score
    assert site.loc["ssl", "runs"] == 2 and site.loc["ssl", "pairs_vs_scratch"] == 2
    assert site.loc["ssl", "auroc_ci_low"] <= site.loc["ssl", "auroc"] <= site.loc["ssl", "auroc_ci_high"]
    assert np.isfinite(site.loc["ssl", "delta_auroc_vs_scratch_ci_low"])
    assert set(summary.loc[summary["site"] == "internal", "ci_method"]) == {"no predictions on disk: no interval"}
    from rich.console import Console
    from medssl.evaluate.report import build_report
    paths = build_report(results.assign(predictions=""), tmp_path / "report", n_boot=50, external={"siteB": scored},
                         console=Console(file=open(tmp_path / "out.txt", "w")))
    assert "siteB: 1 of 5 runs not scored (1 x no model kept for this run)" in paths["table_md"].read_text()
    assert "siteB · per_class_2 · finetune: " in paths["verdict_md"].read_text()


def test_the_features_arm_keeps_a_model_that_an_external_site_scores_like_the_deep_ones(tmp_path):
    """A real ladder (SSL linear + engineered features): the features child's kept package scores the site's
    images exactly as its probe refitted with scikit-learn does, and the report pairs SSL with it there."""
    from medssl.config import FinetuneConfig
    from medssl.export.package import load_package
    from medssl.ladder.ladder import run_ladder
    from medssl.models.engineered import dataset_features
    from medssl.models.probe import fit_logistic
    from medssl.tracking.tracker import NullTracker
    from test_ladder import rungs_of, tiny_encoder_file
    cache, df = cohort(2)
    cfg = FinetuneConfig(protocols=["linear"], arms=["ssl", "features"], bootstrap=20)
    rungs = rungs_of(df, (3,))
    results = run_ladder(cfg, tiny_encoder_file(tmp_path, 2), cache, df, "label", rungs, tmp_path / "l", NullTracker())
    assert (results["status"] == "ok").all(), results["error"].tolist()
    row = results.set_index("arm").loc["features"]
    assert load_package(row["model"]).spec.architecture.features is not None

    site_cache, site = cohort(2, n_patients=12, seed=1)  # other images, other patients
    scored = score_site("siteB", results, site_cache, site, site["label"].astype("Int64"), tmp_path / "siteB")
    assert (scored["status"] == "ok").all(), scored["error"].tolist()
    got = pd.read_csv(scored.set_index("arm").loc["features", "predictions"]).set_index("image_id")
    # the same probe by hand: the child's training images, its chosen C, scikit-learn's own predict_proba
    train_ids = next((tmp_path / "l").glob("children/*features*/train_subset_ids.txt")).read_text().split()
    labels = df.set_index("image_id").loc[train_ids, "label"].to_numpy()
    x_train, _ = dataset_features(ImageDataset(cache, train_ids, labels, spatial_dims=2))
    probe = fit_logistic(x_train, labels, row["chosen_C"], cfg.imbalance != "none", cfg.seed + rungs[0].seed)
    x_site, ids = dataset_features(ImageDataset(site_cache, list(site["image_id"]), list(site["label"]),
                                                spatial_dims=2))
    want = probe.predict_proba(x_site)[:, 1]
    assert np.abs(got.loc[ids, "score"].to_numpy() - want).max() <= 1e-9
    assert (got.loc[ids, "predicted"].to_numpy() == (want >= row["threshold"])).all()

    summary = summarise(results, n_boot=50, external={"siteB": scored})
    on_site = summary[summary["site"] == "siteB"].set_index("arm")
    assert set(on_site.index) == {"ssl", "features"}
    assert on_site.loc["ssl", "pairs_vs_features"] == 1
    ci = on_site.loc["ssl", ["delta_auroc_vs_features_ci_low", "delta_auroc_vs_features_ci_high"]]
    assert np.isfinite(ci).all() and ci.iloc[0] <= ci.iloc[1]
