"""The demo pipeline end to end, tiny, against a real `mlflow server`: what a reviewer opens is all there.

Runs `medssl run pipelines/demo.yaml` as a user would (a subprocess, the README's command with smaller
settings), checks the experiment through MLflow's REST API, then reruns the same command: every stage is
skipped.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from medssl.tracking.reviewer import check_experiment
from test_mlflow_server import free_port, server  # noqa: F401  (the module's mlflow server fixture)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

DEMO = Path(__file__).resolve().parents[1] / "pipelines" / "demo.yaml"
TINY = ["data.demo.subjects=28", "data.demo.size=24", "data.demo.positive_fraction=0.3",
        "preprocess.size=[24,24,24]", "pretrain.crop=[16,16,16]", "pretrain.train.steps=4",
        "pretrain.train.batch_size=4", "pretrain.train.warmup_steps=1", "pretrain.train.log_every=1",
        "pretrain.train.probe_every=2", "pretrain.train.checkpoint_every=2", "split.ladder.per_class=[3]",
        "split.ladder.seeds=[0]", "split.repeats=1", "finetune.epochs=1", "finetune.bootstrap=20",
        "finetune.batch_size=4", "finetune.protocols=[finetune]", "finetune.arms=[ssl,scratch,features]"]


def medssl(args: list[str], cwd: Path, uri: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "MEDSSL_SALT": "test-salt"}
    return subprocess.run([sys.executable, "-m", "medssl.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=500)


def test_demo_pipeline_lands_in_mlflow_and_reruns_skip(server, tmp_path):
    site = tmp_path / "siteB"  # an external site: other pseudo-subjects (another seed), its own labels
    made = medssl(["demo-data", str(site), "--subjects", "12", "--seed", "7", "--size", "24"], tmp_path, server.url)
    assert made.returncode == 0, made.stderr[-4000:]
    external = f"evaluate.external=[{{name: siteB, folder: {site / 'images'}, labels: {site / 'labels.csv'}}}]"
    args = ["run", str(DEMO), f"workdir={tmp_path}/work", f"manifest.out={tmp_path}/demo.csv",
            f"preprocess.cache_dir={tmp_path}/cache", *TINY, external]
    first = medssl(args, tmp_path, server.url)
    assert first.returncode == 0, first.stderr[-4000:]
    assert "Does SSL help?" in first.stdout

    seen = check_experiment(server.url, "demo")
    assert seen["ok"], seen["problems"]
    stages = {c["name"] for c in seen["children"] if c["depth"] == 1}
    assert {"manifest", "pretrain", "ladder"} <= stages, stages
    rungs = [c for c in seen["children"] if c["depth"] == 2]
    arms = {c["tags"].get("medssl.arm") for c in rungs}
    assert arms == {"ssl", "scratch", "features"} and len(rungs) == 3, [(c["name"], c["tags"]) for c in rungs]
    pretrain_id = next(c["run_id"] for c in seen["children"] if c["name"] == "pretrain")
    assert all(c["tags"].get("medssl.pretrain_run_id") == pretrain_id for c in rungs)
    assert seen["registered_models"], "the best model per rung is registered"
    assert any(f.endswith(".png") for f in seen["report"]["files"])
    answer_on_the_parent_run(server.url, seen["parent"]["run_id"], tmp_path)

    manifest = (tmp_path / "demo.csv").read_text()
    assert "MRN" not in manifest, "raw patient ids must never reach the manifest"
    results = pd.read_csv(tmp_path / "work" / "demo" / "ladder" / "results.csv")
    assert set(results["arm"]) == {"ssl", "scratch", "features"} and (results["status"] == "ok").all()
    assert (results["n_patients_used"] == 6).all()  # 3 patients of each class, nothing else

    again = medssl(args, tmp_path, server.url)
    assert again.returncode == 0, again.stderr[-4000:]
    assert again.stderr.count("up to date, skipped") == 7, again.stderr[-3000:]

    # the registered model, as a reviewer would take it: external validation and inference on new scans
    model = f"models:/{seen['registered_models'][0]['name']}/{seen['registered_models'][0]['version']}"
    overrides = [a for a in args[2:] if a.startswith(("workdir=", "preprocess."))]
    scored = medssl(["evaluate", model, *overrides, "--pipeline", str(DEMO), "--manifest",
                     str(tmp_path / "demo.csv"), "--out", str(tmp_path / "external")], tmp_path, server.url)
    assert scored.returncode == 0, scored.stderr[-4000:]
    assert (tmp_path / "external" / "metrics.json").is_file()
    printed = scored.stdout + scored.stderr  # medssl's console writes to stderr
    assert "Confusion matrix" in printed and "cm_0_0" not in printed  # a table, not a flat dict
    assert (tmp_path / "external" / "confusion.png").read_bytes()[:4] == b"\x89PNG"
    images = tmp_path / "work" / "demo" / "demo_data" / "images"
    predicted = medssl(["predict", model, str(images), *overrides, "--pipeline", str(DEMO), "--out",
                        str(tmp_path / "predictions.csv")], tmp_path, server.url)
    assert predicted.returncode == 0, predicted.stderr[-4000:]
    predictions = pd.read_csv(tmp_path / "predictions.csv")
    assert len(predictions) == len(pd.read_csv(tmp_path / "demo.csv"))
    assert predictions["score"].between(0, 1).all() and predictions["paths"].notna().all()

    # the registered model is a medssl package (no pickle) with its card, served by MLflow on a scan
    from mlflow.tracking import MlflowClient
    version = seen["registered_models"][0]
    client = MlflowClient(server.url)
    run_id = client.get_model_version(version["name"], version["version"]).run_id
    files = {f.path for f in client.list_artifacts(run_id, "model")}
    assert {"model/MLmodel", "model/model_card.md", "model/data"} <= files, files
    packed = {f.path for f in client.list_artifacts(run_id, "model/data/medssl_model")}
    assert packed == {"model/data/medssl_model/medssl-model.json", "model/data/medssl_model/model.safetensors"}
    import mlflow.artifacts
    card = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="model/model_card.md",
                                                    dst_path=str(tmp_path / "card"), tracking_uri=server.url))
    text = card.read_text()    # rewritten by the report: the rung's pooled evidence, internal and external
    assert "| internal |" in text and "| siteB |" in text and "(internal) |" in text, text  # + a paired delta
    scan = next(images.rglob("*.nii.gz"))
    row = _served_answer(model, scan, server.url)
    assert row["path"] == str(scan)
    exported = medssl(["export", model, "--format", "onnx", "--out", str(tmp_path / "demo.onnx")], tmp_path, server.url)
    assert exported.returncode == 0 and (tmp_path / "demo.onnx").stat().st_size > 0, exported.stderr[-3000:]


def answer_on_the_parent_run(url: str, run_id: str, tmp_path: Path) -> None:
    """What the run page shows, read through MLflow's REST API: the verdict as the description, the headline
    metrics and paired deltas, internal and on the external site."""
    import json
    import urllib.request
    with urllib.request.urlopen(f"{url}/api/2.0/mlflow/runs/get?run_id={run_id}", timeout=30) as answer:
        run = json.load(answer)["run"]
    metrics = {m["key"]: m["value"] for m in run["data"].get("metrics", [])}
    tags = {t["key"]: t["value"] for t in run["data"].get("tags", [])}
    summary = pd.read_csv(tmp_path / "work" / "demo" / "report" / "summary.csv")
    ssl = summary[(summary["site"] == "internal") & (summary["arm"] == "ssl")].iloc[0]
    key = f"internal/{ssl['rung']}/{ssl['protocol']}/ssl"
    assert metrics[f"{key}/auroc"] == pytest.approx(ssl["auroc"])
    assert any(k.startswith(f"{key}/delta_auroc_vs_") for k in metrics)
    assert any(k.startswith("siteB/") for k in metrics), sorted(metrics)  # the external site beside it
    verdicts = (tmp_path / "work" / "demo" / "report" / "verdict.md").read_text().splitlines()
    assert tags["mlflow.note.content"].startswith("### Does SSL help?")
    assert all(line in tags["mlflow.note.content"] for line in verdicts)
    assert json.loads(tags["mlflow.loggedArtifacts"]) == [{"path": "report/summary_table.json", "type": "table"}]


def _served_answer(model_uri: str, scan: Path, tracking_uri: str) -> dict:
    """`mlflow models serve` on the registered model, one request with a scan path, the first prediction."""
    import json
    import time
    import urllib.error
    import urllib.request
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager",
                               "local", "-p", str(port), "-h", "127.0.0.1"], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE)
    body = json.dumps({"dataframe_split": {"columns": ["path"], "data": [[str(scan)]]}}).encode()
    try:
        for _ in range(180):
            try:
                request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                                 headers={"Content-Type": "application/json"})
                row = json.loads(urllib.request.urlopen(request, timeout=60).read())["predictions"][0]
                probs = [v for k, v in row.items() if k.startswith("p_")]
                assert len(probs) == 2 and abs(sum(probs) - 1) < 1e-5 and row["call"], row
                return row
            except urllib.error.HTTPError as err:   # the server answered, with an error: show it
                raise AssertionError(err.read().decode()[-2000:]) from None
            except OSError:                           # not listening yet
                assert server.poll() is None, server.stderr.read().decode()[-2000:]
                time.sleep(1)
        raise AssertionError("the served model never answered")
    finally:
        server.terminate()
        server.wait(timeout=30)
