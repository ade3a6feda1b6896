"""The one tracker interface every stage logs through, and the tracker that does nothing.

`RunTracker` is what the pipeline, pretraining, the ladder and the report may call on a tracker. Two classes
implement it: `medssl.tracking.tracker.Tracker` (MLflow, rank 0) and `NullTracker` (ranks > 0 of a torchrun,
tests, library use without MLflow). This module imports no MLflow, so a bare training box can use the null
tracker without it.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ContextManager, Mapping, Protocol, runtime_checkable

DESCRIPTION_TAG = "mlflow.note.content"  # what the MLflow UI shows as a run's description


@runtime_checkable
class RunTracker(Protocol):
    """Runs nested under the innermost open run; every logging call goes to `run_id` or, if None, that run."""
    experiment: str | None
    tracking_uri: str | None

    @property
    def active_run_id(self) -> str | None: ...

    def run(self, name: str, parent_run_id: str | None = None,
            tags: Mapping[str, Any] | None = None) -> ContextManager: ...

    def log_params(self, params: Mapping[str, Any], run_id: str | None = None) -> None: ...

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None, run_id: str | None = None) -> None: ...

    def set_tags(self, tags: Mapping[str, Any], run_id: str | None = None) -> None: ...

    def set_description(self, text: str, run_id: str | None = None) -> None: ...

    def log_artifact(self, path: Path | str, artifact_path: str | None = None, run_id: str | None = None) -> None: ...

    def log_artifacts(self, folder: Path | str, artifact_path: str | None = None,
                      run_id: str | None = None) -> None: ...

    def log_figure(self, fig, name: str, run_id: str | None = None) -> None: ...

    def log_text(self, text: str, name: str, run_id: str | None = None) -> None: ...

    def log_table(self, table, artifact_file: str, run_id: str | None = None) -> None: ...

    def log_dataset(self, manifest_df, digest: str | None, name: str, source: str | None = None,
                    context: str = "training", run_id: str | None = None) -> None: ...

    def register_model(self, artifact_path: str, name: str, tags: Mapping[str, Any] | None = None,
                       run_id: str | None = None) -> str | None: ...

    def flush(self, timeout: float | None = None) -> bool: ...

    def close(self) -> None: ...


class NullTracker:
    """Every `RunTracker` call, doing nothing: ranks > 0, tests, and library use without MLflow."""
    experiment = None
    tracking_uri = None
    active_run_id = None

    @contextmanager
    def run(self, name: str, parent_run_id: str | None = None, tags: Mapping[str, Any] | None = None):
        yield SimpleNamespace(info=SimpleNamespace(run_id=None, run_name=name))

    def log_params(self, params: Mapping[str, Any], run_id: str | None = None) -> None:
        return None

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None, run_id: str | None = None) -> None:
        return None

    def set_tags(self, tags: Mapping[str, Any], run_id: str | None = None) -> None:
        return None

    def set_description(self, text: str, run_id: str | None = None) -> None:
        return None

    def log_artifact(self, path: Path | str, artifact_path: str | None = None, run_id: str | None = None) -> None:
        return None

    def log_artifacts(self, folder: Path | str, artifact_path: str | None = None,
                      run_id: str | None = None) -> None:
        return None

    def log_figure(self, fig, name: str, run_id: str | None = None) -> None:
        return None

    def log_text(self, text: str, name: str, run_id: str | None = None) -> None:
        return None

    def log_table(self, table, artifact_file: str, run_id: str | None = None) -> None:
        return None

    def log_dataset(self, manifest_df, digest: str | None, name: str, source: str | None = None,
                    context: str = "training", run_id: str | None = None) -> None:
        return None

    def register_model(self, artifact_path: str, name: str, tags: Mapping[str, Any] | None = None,
                       run_id: str | None = None) -> str | None:
        return None

    def flush(self, timeout: float | None = None) -> bool:
        return True

    def close(self) -> None:
        return None
