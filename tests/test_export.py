"""The deployable model (issue 14): a pickle-free package (safetensors + JSON) that loads without running code,
an MLflow pyfunc that takes scans and serves, and ONNX / TorchScript / MONAI-bundle exports with output parity;
on real images (the ITK T1 volume, pydicom's CT slice), 2D and 3D."""
from __future__ import annotations

import json
import os
import pickle
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from pydicom.data import get_testdata_file

from medssl.config import EncoderConfig, PreprocessConfig
from medssl.errors import DataError, TrainingError
from medssl.export.card import model_card
from medssl.export.formats import export, load_bundle_network
from medssl.export.package import input_size, load_package, read_spec, save_package
from medssl.export.pyfunc import save_pyfunc
from medssl.export.resolve import open_model
from medssl.ingest.manifest import build_manifest, read_manifest
from medssl.models.classifier import Classifier
from medssl.models.encoders import build_encoder
from medssl.preprocess.cache import VolumeCache
from medssl.train.loaders import ImageDataset

ITK_T1 = Path("/usr/share/doc/insighttoolkit5-examples/examples/Data/KmeansTest_T1UCharRaw.nii.gz")
CT_SLICE = Path(get_testdata_file("CT_small.dcm"))
ENCODERS = {"resnet": EncoderConfig(name="resnet10", width=0.25),
            "vit": EncoderConfig(name="vit", patch_size=8, hidden_size=32, num_layers=2, num_heads=2, mlp_dim=64)}


def _spec(dims: int, encoder: EncoderConfig, modality: str) -> dict:
    size = [32, 32, 16] if dims == 3 else [32, 32]
    # a CNN's img_size is the pretraining crop (it takes any size); what it is fed is preprocess.size
    crop = size if encoder.name == "vit" else [16] * dims
    return {"architecture": {"encoder": encoder.model_dump(), "spatial_dims": dims, "img_size": crop, "n_classes": 2},
            "preprocess": PreprocessConfig(spatial_dims=dims, size=size,
                                           spacing=[6.0, 6.0, 6.0] if dims == 3 else [4.0, 4.0]
                                           ).model_dump(mode="json", exclude={"cache_dir"}),
            "labels": {"column": "lesion", "names": ["healthy", "lesion"], "positive": "lesion"},
            "inputs": {"modalities": [modality], "image_dims": [dims]},
            "lineage": {"rung": "per_class_5", "arm": "ssl", "seed": 0, "labelled_patients": 10}}


def _package(tmp_path: Path, dims: int, kind: str = "resnet", modality: str = "MR") -> Path:
    torch.manual_seed(0)
    spec = _spec(dims, ENCODERS[kind], modality)
    arch = spec["architecture"]
    model = Classifier(build_encoder(ENCODERS[kind], dims, arch["img_size"]), 2, threshold=0.37, spatial_dims=dims)
    return save_package(tmp_path / f"package-{dims}d-{kind}", model, spec)


def _scan(tmp_path: Path, dims: int) -> Path:
    """A folder holding one real scan: the ITK T1 (3D MR) or pydicom's CT slice (2D)."""
    folder = tmp_path / f"scan-{dims}d"
    folder.mkdir(exist_ok=True)
    shutil.copy(ITK_T1 if dims == 3 else CT_SLICE, folder)
    return folder


def _training_path_probs(package_dir: Path, scan: Path, tmp_path: Path) -> np.ndarray:
    """The probabilities the ladder would compute: manifest -> VolumeCache -> ImageDataset -> model."""
    package = load_package(package_dir)
    build_manifest(scan, tmp_path / "ref.csv", salt="s", workers=1, progress=False)
    df, meta = read_manifest(tmp_path / "ref.csv")
    cache = VolumeCache(tmp_path / "ref-cache", package.spec.preprocess, meta["root"])
    assert not cache.build(df, workers=1)
    image = ImageDataset(cache, list(df["image_id"]), [0], spatial_dims=package.spec.architecture.spatial_dims)[0]
    with torch.no_grad():
        return torch.softmax(package.model(image["image"][None]), 1).numpy()


@pytest.mark.parametrize("dims,kind", [(2, "resnet"), (3, "resnet"), (3, "vit")])
def test_package_round_trip_is_exact_and_pickle_free(tmp_path, dims, kind):
    folder = _package(tmp_path, dims, kind)
    assert sorted(p.name for p in folder.iterdir()) == ["medssl-model.json", "model.safetensors"]
    raw = (folder / "model.safetensors").read_bytes()
    assert b"\x80\x04" not in raw[:8] and raw[8:9] == b"{"    # safetensors: a length + JSON header, no pickle
    package = load_package(folder)
    assert package.spec.threshold == pytest.approx(0.37) and float(package.model.threshold) == pytest.approx(0.37)
    torch.manual_seed(1)
    model = Classifier(build_encoder(ENCODERS[kind], dims, package.spec.architecture.img_size), 2, spatial_dims=dims)
    model.load_state_dict(package.model.state_dict())
    x = torch.randn(2, 1, *package.spec.architecture.img_size)
    assert torch.equal(model.eval()(x), package.model(x))


def test_tampered_or_foreign_models_are_refused_and_never_executed(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.write_text, (marker, "code ran"))

    folder = _package(tmp_path, 2)
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF                                     # one flipped bit in the weights
    weights.write_bytes(bytes(data))
    with pytest.raises(TrainingError, match="sha256"):
        load_package(folder)
    weights.write_bytes(pickle.dumps(Payload()))        # weights swapped for a malicious pickle
    with pytest.raises(TrainingError):
        load_package(folder)
    spec = json.loads((folder / "medssl-model.json").read_text())
    spec["architecture"]["exec"] = "__import__('os')"
    (folder / "medssl-model.json").write_text(json.dumps(spec))
    with pytest.raises(TrainingError, match="architecture.exec"):
        read_spec(folder)
    # a pickled MLflow pytorch model (what medssl used to log): refused, not unpickled
    planted = tmp_path / "planted"
    (planted / "data").mkdir(parents=True)
    (planted / "data" / "model.pth").write_bytes(pickle.dumps(Payload()))
    (planted / "MLmodel").write_text("flavors:\n  pytorch:\n    model_data: data\n    pytorch_version: 2.13.0\n"
                                     "  python_function:\n    loader_module: mlflow.pytorch\n    data: data\n")
    with pytest.raises(TrainingError, match="pickle"):
        open_model(planted)
    from medssl.evaluate.predict import load_model
    with pytest.raises(TrainingError):
        load_model(planted / "data" / "model.pth")     # a classifier file that is a pickle: weights_only refuses
    assert not marker.exists()


@pytest.mark.parametrize("dims,kind", [(2, "resnet"), (3, "resnet"), (3, "vit")])
def test_exports_match_pytorch_within_tolerance(tmp_path, dims, kind):
    package = load_package(_package(tmp_path, dims, kind))
    x = torch.randn(3, 1, *input_size(package.spec))
    with torch.no_grad():
        want = torch.softmax(package.model(x), 1)
    for fmt, out in [("onnx", tmp_path / "m.onnx"), ("torchscript", tmp_path / "m.ts"), ("bundle", tmp_path / "b")]:
        parity = export(package, fmt, out)
        assert parity["max_abs_diff"] <= parity["tolerance"] == 1e-4, parity
        assert not package.model.training  # exporting leaves the model as it was (eval)
    # the bundle loads with MONAI's own tools: its network from configs/inference.json, its metadata
    from monai.data import load_net_with_metadata
    _, meta, extra = load_net_with_metadata(str(tmp_path / "b" / "models" / "model.ts"),
                                            more_extra_files=["medssl-model.json"])
    assert meta["medssl"]["threshold"] == pytest.approx(0.37)
    assert json.loads(extra["medssl-model.json"])["labels"]["positive"] == "lesion"
    assert torch.allclose(load_bundle_network(tmp_path / "b")(x), want, atol=1e-5)


@pytest.mark.parametrize("dims,modality", [(3, "MR"), (2, "CT")])
def test_pyfunc_scores_real_scans_as_training_does(tmp_path, dims, modality):
    import mlflow.pyfunc
    package_dir = _package(tmp_path, dims, modality=modality)
    scan = _scan(tmp_path, dims)
    served = mlflow.pyfunc.load_model(str(save_pyfunc(package_dir, tmp_path / "mlflow-model")))
    file = next(scan.iterdir())
    frame = served.predict(pd.DataFrame({"path": [str(scan), str(file)]}))
    want = _training_path_probs(package_dir, scan, tmp_path)
    assert list(frame.columns) == ["path", "p_healthy", "p_lesion", "call"]
    assert np.allclose(frame[["p_healthy", "p_lesion"]].to_numpy(), np.repeat(want, 2, axis=0), atol=1e-6)
    expected = "lesion" if want[0, 1] >= 0.37 else "healthy"
    assert frame["call"].tolist() == [expected, expected]


def test_scans_unlike_the_training_data_are_refused_before_inference(tmp_path):
    import mlflow.pyfunc
    # DICOM says its modality (a NIfTI has none: it is read as the modality the model was trained on)
    ct_model = mlflow.pyfunc.load_model(str(save_pyfunc(_package(tmp_path, 2, modality="CT"), tmp_path / "ct")))
    with pytest.raises(DataError, match="MR scan"):
        ct_model.predict(pd.DataFrame({"path": [get_testdata_file("MR_small.dcm")]}))
    model_3d = mlflow.pyfunc.load_model(str(save_pyfunc(_package(tmp_path, 3, modality="CT"), tmp_path / "3d")))
    with pytest.raises(DataError, match="2D scan"):
        model_3d.predict(pd.DataFrame({"path": [str(_scan(tmp_path, 2))]}))
    with pytest.raises(DataError, match="no such file"):
        model_3d.predict(pd.DataFrame({"path": [str(tmp_path / "missing.nii.gz")]}))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(240)
def test_mlflow_models_serve_answers_a_request_with_scans(tmp_path):
    model_dir = save_pyfunc(_package(tmp_path, 3), tmp_path / "served")
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", str(model_dir),
                               "--env-manager", "local", "-p", str(port), "-h", "127.0.0.1"],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        body = json.dumps({"dataframe_split": {"columns": ["path"], "data": [[str(_scan(tmp_path, 3))]]}}).encode()
        answer = None
        for _ in range(180):
            try:
                request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                                 headers={"Content-Type": "application/json"})
                answer = json.loads(urllib.request.urlopen(request, timeout=60).read())
                break
            except OSError:
                assert server.poll() is None, server.stderr.read().decode()[-2000:]
                time.sleep(1)
        assert answer is not None, "the server never answered"
        row = answer["predictions"][0]
        assert set(row) == {"path", "p_healthy", "p_lesion", "call"}
        assert row["p_healthy"] + row["p_lesion"] == pytest.approx(1, abs=1e-6)
        want = _training_path_probs(model_dir / "data" / "package-3d-resnet", _scan(tmp_path, 3), tmp_path)
        assert row["p_lesion"] == pytest.approx(float(want[0, 1]), abs=1e-6)
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_model_card_carries_budget_metrics_and_deltas_but_no_identifiers(tmp_path):
    spec = load_package(_package(tmp_path, 2)).spec
    card = model_card(spec, data={"labelled patients in the rung": 10, "test patients": 40},
                      sites={"internal": {"auroc": 0.81, "auroc_ci_low": 0.7, "auroc_ci_high": 0.9},
                             "site-B": {"auroc": 0.66, "auroc_ci_low": 0.5, "auroc_ci_high": 0.8}},
                      deltas={"scratch": {"delta": 0.07, "ci_low": 0.02, "ci_high": 0.12}})
    assert "0.810 [0.700, 0.900]" in card and "| site-B |" in card and "+0.070 [0.020, 0.120]" in card
    assert "10 labelled patients" in card and "**lesion**" in card and "0.370" in card
    assert "pat-" not in card and "MRN" not in card


def test_export_command_writes_a_checked_onnx_file(tmp_path):
    from medssl.cli import main
    folder = _package(tmp_path, 3)
    assert main(["export", str(folder), "--format", "onnx", "--out", str(tmp_path / "model.onnx")]) == 0
    import onnxruntime
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(2, 1, 32, 32, 16)
    with torch.no_grad():
        want = torch.softmax(load_package(folder).model(x), 1).numpy()
    assert np.abs(session.run(None, {"image": x.numpy()})[0] - want).max() <= 1e-4
    assert main(["export", str(tmp_path / "nothing"), "--format", "onnx", "--out", str(tmp_path / "x.onnx")]) != 0


def test_registered_model_card_takes_the_reports_pooled_evidence():
    from medssl.ladder.cards import evidence
    summary = pd.DataFrame([
        {"site": "internal", "rung": "per_class_5", "protocol": "finetune", "arm": "ssl", "auroc": 0.8,
         "auroc_ci_low": 0.7, "auroc_ci_high": 0.9, "delta_auroc_vs_scratch": 0.1,
         "delta_auroc_vs_scratch_ci_low": 0.02, "delta_auroc_vs_scratch_ci_high": 0.2,
         "delta_auroc_vs_features": -0.05, "delta_auroc_vs_features_ci_low": -0.1,
         "delta_auroc_vs_features_ci_high": 0.01},
        {"site": "siteB", "rung": "per_class_5", "protocol": "finetune", "arm": "ssl", "auroc": 0.6,
         "auroc_ci_low": 0.5, "auroc_ci_high": 0.7},
        {"site": "internal", "rung": "per_class_5", "protocol": "finetune", "arm": "scratch", "auroc": 0.7}])
    facts = evidence(summary, "per_class_5", "finetune", "ssl")
    assert facts["sites"] == {"internal": {"auroc": 0.8, "auroc_ci_low": 0.7, "auroc_ci_high": 0.9},
                              "siteB": {"auroc": 0.6, "auroc_ci_low": 0.5, "auroc_ci_high": 0.7}}
    assert facts["deltas"] == {"scratch (internal)": {"delta": 0.1, "ci_low": 0.02, "ci_high": 0.2},
                               "features (internal)": {"delta": -0.05, "ci_low": -0.1, "ci_high": 0.01}}
    # a registered baseline: the same pair from its side (scratch − SSL)
    scratch = evidence(summary, "per_class_5", "finetune", "scratch")
    assert scratch["sites"] == {"internal": {"auroc": 0.7}}
    assert scratch["deltas"] == {"ssl (internal)": {"delta": -0.1, "ci_low": -0.2, "ci_high": -0.02}}


def test_a_features_package_round_trips_in_float64_and_has_no_traced_export(tmp_path):
    """The non-deep arm's package: JSON settings + float64 tensors (no pickle); it scores a real slice as the
    scikit-learn probe does, its spec is exactly one kind, and ONNX / TorchScript refuse it with the reason."""
    from medssl.models.engineered import image_features
    from medssl.models.features_model import from_probe
    from medssl.models.probe import fit_logistic
    ct = torch.from_numpy(_training_slices()).float()                       # (N, 1, 32, 32) real CT, varied
    x = np.stack([image_features(image) for image in ct.numpy()])          # (N, F)
    y = (ct.mean(dim=(1, 2, 3)) > ct.mean()).long().numpy()
    probe = fit_logistic(x, y, 0.1, True, 0)
    model = from_probe(probe, 2, x.shape[1], 0.4321, spatial_dims=2)
    spec = _spec(2, ENCODERS["resnet"], "CT")
    folder = save_package(tmp_path / "features", model, spec)
    written = json.loads((folder / "medssl-model.json").read_text())["architecture"]
    assert written["encoder"] is None and written["features"]["n_features"] == x.shape[1] and written["members"] == 1
    package = load_package(folder)
    with torch.no_grad():
        got = torch.softmax(package.model(ct), 1).numpy()
    assert np.abs(got - probe.predict_proba(x)).max() <= 1e-12 and package.spec.threshold == 0.4321
    with pytest.raises(TrainingError, match="engineered-features model has no onnx form"):
        export(package, "onnx", tmp_path / "m.onnx")
    both = {**written, "encoder": ENCODERS["resnet"].model_dump()}
    (folder / "medssl-model.json").write_text(json.dumps({**json.loads((folder / "medssl-model.json").read_text()),
                                                          "architecture": both}))
    with pytest.raises(TrainingError, match="exactly one of encoder"):
        read_spec(folder)


def _training_slices() -> np.ndarray:
    """Twelve 32x32 crops of pydicom's CT slice at different offsets and contrasts, scaled to [0, 1]."""
    from pydicom import dcmread
    image = dcmread(CT_SLICE).pixel_array.astype(np.float64)
    image = (image - image.min()) / (image.max() - image.min())
    crops = [image[r:r + 32, c:c + 32] ** g for r in (0, 16, 32) for c in (8, 24) for g in (0.7, 1.4)]
    return np.stack(crops)[:, None]
