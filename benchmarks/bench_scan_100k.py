"""Indexing a 100,000-file DICOM folder: wall time and peak memory of `build_manifest` (scan + header reads +
series assembly + manifest files), in a fresh process.

    python benchmarks/bench_scan_100k.py [--series 1000] [--slices 100] [--workers N] [--folder DIR]
                                         [--out benchmarks/results/bench_scan_100k.json]

The folder: one real series (nibabel's T1 anatomy cut to 8x8 slices, written by medssl's DICOM writer) copied
`--series` times with new Study/Series/SOP Instance UIDs and PatientIDs patched into the bytes (same length,
so every file stays valid): small files, so the scan's own per-file cost is what is measured, not the disk.
Peak RSS is sampled every 50 ms over the indexing process and all its workers (sum), from /proc.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom

from medssl.demo.dicom_writer import write_series

T1 = Path(nib.__file__).parent / "tests" / "data" / "anatomical.nii"


def _template(folder: Path, slices: int) -> list[Path]:
    data = np.asarray(nib.load(T1).dataobj, dtype=np.float32)[12:20, 16:24, :]   # (8, 8, 25) real anatomy
    volume = np.resize(data, (8, 8, slices)).astype(np.int16)
    return write_series(volume, np.diag([1.0, 1.0, 2.0, 1.0]), folder, patient_name="Scan^Bench",
                        patient_id="SCANBENCH000000")


def _same_length(uid: str, n: int) -> str:
    return uid[:-7] + f"{n:07d}"


def make_folder(folder: Path, series: int, slices: int) -> int:
    """`series` x `slices` files; returns the count."""
    with tempfile.TemporaryDirectory() as tmp:
        paths = _template(Path(tmp) / "template", slices)
        headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
        blobs = [p.read_bytes() for p in paths]
    study, series_uid = str(headers[0].StudyInstanceUID), str(headers[0].SeriesInstanceUID)
    for s in range(series):
        out = folder / f"PA{s // 4:05d}" / f"SE{s:05d}"
        out.mkdir(parents=True, exist_ok=True)
        for k, (blob, ds) in enumerate(zip(blobs, headers)):
            sop = str(ds.SOPInstanceUID)
            patched = (blob.replace(study.encode(), _same_length(study, s // 4).encode())
                       .replace(series_uid.encode(), _same_length(series_uid, s).encode())
                       .replace(sop.encode(), _same_length(sop, s * slices + k).encode())
                       .replace(b"SCANBENCH000000", f"SCANBENCH{s // 4:06d}".encode()))
            (out / f"IM{k:05d}.dcm").write_bytes(patched)
    return series * slices


def _tree_rss(pid: int) -> int:
    """Resident bytes of `pid` and every descendant (from /proc)."""
    parent = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
    tree, frontier = {pid}, [pid]
    while frontier:
        kids = [p for p, pp in parent.items() if pp == frontier[-1]]
        frontier.pop()
        tree.update(kids)
        frontier.extend(kids)
    total = 0
    for p in tree:
        try:
            with open(f"/proc/{p}/status") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) * 1024
        except (OSError, StopIteration):
            continue
    return total


def measure(folder: Path, workers: int) -> dict:
    code = ("import sys, time; from pathlib import Path; from medssl.ingest.manifest import build_manifest; "
            "t = time.perf_counter(); s = build_manifest(Path(sys.argv[1]), Path(sys.argv[2]), salt='bench', "
            "workers=int(sys.argv[3]), progress=False); print(time.perf_counter() - t, s.n_images)")
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-c", code, str(folder), f"{tmp}/m.csv", str(workers)],
                                stdout=subprocess.PIPE, text=True)
        peak = [0]

        def sample():
            while proc.poll() is None:
                peak[0] = max(peak[0], _tree_rss(proc.pid))
                time.sleep(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        out, _ = proc.communicate()
        wall = time.perf_counter() - t0
        sampler.join()
    inner, images = out.split()
    return {"wall_s": wall, "build_manifest_s": float(inner), "images": int(images), "peak_rss_mb": peak[0] / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--series", type=int, default=1000)
    parser.add_argument("--slices", type=int, default=100)
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--folder", type=Path, default=None, help="reuse / keep the generated folder here")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/bench_scan_100k.json"))
    args = parser.parse_args()
    folder = args.folder or Path(tempfile.mkdtemp(prefix="scan100k_"))
    t0 = time.perf_counter()
    n_files = sum(1 for _ in folder.rglob("*.dcm")) if folder.is_dir() else 0
    if n_files != args.series * args.slices:
        n_files = make_folder(folder, args.series, args.slices)
    made = time.perf_counter() - t0
    result = {"files": n_files, "series": args.series, "workers": args.workers, "cpu_count": os.cpu_count(),
              "generate_s": made, **measure(folder, args.workers)}
    result["files_per_s"] = n_files / result["build_manifest_s"]
    print(json.dumps(result, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
