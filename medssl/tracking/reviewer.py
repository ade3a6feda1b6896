"""What a reviewer sees in MLflow: check one experiment's story through MlflowClient, and screenshot the UI.

`check_experiment` asks the tracking server what a person opening the experiment would find: the latest
parent (pipeline) run, its child runs (stages, rungs, seeds) with status and metrics, the registered models
made from this experiment's runs, and the report artifact on the parent. `MlflowClient` on an http(s) URI
calls the same REST endpoints the UI uses, so a green check means the UI shows it too; on a local store
(`mlflow.db`) it asks the store directly.

    python -m medssl.tracking.reviewer http://127.0.0.1:5000 demo [--screenshot out.png]   # the parent run's page
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from medssl.errors import TrackingError

PARENT_TAG = "mlflow.parentRunId"
PAGE = 1000
# the command's own process only: a reviewer wants an answer in seconds, not MLflow's minutes of retries
COMMAND_HTTP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


class _Questions:
    """The few questions the check asks, answered as plain dicts, every page of every answer."""

    def __init__(self, uri: str):
        self.uri, self.client = uri, MlflowClient(uri)

    def experiment(self, name: str) -> dict | None:
        found = self.client.get_experiment_by_name(name)
        return None if found is None else {"experiment_id": found.experiment_id, "name": found.name,
                                           "lifecycle_stage": found.lifecycle_stage}

    def runs(self, experiment_id: str) -> list[dict]:
        return [_flat_run(r.to_dictionary()) for r in
                _pages(lambda token: self.client.search_runs([experiment_id], max_results=PAGE, page_token=token))]

    def model_versions(self) -> list[dict]:
        models = _pages(lambda token: self.client.search_registered_models(max_results=PAGE, page_token=token))
        return [dict(v) for m in models for v in _pages(lambda token, name=m.name: self.client.search_model_versions(
            f"name='{name}'", max_results=PAGE, page_token=token))]

    def artifacts(self, run_id: str, path: str) -> list[str]:
        files = []
        for entry in self.client.list_artifacts(run_id, path):
            files += self.artifacts(run_id, entry.path) if entry.is_dir else [entry.path]
        return files


def _pages(search) -> list:
    """Every result of an MLflow search, following its page tokens."""
    found, token = [], None
    while True:
        page = search(token)
        found += list(page)
        token = page.token
        if not token:
            return found


def _flat_run(run: dict) -> dict:
    """Run.to_dictionary() -> {run_id, name, status, start_time, tags, metrics, n_params}."""
    info, data = run["info"], run.get("data", {})
    return {"run_id": info["run_id"], "name": info.get("run_name", ""), "status": info.get("status", ""),
            "start_time": int(info.get("start_time") or 0), "tags": dict(data.get("tags") or {}),
            "metrics": dict(data.get("metrics") or {}), "n_params": len(data.get("params") or {})}


def check_experiment(tracking_uri: str, experiment: str, report_path: str = "report") -> dict:
    """Parent run, child runs, registered models and report artifact of `experiment`, with a problem list."""
    try:
        return _check(_Questions(tracking_uri), tracking_uri, experiment, report_path)
    except MlflowException as err:
        raise TrackingError(f"MLflow did not answer the review: {str(err)[:300]}", where=tracking_uri,
                            fix="start the server (mlflow server ...) or check the tracking URI") from None


def _check(api: _Questions, tracking_uri: str, experiment: str, report_path: str) -> dict:
    found = api.experiment(experiment)
    if not found:
        return {"ok": False, "experiment": None, "problems": [f"no experiment named '{experiment}'"]}
    runs = api.runs(found["experiment_id"])
    parents = sorted((r for r in runs if PARENT_TAG not in r["tags"]), key=lambda r: r["start_time"])
    parent = parents[-1] if parents else None
    children = _descendants(runs, parent["run_id"]) if parent else []
    run_ids = {r["run_id"] for r in runs}
    models = [{"name": v["name"], "version": str(v["version"]), "run_id": v.get("run_id"), "source": v.get("source"),
               "status": v.get("status")} for v in api.model_versions() if v.get("run_id") in run_ids]
    report = api.artifacts(parent["run_id"], report_path) if parent else []
    problems = _problems(parent, children, models, report, report_path)
    return {"ok": not problems, "tracking_uri": tracking_uri,
            "experiment": {"id": found["experiment_id"], "name": experiment}, "parent": parent,
            "parent_runs": len(parents), "children": children, "registered_models": models,
            "report": {"run_id": parent["run_id"] if parent else None, "files": report}, "problems": problems}


def _descendants(runs: list[dict], root: str, depth: int = 1) -> list[dict]:
    """Children of `root`, each followed by its own children (depth-first, in start order)."""
    out = []
    for run in sorted((r for r in runs if r["tags"].get(PARENT_TAG) == root), key=lambda r: r["start_time"]):
        out.append({**run, "depth": depth})
        out += _descendants(runs, run["run_id"], depth + 1)
    return out


def _problems(parent, children, models, report, report_path) -> list[str]:
    problems = []
    if parent is None:
        return ["no parent (pipeline) run in the experiment"]
    if parent["status"] != "FINISHED":
        problems.append(f"parent run {parent['run_id']} is {parent['status']}")
    if not children:
        problems.append("the parent run has no child runs")
    problems += [f"child run '{c['name']}' ({c['run_id']}) is {c['status']}" for c in children
                 if c["status"] != "FINISHED"]
    if not models:
        problems.append("no registered model comes from this experiment's runs")
    if not report:
        problems.append(f"no '{report_path}' artifact on the parent run")
    return problems


def ui_url(tracking_uri: str, experiment_id: str, run_id: str | None = None) -> str:
    """The MLflow UI page of an experiment (or of one run) on a tracking server. `workflowType` asks MLflow 3's
    UI for its model-training pages: a fresh browser otherwise files every run under GenAI "Evaluations"."""
    base = tracking_uri.rstrip("/")
    page = f"{base}/#/experiments/{experiment_id}/runs" + (f"/{run_id}" if run_id else "")
    return page + "?workflowType=machine_learning"


def screenshot(url: str, out_png: Path | str, wait_ms: int = 8000, timeout_s: float = 90.0,
               window: tuple[int, int] = (1600, 1000)) -> Path:
    """PNG of `url` from headless Debian chromium (`apt-get install chromium`); the UI is a JavaScript page,
    so chromium is given `wait_ms` of virtual time to render it first. `window` (width, height): a run page
    needs a tall one to show its description and metrics in one picture."""
    out_png = Path(out_png).resolve()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    done = _chromium(url, [f"--screenshot={out_png}", f"--window-size={window[0]},{window[1]}"], wait_ms, timeout_s)
    if not out_png.is_file() or out_png.stat().st_size == 0:
        raise TrackingError(f"chromium wrote no screenshot (exit {done.returncode}): {done.stderr[-500:]}",
                            where="chromium", fix="check that the URL opens: " + url)
    return out_png


def page_text(url: str, wait_ms: int = 8000, timeout_s: float = 90.0) -> str:
    """The page's DOM after the UI's JavaScript has rendered it (what `screenshot` shows, as HTML text), so a
    test can check that the run page really displays the description and metrics."""
    done = _chromium(url, ["--dump-dom", "--window-size=1600,1000"], wait_ms, timeout_s)
    if not done.stdout.strip():
        raise TrackingError(f"chromium rendered nothing (exit {done.returncode}): {done.stderr[-500:]}",
                            where="chromium", fix="check that the URL opens: " + url)
    return done.stdout


def _chromium(url: str, action: list[str], wait_ms: int, timeout_s: float) -> subprocess.CompletedProcess:
    """Headless chromium on a fresh profile, offline-friendly (no sync, updates or background traffic)."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        raise TrackingError("chromium is not installed, so the UI cannot be rendered", where="medssl.reviewer",
                            fix="apt-get install chromium (Debian), or open the URL in a browser: " + url)
    with tempfile.TemporaryDirectory() as profile:
        cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--hide-scrollbars",
               f"--virtual-time-budget={wait_ms}", *action, url]
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise TrackingError(f"chromium took over {timeout_s:.0f} s for {url}", where=browser) from None


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__.strip().splitlines()[-1].strip())
        return 2
    for key, value in COMMAND_HTTP.items():
        os.environ.setdefault(key, value)  # this command's own process; a user's settings win
    result = check_experiment(argv[0], argv[1])
    print(json.dumps(result, indent=2, default=str))
    if "--screenshot" in argv and result.get("experiment"):
        path = argv[argv.index("--screenshot") + 1]
        parent = (result.get("parent") or {}).get("run_id")  # the parent run's page carries the answer
        shot = screenshot(ui_url(argv[0], result["experiment"]["id"], parent), path, window=(1600, 1700))
        print("screenshot:", shot)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
