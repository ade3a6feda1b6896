"""Demo cohort build speed (serial vs worker processes) and the cost of a tracked metric call, in one run.

    python benchmarks/bench_demo.py [--subjects 60] [--size 48] [--workers N] [--out outputs/bench_demo.json]

Measured on this machine, each against its baseline in the same run:
  1. build_demo_cohort, workers=1 (baseline) and workers=N: subjects/s, and the same files either way
  2. Tracker.log_metrics per call: local SQLite store; an unreachable server (queued to the outbox);
     NullTracker (baseline: the cost of the call itself)
Goal: 60 subjects of 48³ in a few seconds of CPU; a queued metric call costs milliseconds, not seconds.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from medssl.config import DemoConfig
from medssl.demo.cohort import build_demo_cohort
from medssl.tracking.tracker import NullTracker, Tracker


def time_build(cfg: DemoConfig, workers: int, root: Path) -> dict:
    start, cpu = time.perf_counter(), time.process_time()
    cohort = build_demo_cohort(cfg, root / f"w{workers}", workers=workers, progress=False)
    wall = time.perf_counter() - start
    return {"workers": workers, "wall_s": round(wall, 2), "subjects_per_s": round(cfg.subjects / wall, 2),
            "parent_cpu_s": round(time.process_time() - cpu, 2), "images": cohort.n_images}


def time_metric_calls(tracker, n: int, root: Path) -> float:
    """Mean seconds per log_metrics call inside an open run (the run is opened on a reachable store)."""
    with tracker.run("bench"):
        start = time.perf_counter()
        for step in range(n):
            tracker.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
        return (time.perf_counter() - start) / n


def unreachable_tracker(root: Path) -> Tracker:
    """A tracker whose run opens on SQLite, then whose logging goes to a closed port (the outage case)."""
    from mlflow.tracking import MlflowClient
    tracker = Tracker("bench-outage", f"sqlite:///{root / 'outage.db'}", outbox_dir=root / "outbox", end_grace_s=0)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    tracker.outbox.client = MlflowClient(f"http://127.0.0.1:{port}")
    return tracker


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--subjects", type=int, default=60)
    parser.add_argument("--size", type=int, default=48)
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--out", type=Path, default=Path("outputs/bench_demo.json"))
    args = parser.parse_args()
    cfg = DemoConfig(subjects=args.subjects, size=args.size)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        builds = [time_build(cfg, 1, root), time_build(cfg, args.workers, root)]
        same = (root / "w1" / "truth.csv").read_bytes() == (root / f"w{args.workers}" / "truth.csv").read_bytes()
        calls = {"null (baseline)": time_metric_calls(NullTracker(), args.calls, root),
                 "sqlite": time_metric_calls(Tracker("bench", f"sqlite:///{root / 'b.db'}", outbox_dir=root / "ob"),
                                             args.calls, root),
                 "server unreachable (queued)": time_metric_calls(unreachable_tracker(root), args.calls, root)}
    table = Table(title=f"demo cohort {args.subjects} × {args.size}³ (load average {os.getloadavg()[0]:.1f})")
    for column in ("workers", "wall s", "subjects/s", "images"):
        table.add_column(column)
    for b in builds:
        table.add_row(str(b["workers"]), str(b["wall_s"]), str(b["subjects_per_s"]), str(b["images"]))
    console = Console()
    console.print(table)
    console.print(f"same cohort with {args.workers} workers as with 1: {same}")
    for name, seconds in calls.items():
        console.print(f"log_metrics, {name}: {seconds * 1000:.2f} ms per call")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"builds": builds, "same_files": same, "metric_call_s": calls,
                                    "load_average": os.getloadavg()}, indent=2))


if __name__ == "__main__":
    main()
