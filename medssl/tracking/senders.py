"""One MLflow request per queued operation, and how to read the errors MLflow answers with.

Each operation is a plain JSON dict with a "kind" and a "run_id", so it can be spooled to disk and replayed
by another process. A "batch" never holds more than one `log_batch` request's worth (`split_batch`): an
operation is then sent whole or not at all, and a failure half-way through a long replay never sends the
earlier half a second time.
"""
from __future__ import annotations

from pathlib import Path

from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.exceptions import MlflowException

# MLflow error codes that mean "this request is wrong", not "the server is away": retrying cannot help
PERMANENT = {"INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST",
             "BAD_REQUEST", "INVALID_STATE"}
# credentials refused: an expired token or a revoked permission is fixed by a person, and then every call
# queued meanwhile must still arrive, so these are retried (and said loudly), never dropped
AUTH = {"UNAUTHENTICATED", "PERMISSION_DENIED", "CUSTOMER_UNAUTHORIZED"}
BATCH_LIMITS = {"metrics": 1000, "params": 100, "tags": 100}  # MLflow's per-request limits of log_batch


def is_permanent(err: Exception) -> bool:
    return isinstance(err, MlflowException) and err.error_code in PERMANENT


def is_auth(err: Exception) -> bool:
    return isinstance(err, MlflowException) and (err.error_code in AUTH or err.get_http_status_code() in (401, 403))


def split_batch(op: dict) -> list[dict]:
    """A "batch" op cut into ops of at most one log_batch request each (MLflow's per-request limits)."""
    if op["kind"] != "batch":
        return [op]
    parts, rows = [], {key: list(op.get(key, [])) for key in BATCH_LIMITS}
    while any(rows.values()):
        part = {"kind": "batch", "run_id": op["run_id"]}
        for key, limit in BATCH_LIMITS.items():
            if rows[key]:
                part[key], rows[key] = rows[key][:limit], rows[key][limit:]
        parts.append(part)
    return parts


def _send_batch(client, op: dict) -> None:
    client.log_batch(op["run_id"], metrics=[Metric(k, v, ts, step) for k, v, ts, step in op.get("metrics", [])],
                     params=[Param(k, v) for k, v in op.get("params", [])],
                     tags=[RunTag(k, v) for k, v in op.get("tags", [])], synchronous=True)


def _send_inputs(client, op: dict) -> None:
    dataset = Dataset(**op["dataset"])
    client.log_inputs(op["run_id"], [DatasetInput(dataset, [InputTag(k, v) for k, v in op["tags"]])])


def _send_artifact(client, op: dict) -> None:
    local = Path(op["local"])
    if local.is_dir():
        client.log_artifacts(op["run_id"], str(local), op.get("artifact_path"))
    else:
        client.log_artifact(op["run_id"], str(local), op.get("artifact_path"))


def _send_table(client, op: dict) -> None:
    import pandas as pd
    # the table was kept in MLflow's own table format (pandas "split" JSON); read back as written
    table = pd.read_json(Path(op["local"]), orient="split", dtype=False, convert_dates=False)
    client.log_table(op["run_id"], table, op["artifact_file"])


def _send_end(client, op: dict) -> None:
    client.set_terminated(op["run_id"], status=op["status"], end_time=op["end_time"])


def _send_kill(client, op: dict) -> None:
    """A run left open by a dead process: KILLED at its last sign of life, unless it was ended meanwhile."""
    if client.get_run(op["run_id"]).info.status == "RUNNING":
        client.set_terminated(op["run_id"], status="KILLED", end_time=op["end_time"])


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


SENDERS = {"batch": _send_batch, "inputs": _send_inputs, "artifact": _send_artifact, "table": _send_table,
           "end": _send_end, "kill": _send_kill, "register": send_register}
