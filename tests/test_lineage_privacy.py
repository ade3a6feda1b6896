"""The demo pipeline, tiny, in-process into a local MLflow store (SQLite + artifact folder): one manifest
digest for the whole lineage, the salt in the workdir whatever the current directory, and no header
identifier or date the demo wrote anywhere in the MLflow store or medssl's outputs."""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pydicom
import pytest
from mlflow.tracking import MlflowClient

from medssl.cli import main
from medssl.config import DemoConfig
from medssl.demo.cohort import plan_subjects

pytestmark = pytest.mark.timeout(600)

DEMO = Path(__file__).resolve().parents[1] / "pipelines" / "demo.yaml"
TINY = ["data.demo.subjects=20", "data.demo.size=20", "data.demo.positive_fraction=0.3",
        "preprocess.size=[20,20,20]", "pretrain.crop=[16,16,16]", "pretrain.train.steps=2",
        "pretrain.train.batch_size=4", "pretrain.train.warmup_steps=1", "pretrain.train.log_every=1",
        "pretrain.train.checkpoint_every=2", "split.ladder.per_class=[2]", "split.ladder.seeds=[0]",
        "manifest.workers=1"]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """`medssl run pipelines/demo.yaml --until pretrain`, run from a directory other than the workdir's
    parent, with no MEDSSL_SALT: the salt must be made in (and read from) the workdir."""
    base = tmp_path_factory.mktemp("lineage")
    elsewhere = base / "cwd"
    elsewhere.mkdir()
    mp = pytest.MonkeyPatch()
    mp.chdir(elsewhere)
    mp.delenv("MEDSSL_SALT", raising=False)
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{base}/mlflow.db")
    args = ["run", str(DEMO), "--until", "pretrain", f"workdir={base}/work", f"manifest.out={base}/out/demo.csv",
            f"preprocess.cache_dir={base}/cache", *TINY]
    try:
        assert main(args) == 0
    finally:
        mp.undo()
    return base


def _runs(base: Path) -> list:
    client = MlflowClient(f"sqlite:///{base}/mlflow.db")
    experiment = client.get_experiment_by_name("demo")
    return client.search_runs([experiment.experiment_id])


def test_every_stage_and_run_records_the_same_manifest_digest(pipeline):
    base = pipeline
    csv = base / "out" / "demo.csv"
    digest = hashlib.sha256(csv.read_bytes()).hexdigest()
    meta = json.loads(csv.with_suffix(".meta.json").read_text())
    assert meta["digest"] == digest                                    # the file is as the manifest stage wrote it
    stages = {p.stem: json.loads(p.read_text()) for p in (base / "work" / "demo" / "stages").glob("*.json")}
    assert stages["manifest"]["digest"] == stages["splits"]["digest"] == digest
    by_stage = {r.data.tags.get("medssl.stage"): r for r in _runs(base)}
    assert {"manifest", "pretrain"} <= set(by_stage)
    for name in ("manifest", "pretrain"):
        run = by_stage[name]
        assert run.data.tags["medssl.manifest_digest"] == digest, name
        assert {d.dataset.digest for d in run.inputs.dataset_inputs} == {digest[:32]}, name
    splits = json.loads(csv.with_suffix(".splits.json").read_text())
    assert splits["settings"]["manifest_digest"] == digest and set(splits["splits"].values()) >= {"train", "test"}


def test_salt_lives_in_the_workdir_not_the_current_directory(pipeline, tmp_path, monkeypatch):
    from medssl.pipeline.context import pseudonym_salt
    base = pipeline
    salt = (base / "work" / "salt").read_text().strip()
    assert len(salt) == 32 and (base / "work" / "salt").stat().st_mode & 0o077 == 0
    assert not (base / "cwd" / ".medssl").exists()                     # nothing beside the current directory
    monkeypatch.delenv("MEDSSL_SALT", raising=False)
    monkeypatch.chdir(tmp_path)
    assert pseudonym_salt(base / "work") == salt                      # from any directory, the same salt
    assert not (tmp_path / ".medssl").exists()
    monkeypatch.setenv("MEDSSL_SALT", "team-salt")
    assert pseudonym_salt(base / "work") == "team-salt"


def _identifiers(demo_images: Path, subjects) -> set[str]:
    """Every identifier and date in the demo's DICOM headers and BIDS sidecars, and the Subjects' own."""
    found = set()
    for s in subjects:
        found |= {s.patient_id, s.patient_name, s.birth_date, f"{s.birth_date[:4]}-{s.birth_date[4:6]}-"
                  f"{s.birth_date[6:]}", s.patient_name.replace("^", " ")}
    for path in demo_images.rglob("*.dcm"):
        if path.stat().st_size == 0:
            continue
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        for keyword in ("PatientID", "PatientName", "PatientBirthDate", "StudyDate", "SeriesDate",
                        "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "InstitutionName"):
            value = str(ds.get(keyword, "") or "")
            if value:
                found.add(value)
    for path in demo_images.rglob("*.json"):
        sidecar = json.loads(path.read_text())
        found |= {str(sidecar[k]) for k in ("PatientName", "PatientID", "PatientBirthDate")}
        when = sidecar["AcquisitionDateTime"]
        found |= {when, when[:10], when[:10].replace("-", "")}
    return {v for v in found if len(v) >= 6}


def _needles(base: Path) -> set[str]:
    demo_images = base / "work" / "demo" / "demo_data" / "images"
    subjects = plan_subjects(DemoConfig(subjects=20, size=20, positive_fraction=0.3, dicom_fraction=0.5, seed=0),
                             0.2)
    needles = _identifiers(demo_images, subjects)
    assert len(needles) > 60 and any(re.fullmatch(r"\d{8}", n) for n in needles)
    return needles


def _hits(data: bytes, needles: set[str]) -> list[str]:
    return sorted(n for n in needles if n.encode() in data)


def test_no_header_identifier_or_date_reaches_mlflow_or_the_outputs(pipeline):
    """Every file medssl wrote: the MLflow database and artifacts (the manifest logged there included), the
    manifest files, the workdir (stage records, splits, checkpoints, encoder), the cache. Left out: the demo's
    own input folder (the patient data itself) and the `paths` column of the local manifest CSV, which the
    loader needs (data_manifests/README.md: MLflow gets the shared copy, with date/id-like path parts hashed)."""
    import pandas as pd
    base = pipeline
    needles, inputs, local = _needles(base), base / "work" / "demo" / "demo_data", base / "out" / "demo.csv"
    logged = [p for p in (base / "cwd" / "mlruns").rglob("*.csv") if "manifest" in p.parts]
    assert logged, "the manifest is logged to MLflow: the scan below covers it"
    leaks = {}
    for path in base.rglob("*"):
        if not path.is_file() or inputs in path.parents:
            continue
        data = path.read_bytes()
        if path == local:
            data = pd.read_csv(path, dtype=str).drop(columns="paths").to_csv().encode()
        if _hits(data, needles):
            leaks[str(path.relative_to(base))] = _hits(data, needles)[:5]
    assert not leaks, leaks
