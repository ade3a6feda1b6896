"""Ladder children in parallel: worker processes on one machine, or the ranks of a torchrun launch.

One rule shares the children out in both cases: child i of the plan (finished ones included, so the share does
not depend on what is left) goes to rank i % world. Each rank appends its rows to its own shard
(results.rank<r>.csv, so no two processes write one file) and rank 0 merges the shards into results.csv in
plan order once every rank is done (results.merge_shards). Every child sets its own seeds (training order,
random initialisation, probe), so which process runs it does not change its result.
- `finetune.workers: W` (W > 1): torch.multiprocessing starts W processes (spawn) on this machine; each opens
  its own MLflow client, and its child runs hang under the same parent run.
- torchrun (WORLD_SIZE > 1): every rank runs its share. Rank 0 sends its tracker's settings and parent run id
  to the others; a rank > 0 that has no MLflow tracker of its own (under `medssl run` only rank 0 opens one)
  opens a client the same way a worker does, so its child runs hang under the same parent run. A gloo
  barrier waits for all before rank 0 merges.
Either way each extra process queues its MLflow calls in its own outbox folder (<outbox>/worker<r> or
<outbox>/rank<r>): on several nodes a process cannot tell whether another node's writer of a shared folder is
alive. Whatever a process leaves queued there is sent by the next tracker that opens the main outbox
(tracking/recovery.py), so an absent server loses nothing.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Callable

import torch

from medssl.ladder.child import safe_child
from medssl.ladder.results import append_result, finished_keys, merge_shards, shard_path
from medssl.ui import progress_bar


def run_children(ctx, plan: list, results_csv: Path) -> bool:
    """Run the unfinished children of `plan`; True where this process should finish the ladder (rank 0)."""
    done = finished_keys(results_csv, ctx.digest)
    todo = [(i, child) for i, child in enumerate(plan) if child.key not in done]
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return run_on_ranks(ctx, todo, results_csv)
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


def run_on_ranks(ctx, todo: list, results_csv: Path, run_one: Callable = safe_child,
                 unit: Callable[[int, object], int] = lambda index, child: index) -> bool:
    """This rank's share of a torchrun ladder, then rank 0 merges the shards; True on rank 0.

    todo: (plan index, child) of the unfinished children; the child goes to rank unit(index, child) % world
    (the segmentation ladder keeps the two children of a rung together: its SSL child pairs with the scratch
    one); run_one(ctx, child) -> its results row. ctx needs tracker, parent_run_id, rank and parallel.

    Why each rank > 0 logs its own children (rather than rank 0 logging them from the shards after the merge):
    a child's run then gets exactly what a serial child's gets, through the same code (metric histories,
    evaluation files, models, figures), the moment it finishes; replaying shards would need a second logger
    for every kind of call and would hold every run back until the slowest rank ends."""
    from medssl.train.distributed import from_rank0, wait_for_all
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    ctx.rank, ctx.parallel = rank, True
    spec = from_rank0(_tracker_spec(ctx.tracker, ctx.parent_run_id))
    given = ctx.tracker
    own = rank > 0 and spec is not None and not getattr(given, "experiment", None)
    if own:
        ctx.tracker, ctx.parent_run_id = open_tracker(spec, f"rank{rank}"), spec["parent_run_id"]
    try:
        run_share(ctx, [(i, c) for i, c in todo if unit(i, c) % world == rank], shard_path(results_csv, rank),
                  run_one)
    finally:
        if own:
            ctx.tracker.close()  # what the server has not taken stays queued on disk (see the module's note)
            ctx.tracker = given
    wait_for_all()
    if rank == 0:
        merge_shards(results_csv, world)
    wait_for_all()  # no rank reads results.csv before the merge is complete
    return rank == 0


def run_share(ctx, share: list, path: Path, run_one: Callable = safe_child) -> None:
    """This process's children, each row appended to `path` the moment it finishes."""
    with progress_bar("runs") as progress:
        task = progress.add_task(f"ladder (rank {ctx.rank})" if ctx.parallel else "ladder", total=len(share))
        for index, child in share:
            progress.update(task, description=f"ladder {child.key}")
            append_result(path, {**run_one(ctx, child), "plan_index": index})
            progress.advance(task)


def _tracker_spec(tracker, parent_run_id: str | None) -> dict | None:
    """What another process needs to open its own client on the same experiment (None: no MLflow)."""
    if not getattr(tracker, "experiment", None):
        return None
    return {"experiment": tracker.experiment, "tracking_uri": tracker.tracking_uri,
            "outbox_dir": str(getattr(tracker, "outbox_dir", ".medssl/mlflow-outbox")),
            "start_wait_s": getattr(tracker, "start_wait_s", 3.0), "parent_run_id": parent_run_id}


def open_tracker(spec: dict | None, name: str):
    """A worker's or rank's own MLflow client, queuing in <outbox>/<name> (a folder per process)."""
    from medssl.tracking.tracker import NullTracker, Tracker
    if spec is None:
        return NullTracker()
    return Tracker(spec["experiment"], spec["tracking_uri"], outbox_dir=Path(spec["outbox_dir"]) / name,
                   start_wait_s=spec["start_wait_s"])


def _payload(ctx) -> dict:
    """A picklable copy of the context, the tracker replaced by what a worker needs to open its own."""
    tracker, features = ctx.tracker, ctx.features
    ctx.tracker = None
    try:
        copied = copy.copy(ctx)
    finally:
        ctx.tracker = tracker
    copied.features = {}  # each worker computes the frozen features of the images it needs
    return {"ctx": copied, "tracker": _tracker_spec(tracker, ctx.parent_run_id),
            "features": {k: dict(v) for k, v in features.items()}}


def _worker(rank: int, payload: dict, todo: list, results_csv: Path, world: int, threads: int) -> None:
    torch.set_num_threads(threads)
    ctx = payload["ctx"]
    ctx.tracker = open_tracker(payload["tracker"], f"worker{rank}")
    ctx.features = payload["features"]
    ctx.rank, ctx.parallel = rank, True
    try:
        run_share(ctx, [(i, c) for i, c in todo if i % world == rank], shard_path(results_csv, rank))
    finally:
        ctx.tracker.close()
