"""One call on a daemon thread, as a Future. Opening a run waits on the network on a helper thread; a call
abandoned because the server never answered must not keep the process alive at exit, and the workers of a
concurrent.futures ThreadPoolExecutor are joined at interpreter exit (a medssl command, or pytest, would hang
there for as long as MLflow's HTTP retries last)."""
from __future__ import annotations

import threading
from concurrent.futures import Future


def in_daemon_thread(fn, *args, name: str = "medssl-mlflow-open") -> Future:
    future: Future = Future()

    def run() -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(fn(*args))
        except BaseException as err:  # noqa: BLE001 — handed to whoever waits on the future
            future.set_exception(err)

    threading.Thread(target=run, name=name, daemon=True).start()
    return future
