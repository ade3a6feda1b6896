"""`medssl run` under torchrun: every rank runs the pipeline's code; this module says which rank does what.

- pretrain (DDP) and the ladder (children shared out, ladder/parallel.py; classification or segmentation,
  whose stage caches the masks on rank 0 first) run on every rank;
- every other stage (demo, manifest, splits, cache, report) runs on rank 0 alone while the others wait: each
  writes one set of files (the cohort, manifest, splits, cache arrays, the report on the parent run) that two
  processes would race on, and none is worth sharing out.
After every stage, rank 0's outputs (paths, run ids) go to every rank, so a rank never reads a file before rank 0
has finished writing it. The plan is rank 0's too: a rank that looked at the stage records a moment later could
find a stage that rank 0 had just finished and plan something else.
Without torchrun (WORLD_SIZE unset or 1) every function here just runs the stage.
"""
from __future__ import annotations

import os
from typing import Callable

from medssl.errors import MedsslError
from medssl.train.distributed import cleanup, from_rank0, wait_for_all

EVERY_RANK = ("pretrain", "ladder")


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def on_every_rank(name: str) -> bool:
    """Pretraining and the ladder (classification or segmentation) run on every rank."""
    return name in EVERY_RANK


def shared_plan(plan: list) -> list:
    """Rank 0's plan (which stages are to run) on every rank."""
    if world_size() <= 1:
        return plan
    todo = from_rank0([todo for _, _, todo in plan])
    return [(stage, fingerprint, run) for (stage, fingerprint, _), run in zip(plan, todo)]


def run_stage(name: str, run: Callable[[], dict]) -> dict:
    """Run one stage where it belongs; returns rank 0's outputs on every rank."""
    if world_size() <= 1:
        return run()
    if on_every_rank(name):
        return from_rank0(run())  # rank 0's record (the run ids only it knows), once every rank is done
    if rank() != 0:
        sent = from_rank0(None)  # wait while rank 0 works
        if "failed" in sent:
            raise MedsslError(f"rank 0 failed it: {sent['failed']}", where=f"torchrun rank {rank()}",
                              fix="see rank 0's message")
        return sent["outputs"]
    try:
        outputs = run()
    except Exception as err:
        from_rank0({"failed": _first_line(err)})  # the others stop with it instead of waiting to be killed
        raise
    from_rank0({"outputs": outputs})
    return outputs


def finish(ok: bool) -> None:
    """Leave the process groups before the interpreter exits: a gloo group still alive at exit can abort the
    process ("terminate called without an active exception"), which torchrun reports as a failed rank. After
    a success every rank first waits for the others (none tears down a group a peer still uses)."""
    if world_size() <= 1:
        return
    if ok:
        wait_for_all()
    cleanup()


def _first_line(err: Exception) -> str:
    if isinstance(err, MedsslError):
        return err.what + (f" (where: {err.where})" if err.where else "")
    return (str(err).splitlines() or [type(err).__name__])[0]
