"""Is the process that wrote a spool file still alive? A PID alone cannot say.

A restarted container (or a long-lived host) hands the PID of a dead medssl process to a new one, and a
PID-only check would then wait forever for the "living" writer, so its queued metrics are never replayed and
its runs stay RUNNING. Beside the PID, medssl records the machine's boot id and the process start time (field
22 of /proc/PID/stat, in clock ticks since boot): the same PID with another start time, or another boot, is
another process. Where /proc does not exist (macOS), only the PID can be checked.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


def boot_id() -> str | None:
    try:
        return BOOT_ID.read_text().strip()
    except OSError:
        return None


def start_ticks(pid: int) -> int | None:
    """Start time of `pid` in clock ticks since boot, or None (no such process, or no /proc)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) is in parentheses and may hold spaces: count fields after the last ")"
    return int(stat[stat.rindex(")") + 2:].split()[19])


def identity(pid: int | None = None) -> dict:
    """What tells this process apart from any later one with the same PID."""
    pid = os.getpid() if pid is None else pid
    return {"pid": pid, "boot_id": boot_id(), "start_ticks": start_ticks(pid)}


def write_identity(path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(identity()))
    os.replace(tmp, path)


def is_alive(record: dict) -> bool:
    """True while the process described by `record` (an `identity()`) is running."""
    pid = int(record["pid"])
    if not _pid_exists(pid):
        return False
    here = boot_id()
    if record.get("boot_id") and here and record["boot_id"] != here:
        return False  # written before a reboot: every process of that boot is gone
    if record.get("start_ticks") is not None:
        now = start_ticks(pid)
        if now is not None and now != record["start_ticks"]:
            return False  # the PID was reused by a process that started later
    return True


def writer_alive(pid: int, identity_file: Path) -> bool:
    """Is the writer of a spool file alive? Its identity file, else (files of older medssl) its PID only."""
    try:
        record = json.loads(identity_file.read_text())
    except (OSError, ValueError):
        record = {"pid": pid}
    return is_alive(record)


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, owned by another user
    return True
