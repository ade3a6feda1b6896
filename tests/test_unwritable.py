"""A workdir or outbox that cannot take files is a clear error before any MLflow run is opened (issue 11).

The tests run as root in CI, where permission bits do not stop writes; a path below a regular file cannot be
written by anyone, so it stands for every unwritable place.
"""
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from medssl.cli import main
from medssl.errors import TrackingError
from medssl.tracking.tracker import Tracker

DEMO = Path(__file__).resolve().parents[1] / "pipelines" / "demo.yaml"


def runs_in(store: str) -> list:
    client = MlflowClient(store)
    return [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]


@pytest.mark.parametrize("setting", ["workdir", "preprocess.cache_dir", "manifest.out"])
def test_unwritable_place_stops_the_run_before_mlflow(setting, tmp_path, monkeypatch, capsys):
    store = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    (tmp_path / "a-file").write_text("not a folder")
    blocked = tmp_path / "a-file" / ("m.csv" if setting == "manifest.out" else "w")
    overrides = {"workdir": f"workdir={tmp_path}/work", "preprocess.cache_dir": f"preprocess.cache_dir={tmp_path}/c",
                 "manifest.out": f"manifest.out={tmp_path}/m.csv"}
    overrides[setting] = f"{setting}={blocked}"
    assert main(["run", str(DEMO), *overrides.values()]) == 2
    err = capsys.readouterr().err
    assert "cannot write" in err and setting in err and "Traceback" not in err
    assert not (tmp_path / "mlflow.db").exists() or runs_in(store) == []


def test_unwritable_outbox_is_refused_when_the_tracker_is_made(tmp_path):
    store = f"sqlite:///{tmp_path}/mlflow.db"
    (tmp_path / "a-file").write_text("")
    with pytest.raises(TrackingError, match="outbox folder is not writable"):
        Tracker("x", tracking_uri=store, outbox_dir=tmp_path / "a-file" / "outbox")
    assert not (tmp_path / "mlflow.db").exists() or runs_in(store) == []
