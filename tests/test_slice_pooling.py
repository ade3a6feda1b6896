"""2D encoders on 3D volumes, slice-pooled through the whole flow: the ladder (probe, fine-tuning, the features
arm), the kept model package, `evaluate` / `predict`, the served pyfunc and the ONNX / TorchScript exports.
Real anatomy: the ITK example T1 (reoriented to RAS, shrunk), with a T1-dark lesion only in slices far from
the central one."""
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

from medssl.config import EncoderConfig, FinetuneConfig, PreprocessConfig
from medssl.errors import ConfigError, DataError
from medssl.models.encoders import build_encoder, save_encoder
from medssl.models.slices import SlicePooled, volume_pooling
from medssl.tracking.tracker import NullTracker
from medssl.train.loaders import ImageDataset
from memory_cache import MemoryCache

ITK_T1 = Path("/usr/share/doc/insighttoolkit5-examples/examples/Data/KmeansTest_T1UCharRaw.nii.gz")
EDGE, DEPTH = 16, 12                 # cohort volumes: (1, 16, 16, 12); central slice 6
LESION_SLICES = slice(1, 4)          # the lesion lies in axial slices 1-3 only
ENCODER = EncoderConfig(name="vit", patch_size=8, hidden_size=16, num_layers=1, num_heads=2, mlp_dim=16)
torch.set_num_threads(1)


def anatomy() -> np.ndarray:
    """The ITK T1 in RAS voxel order, sampled down to (EDGE, EDGE, DEPTH), scaled to [0, 1]."""
    volume = np.asarray(nib.as_closest_canonical(nib.load(ITK_T1)).dataobj, np.float32)
    index = np.ix_(*[np.linspace(n // 8, n - 1 - n // 8, k).round().astype(int)
                     for n, k in zip(volume.shape, (EDGE, EDGE, DEPTH))])
    volume = volume[index]
    return (volume - volume.min()) / (volume.max() - volume.min())


def with_lesion(volume: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A T1-hypointense blob (80 % darker) in slices 1-3, at a random in-plane place inside the head."""
    out = volume.copy()
    cx, cy = rng.integers(5, EDGE - 5, 2)
    xx, yy = np.meshgrid(np.arange(EDGE), np.arange(EDGE), indexing="ij")
    blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / 6.0)[..., None]  # (X, Y, 1)
    out[..., LESION_SLICES] *= 1.0 - 0.8 * blob
    return out


def cohort(n_patients: int = 24, seed: int = 0):
    """One volume per patient, label p % 2 (1: the off-centre lesion); 12 train / 4 val / 8 test patients."""
    rng, base = np.random.default_rng(seed), anatomy()
    arrays, rows = {}, []
    for p in range(n_patients):
        split = "train" if p < n_patients // 2 else "val" if p < 2 * n_patients // 3 else "test"
        volume = base * rng.uniform(0.9, 1.1) + rng.normal(0, 0.02, base.shape)
        if p % 2:
            volume = with_lesion(volume, rng)
        arrays[f"img-{p:02d}"] = volume[None].astype(np.float32)  # (1, X, Y, Z)
        rows.append({"image_id": f"img-{p:02d}", "patient_id": f"pat-{p:012x}", "split": split, "label": p % 2,
                     "spatial_dims": 3, "modality": "MR"})
    cfg = PreprocessConfig(spatial_dims=2, size=[EDGE, EDGE], slices_from_3d=True)  # what made such a cache
    return MemoryCache(arrays, cfg), pd.DataFrame(rows)


def encoder_file(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    encoder = build_encoder(ENCODER, 2, [EDGE, EDGE])
    return save_encoder(tmp_path / "encoder2d.pt", encoder, ENCODER, 2, [EDGE, EDGE], pretrain_run_id="pre",
                        manifest_digest="dig")


def twins() -> MemoryCache:
    """The same real volume without and with the off-centre lesion: nothing else differs."""
    base = anatomy()
    return MemoryCache({"clean": base[None], "lesion": with_lesion(base, np.random.default_rng(1))[None]})


# ---------------------------------------------------------------------------------------- features
def test_only_slice_pooled_features_see_an_off_centre_lesion():
    from medssl.ladder.classifier import features
    cache = twins()
    torch.manual_seed(0)
    encoder = build_encoder(ENCODER, 2, [EDGE, EDGE]).eval()
    ids, labels = ["clean", "lesion"], [0, 1]
    central = features(encoder, ImageDataset(cache, ids, labels, spatial_dims=2), 2).feats  # (2, F)
    torch.testing.assert_close(central[0], central[1])  # the central slice is identical in both volumes
    for pool in ("mean", "max", "meanmax"):
        pooled = features(SlicePooled(encoder, pool), ImageDataset(cache, ids, labels, spatial_dims=3), 2).feats
        assert pooled.shape == (2, encoder.out_features * (2 if pool == "meanmax" else 1))
        assert (pooled[0] - pooled[1]).abs().max() > 1e-3, pool


def test_the_features_arm_reads_the_inputs_the_deep_arms_read(tmp_path):
    """LadderContext.dataset feeds every arm: whole volumes when slice-pooled (the engineered features then see
    the lesion), the central slice under `central` (they cannot)."""
    from medssl.ladder.child import engineered_features
    from medssl.ladder.ladder import _context
    cache = twins()
    df = pd.DataFrame({"image_id": ["clean", "lesion"], "patient_id": ["p0", "p1"], "split": ["test"] * 2,
                       "label": [0, 1], "spatial_dims": [3, 3]})
    contexts = {}
    for setting in ("central", "meanmax"):
        cfg = FinetuneConfig(slice_pooling=setting)
        contexts[setting] = _context(cfg, encoder_file(tmp_path), cache, df, "label", tmp_path / setting,
                                     NullTracker(), None, None, None, "none", None, "val_loss", None, None, None, [])
    central, pooled = contexts["central"], contexts["meanmax"]
    assert central.pooling is None and pooled.pooling == "meanmax"
    assert central.dataset(["clean"])[0]["image"].shape == (1, EDGE, EDGE)
    assert pooled.dataset(["clean"])[0]["image"].shape == (1, EDGE, EDGE, DEPTH)
    assert isinstance(pooled.encoder("scratch", 0), SlicePooled) and not isinstance(central.encoder("ssl", 0),
                                                                                      SlicePooled)
    flat = engineered_features(central, ["clean", "lesion"])
    np.testing.assert_array_equal(flat[0], flat[1])
    whole = engineered_features(pooled, ["clean", "lesion"])
    assert np.abs(whole[0] - whole[1]).max() > 1e-3
    assert central.digest != pooled.digest  # results of one setting are never taken for the other's


def test_which_models_are_slice_pooled():
    vol, img = (1, 16, 16, 12), (1, 16, 16)
    assert volume_pooling("meanmax", 2, [vol, vol]) == "meanmax" and volume_pooling("max", 2, [vol]) == "max"
    assert volume_pooling("central", 2, [vol]) is None          # the old behaviour, kept on request
    assert volume_pooling("meanmax", 3, [vol]) is None          # a 3D encoder reads volumes itself
    assert volume_pooling("meanmax", 2, [img, img]) is None     # 2D images: each is its own slice
    with pytest.raises(DataError, match="have 2 shapes"):
        volume_pooling("mean", 2, [vol, (1, 16, 16, 9)])       # volumes are batched whole: one slice count
    with pytest.raises(DataError, match="shapes"):
        volume_pooling("mean", 2, [vol, img])


def test_a_bad_setting_names_the_field(tmp_path):
    from medssl.config import load_pipeline
    assert FinetuneConfig().slice_pooling == "meanmax"
    good = tmp_path / "good.yaml"
    good.write_text("name: x\ndata: {demo: {}}\nfinetune: {slice_pooling: central}\n")
    assert load_pipeline(good).finetune.slice_pooling == "central"
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ndata: {demo: {}}\nfinetune: {slice_pooling: sum}\n")
    with pytest.raises(ConfigError, match="finetune.slice_pooling"):
        load_pipeline(bad)


# ------------------------------------------------------------------- ladder -> package -> evaluate / predict
def test_a_slice_pooled_ladder_child_is_scored_the_same_everywhere(tmp_path):
    """The kept package of every deep child, `evaluate` and `predict` give the ladder's own test predictions."""
    from medssl.cohort.splits import build_ladder
    from medssl.evaluate.predict import evaluate_model, predict, score_dataset
    from medssl.export.package import load_package
    from medssl.ladder.ladder import run_ladder
    cache, df = cohort()
    cfg = FinetuneConfig(protocols=["linear", "finetune"], arms=["ssl", "scratch", "features"], epochs=2,
                         batch_size=4, bootstrap=20, patience=1)
    rungs = build_ladder(df, "label", per_class=[4], seeds=[0])
    results = run_ladder(cfg, encoder_file(tmp_path), cache, df, "label", rungs, tmp_path / "ladder", NullTracker(),
                         log_models="none", positive=1)
    assert (results["status"] == "ok").all(), results["error"].tolist()
    deep = results[results["arm"] != "features"]
    assert set(zip(deep["arm"], deep["protocol"])) == {("ssl", "linear"), ("ssl", "finetune"), ("scratch", "finetune")}
    test = df[df["split"] == "test"]
    for _, row in results.iterrows():  # the features arm's kept probe too: it read the same whole volumes
        kept = load_package(row["model"])
        arch = kept.spec.architecture
        assert (arch.spatial_dims, arch.slice_pooling, arch.slices, kept.model.spatial_dims) == (2, "meanmax", DEPTH, 3)
        saved = pd.read_csv(row["predictions"]).set_index("image_id")
        ids, probs = score_dataset(kept.model, ImageDataset(cache, list(saved.index), list(saved["label"]),
                                                            spatial_dims=kept.model.spatial_dims))
        tolerance = 1e-9 if row["arm"] == "features" else 1e-5  # float64 probe; float32 networks
        np.testing.assert_allclose(probs[:, 1], saved.loc[ids, "score"], atol=tolerance)
        out = tmp_path / "evaluate" / row["protocol"] / row["arm"]
        evaluate_model(row["model"], cache, test, "label", out, n_boot=20)
        evaluated = pd.read_csv(out / "predictions.csv").set_index("image_id")
        np.testing.assert_allclose(evaluated.loc[saved.index, "score"], saved["score"], atol=1e-5)
        predicted = predict(row["model"], cache, test, out / "predict.csv").set_index("image_id")
        np.testing.assert_allclose(predicted.loc[saved.index, "score"], saved["score"], atol=1e-5)


def test_a_plain_classifier_file_keeps_its_slice_pooling(tmp_path):
    from medssl.evaluate.predict import load_model, save_classifier
    from medssl.models.classifier import Classifier
    from medssl.models.encoders import load_encoder
    encoder, info = load_encoder(encoder_file(tmp_path))
    model = Classifier(SlicePooled(encoder, "max"), 2, spatial_dims=3).eval()
    loaded = load_model(save_classifier(tmp_path / "clf.pt", model, info))
    assert isinstance(loaded.encoder, SlicePooled) and loaded.encoder.pool == "max" and loaded.spatial_dims == 3
    x = torch.from_numpy(twins().get("lesion"))[None]  # (1, 1, X, Y, Z)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


def test_volumes_of_another_slice_count_are_each_scored_whole(tmp_path):
    """An external site's volumes keep their native slices: `predict` scores each from all of its own."""
    from medssl.evaluate.predict import predict, save_classifier
    from medssl.models.classifier import Classifier
    from medssl.models.encoders import load_encoder
    encoder, info = load_encoder(encoder_file(tmp_path))
    model = Classifier(SlicePooled(encoder, "meanmax"), 2, spatial_dims=3).eval()
    base = anatomy()
    arrays = {"deep": base[None], "shallow": base[None, ..., 2:9],
              "lesion": with_lesion(base, np.random.default_rng(3))[None]}  # 12, 7 and 12 slices
    df = pd.DataFrame({"image_id": list(arrays), "patient_id": ["a", "b", "c"]})
    frame = predict(save_classifier(tmp_path / "clf.pt", model, info), MemoryCache(arrays), df,
                    tmp_path / "p.csv").set_index("image_id")
    with torch.no_grad():
        want = {i: float(torch.softmax(model(torch.from_numpy(a)[None]), 1)[0, 1]) for i, a in arrays.items()}
    np.testing.assert_allclose(frame.loc[list(want), "score"], list(want.values()), atol=1e-6)
    # a kept fine-tuned rung is an ensemble of slice-pooled fold models: scored the same way
    from medssl.evaluate.predict import score_dataset
    from medssl.models.ensemble import Ensemble
    torch.manual_seed(1)
    other = Classifier(SlicePooled(build_encoder(ENCODER, 2, [EDGE, EDGE]), "meanmax"), 2, spatial_dims=3)
    ensemble = Ensemble([model, other.eval()])
    ids, probs = score_dataset(ensemble, ImageDataset(MemoryCache(arrays), list(arrays), [0, 0, 1], spatial_dims=3))
    with torch.no_grad():
        each = [float(torch.softmax(ensemble(torch.from_numpy(arrays[i])[None]), 1)[0, 1]) for i in ids]
    np.testing.assert_allclose(probs[:, 1], each, atol=1e-6)


# ---------------------------------------------------------------------------------- served and exported
def _pooled_package(tmp_path: Path) -> Path:
    from medssl.export.package import save_package
    from medssl.models.classifier import Classifier
    enc_cfg = EncoderConfig(name="resnet10", width=0.25)
    torch.manual_seed(0)
    model = Classifier(SlicePooled(build_encoder(enc_cfg, 2, [16, 16]), "meanmax"), 2, threshold=0.4, spatial_dims=3)
    pre = PreprocessConfig(spatial_dims=2, spacing=[8.0, 8.0], size=[16, 16], slices_from_3d=True)
    spec = {"architecture": {"encoder": enc_cfg.model_dump(), "spatial_dims": 2, "img_size": [16, 16], "n_classes": 2,
                             "slice_pooling": "meanmax", "slices": 8},
            "preprocess": pre.model_dump(mode="json", exclude={"cache_dir"}),
            "labels": {"column": "lesion", "names": ["healthy", "lesion"], "positive": "lesion"},
            "inputs": {"modalities": ["MR"], "image_dims": [3]}}
    return save_package(tmp_path / "pooled", model, spec)


def test_served_scans_are_scored_from_all_their_slices(tmp_path):
    """The pyfunc's scans path equals manifest -> cache -> whole volume -> model, and reads every slice."""
    import shutil
    from medssl.export.package import load_package
    from medssl.export.pyfunc import ScanClassifier
    from medssl.ingest.manifest import build_manifest, read_manifest
    from medssl.preprocess.cache import VolumeCache
    package = load_package(_pooled_package(tmp_path))
    folder = tmp_path / "scan"
    folder.mkdir()
    shutil.copy(ITK_T1, folder)
    served = ScanClassifier(package).predict(pd.DataFrame({"path": [str(folder)]}))
    build_manifest(folder, tmp_path / "ref.csv", salt="s", workers=1, progress=False)
    df, meta = read_manifest(tmp_path / "ref.csv")
    cache = VolumeCache(tmp_path / "ref-cache", package.spec.preprocess, meta["root"])
    assert not cache.build(df, workers=1)
    volume = ImageDataset(cache, list(df["image_id"]), [0], spatial_dims=3)[0]["image"]  # (1, 16, 16, Z)
    assert volume.ndim == 4 and volume.shape[-1] > 8  # native slices, not the 8 of the exports' example
    with torch.no_grad():
        want = torch.softmax(package.model(volume[None]), 1).numpy()
        central = torch.softmax(package.model(volume[None, ..., volume.shape[-1] // 2]), 1).numpy()
    np.testing.assert_allclose(served[["p_healthy", "p_lesion"]].to_numpy(), want, atol=1e-5)
    assert np.abs(want - central).max() > 1e-4  # it did not fall back to one slice


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_exports_of_a_slice_pooled_model_match_at_any_depth(tmp_path, fmt):
    from medssl.export.formats import _run_onnx, export
    from medssl.export.package import load_package
    package = load_package(_pooled_package(tmp_path))
    package.model.encoder.chunk = 3  # eager chunks: a traced graph must not keep their count
    parity = export(package, fmt, tmp_path / f"model.{fmt}")  # checked at the example depth (8 slices)
    assert parity["max_abs_diff"] <= parity["tolerance"]
    x = torch.from_numpy(np.stack([anatomy()[:, :, :DEPTH], with_lesion(anatomy(), np.random.default_rng(2))]))
    x = x[:, None]  # (2, 1, 16, 16, 12): another depth than the traced one
    with torch.no_grad():
        want = torch.softmax(package.model(x), 1).numpy()
    got = _run_onnx(Path(parity["path"]), x) if fmt == "onnx" else \
        torch.jit.load(parity["path"]).eval()(x).detach().numpy()
    np.testing.assert_allclose(got, want, atol=1e-4)
