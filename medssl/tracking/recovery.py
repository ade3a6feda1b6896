"""What a dead medssl process left in an outbox folder becomes the work of a living one.

A process killed mid-run (SIGKILL, out of memory, a lost node) leaves `outbox-<pid>-<id>.jsonl` (its calls
not yet delivered; `.acked` says how many of its lines were) and `open-<pid>-<id>.json` (its open runs, touched
by its heartbeat). The next `Tracker` on the same folder claims each file of a process that is gone
(medssl/tracking/liveness.py: PID, boot id and start time), queues the undelivered calls in its own outbox, in
their order and with their original timestamps and steps, and queues the open runs' end as KILLED at the
file's last heartbeat, the last time the dead process was seen alive.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from medssl.tracking.liveness import writer_alive
from medssl.ui import console


# folders of the extra processes of a parallel ladder inside the main outbox (ladder/parallel.py)
PROCESS_FOLDERS = ("worker*", "rank*")


def adopt_orphans(outbox) -> int:
    """Queue in `outbox` what dead processes left in its folder, and in the folders of the parallel ladder's
    processes inside it (only a run of this experiment opens that main folder). Returns how many calls."""
    folders = [outbox.folder] + sorted(p for pattern in PROCESS_FOLDERS for p in outbox.folder.glob(pattern)
                                       if p.is_dir())
    adopted = killed = 0
    for folder in folders:
        calls, runs = _adopt_folder(outbox, folder)
        adopted, killed = adopted + calls, killed + runs
    if adopted or killed:
        console.print(f"queued {adopted} MLflow call(s) and the end of {killed} run(s) left by killed "
                      f"medssl process(es) in {outbox.folder}")
    return adopted


def _adopt_folder(outbox, folder: Path) -> tuple[int, int]:
    adopted = killed = 0
    for path in sorted(folder.glob("outbox-*.jsonl")):
        claimed = _claim(outbox, path, "outbox-")
        if claimed is not None:
            acked = _read_acked(path.with_suffix(".acked"))
            ops = read_ops(claimed)[acked:]
            for op in ops:
                outbox.submit(op)
            claimed.unlink()  # now in this process's own spool
            path.with_suffix(".acked").unlink(missing_ok=True)
            adopted += len(ops)
    for path in sorted(folder.glob("open-*.json")):
        last_alive_ms = _mtime_ms(path)
        claimed = _claim(outbox, path, "open-")
        if claimed is not None:
            for run_id in _read_run_ids(claimed):
                outbox.submit({"kind": "kill", "run_id": run_id, "end_time": last_alive_ms})
                killed += 1
            claimed.unlink()
    _forget_dead_identities(outbox, folder)
    return adopted, killed


def unsent_ops(path: Path) -> list[dict]:
    """The calls of spool `path` that were not delivered yet."""
    return read_ops(path)[_read_acked(path.with_suffix(".acked")):]


def read_ops(path: Path) -> list[dict]:
    """Queued calls of a spool file; a line cut short by a crash mid-write is the only one skipped."""
    ops = []
    for line in path.read_text().splitlines():
        try:
            ops.append(json.loads(line))
        except json.JSONDecodeError:
            console.print(f"[yellow]skipped a truncated line in {path}[/]")
    return ops


def _token(path: Path, prefix: str) -> str:
    return path.name.removeprefix(prefix).split(".")[0]  # "<pid>-<id>"


def _claim(outbox, path: Path, prefix: str) -> Path | None:
    """Rename a dead process's file to this process (atomic: two new processes never both take it)."""
    token = _token(path, prefix)
    if token == outbox.token or writer_alive(int(token.split("-")[0]), path.parent / f"proc-{token}.json"):
        return None
    claimed = path.with_name(f"claimed-{outbox.token}-{path.name}")
    try:
        os.rename(path, claimed)
    except OSError:
        return None  # another process claimed it first
    return claimed


def _forget_dead_identities(outbox, folder: Path) -> None:
    for path in folder.glob("proc-*.json"):
        token = _token(path, "proc-")
        left = [folder / f"outbox-{token}.jsonl", folder / f"open-{token}.json"]
        if token != outbox.token and not any(p.exists() for p in left) \
                and not writer_alive(int(token.split("-")[0]), path):
            path.unlink(missing_ok=True)


def _read_acked(path: Path) -> int:
    try:
        return int(path.read_text())
    except (OSError, ValueError):
        return 0


def _read_run_ids(path: Path) -> list[str]:
    try:
        return list(json.loads(path.read_text()))
    except (OSError, ValueError):
        return []  # cut short by the crash: nothing to end


def _mtime_ms(path: Path) -> int:
    try:
        return int(path.stat().st_mtime * 1000)
    except OSError:
        return int(time.time() * 1000)  # claimed by another process this instant: it will not be used
