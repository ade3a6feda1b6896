"""MLflow tracking for every stage: runs nested under one parent, lineage tags, datasets, artifacts.

`Tracker` talks to MLflow through `MlflowClient` (no global "active run" state, so two trackers or a library
caller never log into each other's runs). Runs opened while another is open become its children, so the
pipeline → stage → rung tree appears in the MLflow UI without passing ids around.
Every logging call goes through an `Outbox` (medssl/outbox.py): if the tracking server is unreachable the
call is queued in memory and on disk and replayed, in order and with its original timestamps and steps, when
the server answers again. Only opening a run needs the server (MLflow assigns the run id).
"""
from __future__ import annotations

import os

import subprocess
import time
import uuid
import warnings
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator, Mapping

import mlflow
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

import medssl
from medssl.errors import TrackingError
from medssl.tracking.outbox import Outbox, console, is_permanent, recover, send_register

MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value; longer values are cut with a marker
MAX_TAG_CHARS = 8000
DIGEST_CHARS = 32  # MLflow keeps at most 36 characters of a dataset digest; the full one goes in a tag
# An outage must cost a training step about a second, not MLflow's default minutes of retries.
# setdefault: a user who sets these deliberately keeps their values.
# No HTTP-level retries: a failed logging call is queued and replayed by the outbox, which is better than
# blocking the training step; opening a run (which cannot be queued: it needs the server's run id) waits for
# the server up to `start_wait_s`, see _create_run.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
PSEUDONYM = {"patient_id": r"pat-[0-9a-f]{12}", "study_id": r"stu-[0-9a-f]{12}", "series_id": r"ser-[0-9a-f]{12}"}


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """{"a": {"b": 1}} -> {"a.b": "1"}; values become strings of at most MAX_PARAM_CHARS characters."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = _cut(str(value), MAX_PARAM_CHARS)
    return flat


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 15] + "...[truncated]"


def lineage_tags() -> dict[str, str]:
    """What produced a run: medssl version and git commit of the code (no host or user names)."""
    import platform
    import torch
    tags = {"mlflow.source.name": "medssl", "medssl.version": medssl.__version__,
            "medssl.python": platform.python_version(),
            "medssl.torch": torch.__version__, "medssl.mlflow": mlflow.__version__}
    repo = Path(medssl.__file__).resolve().parent.parent
    sha = _git(repo, "rev-parse", "HEAD")
    if sha:
        dirty = bool(_git(repo, "status", "--porcelain", "--untracked-files=no"))
        tags.update({"mlflow.source.git.commit": sha, "medssl.git_sha": sha, "medssl.git_dirty": str(dirty).lower()})
    return tags


def _git(repo: Path, *args: str) -> str:
    try:
        done = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


class Tracker:
    """One MLflow experiment. `Tracker(None)` gives a `NullTracker` (library use, tests)."""

    def __new__(cls, experiment: str | None = None, *args, **kwargs):
        if experiment is None:
            return NullTracker()
        return super().__new__(cls)

    def __init__(self, experiment: str, tracking_uri: str | None = None, outbox_dir: Path | str | None = None,
                 retry_interval: float = 1.0, end_grace_s: float = 10.0, start_wait_s: float = 3.0):
        for key, value in HTTP_DEFAULTS.items():
            os.environ.setdefault(key, value)
        self.experiment = experiment
        self.tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or mlflow.get_tracking_uri()
        self.client = MlflowClient(self.tracking_uri)
        self.outbox_dir = Path(outbox_dir or ".medssl/mlflow-outbox")
        self.outbox = Outbox(self.client, self.outbox_dir, retry_interval)
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
        run = self._create_run(name, parent, {**(tags or {})})
        self._runs.append(run.info.run_id)
        self.outbox.mark_open(run.info.run_id)
        status = "FINISHED"
        try:
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
            self.outbox.mark_closed(run.info.run_id)  # its end is sent or queued (and queued ops are replayed)
            if not self._runs:
                self._drain()

    def _create_run(self, name: str, parent: str | None, tags: dict) -> Any:
        if not self._runs:
            recover(self.client, self.outbox_dir)  # calls left queued by a process that died
        self.outbox.flush(force=True)
        tags = {k: _cut(str(v), MAX_TAG_CHARS) for k, v in tags.items()}
        tags[MLFLOW_RUN_NAME] = name
        if parent:
            tags[MLFLOW_PARENT_RUN_ID] = parent
        error, start, pause, told = None, time.monotonic(), 0.5, False
        while True:
            try:
                return self.client.create_run(self._experiment(), run_name=name, tags=tags)
            except TrackingError:
                raise
            except Exception as err:  # noqa: BLE001
                error = err
                left = self.start_wait_s - (time.monotonic() - start)
                if is_permanent(err) or left <= 0:
                    break
                if not told and self.start_wait_s > 5:
                    console.print(f"[yellow]MLflow at {self.tracking_uri} does not answer; waiting up to "
                                  f"{self.start_wait_s:.0f} s for it to open run '{name}'[/] "
                                  "(tracking.server_wait_s)")
                    told = True
                time.sleep(min(pause, left))  # a restarting server gets the time it needs, not a flood
                pause = min(2 * pause, 5.0)
        raise TrackingError(f"cannot open MLflow run '{name}': {error}", where=f"tracking uri {self.tracking_uri}",
                            fix="start the tracking server (or raise tracking.server_wait_s), or unset "
                                "MLFLOW_TRACKING_URI / tracking.tracking_uri to log to the local mlflow.db")

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
        """The outermost run ended: give a briefly absent server `end_grace_s` to come back."""
        deadline = time.monotonic() + self.end_grace_s
        while not self.outbox.flush(force=True) and time.monotonic() < deadline:
            time.sleep(1.0)
        if len(self.outbox):
            console.print(f"[yellow]{len(self.outbox)} MLflow logging calls are still queued[/] in "
                          f"{self.outbox.path}; the next medssl run with the same tracking settings sends them")

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
        rows = [[str(k), _cut(str(v), MAX_TAG_CHARS)] for k, v in tags.items()]
        self.outbox.submit({"kind": "batch", "run_id": self._run_id(run_id), "tags": rows})

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
        _check_pseudonymous(manifest_df)
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
        MLflow is unreachable: then the registration is queued behind the artifacts it needs and made when the
        server is back (by this process, or by the next medssl process that finds the outbox)."""
        op = {"kind": "register", "run_id": self._run_id(run_id), "name": name, "artifact_path": artifact_path,
              "tags": {k: _cut(str(v), MAX_TAG_CHARS) for k, v in (tags or {}).items()}}
        if self.outbox.flush(force=True):
            try:
                return send_register(self.client, op)
            except Exception as err:  # noqa: BLE001
                if is_permanent(err):
                    console.print(f"[yellow]model '{name}' not registered[/]: {err}")
                    return None
        self.outbox.submit(op)
        console.print(f"[yellow]model '{name}' queued for registration[/]: MLflow is unreachable; it is "
                      f"registered when the server is back ({self.outbox_dir})")
        return None


def _check_pseudonymous(df) -> None:
    for column, pattern in PSEUDONYM.items():
        if column in df.columns:
            values = df[column].dropna().astype(str)
            bad = values[~values.str.fullmatch(pattern)]
            if len(bad):
                raise TrackingError(f"manifest column '{column}' holds {len(bad)} values that are not pseudonyms",
                                    where="Tracker.log_dataset",
                                    fix="log only manifests written by medssl.data.manifest (salted-hash ids)")


class NullTracker:
    """The same methods as `Tracker`, doing nothing: for tests and library use without MLflow."""
    experiment = None
    tracking_uri = None
    active_run_id = None

    @contextmanager
    def run(self, name: str, parent_run_id: str | None = None, tags: Mapping[str, Any] | None = None):
        yield SimpleNamespace(info=SimpleNamespace(run_id=None, run_name=name))

    def _noop(self, *args, **kwargs) -> None:
        return None

    log_params = log_metrics = set_tags = log_artifact = log_artifacts = _noop
    log_figure = log_text = log_dataset = register_model = _noop
