"""MLflow tracking for every stage: runs nested under one parent, lineage tags, datasets, artifacts.

`Tracker` is the MLflow implementation of `RunTracker` (medssl/tracking/base.py; `NullTracker` is the other).
It talks to MLflow through `MlflowClient` (no global "active run" state, so two trackers or a library caller
never log into each other's runs) and changes no environment variable: MLflow's HTTP settings
(MLFLOW_HTTP_REQUEST_TIMEOUT, _MAX_RETRIES, ...) stay the user's. Runs opened while another is open become
its children, so the pipeline -> stage -> rung tree appears in the MLflow UI without passing ids around.
Every logging call goes through an `Outbox` (medssl/tracking/outbox.py): a background thread sends it, and
whatever MLflow has not acknowledged is on disk and replayed, in order and with its original timestamps and
steps. Only opening a run needs the server at once (MLflow assigns the run id); it waits `start_wait_s`.
"""
from __future__ import annotations

import os
import time
import uuid
import warnings
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

import mlflow
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

from medssl.errors import TrackingError
from medssl.tracking.background import in_daemon_thread
from medssl.tracking.base import DESCRIPTION_TAG, NullTracker, RunTracker
from medssl.tracking.outbox import Outbox
from medssl.tracking.records import (DIGEST_CHARS, MAX_TAG_CHARS, check_pseudonymous, cut, flatten,
                                     lineage_tags)
from medssl.tracking.recovery import adopt_orphans
from medssl.tracking.senders import is_auth, is_permanent
from medssl.ui import console

__all__ = ["NullTracker", "RunTracker", "Tracker", "flatten", "lineage_tags"]
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
OPEN_SLACK_S = 5.0  # beyond start_wait_s, for a create_run call already under way when the wait ends
OPEN_FIX = ("start the tracking server (or raise tracking.server_wait_s), or unset MLFLOW_TRACKING_URI / "
            "tracking.tracking_uri to log to the local mlflow.db")
DRAIN_S = 30.0  # the longest a run's end waits for calls still on their way to a server that answers
REGISTER_WAIT_S = 60.0  # register_model answers with a version when MLflow does within this


class Tracker:
    """One MLflow experiment. `Tracker(None)` gives a `NullTracker` (library use, tests)."""

    def __new__(cls, experiment: str | None = None, *args, **kwargs):
        if experiment is None:
            return NullTracker()
        return super().__new__(cls)

    def __init__(self, experiment: str, tracking_uri: str | None = None, outbox_dir: Path | str | None = None,
                 retry_interval: float = 1.0, end_grace_s: float = 10.0, start_wait_s: float = 3.0,
                 heartbeat_s: float = 5.0):
        self.experiment = experiment
        self.tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or mlflow.get_tracking_uri()
        self.client = MlflowClient(self.tracking_uri)
        self.outbox_dir = Path(outbox_dir or ".medssl/mlflow-outbox")
        self.outbox = Outbox(self.client, self.outbox_dir, retry_interval, heartbeat_s=heartbeat_s)
        self.end_grace_s, self.start_wait_s = end_grace_s, start_wait_s
        self._runs: list[str] = []  # open runs, innermost last
        self._experiment_id: str | None = None

    # ------------------------------------------------------------------------------------------ runs
    @property
    def active_run_id(self) -> str | None:
        return self._runs[-1] if self._runs else None

    @contextmanager
    def run(self, name: str, parent_run_id: str | None = None, tags: Mapping[str, Any] | None = None) -> Iterator:
        """Open a run (child of `parent_run_id`, else of the innermost open run); yields the MLflow `Run`."""
        parent = parent_run_id or self.active_run_id
        run = self._open_run(name, parent, {**(tags or {})})
        self._runs.append(run.info.run_id)
        status = "FINISHED"
        try:
            self.outbox.mark_open(run.info.run_id)
            yield run
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        except BaseException:
            status = "FAILED"
            raise
        finally:
            self._runs.pop()
            self.outbox.submit({"kind": "end", "run_id": run.info.run_id, "status": status,
                                "end_time": int(time.time() * 1000)})
            if run.info.run_id in self.outbox.open_runs:
                self.outbox.mark_closed(run.info.run_id)  # its end is queued on disk: replayed if we die
            if not self._runs:
                self._drain()

    def _open_run(self, name: str, parent: str | None, tags: dict) -> Any:
        """create_run on a helper thread, so that a server stuck in MLflow's own retries costs the stage
        `start_wait_s`, not minutes; a run created after we stopped waiting is ended FAILED, never left RUNNING."""
        if not self._runs:
            adopt_orphans(self.outbox)  # calls and open runs left by a process that died
        tags = {k: cut(str(v), MAX_TAG_CHARS) for k, v in tags.items()}
        tags[MLFLOW_RUN_NAME] = name
        if parent:
            tags[MLFLOW_PARENT_RUN_ID] = parent
        if not self.tracking_uri.startswith(("http://", "https://")):
            return self._create_run(name, tags, time.monotonic() + self.start_wait_s)  # local: no network
        future = in_daemon_thread(self._create_run, name, tags, time.monotonic() + self.start_wait_s)
        try:
            return future.result(timeout=self.start_wait_s + OPEN_SLACK_S)
        except FutureTimeout:
            future.add_done_callback(self._end_abandoned)
            raise TrackingError(f"cannot open MLflow run '{name}': no answer in {self.start_wait_s:.0f} s",
                                where=f"tracking uri {self.tracking_uri}", fix=OPEN_FIX) from None

    def _end_abandoned(self, future) -> None:
        if future.exception() is None:
            self.client.set_terminated(future.result().info.run_id, status="FAILED")

    def _create_run(self, name: str, tags: dict, give_up_at: float) -> Any:
        error, pause, told = None, 0.5, False
        while True:
            try:
                return self.client.create_run(self._experiment(), run_name=name, tags=tags)
            except TrackingError:
                raise
            except Exception as err:  # noqa: BLE001
                error, left = err, give_up_at - time.monotonic()
                if is_permanent(err) or left <= 0:
                    break
                if not told and (self.start_wait_s > 5 or is_auth(err)):
                    console.print(f"[yellow]MLflow at {self.tracking_uri} does not accept run '{name}' yet "
                                  f"({type(err).__name__}); waiting up to {self.start_wait_s:.0f} s[/] "
                                  "(tracking.server_wait_s)")
                    told = True
                time.sleep(min(pause, left))  # a restarting server gets the time it needs, not a flood
                pause = min(2 * pause, 5.0)
        fix = ("check the credentials (MLFLOW_TRACKING_TOKEN, MLFLOW_TRACKING_USERNAME / _PASSWORD) and the "
               "permission on the experiment") if is_auth(error) else OPEN_FIX
        raise TrackingError(f"cannot open MLflow run '{name}': {error}", where=f"tracking uri {self.tracking_uri}",
                            fix=fix)

    def _experiment(self) -> str:
        if self._experiment_id is None:
            found = self.client.get_experiment_by_name(self.experiment)
            if found is not None and found.lifecycle_stage == "deleted":
                raise TrackingError(f"MLflow experiment '{self.experiment}' is deleted", where=self.tracking_uri,
                                    fix=f"restore it (mlflow experiments restore --experiment-id "
                                        f"{found.experiment_id}) or choose another tracking.experiment")
            self._experiment_id = found.experiment_id if found else self._create_experiment()
            if found is None or EXPERIMENT_KIND[0] not in found.tags:
                # MLflow 3's UI opens untagged experiments on its GenAI page; this shows the runs table
                self.client.set_experiment_tag(self._experiment_id, *EXPERIMENT_KIND)
        return self._experiment_id

    def _create_experiment(self) -> str:
        try:
            return self.client.create_experiment(self.experiment)
        except Exception as err:  # noqa: BLE001
            if not is_permanent(err):
                raise
            return self.client.get_experiment_by_name(self.experiment).experiment_id  # another process won

    def _drain(self) -> None:
        """The outermost run ended: let the sender catch up with a server that answers (up to DRAIN_S), then
        give a briefly absent server `end_grace_s` to come back."""
        self.outbox.flush(timeout=max(self.end_grace_s, DRAIN_S))
        deadline = time.monotonic() + self.end_grace_s
        while len(self.outbox) and time.monotonic() < deadline:
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
            self.outbox.flush(timeout=max(0.0, deadline - time.monotonic()))
        if len(self.outbox):
            console.print(f"[yellow]{len(self.outbox)} MLflow logging calls are still queued[/] in "
                          f"{self.outbox.path}; the next medssl run with the same tracking settings sends them")
        if self.outbox.refused:
            console.print(f"[red]{len(self.outbox.refused)} MLflow call(s) were refused and dropped[/]; the "
                          f"first: {self.outbox.refused[0]}")

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until MLflow has every call made so far (True), or an attempt failed / `timeout` passed."""
        return self.outbox.flush(timeout=DRAIN_S if timeout is None else timeout)

    def close(self) -> None:
        """Deliver what is queued (up to `end_grace_s`) and stop the sender thread; the rest stays on disk."""
        self._drain()
        self.outbox.close()

    def _run_id(self, run_id: str | None) -> str:
        run_id = run_id or self.active_run_id
        if run_id is None:
            raise TrackingError("nothing to log to: no MLflow run is open", where="medssl.tracking.Tracker",
                                fix="log inside `with tracker.run(name):`")
        return run_id

    # -------------------------------------------------------------------------------------- logging
    def log_params(self, params: Mapping[str, Any], run_id: str | None = None) -> None:
        self.outbox.submit({"kind": "batch", "run_id": self._run_id(run_id),
                            "params": sorted(flatten(params).items())})

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None, run_id: str | None = None) -> None:
        stamp = int(time.time() * 1000)  # the time of the event, kept through any queueing
        rows = [[str(k), float(v), stamp, int(step or 0)] for k, v in metrics.items()]
        self.outbox.submit({"kind": "batch", "run_id": self._run_id(run_id), "metrics": rows})

    def set_tags(self, tags: Mapping[str, Any], run_id: str | None = None) -> None:
        rows = [[str(k), cut(str(v), MAX_TAG_CHARS)] for k, v in tags.items()]
        self.outbox.submit({"kind": "batch", "run_id": self._run_id(run_id), "tags": rows})

    def set_description(self, text: str, run_id: str | None = None) -> None:
        """The run's description in the MLflow UI (markdown; the `mlflow.note.content` tag)."""
        self.set_tags({DESCRIPTION_TAG: text}, run_id)

    def log_table(self, table, artifact_file: str, run_id: str | None = None) -> None:
        """A pandas DataFrame as an MLflow table artifact (`artifact_file` ends in .json), shown in the UI's
        artifact view and read back by `mlflow.load_table`."""
        if not artifact_file.endswith(".json"):
            raise TrackingError(f"table artifact '{artifact_file}' must end in .json", where="Tracker.log_table",
                                fix="name it e.g. 'report/ladder.json'")
        local = self._scratch_file(artifact_file)
        table.to_json(local, orient="split", index=False, date_format="iso")  # MLflow's own table format
        self.outbox.submit({"kind": "table", "run_id": self._run_id(run_id), "local": str(local),
                            "artifact_file": artifact_file})

    def log_artifact(self, path: Path | str, artifact_path: str | None = None, run_id: str | None = None) -> None:
        self.outbox.submit({"kind": "artifact", "run_id": self._run_id(run_id), "local": str(path),
                            "artifact_path": artifact_path})

    def log_artifacts(self, folder: Path | str, artifact_path: str | None = None, run_id: str | None = None) -> None:
        self.log_artifact(folder, artifact_path, run_id)

    def log_figure(self, fig, name: str, run_id: str | None = None) -> None:
        """`name` is the artifact file, e.g. "curves/loss.png"."""
        local = self._scratch_file(name)
        fig.savefig(local, dpi=120, bbox_inches="tight")
        self.log_artifact(local, str(Path(name).parent) if "/" in name else None, run_id)

    def log_text(self, text: str, name: str, run_id: str | None = None) -> None:
        local = self._scratch_file(name)
        local.write_text(text)
        self.log_artifact(local, str(Path(name).parent) if "/" in name else None, run_id)

    def _scratch_file(self, name: str) -> Path:
        # inside the outbox's own folder: deleted once MLflow has the file
        local = self.outbox_dir / "files" / uuid.uuid4().hex / Path(name).name
        local.parent.mkdir(parents=True, exist_ok=True)
        return local

    def log_dataset(self, manifest_df, digest: str | None, name: str, source: str | None = None,
                    context: str = "training", run_id: str | None = None) -> None:
        """Record the manifest as the run's input dataset (schema, row count, digest; never the rows)."""
        check_pseudonymous(manifest_df)
        with warnings.catch_warnings():  # MLflow's hint about integer columns concerns model signatures
            warnings.simplefilter("ignore", UserWarning)
            # source=None would make MLflow record the OS user name as the "code" source: never let it
            entity = mlflow.data.from_pandas(manifest_df, source=str(source or name), name=name,
                                             digest=digest[:DIGEST_CHARS] if digest else None)._to_mlflow_entity()
        fields = {k: getattr(entity, k) for k in ("name", "digest", "source_type", "source", "schema", "profile")}
        tags = [["mlflow.data.context", context]] + ([["medssl.manifest_digest", digest]] if digest else [])
        self.outbox.submit({"kind": "inputs", "run_id": self._run_id(run_id), "dataset": fields, "tags": tags})
        if digest:
            self.set_tags({"medssl.manifest_digest": digest}, run_id)

    def register_model(self, artifact_path: str, name: str, tags: Mapping[str, Any] | None = None,
                       run_id: str | None = None) -> str | None:
        """Register `runs:/<run>/<artifact_path>` as a new version of model `name`; its version, or None when
        MLflow does not answer: then the registration stays queued behind the artifacts it needs and is made
        when the server is back (by this process, or by the next medssl process that finds the outbox)."""
        op = {"kind": "register", "run_id": self._run_id(run_id), "name": name, "artifact_path": artifact_path,
              "tags": {k: cut(str(v), MAX_TAG_CHARS) for k, v in (tags or {}).items()}}
        answer = self.outbox.outcome(self.outbox.submit(op), timeout=REGISTER_WAIT_S)
        if isinstance(answer, str):
            return answer
        if isinstance(answer, Exception):
            console.print(f"[yellow]model '{name}' not registered[/]: {answer}")
            return None
        console.print(f"[yellow]model '{name}' queued for registration[/]: MLflow does not answer; it is "
                      f"registered when the server is back ({self.outbox_dir})")
        return None
