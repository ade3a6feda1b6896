"""Tracker against a real MLflow SQLite store: run tree, params, artifacts, datasets, lineage, outages."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import time

import matplotlib
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException

from medssl.errors import TrackingError
from medssl.tracking.tracker import NullTracker, Tracker, flatten, lineage_tags

matplotlib.use("Agg")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"  # one store: schema set-up costs seconds


@pytest.fixture
def tracker(store, tmp_path, request):
    return Tracker(request.node.name, tracking_uri=store, outbox_dir=tmp_path / "outbox", end_grace_s=0)


def manifest() -> pd.DataFrame:
    return pd.DataFrame({"image_id": ["img-0123456789ab", "img-0123456789ac"],
                         "patient_id": ["pat-0123456789ab", "pat-0123456789ac"], "label": [0, 1]})


def test_runs_nest_under_the_open_run_or_the_given_parent(tracker):
    with tracker.run("pipeline", tags={"medssl.pipeline": "demo"}) as parent:
        with tracker.run("pretrain") as child:
            with tracker.run("probe") as grandchild:
                pass
        with tracker.run("ladder", parent_run_id=parent.info.run_id) as sibling:
            pass
    client = tracker.client
    tags = {r.info.run_name: r.data.tags for r in (client.get_run(x.info.run_id)
                                                   for x in (parent, child, grandchild, sibling))}
    assert "mlflow.parentRunId" not in tags["pipeline"]
    assert tags["pretrain"]["mlflow.parentRunId"] == parent.info.run_id
    assert tags["probe"]["mlflow.parentRunId"] == child.info.run_id
    assert tags["ladder"]["mlflow.parentRunId"] == parent.info.run_id
    assert tags["pipeline"]["medssl.pipeline"] == "demo"
    assert client.get_run(parent.info.run_id).info.status == "FINISHED"


def test_a_failing_stage_marks_its_run_failed_and_raises(tracker):
    with pytest.raises(ValueError):
        with tracker.run("broken") as run:
            raise ValueError("boom")
    assert tracker.client.get_run(run.info.run_id).info.status == "FAILED"


def test_params_are_flattened_and_long_values_cut(tracker):
    assert flatten({"a": {"b": {"c": 1}, "d": [1, 2]}, "e": None}) == {"a.b.c": "1", "a.d": "[1, 2]", "e": "None"}
    nested = {f"k{i}": {"x": i} for i in range(150)}  # more than MLflow's 100 params per request
    with tracker.run("params") as run:
        tracker.log_params({"pipeline": {"name": "demo", "scale": 1.5}, "long": "x" * 10000, **nested})
    params = tracker.client.get_run(run.info.run_id).data.params
    assert params["pipeline.name"] == "demo" and params["pipeline.scale"] == "1.5"
    assert len(params["long"]) <= 6000 and params["long"].endswith("[truncated]")
    assert params["k149.x"] == "149" and len(params) == 153


def test_metric_history_keeps_steps_and_values(tracker):
    with tracker.run("metrics") as run:
        for step in range(30):
            tracker.log_metrics({"loss": 1.0 / (step + 1), "acc": step / 30}, step=step)
    history = tracker.client.get_metric_history(run.info.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(s, 1.0 / (s + 1)) for s in range(30)]


def test_figures_text_and_files_become_artifacts(tracker, tmp_path):
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "table.csv").write_text("a,b\n1,2\n")
    (tmp_path / "file.json").write_text("{}")
    with tracker.run("artifacts") as run:
        tracker.log_figure(fig, "curves/loss.png")
        tracker.log_text("hello", "notes.txt")
        tracker.log_artifacts(tmp_path / "report", "report")
        tracker.log_artifact(tmp_path / "file.json")
    plt.close(fig)
    client, rid = tracker.client, run.info.run_id
    assert {a.path for a in client.list_artifacts(rid)} == {"curves", "notes.txt", "report", "file.json"}
    png = client.download_artifacts(rid, "curves/loss.png", str(tmp_path / "dl"))
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert [a.path for a in client.list_artifacts(rid, "report")] == ["report/table.csv"]
    assert not any((tmp_path / "outbox" / "files").rglob("*.*"))  # scratch copies removed once delivered


def test_dataset_is_logged_with_the_manifest_digest(tracker):
    sha256 = "ec2e25a6067e1cbc6135d08b16b6a3811e3992b2022ac00e0f73e08332f629b1"  # longer than MLflow's 36
    with tracker.run("manifest") as run:
        tracker.log_dataset(manifest(), sha256, "demo", source="data_manifests/demo.csv")
    got = tracker.client.get_run(run.info.run_id)
    dataset_input = got.inputs.dataset_inputs[0]
    dataset = dataset_input.dataset
    assert (dataset.name, dataset.digest) == ("demo", sha256[:32])
    assert {t.key: t.value for t in dataset_input.tags}["medssl.manifest_digest"] == sha256
    assert json.loads(dataset.profile)["num_rows"] == 2
    assert got.data.tags["medssl.manifest_digest"] == sha256


def test_dataset_source_never_records_the_os_user(tracker):
    import getpass
    with tracker.run("manifest-nosource") as run:
        tracker.log_dataset(manifest(), "d1g3st", "demo")
    dataset = tracker.client.get_run(run.info.run_id).inputs.dataset_inputs[0].dataset
    assert getpass.getuser() not in dataset.source and "mlflow.user" not in dataset.source


def test_manifest_with_real_patient_ids_is_refused(tracker):
    df = manifest().assign(patient_id=["Doe^John", "pat-0123456789ac"])
    with tracker.run("phi"):
        with pytest.raises(TrackingError, match="not pseudonyms"):
            tracker.log_dataset(df, "x", "demo")


def test_lineage_has_the_commit_and_no_host_name():
    tags = lineage_tags()
    assert tags["medssl.version"]
    in_git = subprocess.run(["git", "-C", os.path.dirname(__file__), "rev-parse", "HEAD"], capture_output=True)
    if in_git.returncode == 0:  # a source tarball without .git has no commit to record
        assert tags["medssl.git_sha"] == in_git.stdout.decode().strip() == tags["mlflow.source.git.commit"]
    assert socket.gethostname() not in json.dumps(tags)


def test_null_tracker_and_tracker_none_accept_every_call(tmp_path):
    for tracker in (NullTracker(), Tracker(None)):
        assert isinstance(tracker, NullTracker)
        with tracker.run("x", tags={"a": 1}) as run:
            tracker.log_params({"a": {"b": 1}})
            tracker.log_metrics({"loss": 1.0}, step=3)
            tracker.log_artifact(tmp_path, "x")
            tracker.log_dataset(manifest(), "d", "n")
        assert run.info.run_id is None


def test_logging_outside_a_run_says_what_to_do(tracker):
    with pytest.raises(TrackingError, match="tracker.run"):
        tracker.log_metrics({"loss": 1.0})


def test_unreachable_server_at_run_start_fails_fast_and_clearly(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    tracker = Tracker("x", tracking_uri=f"http://127.0.0.1:{port}", outbox_dir=tmp_path)
    start = time.monotonic()
    with pytest.raises(TrackingError, match="cannot open MLflow run"):
        with tracker.run("x"):
            pass
    assert time.monotonic() - start < 15


def make_flaky(tracker, monkeypatch, method: str, down: bool) -> dict:
    """tracker.client.<method> fails like an unreachable server while the returned {"on": ...} is True."""
    real, state = getattr(tracker.client, method), {"on": down}

    def flaky(*args, **kwargs):
        if state["on"]:
            raise MlflowException("API request failed with exception ConnectionError")
        return real(*args, **kwargs)

    monkeypatch.setattr(tracker.client, method, flaky)
    tracker.outbox.retry_interval = 0
    return state


def test_outage_queues_in_order_and_replays_exact_steps(tracker, monkeypatch):
    down = make_flaky(tracker, monkeypatch, "log_batch", down=False)
    with tracker.run("flaky") as run:
        tracker.log_metrics({"loss": 0.0}, step=0)
        assert tracker.flush()
        down["on"] = True
        for step in range(1, 6):
            tracker.log_metrics({"loss": float(step)}, step=step)
        assert not tracker.flush()  # the sender tried and failed: all five wait, on disk too
        assert len(tracker.outbox) == 5 and tracker.outbox.path.is_file()
        down["on"] = False
        tracker.log_metrics({"loss": 6.0}, step=6)
        assert tracker.flush()
        assert len(tracker.outbox) == 0 and not tracker.outbox.path.exists()
    history = tracker.client.get_metric_history(run.info.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(s, float(s)) for s in range(7)]


def test_outbox_left_by_a_dead_process_is_replayed(tracker, tmp_path):
    with tracker.run("crashed") as run:
        pass
    dead = subprocess.Popen(["true"])
    dead.wait()
    ops = [{"kind": "batch", "run_id": run.info.run_id, "metrics": [["loss", 2.0 - s, 1000 + s, s]]} for s in range(3)]
    left = tmp_path / "outbox" / f"outbox-{dead.pid}-abc123.jsonl"
    left.parent.mkdir(exist_ok=True)
    left.write_text("".join(json.dumps(op) + "\n" for op in ops) + '{"kind": "batch", "run_')  # died mid-write
    with tracker.run("next"):
        pass
    history = tracker.client.get_metric_history(run.info.run_id, "loss")
    assert [(m.step, m.value, m.timestamp) for m in history] == [(s, 2.0 - s, 1000 + s) for s in range(3)]
    assert not list((tmp_path / "outbox").glob("*.jsonl"))


def test_a_tracker_changes_no_environment_variable(store, tmp_path, monkeypatch):
    """MLflow's HTTP settings are the user's (and every child process's): a Tracker leaves them alone."""
    for name in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)
    before = dict(os.environ)
    tracker = Tracker("env", tracking_uri=store, outbox_dir=tmp_path / "outbox", end_grace_s=0)
    with tracker.run("env"):
        tracker.log_metrics({"loss": 1.0})
    assert dict(os.environ) == before


def test_reviewer_check_on_a_local_store_names_what_is_missing(tracker, store, tmp_path):
    from medssl.tracking.reviewer import check_experiment
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "table.csv").write_text("rung,auroc\n")
    with tracker.run("pipeline") as parent:
        with tracker.run("pretrain"):
            pass
        with tracker.run("ladder"):
            pass
        tracker.log_artifacts(tmp_path / "report", "report")
    seen = check_experiment(store, tracker.experiment)
    assert seen["parent"]["run_id"] == parent.info.run_id
    assert [c["name"] for c in seen["children"]] == ["pretrain", "ladder"]
    assert seen["report"]["files"] == ["report/table.csv"]
    assert seen["problems"] == ["no registered model comes from this experiment's runs"] and not seen["ok"]


def test_a_hung_server_never_stalls_a_training_step(tracker, monkeypatch):
    """A server that accepts connections and never answers (stuck proxy): the training thread does not wait
    at all; the sender thread times out (the user's MLflow HTTP settings), keeps the calls, sends them later."""
    from mlflow.tracking import MlflowClient
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")  # a user's setting: MLflow's default waits 2 min
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(16)
    with tracker.run("hung") as run:
        tracker.log_metrics({"loss": 0.0}, step=0)
        assert tracker.flush()
        healthy = tracker.outbox.client
        tracker.outbox.client = MlflowClient(f"http://127.0.0.1:{hung.getsockname()[1]}")
        took = [timed(tracker.log_metrics, {"loss": float(step)}, step=step) for step in range(1, 4)]
        assert max(took) < 0.5, took                     # a local append, no network on this thread
        assert not tracker.flush(timeout=60) and len(tracker.outbox) == 3  # timed out: kept, not lost
        tracker.outbox.client = healthy
    hung.close()
    history = tracker.client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in history] == [0, 1, 2, 3]


def timed(call, *args, **kwargs) -> float:
    start = time.monotonic()
    call(*args, **kwargs)
    return time.monotonic() - start


def test_a_refused_call_is_dropped_and_training_goes_on(tracker):
    """MLflow refuses to change a logged param: that call is reported and dropped, nothing raises or queues."""
    with tracker.run("conflict") as run:
        tracker.log_params({"lr": 0.1})
        tracker.log_params({"lr": 0.2})
        tracker.log_metrics({"loss": 1.0}, step=1)
        assert tracker.flush()
        assert len(tracker.outbox) == 0 and len(tracker.outbox.refused) == 1
    got = tracker.client.get_run(run.info.run_id)
    assert got.data.params["lr"] == "0.1" and got.data.metrics["loss"] == 1.0


def test_a_model_registered_during_an_outage_is_registered_when_mlflow_is_back(tracker, tmp_path, monkeypatch):
    down = make_flaky(tracker, monkeypatch, "create_model_version", down=True)
    model = tmp_path / "model.txt"
    model.write_text("weights")
    name = f"queued-{os.getpid()}"
    with tracker.run("ladder") as run:
        tracker.log_artifact(model, "model")
        assert tracker.register_model("model", name, {"medssl.rung": "per_class_5"}) is None  # queued
        assert len(tracker.outbox) == 1
        down["on"] = False
        tracker.log_metrics({"auroc": 0.7})  # any later call replays the queue first
    assert len(tracker.outbox) == 0
    versions = tracker.client.search_model_versions(f"name='{name}'")
    assert [(v.run_id, v.source, v.tags["medssl.rung"]) for v in versions] == [
        (run.info.run_id, f"runs:/{run.info.run_id}/model", "per_class_5")]


def test_runs_left_open_by_a_killed_process_are_marked_killed(tracker, tmp_path):
    with tracker.run("finished"):
        assert len(list((tmp_path / "outbox").glob("open-*.json"))) == 1  # while it is open
    assert not list((tmp_path / "outbox").glob("open-*.json"))
    orphan = tracker.client.create_run(tracker._experiment(), run_name="killed by SIGKILL")
    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / "outbox" / f"open-{dead.pid}-abc123.json").write_text(json.dumps([orphan.info.run_id]))
    with tracker.run("next"):
        pass
    assert tracker.client.get_run(orphan.info.run_id).info.status == "KILLED"
    assert not list((tmp_path / "outbox").glob("open-*.json"))


@pytest.mark.parametrize("process", ["rank1", "worker0"])
def test_calls_left_by_a_dead_ladder_process_are_sent_by_the_next_run(tracker, tmp_path, process):
    """A torchrun rank or ladder worker queues in <outbox>/<process> (ladder/parallel.py). One that died with
    calls unsent (the server away) loses nothing: the main outbox's next run sends them, and ends its run."""
    orphan = tracker.client.create_run(tracker._experiment(), run_name="a child of rank 1")
    dead = subprocess.Popen(["true"])
    dead.wait()
    folder = tmp_path / "outbox" / process
    folder.mkdir(parents=True)
    ops = [{"kind": "batch", "run_id": orphan.info.run_id, "metrics": [["test_auroc", 0.75, 1_700_000_000_000, 0]]},
           {"kind": "batch", "run_id": orphan.info.run_id, "tags": [["medssl.rank", "1"]]}]
    (folder / f"outbox-{dead.pid}-abc123.jsonl").write_text("".join(json.dumps(op) + "\n" for op in ops))
    (folder / f"outbox-{dead.pid}-abc123.acked").write_text("1")  # the metric was delivered before it died
    (folder / f"open-{dead.pid}-abc123.json").write_text(json.dumps([orphan.info.run_id]))
    with tracker.run("the next pipeline run"):
        pass
    got = tracker.client.get_run(orphan.info.run_id)
    assert got.info.status == "KILLED" and got.data.tags["medssl.rank"] == "1"
    assert "test_auroc" not in got.data.metrics  # a delivered call is never sent twice
    assert not list(folder.glob("outbox-*")) and not list(folder.glob("open-*"))


def test_tracker_and_null_tracker_share_one_interface(tracker):
    """One interface (RunTracker): both implement every method with the same parameters."""
    import inspect
    from medssl.tracking.base import RunTracker
    methods = [n for n, v in vars(RunTracker).items() if not n.startswith("_") and callable(v)]
    assert {"run", "log_metrics", "set_description", "log_table", "flush", "close"} <= set(methods)
    for impl in (tracker, NullTracker()):
        assert isinstance(impl, RunTracker)
        for name in methods:
            want = list(inspect.signature(getattr(RunTracker, name)).parameters)[1:]  # without self
            assert list(inspect.signature(getattr(impl, name)).parameters) == want, (type(impl), name)


def test_description_and_table_reach_the_run(tracker, tmp_path):
    table = pd.DataFrame({"rung": [2, 5], "auroc": [0.61, 0.74], "arm": ["ssl", "scratch"]})
    with tracker.run("report") as run:
        tracker.set_description("# Verdict\nSSL helps at 5 labels per class")
        tracker.log_table(table, "report/ladder.json")
    got = tracker.client.get_run(run.info.run_id)
    assert got.data.tags["mlflow.note.content"] == "# Verdict\nSSL helps at 5 labels per class"
    assert {"path": "report/ladder.json", "type": "table"} in json.loads(got.data.tags["mlflow.loggedArtifacts"])
    local = tracker.client.download_artifacts(run.info.run_id, "report/ladder.json", str(tmp_path / "dl"))
    pd.testing.assert_frame_equal(pd.read_json(local, orient="split"), table)
    with pytest.raises(TrackingError, match=".json"):
        with tracker.run("bad-table"):
            tracker.log_table(table, "report/ladder.csv")
