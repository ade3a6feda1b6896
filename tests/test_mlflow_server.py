"""A real `mlflow server` goes away in the middle of a run and comes back: nothing is lost, nothing stalls."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from medssl.tracking import Tracker

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """`mlflow server` on a fixed port and store, which the test can stop and start again."""

    def __init__(self, root: Path, port: int):
        self.root, self.port, self.proc = root, port, None
        self.url = f"http://127.0.0.1:{port}"

    def start(self, timeout: float = 45.0) -> None:
        cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
               "--artifacts-destination", str(self.root / "artifacts"), "--host", "127.0.0.1",
               "--port", str(self.port), "--workers", "1"]
        self.log = open(self.root / "server.log", "a")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {(self.root / 'server.log').read_text()[-2000:]}")
            try:
                if requests.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except requests.RequestException:
                time.sleep(0.3)
        raise RuntimeError("mlflow server did not answer /health in time")

    def stop(self) -> None:
        import os
        import signal
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # its own session: the uvicorn workers go too
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


@pytest.fixture
def server(tmp_path):
    srv = Server(tmp_path, free_port())
    srv.start()
    yield srv
    srv.stop()


def timed(call, *args, **kwargs) -> float:
    start = time.monotonic()
    call(*args, **kwargs)
    return time.monotonic() - start


def test_outage_mid_run_loses_no_metric(server, tmp_path):
    tracker = Tracker("outage", tracking_uri=server.url, outbox_dir=tmp_path / "outbox", end_grace_s=20)
    artifact = tmp_path / "notes.txt"
    with tracker.run("pipeline") as parent, tracker.run("pretrain") as child:
        for step in range(5):
            tracker.log_metrics({"loss": 1.0 / (step + 1), "lr": 0.1 * step}, step=step)
        server.stop()
        durations = [timed(tracker.log_metrics, {"loss": 1.0 / (step + 1), "lr": 0.1 * step}, step=step)
                     for step in range(5, 15)]
        artifact.write_text("written during the outage")
        durations.append(timed(tracker.log_artifact, artifact, "notes"))
        artifact.write_text("changed after logging")  # the queued copy must keep what was logged
        durations.append(timed(tracker.log_params, {"encoder": {"name": "resnet18"}}))
        assert max(durations) < 5, durations
        spooled = list((tmp_path / "outbox").glob("outbox-*.jsonl"))
        assert spooled and len(spooled[0].read_text().splitlines()) == 12  # on disk, in case we die now
        server.start()
        for step in range(15, 20):
            tracker.log_metrics({"loss": 1.0 / (step + 1), "lr": 0.1 * step}, step=step)
    assert not list((tmp_path / "outbox").glob("outbox-*.jsonl"))

    api = f"{server.url}/api/2.0/mlflow"
    history = requests.get(f"{api}/metrics/get-history", params={"run_id": child.info.run_id, "metric_key": "loss"},
                           timeout=10).json()["metrics"]
    assert sorted(m["step"] for m in history) == list(range(20))
    assert all(abs(m["value"] - 1.0 / (m["step"] + 1)) < 1e-12 for m in history)
    assert [m["timestamp"] for m in sorted(history, key=lambda m: m["step"])] == sorted(m["timestamp"] for m in history)
    run = requests.get(f"{api}/runs/get", params={"run_id": child.info.run_id}, timeout=10).json()["run"]
    assert run["info"]["status"] == "FINISHED"
    assert {"key": "encoder.name", "value": "resnet18"} in run["data"]["params"]
    tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
    assert tags["mlflow.parentRunId"] == parent.info.run_id
    listed = requests.get(f"{api}/artifacts/list", params={"run_id": child.info.run_id, "path": "notes"},
                          timeout=10).json()
    assert [f["path"] for f in listed["files"]] == ["notes/notes.txt"]
    got = requests.get(f"{server.url}/get-artifact", params={"run_id": child.info.run_id, "path": "notes/notes.txt"},
                       timeout=10)
    assert got.text == "written during the outage"
    assert json.loads(requests.get(f"{api}/runs/get", params={"run_id": parent.info.run_id},
                                   timeout=10).text)["run"]["info"]["status"] == "FINISHED"
