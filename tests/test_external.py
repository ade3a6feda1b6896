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
