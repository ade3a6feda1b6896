"""Ladder children in parallel: worker processes on one machine, or the ranks of a torchrun launch.

One rule shares the children out in both cases: child i of the plan (finished ones included, so the share does
not depend on what is left) goes to rank i % world. Each rank appends its rows to its own shard
(results.rank<r>.csv, so no two processes write one file) and rank 0 merges the shards into results.csv in
plan order once every rank is done (results.merge_shards). Every child sets its own seeds (training order,
random initialisation, probe), so which process runs it does not change its result.
- `finetune.workers: W` (W > 1): torch.multiprocessing starts W processes (spawn) on this machine; each opens
  its own MLflow client, and its child runs hang under the same parent run.
- torchrun (WORLD_SIZE > 1): every rank runs its share with the tracker it was given (under the pipeline only
  rank 0 talks to MLflow, so the other ranks' children are rows in results.csv without an MLflow run); a gloo
  barrier waits for all before rank 0 merges.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path

import torch

from medssl.ladder.child import safe_child
from medssl.ladder.results import append_result, finished_keys, merge_shards, shard_path
from medssl.ui import progress_bar


def run_children(ctx, plan: list, results_csv: Path) -> bool:
    """Run the unfinished children of `plan`; True where this process should finish the ladder (rank 0)."""
    done = finished_keys(results_csv, ctx.digest)
    todo = [(i, child) for i, child in enumerate(plan) if child.key not in done]
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    if world > 1:
        ctx.rank, ctx.parallel = rank, True
        run_share(ctx, [(i, c) for i, c in todo if i % world == rank], shard_path(results_csv, rank))
        _barrier()
        if rank == 0:
            merge_shards(results_csv, world)
        _barrier()  # no rank reads results.csv before the merge is complete
        return rank == 0
    workers = min(ctx.cfg.workers, len(todo))
    if workers > 1:
        payload = _payload(ctx)
        threads = max(1, torch.get_num_threads() // workers)
        torch.multiprocessing.start_processes(_worker, args=(payload, todo, results_csv, workers, threads),
                                              nprocs=workers, start_method="spawn")
        merge_shards(results_csv, workers)
        return True
    run_share(ctx, todo, results_csv)
    return True


def run_share(ctx, share: list, path: Path) -> None:
    """This process's children, each row appended to `path` the moment it finishes."""
    with progress_bar("runs") as progress:
        task = progress.add_task(f"ladder (rank {ctx.rank})" if ctx.parallel else "ladder", total=len(share))
        for index, child in share:
            progress.update(task, description=f"ladder {child.key}")
            append_result(path, {**safe_child(ctx, child), "plan_index": index})
            progress.advance(task)


def _payload(ctx) -> dict:
    """A picklable copy of the context, the tracker replaced by what a worker needs to open its own."""
    tracker = ctx.tracker
    spec = None
    if getattr(tracker, "experiment", None):
        spec = {"experiment": tracker.experiment, "tracking_uri": tracker.tracking_uri,
                "outbox_dir": str(getattr(tracker, "outbox_dir", ".medssl/mlflow-outbox"))}
    ctx.tracker, features = None, ctx.features
    try:
        copied = copy.copy(ctx)
    finally:
        ctx.tracker = tracker
    copied.features = {}  # each worker computes the frozen features of the images it needs
    return {"ctx": copied, "tracker": spec, "features": {k: dict(v) for k, v in features.items()}}


def _worker(rank: int, payload: dict, todo: list, results_csv: Path, world: int, threads: int) -> None:
    from medssl.tracking.tracker import NullTracker, Tracker
    torch.set_num_threads(threads)
    ctx = payload["ctx"]
    spec = payload["tracker"]
    # an outbox per worker: queued MLflow calls of two processes never share files
    ctx.tracker = Tracker(spec["experiment"], spec["tracking_uri"], outbox_dir=Path(spec["outbox_dir"]) / f"worker{rank}") \
        if spec else NullTracker()
    ctx.features = payload["features"]
    ctx.rank, ctx.parallel = rank, True
    run_share(ctx, [(i, c) for i, c in todo if i % world == rank], shard_path(results_csv, rank))


def _barrier() -> None:
    from medssl.train.distributed import init_distributed
    import torch.distributed as dist
    init_distributed("gloo")
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
