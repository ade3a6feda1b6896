"""A tiny end-to-end ladder on CPU: real anatomy (pydicom CT slice, nibabel T1 volume) made into pseudo-patients,
a bright blob as the positive finding, a tiny ViT, MLflow in a SQLite store under tmp_path."""
import os
import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest
import torch
from mlflow.tracking import MlflowClient
from rich.console import Console

from medssl.config import EncoderConfig, FinetuneConfig
from medssl.cohort.splits import Rung
from medssl.models.encoders import build_encoder, save_encoder
from medssl.tracking.tracker import Tracker
from memory_cache import MemoryCache

EDGE = 16
torch.set_num_threads(1)  # tiny models: threads only contend with the other tests on a shared CPU


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite MLflow store for the module (creating its tables costs seconds)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"


def anatomy(spatial_dims: int) -> np.ndarray:
    """A real image, shrunk to EDGE^d and scaled to [0, 1]."""
    if spatial_dims == 2:
        image = pydicom.dcmread(pydicom.data.get_testdata_file("CT_small.dcm")).pixel_array.astype(np.float32)
    else:
        path = os.path.join(os.path.dirname(nib.__file__), "tests", "data", "anatomical.nii")
        image = np.asarray(nib.load(path).dataobj, np.float32)
    index = np.ix_(*[np.linspace(0, n - 1, EDGE).round().astype(int) for n in image.shape])
    image = image[index]
    return (image - image.min()) / (image.max() - image.min())


def cohort(spatial_dims: int, n_patients: int = 24, seed: int = 0):
    """Two images per patient, one label per patient (p % 2; 1 = a bright blob). Patients split
    12 train / 4 val / 8 test, every split balanced."""
    rng = np.random.default_rng(seed)
    base, arrays, rows = anatomy(spatial_dims), {}, []
    grid = np.stack(np.meshgrid(*[np.arange(EDGE)] * spatial_dims, indexing="ij"))
    for p in range(n_patients):
        split = "train" if p < n_patients // 2 else "val" if p < 2 * n_patients // 3 else "test"
        for k in range(2):
            label = p % 2
            image = np.roll(base, rng.integers(-2, 3, spatial_dims), axis=tuple(range(spatial_dims)))
            image = image * rng.uniform(0.8, 1.2) + rng.normal(0, 0.05, image.shape)
            if label:
                centre = rng.integers(4, EDGE - 4, spatial_dims).reshape(-1, *[1] * spatial_dims)
                image = image + 1.5 * np.exp(-((grid - centre) ** 2).sum(0) / 4.0)
            image_id = f"img-{spatial_dims}d{p:02d}{k}"
            arrays[image_id] = image[None].astype(np.float32)  # (1, *spatial)
            rows.append({"image_id": image_id, "patient_id": f"pat-{p:012x}", "split": split, "label": label})
    return MemoryCache(arrays), pd.DataFrame(rows)


def tiny_encoder_file(tmp_path, spatial_dims: int):
    cfg = EncoderConfig(name="vit", patch_size=8, hidden_size=16, num_layers=1, num_heads=2, mlp_dim=16)
    torch.manual_seed(0)
    encoder = build_encoder(cfg, spatial_dims, [EDGE] * spatial_dims)
    return save_encoder(tmp_path / f"encoder{spatial_dims}d.pt", encoder, cfg, spatial_dims, [EDGE] * spatial_dims,
                        pretrain_run_id="pretrain123", manifest_digest="digest456")


def rungs_of(df, sizes=(3, 4), seeds=(0,)):
    """Nested per-class rungs (in patients) from the training split."""
    from medssl.cohort.splits import build_ladder
    return build_ladder(df, "label", per_class=list(sizes), seeds=seeds)


def children_of(client, experiment_id, parent_id):
    return client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_ladder_end_to_end_and_resume(tmp_path, store, spatial_dims):
    from medssl.ladder.ladder import run_ladder
    from medssl.evaluate.predict import evaluate_model, predict
    cache, df = cohort(spatial_dims)
    encoder = tiny_encoder_file(tmp_path, spatial_dims)
    train0 = tuple(df.loc[(df["split"] == "train") & (df["label"] == 0), "image_id"][:6])
    rungs = rungs_of(df) + [Rung("only_negatives", 0, train0)]
    protocols = ["linear", "finetune"] if spatial_dims == 2 else ["finetune"]
    arms = ({("random_features", "linear"), ("ssl", "linear")} if spatial_dims == 2 else set()) | \
        {("scratch", "finetune"), ("ssl", "finetune"), ("features", "linear")}
    cfg = FinetuneConfig(protocols=protocols, epochs=2, batch_size=4, bootstrap=50, patience=1)
    experiment = f"ladder-test{spatial_dims}d"
    tracker = Tracker(experiment, store, outbox_dir=tmp_path / "outbox")
    out = tmp_path / "ladder"
    log_models = "all" if spatial_dims == 2 else "best"  # both modes; "best" logs only improving runs
    with tracker.run("ladder") as parent:
        results = run_ladder(cfg, encoder, cache, df, "label", rungs, out, tracker, log_models=log_models)
    ok = results[results["status"] == "ok"]
    n_ok = 2 * len(arms)  # 2 good rungs x arms
    assert len(ok) == n_ok and set(zip(ok["arm"], ok["protocol"])) == arms
    failed = results[results["status"] == "failed"]
    assert len(failed) == len(arms) and failed["error"].str.contains("lacks class 1").all()
    assert ok["auroc"].between(0, 1).all() and (ok["validation"] == "inner").all()
    # budgets in patients: 3 and 4 of each class; inner validation spends nothing beyond them
    assert sorted(set(ok["n_labelled_patients"])) == [6, 8] and (ok["n_patients_used"] == ok["n_labelled_patients"]).all()
    assert (ok["n_extra_val_patients"] == 0).all() and ok["labels_note"].fillna("").eq("").all()
    # every deep child keeps its model as a local package (external sites score all of them); it reproduces
    # the child's own test predictions
    from medssl.evaluate.predict import score_dataset
    from medssl.export.package import load_package
    from medssl.train.loaders import ImageDataset
    assert ok["model"].str.len().gt(0).all()
    for arm, tolerance in (("ssl", 1e-5), ("features", 1e-9)):  # float32 network; float64 features probe
        row = ok[ok["arm"] == arm].iloc[0]
        kept = load_package(row["model"])
        saved = pd.read_csv(row["predictions"])
        _, probs = score_dataset(kept.model, ImageDataset(cache, list(saved["image_id"]), list(saved["label"]),
                                                          spatial_dims=kept.spec.architecture.spatial_dims))
        assert np.abs(probs[:, 1] - saved["score"]).max() <= tolerance, arm
        assert kept.spec.threshold == pytest.approx(row["threshold"], abs=1e-7) and kept.spec.lineage.arm == arm
    assert kept.spec.architecture.features.n_features > 0 and kept.spec.architecture.encoder is None
    finetuned_model = load_package(ok.loc[ok["protocol"] == "finetune", "model"].iloc[0])
    assert finetuned_model.spec.architecture.members == 3  # the inner-CV fold models, kept as one ensemble
    assert (ok["n_labelled"] == 2 * ok["n_labelled_patients"]).all()  # a patient's images all go with it
    assert (ok["positive_class"].astype(str) == "1").all() and (ok["inner_folds"] == 3).all()
    finetuned = ok[ok["protocol"] == "finetune"]
    assert finetuned["chosen_epochs"].between(1, 2).all() and ok.loc[ok["protocol"] == "linear", "chosen_C"].notna().all()
    from sklearn.metrics import roc_auc_score
    for _, row in ok[ok["arm"] == "ssl"].iterrows():  # paired per-child deltas against every baseline
        for arm in sorted({a for a, _ in arms} - {"ssl"}):
            theirs = ok[(ok["rung"] == row["rung"]) & (ok["arm"] == arm)]
            same = theirs[theirs["protocol"] == row["protocol"]]  # the same protocol where the arm has it
            other = same if len(same) else theirs
            a, b = (pd.read_csv(p).set_index("image_id") for p in (row["predictions"], other["predictions"].iloc[0]))
            b = b.loc[a.index]
            by_hand = roc_auc_score(a["label"], a["score"]) - roc_auc_score(b["label"], b["score"])
            assert row[f"delta_auroc_vs_{arm}"] == pytest.approx(by_hand, abs=1e-9), arm
            assert row[f"delta_auroc_vs_{arm}_ci_low"] <= row[f"delta_auroc_vs_{arm}_ci_high"]
    for path in ok["predictions"]:  # the prediction-file contract of results.py
        frame = pd.read_csv(path)
        assert {"image_id", "label", "patient_id", "score", "prob_0", "prob_1", "predicted"} <= set(frame.columns)
        assert len(frame) == 16 and np.allclose(frame["score"], frame["prob_1"])

    client = MlflowClient(tracker.tracking_uri)
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    children = children_of(client, experiment_id, parent.info.run_id)
    assert len(children) == n_ok  # failed rungs fail their checks before a run is opened
    for child in children:
        tags = child.data.tags
        assert tags["medssl.pretrain_run_id"] == "pretrain123" and tags["medssl.manifest_digest"] == "digest456"
        assert {"medssl.rung", "medssl.seed", "medssl.arm", "medssl.protocol", "medssl.repeat"} <= set(tags)
        assert "test_auroc" in child.data.metrics and child.data.metrics["n_patients_used"] in (6, 8)
        assert child.data.params["validation"] == "inner" and child.data.params["positive_class"] == "1"
    artifacts = {a.path for a in client.list_artifacts(children[0].info.run_id, "evaluation")}
    assert {"evaluation/roc.png", "evaluation/pr.png", "evaluation/confusion.png"} <= artifacts
    versions = {v.name: v for v in client.search_model_versions(f"name LIKE '{experiment}-label-%'")}
    assert set(versions) == {f"{experiment}-label-per_class_3", f"{experiment}-label-per_class_4"}
    version = versions[f"{experiment}-label-per_class_3"]
    logged = results[results["model_logged"] == True]  # noqa: E712
    assert version.run_id in set(logged["run_id"]) and not (logged["arm"] == "features").any()
    deep = ok[ok["arm"] != "features"]
    if log_models == "all":
        assert len(logged) == len(deep)
    else:  # per rung the first run logs; later ones only when their inner validation AUROC is higher
        for _, part in deep.groupby("rung"):
            best_so_far = part["val_auroc"].cummax().shift(fill_value=-1)
            assert (part["model_logged"] == (part["val_auroc"] > best_so_far)).all()
    assert version.tags["medssl.pretrain_run_id"] == "pretrain123" and version.tags["medssl.validation"] == "inner"

    # interrupted after all but the last finished child: only that one (and the failed rung) are redone
    csv = out / "results.csv"
    lines = csv.read_text().splitlines()
    last_ok = ok["key"].iloc[-1]
    csv.write_text("\n".join(l for l in lines if not l.startswith(last_ok + ",")) + "\n")
    with tracker.run("ladder") as parent2:
        again = run_ladder(cfg, encoder, cache, df, "label", rungs, out, tracker, log_models=log_models)
    assert len(children_of(client, experiment_id, parent2.info.run_id)) == 1
    assert set(again.loc[again["status"] == "ok", "key"]) == set(ok["key"])
    assert len(client.search_model_versions(f"name LIKE '{experiment}-label-%'")) <= 3  # no duplicate of unchanged bests

    # external validation and predictions with the registered model
    model_uri = f"models:/{version.name}/{version.version}"
    test_df = df[df["split"] == "test"]
    values = evaluate_model(model_uri, cache, test_df, "label", tmp_path / "external", tracker, n_boot=20)
    assert 0 <= values["auroc"] <= 1 and (tmp_path / "external" / "roc.png").is_file()
    frame = predict(model_uri, cache, test_df, tmp_path / "pred.csv", tracking_uri=tracker.tracking_uri)
    assert list(frame.columns) == ["image_id", "score", "predicted"] and len(frame) == len(test_df)


def test_mismatches_fail_before_training_and_name_the_problem(tmp_path):
    from medssl.errors import DataError
    from medssl.ladder.ladder import run_ladder
    from medssl.tracking.tracker import NullTracker
    cache, df = cohort(2)
    cfg = FinetuneConfig(protocols=["finetune"], arms=["ssl", "scratch"], epochs=1, batch_size=4, bootstrap=10)
    three_d = tiny_encoder_file(tmp_path, 3)  # a 3D encoder given 2D images
    results = run_ladder(cfg, three_d, cache, df, "label", rungs_of(df, (3,)), tmp_path / "a", NullTracker())
    assert (results["status"] == "failed").all() and results["error"].str.contains("encoder is 3D").all()

    cfg2 = EncoderConfig(name="vit", in_channels=2, patch_size=8, hidden_size=16, num_layers=1, num_heads=2, mlp_dim=16)
    two_channel = save_encoder(tmp_path / "two.pt", build_encoder(cfg2, 2, [EDGE] * 2), cfg2, 2, [EDGE] * 2)
    results = run_ladder(cfg, two_channel, cache, df, "label", rungs_of(df, (3,)), tmp_path / "b", NullTracker())
    assert results["error"].str.contains("expects 2 channel").all()

    unlabelled = df.assign(label=np.where(df["split"] == "val", np.nan, df["label"]))
    split_cfg = cfg.model_copy(update={"validation": "split"})
    results = run_ladder(split_cfg, tiny_encoder_file(tmp_path, 2), cache, unlabelled, "label", rungs_of(df, (3,)),
                         tmp_path / "c", NullTracker())
    assert results["error"].str.contains("validation split of rung per_class_3 has no labelled images").all()

    with pytest.raises(DataError, match="no labels in column 'label'"):
        run_ladder(cfg, tiny_encoder_file(tmp_path, 2), cache, df.assign(label=np.nan), "label", rungs_of(df, (3,)),
                   tmp_path / "d", NullTracker())

    # class names (as the manifest's label_names store them, string keys) appear in the message
    lacking = [Rung("negatives_only", 0, tuple(df.loc[(df["split"] == "train") & (df["label"] == 0), "image_id"]))]
    results = run_ladder(cfg, tiny_encoder_file(tmp_path, 2), cache, df, "label", lacking, tmp_path / "e",
                         NullTracker(), class_names={"0": "normal", "1": "lesion"}, positive_class="lesion")
    assert results["error"].str.contains("training subset of rung negatives_only lacks class 1 \\(lesion\\)").all()


def test_multiclass_ladder_without_mlflow(tmp_path, monkeypatch):
    from medssl.ladder import ladder
    from medssl.evaluate.predict import load_model, predict, save_classifier
    from medssl.tracking.tracker import NullTracker
    from medssl.ladder import child
    cache, df = cohort(2, n_patients=36)  # 18 training patients, 6 of each class
    df["label"] = [int(p[-2:], 16) % 3 for p in df["patient_id"]]  # three classes, one per patient
    train = df[df["split"] == "train"]
    first = sorted(train["patient_id"].unique())[:9]  # 3 patients of each class
    rungs = [Rung("half", 0, tuple(train.loc[train["patient_id"].isin(first), "image_id"])),
             Rung("all", 0, tuple(train["image_id"]))]
    encoded = []  # image ids that went through a frozen encoder, per call
    real_features = child.features
    monkeypatch.setattr(child, "features", lambda enc, ds, bs: encoded.append(list(ds.ids)) or real_features(enc, ds, bs))
    cfg = FinetuneConfig(protocols=["linear"], epochs=2, batch_size=4, bootstrap=20)
    encoder = tiny_encoder_file(tmp_path, 2)
    results = ladder.run_ladder(cfg, encoder, cache, df, "label", rungs, tmp_path / "ladder", NullTracker())
    assert (results["status"] == "ok").all(), results["error"].tolist()
    # frozen features computed once per encoder (random seed 0, SSL) and image: the 36 training images each
    # (no validation image: inner validation)
    assert sum(len(ids) for ids in encoded) == 2 * 36
    assert "cm_2_2" in results and results["auroc"].between(0, 1).all()
    assert (results["positive_class"] == "").all() and results["threshold"].isna().all()

    # a plain-dict classifier file round-trips and predicts one score per class
    from medssl.models.classifier import Classifier
    from medssl.models.encoders import load_encoder
    enc, info = load_encoder(encoder)
    path = save_classifier(tmp_path / "clf.pt", Classifier(enc, 3, spatial_dims=2), info)
    assert load_model(path).head.out_features == 3
    frame = predict(path, cache, df, tmp_path / "p.csv")
    assert list(frame.columns) == ["image_id", "score_0", "score_1", "score_2", "predicted"]
    assert np.allclose(frame[["score_0", "score_1", "score_2"]].sum(axis=1), 1, atol=1e-5)


def test_predict_refuses_images_of_the_wrong_dimension(tmp_path):
    from medssl.errors import DataError
    from medssl.models.classifier import Classifier
    from medssl.evaluate.predict import predict, save_classifier
    from medssl.models.encoders import load_encoder
    enc, info = load_encoder(tiny_encoder_file(tmp_path, 3))
    path = save_classifier(tmp_path / "clf3d.pt", Classifier(enc, 2, spatial_dims=3), info)
    cache, df = cohort(2, n_patients=2)
    with pytest.raises(DataError, match="model is 3D but the images are 2D"):
        predict(path, cache, df, tmp_path / "p.csv")


# ----------------------------------------------------------------------------- classifier pieces
def _datasets(spatial_dims=2):
    from medssl.train.loaders import ImageDataset
    cache, df = cohort(spatial_dims)
    part = {s: df[df["split"] == s] for s in ("train", "val")}
    return [ImageDataset(cache, list(p["image_id"]), list(p["label"])) for p in part.values()]


def test_class_weights_and_balanced_sampler():
    from medssl.ladder.classifier import class_weights, train_loader
    y = [0] * 9 + [1] * 3
    # N / (K * n_k): 12 / (2 * 9) and 12 / (2 * 3)
    assert class_weights(y, 2, "weighted_loss").tolist() == pytest.approx([12 / 18, 2.0])
    assert class_weights(y, 2, "none").tolist() == [1.0, 1.0]
    data = [{"image": torch.zeros(1), "label": v} for v in y * 50]
    loader = train_loader(data, y * 50, FinetuneConfig(imbalance="balanced_sampler", batch_size=30), seed=0)
    drawn = torch.cat([b["label"] for b in loader])
    assert abs(drawn.float().mean().item() - 0.5) < 0.05  # classes drawn equally often, not 3:1


def test_early_stopping_and_validation_threshold():
    from medssl.evaluate.metrics import choose_threshold
    from medssl.ladder.classifier import fit
    from medssl.evaluate.predict import score_dataset
    train, val = _datasets()
    cfg = EncoderConfig(name="vit", patch_size=8, hidden_size=16, num_layers=1, num_heads=2, mlp_dim=16)
    torch.manual_seed(0)
    encoder = build_encoder(cfg, 2, [EDGE, EDGE])
    # a vanishing learning rate cannot improve the validation loss: patience 2 stops after 1 + 2 epochs
    result = fit(encoder, train, val, 2, "finetune", FinetuneConfig(epochs=10, lr=1e-12, patience=2), seed=0)
    assert result.epochs == 1 and len(result.history) == 3
    ids, probs = score_dataset(result.model, val)
    y_val = [int(val[i]["label"]) for i in range(len(val))]
    assert result.threshold == pytest.approx(choose_threshold(y_val, probs[:, 1]))
    assert float(result.model.threshold) == pytest.approx(result.threshold)


def test_non_finite_loss_stops_with_a_training_error():
    from medssl.errors import TrainingError
    from medssl.ladder.classifier import fit
    train, val = _datasets()
    train.cache = MemoryCache({i: np.full((1, EDGE, EDGE), np.nan, np.float32) for i in train.ids})
    cfg = EncoderConfig(name="vit", patch_size=8, hidden_size=16, num_layers=1, num_heads=2, mlp_dim=16)
    with pytest.raises(TrainingError, match="non-finite training loss at epoch 1"):
        fit(build_encoder(cfg, 2, [EDGE, EDGE]), train, val, 2, "finetune", FinetuneConfig(epochs=2), seed=0)


def test_report_from_a_real_ladder_pools_seeds_over_the_same_patient_resamples(tmp_path):
    """With one seed the pooled interval is that run's own interval; with two, both seeds' predictions are
    resampled together (same test patients), so the interval is no longer one run's."""
    from medssl.evaluate.report import build_report
    from medssl.ladder.ladder import run_ladder
    from medssl.tracking.tracker import NullTracker
    cache, df = cohort(2)
    cfg = FinetuneConfig(protocols=["linear"], arms=["ssl", "random_features"], epochs=1, batch_size=4, bootstrap=40)
    train = df[df["split"] == "train"]
    ids = tuple(train["image_id"])
    rungs = [Rung("all", 0, ids), Rung("all", 1, ids)]
    results = run_ladder(cfg, tiny_encoder_file(tmp_path, 2), cache, df, "label", rungs, tmp_path / "l", NullTracker())
    assert (results["status"] == "ok").all()
    one = results[results["seed"] == 0]
    paths = build_report(one, tmp_path / "r1", console=Console(file=open(tmp_path / "o1", "w")))  # n_boot: 40
    summary = pd.read_csv(paths["summary_csv"]).set_index("arm")
    for arm in ("ssl", "random_features"):  # (paired deltas between arms are the report's own bootstrap)
        row = one[one["arm"] == arm].iloc[0]
        assert summary.loc[arm, "ci_method"] == "pooled resamples"
        assert summary.loc[arm, "auroc_ci_low"] == pytest.approx(row["auroc_ci_low"])
        assert summary.loc[arm, "auroc_ci_high"] == pytest.approx(row["auroc_ci_high"])

    both = pd.read_csv(build_report(results, tmp_path / "r2", n_boot=40,
                                    console=Console(file=open(tmp_path / "o2", "w")))["summary_csv"])
    assert set(both["seeds"]) == {2} and (both["ci_method"] == "pooled resamples").all()
    assert (both["auroc_ci_low"] <= both["auroc_ci_high"]).all()


def test_changed_settings_redo_finished_runs(tmp_path):
    from medssl.ladder.ladder import run_ladder
    from medssl.tracking.tracker import NullTracker
    cache, df = cohort(2)
    encoder, rungs = tiny_encoder_file(tmp_path, 2), rungs_of(df, (3,))
    cfg = FinetuneConfig(protocols=["linear"], arms=["ssl", "random_features"], epochs=1, batch_size=4, bootstrap=10)
    csv = tmp_path / "l" / "results.csv"
    first = run_ladder(cfg, encoder, cache, df, "label", rungs, tmp_path / "l", NullTracker())
    rows = len(csv.read_text().splitlines())
    again = run_ladder(cfg, encoder, cache, df, "label", rungs, tmp_path / "l", NullTracker())
    assert len(csv.read_text().splitlines()) == rows and again["run_id"].equals(first["run_id"])  # skipped
    changed = run_ladder(cfg.model_copy(update={"lr": 0.01}), encoder, cache, df, "label", rungs, tmp_path / "l",
                         NullTracker())
    assert len(csv.read_text().splitlines()) == rows + 2  # both runs redone under the new settings
    assert (changed["settings_digest"] != first["settings_digest"].iloc[0]).all() and len(changed) == 2


def test_finetune_lr_warms_up_for_one_epoch_then_decays_to_zero():
    from medssl.ladder.classifier import _schedule
    for schedule, expected in (("cosine", [1 / 3, 2 / 3, 1.0]), ("constant", [1.0, 1.0, 1.0])):
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.3)
        scheduler = _schedule(optimizer, FinetuneConfig(epochs=4, lr=0.3, schedule=schedule), steps_per_epoch=3)
        lrs = []
        for _ in range(12):
            lrs.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        assert lrs[:3] == pytest.approx([0.3 * f for f in expected])  # epoch 1
        assert lrs[-1] < 0.05 if schedule == "cosine" else lrs[-1] == pytest.approx(0.3)
        assert all(a >= b for a, b in zip(lrs[2:], lrs[3:])) or schedule == "constant"


def test_finetune_views_change_training_and_are_part_of_the_seed():
    from medssl.config import ViewsConfig
    from medssl.ladder.classifier import fit
    train, val = _datasets()
    enc = EncoderConfig(name="vit", patch_size=8, hidden_size=16, num_layers=1, num_heads=2, mlp_dim=16)
    flips = ViewsConfig(rotate_degrees=0, scale_range=(1, 1), crop_jitter=0, gamma_range=(1, 1), noise_std=0,
                        blur_sigma=(0, 0), flip_prob=0.5)

    def weights(views):
        torch.manual_seed(0)
        cfg = FinetuneConfig(epochs=2, patience=5, views=views)
        return fit(build_encoder(enc, 2, [EDGE, EDGE]), train, val, 2, "finetune", cfg, seed=0).model.state_dict()
    plain, a, b = weights(None), weights(flips), weights(flips)
    assert all(torch.equal(a[k], b[k]) for k in a)          # same seed, same views, same weights
    assert not all(torch.equal(a[k], plain[k]) for k in a)  # the views did reach the training batches


# ----------------------------------------------------------------------------- honest budgets
class RecordingCache(MemoryCache):
    """Records every image id read, so a test can tell what a fit saw."""

    def __init__(self, arrays):
        super().__init__(arrays)
        self.reads = []

    def get(self, image_id):
        self.reads.append(image_id)
        return super().get(image_id)


@pytest.mark.parametrize("validation", ["inner", "split"])
def test_no_id_outside_the_rung_reaches_training_selection_or_threshold(tmp_path, monkeypatch, validation):
    """Every image a fit reads (frozen features, engineered features, every fold, a probe's refit, the threshold's
    out-of-fold predictions) is the rung's, plus under validation: split the validation split, counted."""
    from medssl.ladder import child
    from medssl.ladder.ladder import run_ladder
    from medssl.tracking.tracker import NullTracker
    arrays, df = cohort(2)
    cache = RecordingCache(arrays.arrays)
    rungs = rungs_of(df, (3,))
    val = set(df.loc[df["split"] == "val", "image_id"])
    seen = {}
    for name, position in (("_fit_deep", 1), ("_fit_features", 0)):  # (ctx, child, items, ...), (ctx, items, ...)
        real = getattr(child, name)

        def recording(ctx, *args, _real=real, _at=position, **kw):
            items = args[_at]
            cache.reads.clear()
            out = _real(ctx, *args, **kw)
            seen[len(seen)] = (set(items), set(cache.reads))
            return out
        monkeypatch.setattr(child, name, recording)
    cfg = FinetuneConfig(epochs=2, batch_size=4, bootstrap=10, validation=validation)
    results = run_ladder(cfg, tiny_encoder_file(tmp_path, 2), cache, df, "label", rungs, tmp_path / "l", NullTracker())
    assert (results["status"] == "ok").all(), results["error"].tolist()
    assert len(seen) == 5  # random_features, ssl linear, scratch, ssl finetune, features
    allowed = set(rungs[0].image_ids) | (val if validation == "split" else set())
    for items, reads in seen.values():
        assert items == allowed and reads <= allowed
    assert any(reads for _, reads in seen.values())
    extra = 4 if validation == "split" else 0  # the 4 validation patients
    assert (results["n_extra_val_patients"] == extra).all() and (results["n_patients_used"] == 6 + extra).all()
    assert (results["labels_note"] == ("uses 4 extra validation labels" if extra else "")).all()


def test_positive_class_is_coded_1_whatever_the_manifest_code(tmp_path):
    """Labels coded alphabetically ('bleed' = 0): the ladder trains, thresholds and scores with bleed = 1."""
    from medssl.ladder.ladder import run_ladder
    from medssl.tracking.tracker import NullTracker
    cache, df = cohort(2)
    flipped = df.assign(label=1 - df["label"])  # the blob (the condition) is now manifest code 0
    cfg = FinetuneConfig(protocols=["linear"], arms=["features"], bootstrap=10)
    results = run_ladder(cfg, tiny_encoder_file(tmp_path, 2), cache, flipped, "label", rungs_of(df, (3,)),
                         tmp_path / "l", NullTracker(), class_names={0: "bleed", 1: "normal"}, positive_class="bleed")
    row = results.iloc[0]
    assert row["status"] == "ok" and row["positive_class"] == "bleed" and row["class_names"] == '["normal", "bleed"]'
    frame = pd.read_csv(row["predictions"]).set_index("image_id")
    blob = df.set_index("image_id").loc[frame.index, "label"]  # 1 = has the blob
    assert (frame["label"] == blob).all()                        # the condition is code 1 in the predictions


def test_a_rung_that_holds_test_patients_is_refused_and_a_tiny_rung_names_its_class(tmp_path):
    from medssl.errors import DataError
    from medssl.ladder.ladder import run_ladder
    from medssl.tracking.tracker import NullTracker
    cache, df = cohort(2)
    encoder = tiny_encoder_file(tmp_path, 2)
    cfg = FinetuneConfig(protocols=["linear"], arms=["features"], bootstrap=10)
    leaky = Rung("leaky", 0, rungs_of(df, (3,))[0].image_ids + tuple(df.loc[df["split"] == "test", "image_id"][:1]))
    with pytest.raises(DataError, match="rung leaky .* holds 1 patient\\(s\\) of the evaluation splits"):
        run_ladder(cfg, encoder, cache, df, "label", [leaky], tmp_path / "a", NullTracker())
    results = run_ladder(cfg, encoder, cache, df, "label", rungs_of(df, (2,)), tmp_path / "b", NullTracker(),
                         class_names={0: "normal", 1: "lesion"}, positive_class="lesion")
    assert results["error"].str.contains("rung per_class_2 has 2 labelled patient\\(s\\) of class 0 \\(normal\\), "
                                         "but inner validation with 3 folds needs at least 3").all()


def _torchrun_rank(rank: int, world: int, port: int, tmp: str) -> None:
    """One rank of a torchrun-like launch (its environment), running the whole ladder call."""
    from medssl.ladder.ladder import run_ladder
    from medssl.tracking.tracker import NullTracker
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    cache, df = cohort(2)
    cfg = FinetuneConfig(epochs=2, batch_size=4, bootstrap=20)
    run_ladder(cfg, f"{tmp}/encoder2d.pt", cache, df, "label", rungs_of(df, (3, 4)), f"{tmp}/ranks", NullTracker())


def test_parallel_ladder_gives_the_serial_results(tmp_path):
    """Two worker processes, and two torchrun ranks, share the children out (i % 2); the merged file equals
    the serial one."""
    from medssl.ladder.ladder import run_ladder
    from medssl.tracking.tracker import NullTracker
    cache, df = cohort(2)
    encoder = tiny_encoder_file(tmp_path, 2)
    cfg = FinetuneConfig(epochs=2, batch_size=4, bootstrap=20)
    rungs = rungs_of(df, (3, 4))
    serial = run_ladder(cfg, encoder, cache, df, "label", rungs, tmp_path / "serial", NullTracker())
    parallel = run_ladder(cfg.model_copy(update={"workers": 2}), encoder, cache, df, "label", rungs,
                          tmp_path / "parallel", NullTracker())
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.start_processes(_torchrun_rank, args=(2, port, str(tmp_path)), nprocs=2,
                                          start_method="spawn")
    from medssl.ladder.results import read_results
    ranks = read_results(tmp_path / "ranks" / "results.csv")
    assert (serial["status"] == "ok").all() and len(serial) == 10
    for other, folder in ((parallel, "parallel"), (ranks, "ranks")):
        assert list(other["key"]) == list(serial["key"])  # merged in plan order
        assert not list((tmp_path / folder).glob("results.rank*.csv"))  # shards merged away
        for column in ("auroc", "balanced_accuracy", "threshold", "chosen_C", "chosen_epochs", "val_auroc"):
            assert np.allclose(other[column], serial[column], atol=1e-5, equal_nan=True), (folder, column)
        for a, b in zip(serial["predictions"], other["predictions"]):
            assert np.allclose(pd.read_csv(a)["score"], pd.read_csv(b)["score"], atol=1e-5)
