"""Fine-tuning under inner validation keeps its K fold models as one ensemble: the threshold applied to the test
set is chosen on out-of-fold predictions of those very models, each rung patient predicted by the member that
did not train on it, and nothing outside the rung is read. The ensemble's package, MLflow pyfunc and exports
score as the mean of its members."""
import numpy as np
import pytest
import torch
from torch.utils.data import Subset

from medssl.config import EncoderConfig, FinetuneConfig
from medssl.evaluate.metrics import choose_threshold
from medssl.evaluate.predict import score_dataset
from medssl.ladder import classifier
from medssl.ladder.inner import patient_folds
from medssl.models.encoders import build_encoder
from medssl.models.ensemble import Ensemble
from medssl.train.loaders import ImageDataset
from test_ladder import EDGE, RecordingCache, cohort  # noqa: E402 - the ladder tests' tiny cohort

VIT = EncoderConfig(name="vit", patch_size=8, hidden_size=16, num_layers=1, num_heads=2, mlp_dim=16)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_the_test_threshold_is_chosen_on_the_models_that_score_the_test_set(monkeypatch, spatial_dims):
    arrays, df = cohort(spatial_dims)
    cache = RecordingCache(arrays.arrays)
    rung = df[df["split"] == "train"]                                      # 12 patients, 24 images
    ids, y = list(rung["image_id"]), rung["label"].to_numpy()
    folds = patient_folds(rung["patient_id"].tolist(), y, 3, seed=0, rung="all")
    trained_on = []                                                        # image ids of each fold's training
    real_loader = classifier.train_loader
    monkeypatch.setattr(classifier, "train_loader", lambda data, labels, cfg, seed: trained_on.append(
        [ids[i] for i in data.indices]) or real_loader(data, labels, cfg, seed))
    torch.manual_seed(0)
    encoder = build_encoder(VIT, spatial_dims, [EDGE] * spatial_dims)
    cfg = FinetuneConfig(epochs=4, patience=2, batch_size=4, lr=3e-3)
    cache.reads.clear()
    result = classifier.fit_rung(encoder, ImageDataset(cache, ids, list(y)), folds, 2, "finetune", cfg, seed=0)
    assert set(cache.reads) <= set(ids)                                   # no label outside the rung was read
    model = result.model
    assert isinstance(model, Ensemble) and len(model.members) == 3 and len(trained_on) == 3
    oof = np.zeros(len(ids))
    for member, (train_idx, held_idx), seen in zip(model.members, folds.splits, trained_on):
        held = [ids[i] for i in held_idx]
        assert seen == [ids[i] for i in train_idx] and not set(seen) & set(held)   # it never trained on its fold
        _, probs = score_dataset(member, ImageDataset(cache, held, list(y[held_idx])))
        oof[held_idx] = probs[:, 1]
    # the stored operating point is the out-of-fold choice of these members (recomputed by hand)
    assert result.threshold == pytest.approx(choose_threshold(y, oof), abs=1e-6)
    assert float(model.threshold) == pytest.approx(result.threshold, abs=1e-12)
    # ... and the test set is scored by the same members: their mean probability
    test = df[df["split"] == "test"]
    test_ds = ImageDataset(cache, list(test["image_id"]), list(test["label"]))
    _, scored = score_dataset(model, test_ds)
    by_hand = np.mean([score_dataset(member, test_ds)[1] for member in model.members], axis=0)
    assert np.abs(scored - by_hand).max() <= 1e-6
    # the chosen epoch is the best of the mean held-out curve the history records
    assert result.epochs == 1 + int(np.argmin([h["val_loss"] for h in result.history]))


@pytest.mark.parametrize("dims", [2, 3])
def test_an_ensemble_package_loads_serves_and_exports_as_its_members_mean(tmp_path, dims):
    """save_package / load_package (no pickle), the MLflow pyfunc on a real scan, ONNX / TorchScript / the
    MONAI bundle: all give the mean of the members' probabilities."""
    import mlflow.pyfunc
    import pandas as pd
    from medssl.export.formats import export
    from medssl.export.package import input_size, load_package, save_package
    from medssl.export.pyfunc import save_pyfunc
    from medssl.models.classifier import Classifier
    from test_export import ENCODERS, _scan, _spec, _training_path_probs
    spec = _spec(dims, ENCODERS["resnet"], "MR" if dims == 3 else "CT")
    torch.manual_seed(0)
    members = [Classifier(build_encoder(ENCODERS["resnet"], dims, spec["architecture"]["img_size"]), 2,
                          spatial_dims=dims).eval() for _ in range(3)]
    folder = save_package(tmp_path / "ensemble", Ensemble(members, threshold=0.42), spec)
    package = load_package(folder)
    assert package.spec.architecture.members == 3 and package.spec.threshold == 0.42
    assert "ensemble of 3" in package.spec.architecture.describe()
    x = torch.randn(2, 1, *input_size(package.spec))
    with torch.no_grad():
        mean = torch.stack([torch.softmax(m(x), 1) for m in members]).mean(0)      # (2, K) by hand
        assert torch.allclose(torch.softmax(package.model(x), 1), mean, atol=1e-6)
    scan = _scan(tmp_path, dims)
    served = mlflow.pyfunc.load_model(str(save_pyfunc(folder, tmp_path / "mlflow-model")))
    frame = served.predict(pd.DataFrame({"path": [str(scan)]}))
    want = _training_path_probs(folder, scan, tmp_path)
    assert np.allclose(frame[["p_healthy", "p_lesion"]].to_numpy(), want, atol=1e-6)
    for fmt, out in [("onnx", tmp_path / "m.onnx"), ("torchscript", tmp_path / "m.ts"), ("bundle", tmp_path / "b")]:
        parity = export(package, fmt, out)           # each export is checked against the package's own output
        assert parity["max_abs_diff"] <= parity["tolerance"], parity
