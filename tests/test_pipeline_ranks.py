"""`medssl run` under torchrun, as the README writes it (2 gloo ranks on the CPU), against a real `mlflow server`.

Rank 0 alone builds the demo cohort, manifest, splits and cache and writes the report; both ranks pretrain (DDP)
and share the ladder's children. The ladder's numbers equal those of a one-process run on the same encoder and
data, every child is an MLflow run under the one ladder run whichever rank ran it, and the report is made once.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from medssl.ladder.results import read_results
from test_mlflow_server import server  # noqa: F401  (the module's mlflow server fixture)


DEMO = Path(__file__).resolve().parents[1] / "pipelines" / "demo.yaml"
TINY = ["name=ranks", "data.demo.subjects=28", "data.demo.size=24", "data.demo.positive_fraction=0.3",
        "preprocess.size=[24,24,24]", "pretrain.crop=[16,16,16]", "pretrain.train.steps=2",
        "pretrain.train.batch_size=4", "pretrain.train.warmup_steps=1", "pretrain.train.log_every=1",
        "pretrain.train.probe_every=100", "pretrain.train.checkpoint_every=2", "split.ladder.per_class=[3]",
        "split.ladder.seeds=[0]", "split.repeats=1", "finetune.epochs=1", "finetune.bootstrap=20",
        "finetune.batch_size=4", "finetune.protocols=[linear,finetune]", "finetune.arms=[ssl,scratch,features]"]
METRICS = ("auroc", "balanced_accuracy", "auprc", "threshold", "chosen_C", "chosen_epochs", "val_auroc",
           "auroc_ci_low", "auroc_ci_high")


def torchrun(args: list[str], cwd: Path, uri: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "MEDSSL_SALT": "test-salt", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(DEMO.parents[1]), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "medssl.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-5000:])
    return done


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_torchrun_pipeline_shares_the_ladder_and_reports_once(server, tmp_path, monkeypatch, capsys):
    from medssl.cli import main
    work = tmp_path / "work" / "ranks"
    args = ["run", str(DEMO), f"workdir={tmp_path}/work", f"manifest.out={tmp_path}/demo.csv",
            f"preprocess.cache_dir={tmp_path}/cache", *TINY]
    ranked = torchrun(args, tmp_path, server.url)
    assert (ranked.stdout + ranked.stderr).count("Does SSL help?") == 1  # the report: rank 0, once
    shared = read_results(work / "ladder" / "results.csv")
    assert (shared["status"] == "ok").all() and len(shared) == 4, shared[["key", "error"]]
    assert not list((work / "ladder").glob("results.rank*.csv"))  # shards merged away
    assert not list((work / "mlflow-outbox").rglob("outbox-*.jsonl"))  # every rank's calls delivered

    # one process, same data and encoder (every earlier stage skipped: rank 0 recorded them), the ladder redone
    shutil.move(work / "ladder", tmp_path / "ladder_of_the_ranks")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    monkeypatch.setenv("MEDSSL_SALT", "test-salt")
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank (OMP_NUM_THREADS=1): another thread count sums floats in another order
    try:
        assert main(args) == 0  # in this process: no second interpreter start-up
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().err
    assert printed.count("up to date, skipped") == 5, printed[-3000:]
    alone = read_results(work / "ladder" / "results.csv")
    assert list(alone["key"]) == list(shared["key"])  # merged in plan order
    for column in METRICS:
        assert np.allclose(shared[column], alone[column], atol=1e-5, equal_nan=True), column

    client = MlflowClient(server.url)
    experiment = client.get_experiment_by_name("ranks").experiment_id
    runs = client.search_runs([experiment], max_results=200)
    by_id = {r.info.run_id: r for r in runs}
    pipelines = sorted((r for r in runs if "mlflow.parentRunId" not in r.data.tags), key=lambda r: r.info.start_time)
    assert len(pipelines) == 2  # the torchrun launch opened one parent run, not one per rank
    parent = pipelines[0].info.run_id
    ladder = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent and r.info.run_name == "ladder"]
    assert len(ladder) == 1
    children = {r.info.run_id for r in runs if r.data.tags.get("mlflow.parentRunId") == ladder[0].info.run_id}
    assert children == set(shared["run_id"])  # every child has its run, under the one ladder run
    assert {by_id[i].data.tags["medssl.rank"] for i in children} == {"0", "1"}  # ... run by both ranks
    for row in shared.itertuples():
        got = by_id[row.run_id]
        assert got.info.status == "FINISHED" and got.data.metrics["test_auroc"] == pytest.approx(row.auroc)
    headline = [k for k in pipelines[0].data.metrics if k.startswith("internal/")]
    assert headline  # the report's answer is on the parent run, logged once (not once per rank)
    assert all(len(client.get_metric_history(parent, k)) == 1 for k in headline[:6])



@pytest.mark.slow
@pytest.mark.timeout(400)
def test_torchrun_segmentation_pipeline_shares_its_rungs(server, tmp_path):
    """The Dice ladder under the same command line: rank 0 caches the masks while rank 1 waits, the two rungs
    run on the two ranks (each rung's scratch and SSL child together), one report."""
    tiny = ["name=seg-ranks", "data.demo.subjects=12", "data.demo.size=32", "preprocess.size=[32,32]",
            "pretrain.crop=[16,16]", "pretrain.train.steps=2", "pretrain.train.batch_size=2",
            "pretrain.train.warmup_steps=1", "pretrain.train.checkpoint_every=2", "pretrain.train.log_every=1",
            "split.ladder.per_class=[1,2]", "split.ladder.seeds=[0]", "finetune.bootstrap=20",
            "finetune.segmentation.steps=2", "finetune.segmentation.batch_size=2",
            "finetune.segmentation.patch=[32,32]", "finetune.segmentation.overlays=1"]
    torchrun(["run", str(DEMO.with_name("demo_seg.yaml")), f"workdir={tmp_path}/work",
              f"manifest.out={tmp_path}/seg.csv", f"preprocess.cache_dir={tmp_path}/cache", *tiny], tmp_path, server.url)
    work = tmp_path / "work" / "seg-ranks"
    results = read_results(work / "ladder" / "seg_results.csv")
    assert (results["status"] == "ok").all() and len(results) == 4, results[["key", "error"]]
    assert (work / "report" / "dice_curve.png").is_file()
    client = MlflowClient(server.url)
    runs = {r.info.run_id: r for r in client.search_runs([client.get_experiment_by_name("seg-ranks").experiment_id])}
    ladder = {runs[i].data.tags["mlflow.parentRunId"] for i in results["run_id"]}
    assert len(ladder) == 1 and runs[ladder.pop()].info.run_name == "ladder"  # one parent for every child
    ranks = {runs[i].data.tags["medssl.rank"]: set() for i in results["run_id"]}
    for run_id, rung in zip(results["run_id"], results["rung"]):
        ranks[runs[run_id].data.tags["medssl.rank"]].add(rung)
    assert sorted(map(sorted, ranks.values())) == [["per_class_1"], ["per_class_2"]]
    parent = next(r for r in runs.values() if "mlflow.parentRunId" not in r.data.tags)
    dice = [k for k in parent.data.metrics if k.startswith("dice_")]
    assert dice and all(len(client.get_metric_history(parent.info.run_id, k)) == 1 for k in dice)


def _stage_rank(rank: int, port: int, tmp: str) -> None:
    """One rank of a torchrun-like launch running three stages through ranks.run_stage."""
    import json
    from medssl.errors import DataError, MedsslError
    from medssl.pipeline import ranks
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port)})
    calls = []

    def cache() -> dict:
        calls.append(rank)
        return {"paths": [f"written by rank {rank}"]}

    def splits() -> dict:
        raise DataError("the manifest has no labels", where="split.label")
    got = {"cache": ranks.run_stage("cache", cache), "pretrain": ranks.run_stage("pretrain", lambda: {"rank": rank})}
    try:
        ranks.run_stage("splits", splits)
    except MedsslError as err:
        got["error"] = err.what
    Path(tmp, f"rank{rank}.json").write_text(json.dumps({**got, "calls": calls}))
    ranks.finish(ok=True)   # as the pipeline does: no gloo group left alive at exit


def test_rank0_alone_runs_single_process_stages_and_every_rank_gets_its_outputs_or_its_failure(tmp_path):
    import json
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.start_processes(_stage_rank, args=(port, str(tmp_path)), nprocs=2, start_method="spawn")
    zero, one = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert zero["calls"] == [0] and one["calls"] == []  # the cache stage ran on rank 0 only
    assert zero["cache"] == one["cache"] == {"paths": ["written by rank 0"]}
    assert zero["pretrain"] == one["pretrain"] == {"rank": 0}  # ran on both; rank 0's record for all
    assert zero["error"] == "the manifest has no labels"
    assert one["error"] == "rank 0 failed it: the manifest has no labels (where: split.label)"
