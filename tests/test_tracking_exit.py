"""A run that could not be opened (server silent) must not keep the process alive at exit: the abandoned open
call waits in MLflow's HTTP retries for minutes, and a joined worker thread made every such medssl command (and
the test suite) hang at exit."""
from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path


def test_process_exits_promptly_after_a_run_could_not_be_opened(tmp_path):
    silent = socket.socket()                     # accepts connections, never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    port = silent.getsockname()[1]
    script = textwrap.dedent(f"""
        import sys
        from medssl.errors import TrackingError
        from medssl.tracking.tracker import Tracker
        tracker = Tracker("exp", "http://127.0.0.1:{port}", outbox_dir=r"{tmp_path / 'outbox'}", start_wait_s=1)
        try:
            with tracker.run("stage"):
                pass
        except TrackingError:
            print("refused")
    """)
    env_path = str(Path(__file__).resolve().parent.parent)
    started = time.monotonic()
    try:
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                              env={"PYTHONPATH": env_path, "PATH": "/usr/bin:/bin", "MLFLOW_HTTP_REQUEST_TIMEOUT": "60"})
    finally:
        silent.close()
    assert "refused" in done.stdout, done.stderr[-2000:]
    assert time.monotonic() - started < 60, "the process waited at exit for the abandoned open call"
