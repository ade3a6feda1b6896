"""Logging calls that MLflow has not acknowledged yet: kept in order, in memory and in a JSONL file.

Why: a team tracking server restarts or drops off the network while a 10-hour pretraining is running. The
training must not stop or stall, and the metric history must come out exact once the server is back. Every
call is tried at once; if the server is unreachable the call is queued (with its own timestamp and step, so the
replayed history is the one that happened) and appended to `outbox-<pid>.jsonl`, so a crash loses nothing:
the next `Tracker` pointed at the same folder replays files left behind by dead processes.
Errors that a retry cannot fix (a param changed value, a deleted run) are reported and dropped, never raised
into the training loop.
"""
from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from pathlib import Path

from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from medssl.ui import console


# MLflow error codes that mean "the request is wrong", not "the server is away": retrying cannot help
_PERMANENT = {"INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST",
              "BAD_REQUEST", "INVALID_STATE", "PERMISSION_DENIED", "UNAUTHENTICATED"}
_BATCH = {"metrics": 1000, "params": 100, "tags": 100}  # MLflow's per-request limits of log_batch


def is_permanent(err: Exception) -> bool:
    return isinstance(err, MlflowException) and err.error_code in _PERMANENT


def _send_batch(client, op: dict) -> None:
    metrics = [Metric(k, v, ts, step) for k, v, ts, step in op.get("metrics", [])]
    params = [Param(k, v) for k, v in op.get("params", [])]
    tags = [RunTag(k, v) for k, v in op.get("tags", [])]
    # chunked so a 3000-step replay fits MLflow's per-request limits
    while metrics or params or tags:
        client.log_batch(op["run_id"], metrics=metrics[:_BATCH["metrics"]], params=params[:_BATCH["params"]],
                         tags=tags[:_BATCH["tags"]], synchronous=True)
        metrics, params, tags = (metrics[_BATCH["metrics"]:], params[_BATCH["params"]:],
                                 tags[_BATCH["tags"]:])


def _send_inputs(client, op: dict) -> None:
    dataset = Dataset(**op["dataset"])
    client.log_inputs(op["run_id"], [DatasetInput(dataset, [InputTag(k, v) for k, v in op["tags"]])])


def _send_artifact(client, op: dict) -> None:
    local = Path(op["local"])
    if local.is_dir():
        client.log_artifacts(op["run_id"], str(local), op.get("artifact_path"))
    else:
        client.log_artifact(op["run_id"], str(local), op.get("artifact_path"))


def _send_end(client, op: dict) -> None:
    client.set_terminated(op["run_id"], status=op["status"], end_time=op["end_time"])


def send_register(client, op: dict) -> str:
    """A new version of registered model op["name"] from runs:/<run>/<artifact_path>; its version number."""
    try:
        client.create_registered_model(op["name"])
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    version = client.create_model_version(op["name"], f"runs:/{op['run_id']}/{op['artifact_path']}",
                                          run_id=op["run_id"], tags=op.get("tags") or {})
    return str(version.version)


SENDERS = {"batch": _send_batch, "inputs": _send_inputs, "artifact": _send_artifact, "end": _send_end,
           "register": send_register}


class Outbox:
    """Ordered queue of logging operations (plain JSON dicts with a "kind" and a "run_id")."""

    def __init__(self, client, folder: Path, retry_interval: float = 1.0, max_interval: float = 30.0):
        self.client, self.folder = client, Path(folder)
        self.retry_interval, self.max_interval = retry_interval, max_interval
        self.path = self.folder / f"outbox-{os.getpid()}-{uuid.uuid4().hex[:6]}.jsonl"
        self.ops: list[dict] = []
        self.open_runs: list[str] = []  # also in open-<pid>-*.json: a killed process's runs get ended later
        self._last_failure = 0.0
        self._failures = 0  # consecutive: the wait between retries doubles, so a hung server costs little
        self.warned = False

    def __len__(self) -> int:
        return len(self.ops)

    def submit(self, op: dict, files_copy: bool = True) -> bool:
        """Send `op` now (after anything queued before it) or queue it. True when it reached MLflow."""
        if not self.ops and self._send(op):
            self._drop_copy(op)
            return True
        if op["kind"] == "artifact" and files_copy and not self._is_own_file(op["local"]):
            op = {**op, "local": self._keep_copy(op["local"])}  # the file may change before the replay
        self.ops.append(op)
        self._append(op)
        self.flush()
        return False

    def flush(self, force: bool = False) -> bool:
        """Replay queued operations in order; stop at the first that fails. True when the queue is empty."""
        if not self.ops:
            return True
        wait = min(self.max_interval, self.retry_interval * 2 ** max(0, self._failures - 1))
        if not force and time.monotonic() - self._last_failure < wait:
            return False
        sent = 0
        for op in self.ops:
            if not self._send(op):
                break
            sent += 1
        if sent:
            for op in self.ops[:sent]:
                self._drop_copy(op)
            self.ops = self.ops[sent:]
            self._rewrite()
            if not self.ops:
                console.print(f"[green]MLflow reachable again[/]: {sent} queued logging calls delivered")
                self.warned = False
        return not self.ops

    def _send(self, op: dict) -> bool:
        try:
            SENDERS[op["kind"]](self.client, op)
            self._failures = 0
            return True
        except Exception as err:  # noqa: BLE001 — an outage shows up as many exception types
            if is_permanent(err):
                console.print(f"[red]MLflow refused a {op['kind']} call for run {op['run_id']}[/] "
                              f"(dropped, training goes on): {err}")
                return True
            self._last_failure = time.monotonic()
            self._failures += 1
            if not self.warned:
                console.print(f"[yellow]MLflow unreachable[/] ({type(err).__name__}); training goes on, "
                              f"logging is queued in {self.path} and sent when the server is back")
                self.warned = True
            return False

    def mark_open(self, run_id: str) -> None:
        self.open_runs.append(run_id)
        self._write_open()

    def mark_closed(self, run_id: str) -> None:
        self.open_runs.remove(run_id)
        self._write_open()

    # ------------------------------------------------------------------------------------- on disk
    def _write_open(self) -> None:
        """The runs this process has open, so that after a SIGKILL (no `finally` runs) the next medssl
        process can mark them KILLED instead of leaving them RUNNING in the UI forever."""
        path = self.path.with_name(self.path.name.replace("outbox-", "open-", 1)).with_suffix(".json")
        if not self.open_runs:
            path.unlink(missing_ok=True)
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.open_runs))
        os.replace(tmp, path)

    def _append(self, op: dict) -> None:
        """One line per queued call: a long outage costs one small write per call, not a rewrite."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as spool:
            spool.write(json.dumps(op) + "\n")

    def _rewrite(self) -> None:
        if not self.ops:
            self.path.unlink(missing_ok=True)
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(op) + "\n" for op in self.ops))
        os.replace(tmp, self.path)  # atomic: a crash mid-write leaves the previous complete file

    def _keep_copy(self, local: str) -> str:
        src = Path(local)
        dst = self.folder / "files" / uuid.uuid4().hex / src.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst)
        else:
            shutil.copy2(src, dst)
        return str(dst)

    def _is_own_file(self, local: str) -> bool:
        return Path(local).resolve().is_relative_to((self.folder / "files").resolve())

    def _drop_copy(self, op: dict) -> None:
        if op["kind"] == "artifact" and self._is_own_file(op["local"]):
            shutil.rmtree(Path(op["local"]).parent, ignore_errors=True)


def recover(client, folder: Path) -> int:
    """Replay outbox files left in `folder` by processes that are gone. Returns how many calls were sent."""
    sent = 0
    for path in sorted(Path(folder).glob("outbox-*.jsonl")):
        if not _left_by_dead_process(path):
            continue
        claimed = path.with_name(f"claimed-{os.getpid()}-{path.name}")
        try:
            os.rename(path, claimed)  # atomic claim, so two new processes never replay the same file twice
        except OSError:
            continue
        box = Outbox(client, folder)
        box.path = claimed
        box.ops = _read_ops(claimed)
        total = len(box.ops)
        box.flush(force=True)
        sent += total - len(box.ops)
        if box.ops:  # still unreachable: hand the file back under an outbox name for the next try
            os.rename(claimed, path)
    return sent + _end_orphaned_runs(client, folder)


def _end_orphaned_runs(client, folder: Path) -> int:
    """Runs that a dead process left open (open-<pid>-*.json) and that are still RUNNING: marked KILLED,
    with the time of the process's last sign of life (the file's modification time) as their end."""
    ended = 0
    for path in sorted(Path(folder).glob("open-*.json")):
        if not _left_by_dead_process(path):
            continue
        try:
            run_ids, end_time = json.loads(path.read_text()), int(path.stat().st_mtime * 1000)
            for run_id in run_ids:
                if client.get_run(run_id).info.status == "RUNNING":
                    client.set_terminated(run_id, status="KILLED", end_time=end_time)
                    ended += 1
        except json.JSONDecodeError:
            pass  # cut short by the crash: nothing to end
        except Exception as err:  # noqa: BLE001
            if not is_permanent(err):
                continue  # unreachable: the next process tries again
        path.unlink(missing_ok=True)
    if ended:
        console.print(f"{ended} MLflow run(s) left open by a killed process marked KILLED")
    return ended


def _read_ops(path: Path) -> list[dict]:
    """Queued calls of a spool file; a line cut short by a crash mid-write is the only one skipped."""
    ops = []
    for line in path.read_text().splitlines():
        try:
            ops.append(json.loads(line))
        except json.JSONDecodeError:
            console.print(f"[yellow]skipped a truncated line in {path}[/]")
    return ops


def _left_by_dead_process(path: Path) -> bool:
    """<kind>-<pid>-...: written by a process that is neither this one nor alive."""
    pid = int(path.name.split("-")[1])
    return pid != os.getpid() and not _alive(pid)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
