"""Logging calls on their way to MLflow: sent by a background thread, kept on disk until acknowledged.

Why: a team tracking server restarts, drops off the network or hangs while a 10-hour pretraining runs. The
training thread must never wait on the network, and the metric history must come out exact once the server
is back. `submit` only appends the call to `outbox-<pid>-<id>.jsonl` (a local write) and hands it to the
sender thread, which sends calls in order, one MLflow request each, and records how many are delivered in
`outbox-<pid>-<id>.acked`. So a crash or a SIGKILL loses nothing and a replay never repeats a delivered call:
the next medssl process sends what is left (medssl/tracking/recovery.py).
Calls that a retry cannot fix (a param changed value, a deleted run) are reported and dropped; refused
credentials (an expired token, a revoked permission) are reported loudly and retried until they work.
"""
from __future__ import annotations

import itertools
import json
import os
import shutil
import threading
import time
import uuid
from collections import deque
from pathlib import Path

from medssl.errors import TrackingError
from medssl.tracking.liveness import write_identity
from medssl.tracking.senders import SENDERS, is_auth, is_permanent, split_batch
from medssl.ui import console

SEND_AT_ONCE = 200  # calls sent per pass before the delivered count is written down


class Outbox:
    """Ordered queue of logging operations (plain JSON dicts with a "kind" and a "run_id")."""

    def __init__(self, client, folder: Path, retry_interval: float = 1.0, max_interval: float = 30.0,
                 heartbeat_s: float = 5.0, max_in_memory: int = 50_000):
        self.client, self.folder = client, Path(folder)
        self.retry_interval, self.max_interval, self.heartbeat_s = retry_interval, max_interval, heartbeat_s
        self.max_in_memory = max_in_memory  # beyond this, calls wait in the spool file only
        self.token = f"{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.path = self.folder / f"outbox-{self.token}.jsonl"
        self.acked_path = self.path.with_suffix(".acked")
        self.open_path = self.folder / f"open-{self.token}.json"
        self.identity_path = self.folder / f"proc-{self.token}.json"
        self._cond = threading.Condition()
        self._pending: deque[dict] = deque()  # submitted, not yet delivered, oldest first
        self._disk_only = 0                   # submitted past max_in_memory: read back from the spool later
        self._spooled = self._acked = 0       # lines in the spool file; of them delivered, from the front
        self._spool = None
        self._failures, self._next_try, self._force = 0, 0.0, False
        self._pass = self._failed_pass = 0  # send passes begun; the last that failed (what flush waits on)
        self._outcomes: dict[str, object] = {}  # op id -> result (or exception) of its first attempt
        self._thread: threading.Thread | None = None
        self._closed, self._last_beat = False, 0.0
        self.open_runs: list[str] = []  # also in open-<token>.json: a killed process's runs get ended later
        self.refused: list[str] = []    # calls MLflow refused for good (reported, dropped)
        self.warned = self.auth_warned = False
        _ready_folder(self.folder, self.identity_path)

    def __len__(self) -> int:
        return len(self._pending) + self._disk_only

    # ------------------------------------------------------------------------------ training thread
    def submit(self, op: dict) -> str:
        """Queue `op` (on disk at once, sent by the sender thread); returns its id."""
        if op["kind"] == "artifact" and not self._is_own_file(op["local"]):
            op = {**op, "local": self._keep_copy(op["local"])}  # the file may change before it is sent
        op = {**op, "id": op.get("id") or uuid.uuid4().hex[:12]}
        with self._cond:
            for part in split_batch(op):
                self._append(part)
                if len(self._pending) < self.max_in_memory and not self._disk_only:
                    self._pending.append(part)
                else:
                    self._disk_only += 1
            self._beat()
            self._start()
            self._cond.notify_all()
        return op["id"]

    def outcome(self, op_id: str, timeout: float) -> object:
        """The result of the first attempt to send op `op_id` (None if none was made in `timeout`)."""
        with self._cond:
            self._force = True
            self._cond.notify_all()
            self._cond.wait_for(lambda: op_id in self._outcomes, timeout)
            return self._outcomes.pop(op_id, None)

    def flush(self, timeout: float = 30.0) -> bool:
        """Try every queued call now; return once all are delivered (True) or an attempt failed (False)."""
        with self._cond:
            begun = self._pass  # a pass already under way may have started before the caller's last call
            self._force = True
            self._cond.notify_all()
            self._cond.wait_for(lambda: not len(self) or self._failed_pass > begun, timeout)
            return not len(self)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=1.0)

    def mark_open(self, run_id: str) -> None:
        self.open_runs.append(run_id)
        self._write_open()
        with self._cond:
            self._start()  # its heartbeat keeps the open-runs file fresh

    def mark_closed(self, run_id: str) -> None:
        self.open_runs.remove(run_id)
        self._write_open()

    # -------------------------------------------------------------------------------- sender thread
    def _start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._work, name="medssl-mlflow-sender", daemon=True)
            self._thread.start()

    def _work(self) -> None:
        while True:
            with self._cond:
                batch = self._next_batch()
                if batch is None:
                    return
            if batch:
                sent, answers, failure = self._deliver(batch)
                with self._cond:
                    self._settle(batch[:sent])  # before any waiter hears the answers, so it counts right
                    self._outcomes.update(answers)
                    if failure is not None:
                        self._failed(*failure)

    def _next_batch(self) -> list[dict] | None:
        """Under the lock: the calls to send now ([] after a wait with nothing due; None: closed and empty)."""
        due = max(0.0, self._next_try - time.monotonic())
        if not len(self) or (due and not self._force):
            if self._closed and not len(self):
                return None
            self._cond.wait(timeout=min(self.heartbeat_s, due or self.heartbeat_s))
            self._beat()
            return []
        self._force = False
        self._pass += 1
        if not self._pending:
            self._read_back()
        return list(itertools.islice(self._pending, SEND_AT_ONCE))

    def _deliver(self, batch: list[dict]) -> tuple[int, dict, tuple | None]:
        """Send `batch` in order without the lock: how many were delivered (or refused for good), the answers
        to registrations, and the (op, error) that stopped the pass."""
        answers = {}
        for done, op in enumerate(batch):
            try:
                result = SENDERS[op["kind"]](self.client, op)
            except Exception as err:  # noqa: BLE001 — an outage shows up as many exception types
                if not is_permanent(err):
                    return done, answers, (op, err)
                self.refused.append(f"{op['kind']} for run {op['run_id']}: {err}")
                console.print(f"[red]MLflow refused a {op['kind']} call for run {op['run_id']}[/] "
                              f"(dropped, training goes on): {err}")
                result = err
            if op["kind"] == "register":  # the only call whose caller waits for its answer
                answers[op["id"]] = result
            self._failures = 0
        return len(batch), answers, None

    def _failed(self, op: dict, err: Exception) -> None:
        """Under the lock: back off before the next pass, and say so once per outage."""
        self._failures += 1
        self._failed_pass = self._pass
        self._next_try = time.monotonic() + min(self.max_interval, self.retry_interval * 2 ** (self._failures - 1))
        if op["kind"] == "register":
            self._outcomes[op["id"]] = None
        self._cond.notify_all()
        if is_auth(err) and not self.auth_warned:
            console.print(f"[bold red]MLflow refuses medssl's credentials[/] ({err.error_code}): {err}\n"
                          f"  nothing is dropped: logging is kept in {self.path} and retried until MLflow "
                          "accepts it.\n  what to do: renew the token / password (MLFLOW_TRACKING_TOKEN, "
                          "MLFLOW_TRACKING_USERNAME / _PASSWORD) or restore the permission on the experiment")
            self.auth_warned = True
        elif not is_auth(err) and not self.warned:
            console.print(f"[yellow]MLflow unreachable[/] ({type(err).__name__}); training goes on, "
                          f"logging is queued in {self.path} and sent when the server is back")
            self.warned = True

    def _settle(self, delivered: list[dict]) -> None:
        """Under the lock: forget delivered calls, on disk too."""
        for op in delivered:
            self._pending.popleft()
            self._drop_copy(op)
        self._acked += len(delivered)
        if delivered and (self.warned or self.auth_warned) and not len(self):
            console.print(f"[green]MLflow accepts logging again[/]: queued calls delivered")
            self.warned = self.auth_warned = False
        if not len(self):
            self._compact()
        elif delivered:
            _write_atomic(self.acked_path, str(self._acked))
        self._cond.notify_all()

    # ------------------------------------------------------------------------------------- on disk
    def _append(self, op: dict) -> None:
        """One line per call: a long outage costs one small local write per call, never a rewrite."""
        if self._spool is None:
            self._spool = self.path.open("a")
        self._spool.write(json.dumps(op) + "\n")
        self._spool.flush()  # in the OS's hands: a SIGKILL of this process loses nothing
        self._spooled += 1

    def _read_back(self) -> None:
        """Refill memory with the calls that only the spool holds (after a long outage)."""
        with self.path.open() as spool:
            lines = itertools.islice(spool, self._acked, self._acked + self.max_in_memory)
            self._pending.extend(json.loads(line) for line in lines)
        self._disk_only -= len(self._pending)

    def _compact(self) -> None:
        if self._spool is not None:
            self._spool.close()
            self._spool = None
        self.path.unlink(missing_ok=True)
        self.acked_path.unlink(missing_ok=True)
        self._spooled = self._acked = 0

    def _beat(self) -> None:
        """Touch the open-runs file now and then: its time is this process's last sign of life, which
        becomes the end time of its runs if it is killed."""
        now = time.monotonic()
        if now - self._last_beat >= self.heartbeat_s and self.open_runs:
            self._last_beat = now
            try:
                os.utime(self.open_path)
            except OSError:
                pass  # being rewritten by mark_open / mark_closed this instant

    def _write_open(self) -> None:
        """The runs this process has open, so that after a SIGKILL (no `finally` runs) the next medssl
        process can mark them KILLED instead of leaving them RUNNING in the UI forever."""
        if not self.open_runs:
            self.open_path.unlink(missing_ok=True)
            return
        _write_atomic(self.open_path, json.dumps(self.open_runs))

    def _keep_copy(self, local: str) -> str:
        src = Path(local)
        dst = self.folder / "files" / uuid.uuid4().hex / src.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst)
        else:
            shutil.copy2(src, dst)
        return str(dst)

    def _is_own_file(self, local: str) -> bool:
        return Path(local).resolve().is_relative_to((self.folder / "files").resolve())

    def _drop_copy(self, op: dict) -> None:
        if op["kind"] in ("artifact", "table") and self._is_own_file(op["local"]):
            shutil.rmtree(Path(op["local"]).parent, ignore_errors=True)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)  # a crash mid-write leaves the previous complete file


def _ready_folder(folder: Path, identity_path: Path) -> None:
    """The outbox folder exists and takes files, or a clear error now, before any run is opened."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        write_identity(identity_path)
    except OSError as err:
        raise TrackingError(f"the MLflow outbox folder is not writable: {err.strerror or err}", where=str(folder),
                            fix="make the workdir writable, or choose another workdir (workdir=...)") from None
