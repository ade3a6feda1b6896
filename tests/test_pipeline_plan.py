"""`medssl run --dry-run` plans every shipped pipeline without running anything; the CLI fails cleanly."""
from pathlib import Path

import pytest

from medssl.cli import main

PIPELINES = sorted(Path(__file__).resolve().parents[1].joinpath("pipelines").glob("*.yaml"))


@pytest.mark.parametrize("path", PIPELINES, ids=lambda p: p.name)
def test_dry_run_plans_all_stages(path, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    assert main(["run", str(path), "--dry-run", f"workdir={tmp_path}/work"]) == 0
    err = capsys.readouterr().err
    for stage in ("manifest", "splits", "cache", "pretrain", "ladder", "report"):
        assert stage in err
    assert not (tmp_path / "mlflow.db").exists(), "a dry run must not touch MLflow"
    assert not (tmp_path / "work").exists(), "a dry run must not write anything"


def test_bad_config_is_a_message_not_a_traceback(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ndata: {demo: {}}\npretrain: {crop: [32, 32, 32], oops: 1}\n")
    assert main(["run", str(bad), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "pretrain.oops: unknown key" in err and "Traceback" not in err


def test_missing_folder_is_a_message(tmp_path, capsys):
    code = main(["manifest", "build", str(tmp_path / "nope"), "--out", str(tmp_path / "m.csv")])
    assert code == 2
    assert "does not exist" in capsys.readouterr().err


def test_a_stage_revision_invalidates_it_and_everything_after(tmp_path, monkeypatch):
    """After an upgrade that changes what a stage writes, its finished work (and all downstream) reruns."""
    import dataclasses
    from medssl.pipeline import runner as pipeline
    from medssl.config import load_pipeline
    monkeypatch.chdir(tmp_path)
    cfg = load_pipeline(PIPELINES[0], [f"workdir={tmp_path}/work"])
    before = pipeline.Pipeline(cfg).fingerprints()
    bumped = tuple(dataclasses.replace(s, revision=s.revision + 1) if s.name == "cache" else s
                   for s in pipeline.STAGES)
    monkeypatch.setattr(pipeline, "STAGES", bumped)
    after = pipeline.Pipeline(cfg).fingerprints()
    changed = {name for name in before if before[name] != after[name]}
    assert changed == {"cache", "pretrain", "ladder", "report"}
