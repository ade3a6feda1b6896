"""Tracking that loses nothing, against a real `mlflow server` (issue 11 item 5 and 9): refused credentials,
a hung server, a failure half-way through a long replay, a killed process whose PID is reused."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from medssl.tracking import liveness
from medssl.tracking.tracker import Tracker
from test_mlflow_server import Server, free_port, server, timed  # noqa: F401  (server: fixture)

pytestmark = pytest.mark.slow
ADMIN = ("admin", "admin-password-1234")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    pytest.importorskip("flask_wtf", reason="MLflow's basic-auth app needs Flask-WTF (the test extra has it)")
    root = tmp_path_factory.mktemp("auth")
    (root / "auth.ini").write_text(f"[mlflow]\ndefault_permission = READ\ndatabase_uri = sqlite:///{root}/auth.db\n"
                                   f"admin_username = {ADMIN[0]}\nadmin_password = {ADMIN[1]}\n"
                                   "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    srv = Server(root, free_port(), extra=("--app-name", "basic-auth"),
                 env={"MLFLOW_AUTH_CONFIG_PATH": str(root / "auth.ini"), "MLFLOW_FLASK_SERVER_SECRET_KEY": "test"})
    srv.start()
    yield srv
    srv.stop()


def history(url: str, run_id: str, key: str = "loss", auth=None) -> list[dict]:
    got = requests.get(f"{url}/api/2.0/mlflow/metrics/get-history", params={"run_id": run_id, "metric_key": key},
                       auth=auth, timeout=10)
    got.raise_for_status()
    return got.json().get("metrics", [])


def test_expired_credentials_are_retried_loudly_and_nothing_is_dropped(auth_server, tmp_path, monkeypatch, capsys):
    api = f"{auth_server.url}/api/2.0/mlflow"
    requests.post(f"{api}/users/create", json={"username": "alice", "password": "first-pw-123456"}, auth=ADMIN,
                  timeout=10).raise_for_status()
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "first-pw-123456")
    tracker = Tracker("auth", tracking_uri=auth_server.url, outbox_dir=tmp_path / "outbox", retry_interval=0.2)
    with tracker.run("pretrain") as run:
        for step in range(3):
            tracker.log_metrics({"loss": float(step)}, step=step)
        assert tracker.flush()
        # the password is rotated under the running job (a token expiring): every call now answers 401
        requests.patch(f"{api}/users/update-password", json={"username": "alice", "password": "second-pw-123456"},
                       auth=ADMIN, timeout=10).raise_for_status()
        for step in range(3, 6):
            tracker.log_metrics({"loss": float(step)}, step=step)
        assert not tracker.flush(timeout=60)
        assert len(tracker.outbox) == 3 and not tracker.outbox.refused  # kept for a retry, not dropped
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "second-pw-123456")  # the user renews the credential
        tracker.log_metrics({"loss": 6.0}, step=6)
        assert tracker.flush()
    said = " ".join(capsys.readouterr().err.split())
    assert "refuses medssl's credentials" in said and "nothing is dropped" in said
    got = history(auth_server.url, run.info.run_id, auth=ADMIN)
    assert sorted((m["step"], m["value"]) for m in got) == [(s, float(s)) for s in range(7)]


def _permission(auth_server, verb: str, experiment_id: str, permission: str | None = None) -> None:
    """MLflow 3's user-permission API (the 2.x experiments/permissions routes are gone)."""
    body = {"username": "bob", "resource_type": "experiment", "resource_id": experiment_id}
    requests.post(f"{auth_server.url}/api/3.0/mlflow/users/permissions/{verb}",
                  json=body | ({"permission": permission} if permission else {}), auth=ADMIN,
                  timeout=10).raise_for_status()


def test_a_revoked_permission_is_retried_loudly_and_nothing_is_dropped(auth_server, tmp_path, monkeypatch, capsys):
    """403 PERMISSION_DENIED (a user's access to the experiment withdrawn under a running job, then given
    back): kept in the outbox and retried, never dropped — the same as an expired credential."""
    api = f"{auth_server.url}/api/2.0/mlflow"
    requests.post(f"{api}/users/create", json={"username": "bob", "password": "bob-pw-1234567"}, auth=ADMIN,
                  timeout=10).raise_for_status()
    created = requests.post(f"{api}/experiments/create", json={"name": "perm"}, auth=ADMIN, timeout=10)
    created.raise_for_status()
    experiment_id = created.json()["experiment_id"]
    _permission(auth_server, "grant", experiment_id, "EDIT")
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "bob")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "bob-pw-1234567")
    tracker = Tracker("perm", tracking_uri=auth_server.url, outbox_dir=tmp_path / "outbox", retry_interval=0.2)
    with tracker.run("pretrain") as run:
        assert run.info.experiment_id == experiment_id
        for step in range(3):
            tracker.log_metrics({"loss": float(step)}, step=step)
        assert tracker.flush()
        _permission(auth_server, "revoke", experiment_id)           # bob is back to the default: READ
        for step in range(3, 6):
            tracker.log_metrics({"loss": float(step)}, step=step)
        assert not tracker.flush(timeout=60)
        assert len(tracker.outbox) == 3 and not tracker.outbox.refused  # kept for a retry, not dropped
        _permission(auth_server, "grant", experiment_id, "EDIT")    # an admin restores the access
        tracker.log_metrics({"loss": 6.0}, step=6)
        assert tracker.flush()
    said = " ".join(capsys.readouterr().err.split())
    assert "nothing is dropped" in said
    got = history(auth_server.url, run.info.run_id, auth=ADMIN)
    assert sorted((m["step"], m["value"]) for m in got) == [(s, float(s)) for s in range(7)]


def test_a_hung_server_never_stalls_training_and_gets_everything_after(server, tmp_path):
    """SIGSTOP: the server accepts connections and answers nothing (a stuck proxy, a paused VM)."""
    tracker = Tracker("hung", tracking_uri=server.url, outbox_dir=tmp_path / "outbox")
    with tracker.run("pretrain") as run:
        tracker.log_metrics({"loss": 0.0}, step=0)
        assert tracker.flush()
        os.killpg(server.proc.pid, signal.SIGSTOP)
        try:
            took = [timed(tracker.log_metrics, {"loss": float(s)}, step=s) for s in range(1, 50)]
        finally:
            os.killpg(server.proc.pid, signal.SIGCONT)
        assert max(took) < 0.5, max(took)  # no network on the training thread
    assert sorted(m["step"] for m in history(server.url, run.info.run_id)) == list(range(50))


def test_a_failure_half_way_through_a_long_batch_never_resends_the_first_half(server, tmp_path, monkeypatch):
    tracker = Tracker("chunks", tracking_uri=server.url, outbox_dir=tmp_path / "outbox", retry_interval=0.1)
    real, calls = tracker.client.log_batch, []

    def second_request_fails(run_id, metrics=(), **kwargs):
        calls.append(metrics[0].key if metrics else None)
        if len(calls) == 2:
            raise ConnectionError("connection reset half-way through the replay")
        return real(run_id, metrics=metrics, **kwargs)

    monkeypatch.setattr(tracker.client, "log_batch", second_request_fails)
    rows = {f"m{i}": float(i) for i in range(2500)}  # one call, three log_batch requests (1000 metrics each)
    with tracker.run("replay") as run:
        tracker.log_metrics(rows, step=7)
    assert calls == ["m0", "m1000", "m1000", "m2000"]  # the failed chunk once more, never the first one
    assert len(tracker.outbox) == 0
    got = requests.get(f"{server.url}/api/2.0/mlflow/runs/get", params={"run_id": run.info.run_id},
                       timeout=10).json()["run"]["data"]["metrics"]
    assert len(got) == 2500 and {m["key"]: m["value"] for m in got} == rows


CHILD = """
import sys, time
from medssl.tracking.tracker import Tracker
tracker = Tracker("killed", tracking_uri=sys.argv[1], outbox_dir=sys.argv[2], heartbeat_s=0.2)
with tracker.run("pretrain") as run:
    tracker.log_metrics({"loss": 1.0}, step=0)
    tracker.flush()
    print(run.info.run_id, flush=True)
    time.sleep(600)  # SIGKILLed in here
"""


def test_a_killed_process_whose_pid_is_reused_still_gets_its_runs_ended_at_its_last_heartbeat(server, tmp_path):
    outbox = tmp_path / "outbox"
    child = subprocess.Popen([sys.executable, "-c", CHILD, server.url, str(outbox)], stdout=subprocess.PIPE,
                             text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    run_id = child.stdout.readline().strip()
    time.sleep(2.5)  # alive, heartbeating
    killed_at = time.time() * 1000
    child.kill()
    child.wait()
    # the dead child's PID now belongs to another process (a restarted container hands PIDs out again):
    # rename its files to a living PID, keeping the start time the dead process had
    reuser = subprocess.Popen(["sleep", "60"])
    try:
        (left,) = outbox.glob("open-*.json")
        token = left.name.removeprefix("open-").removesuffix(".json")
        identity = json.loads((outbox / f"proc-{token}.json").read_text())
        assert identity["start_ticks"] is None or liveness.start_ticks(reuser.pid) != identity["start_ticks"]
        new = f"{reuser.pid}-{token.split('-')[1]}"
        (outbox / f"proc-{new}.json").write_text(json.dumps({**identity, "pid": reuser.pid}))
        os.rename(left, outbox / f"open-{new}.json")
        tracker = Tracker("killed", tracking_uri=server.url, outbox_dir=outbox)
        with tracker.run("next"):
            pass
    finally:
        reuser.kill()
        reuser.wait()
    info = requests.get(f"{server.url}/api/2.0/mlflow/runs/get", params={"run_id": run_id},
                        timeout=10).json()["run"]["info"]
    assert info["status"] == "KILLED"
    assert killed_at - 1500 <= int(info["end_time"]) <= killed_at + 500  # its last heartbeat, not its start
    assert int(info["end_time"]) - int(info["start_time"]) > 2000
