"""Indexing + caching speed of medssl against dcm2niix on the same DICOM folder, in the same run.

    python benchmarks/bench_index.py [--series 40] [--slices 128] [--workers N] [--out outputs/bench_index.json]

The folder: `--series` series of `--slices` single-frame 128x128 slices each, derived from a real T1 (ITK's
KmeansTest volume if installed, else nibabel's anatomical.nii) by resampling along z, a random rotation
(oblique series) and noise; file names shuffled. Measured, each on the same files (warm page cache for all):
  1. medssl index      scan + header reads + series assembly + manifest files (build_manifest)
  2. medssl decode     load_image for every manifest row (pixel decode, rescale, affine) in worker processes
  3. medssl cache      VolumeCache.build into a fresh folder (decode + orient to RAS + normalise + float16
                       store), default preprocessing (no resampling: the numpy chain, preprocess/arrays.py)
  4. dcm2niix          DICOM -> NIfTI conversion of the whole folder (uncompressed output)
Goal (issue 11): (1) + (3) within 1.5x of (4) in EVERY run. The machine is shared, so each repeat runs
(1), (2), (3) and (4) back to back (interleaved) and the ratio is taken per repeat, from the same minute.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np
from rich.console import Console
from rich.table import Table
from scipy import ndimage

from medssl.demo.dicom_writer import write_series
from medssl.ingest.decode import load_image
from medssl.ingest.manifest import build_manifest, read_manifest

ITK_T1 = Path("/usr/share/doc/insighttoolkit5-examples/examples/Data/KmeansTest_T1UCharRaw.nii.gz")
console = Console()


def source_volume(slices: int) -> tuple[np.ndarray, np.ndarray]:
    """A real T1 resampled to (128, 128, slices) int16 with its affine."""
    path = ITK_T1 if ITK_T1.is_file() else Path(nib.__file__).parent / "tests" / "data" / "anatomical.nii"
    img = nib.load(path)
    data = np.asarray(img.dataobj, dtype=np.float32)
    zoom = (128 / data.shape[0], 128 / data.shape[1], slices / data.shape[2])
    data = ndimage.zoom(data, zoom, order=1)
    affine = img.affine @ np.diag([1 / zoom[0], 1 / zoom[1], 1 / zoom[2], 1])
    return data, affine


def random_rotation(rng: np.random.Generator, degrees: float = 15.0) -> np.ndarray:
    angles = np.radians(rng.uniform(-degrees, degrees, 3))
    out = np.eye(4)
    for axis, angle in enumerate(angles):
        a, b = [i for i in range(3) if i != axis]
        r = np.eye(4)
        r[a, a], r[a, b], r[b, a], r[b, b] = np.cos(angle), -np.sin(angle), np.sin(angle), np.cos(angle)
        out = r @ out
    return out


def make_cohort(folder: Path, series: int, slices: int, seed: int = 0) -> int:
    rng = np.random.default_rng(seed)
    base, affine = source_volume(slices)
    for s in range(series):
        noisy = base * rng.uniform(0.8, 1.2) + rng.normal(0, 3, base.shape)
        write_series(np.clip(noisy, -32768, 32767).astype(np.int16), random_rotation(rng) @ affine,
                     folder / f"subject{s:03d}" / "t1", patient_name=f"Bench^{s}", patient_id=f"B{s:04d}",
                     shuffle_names=True, rng=rng)
    return series * slices


def _decode(args) -> int:
    row, root = args
    return load_image(row, root).array.size


def time_medssl(folder: Path, work: Path, workers: int) -> dict:
    t0 = time.perf_counter()
    summary = build_manifest(folder, work / "bench.csv", salt="bench", workers=workers, progress=False)
    t1 = time.perf_counter()
    df, meta = read_manifest(work / "bench.csv")
    rows = [(dict(row), Path(meta["root"])) for _, row in df.iterrows()]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        voxels = sum(pool.map(_decode, rows, chunksize=1))
    t2 = time.perf_counter()
    return {"index_s": t1 - t0, "decode_s": t2 - t1, "images": summary.n_images, "voxels": int(voxels),
            "df": df, "root": Path(meta["root"])}


def time_cache(df, root: Path, work: Path, workers: int) -> float:
    """VolumeCache.build of every row into a fresh folder (nothing reused)."""
    from medssl.config import PreprocessConfig
    from medssl.preprocess.cache import VolumeCache
    shutil.rmtree(work / "cache", ignore_errors=True)
    t0 = time.perf_counter()
    cache = VolumeCache(work / "cache", PreprocessConfig(), root)
    failures = cache.build(df, workers=workers)
    elapsed = time.perf_counter() - t0
    if failures:
        raise RuntimeError(f"cache failures: {failures}")
    return elapsed


def time_dcm2niix(folder: Path, work: Path) -> float:
    out = work / "dcm2niix"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    t0 = time.perf_counter()
    done = subprocess.run(["dcm2niix", "-z", "n", "-b", "n", "-f", "%j", "-o", str(out), str(folder)],
                          capture_output=True, text=True)
    elapsed = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    return elapsed


INDEX, DECODE, CACHE, BOTH, DCM2NIIX = ("medssl index (scan + manifest)", "medssl decode (load_image)",
                                       "medssl cache (VolumeCache.build)", "medssl index + cache", "dcm2niix")


def measure(folder: Path, work: Path, workers: int, repeats: int) -> tuple[dict, dict]:
    """Interleaved repeats of medssl (index, decode, cache) and dcm2niix; {step: [seconds, ...]}, last run."""
    runs: dict[str, list[float]] = {INDEX: [], DECODE: [], CACHE: [], BOTH: [], DCM2NIIX: []}
    for _ in range(repeats):
        ours = time_medssl(folder, work, workers)
        cache_s = time_cache(ours["df"], ours["root"], work, workers)
        runs[INDEX].append(ours["index_s"])
        runs[DECODE].append(ours["decode_s"])
        runs[CACHE].append(cache_s)
        runs[BOTH].append(ours["index_s"] + cache_s)
        runs[DCM2NIIX].append(time_dcm2niix(folder, work))
    return runs, ours


def report(results: dict, n_files: int) -> None:
    table = Table(title=f"indexing {n_files:,} DICOM files ({results['cpu_count']} CPUs, {results['workers']} workers, "
                        f"best of {results['repeats']})")
    for column in ("step", "seconds", "files/s"):
        table.add_column(column, justify="right" if column != "step" else "left")
    for step, seconds in results["seconds"].items():
        table.add_row(step, f"{seconds:.2f}", f"{n_files / seconds:,.0f}")
    console.print(table)
    ratios = ", ".join(f"{r:.2f}x" for r in results["ratio_index_cache_vs_dcm2niix_per_run"])
    console.print(f"medssl index+cache / dcm2niix per interleaved run: {ratios} (goal <= 1.5x in every run)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--series", type=int, default=40)
    parser.add_argument("--slices", type=int, default=128)
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("outputs/bench_index.json"))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_index_"))
    try:
        t0 = time.perf_counter()
        n_files = make_cohort(work / "dicom", args.series, args.slices)
        console.print(f"wrote {n_files:,} files in {time.perf_counter() - t0:.1f} s")
        runs, ours = measure(work / "dicom", work, args.workers, args.repeats)
        seconds = {step: min(values) for step, values in runs.items()}
        per_run = [ours_s / theirs for ours_s, theirs in zip(runs[BOTH], runs[DCM2NIIX])]
        results = {"files": n_files, "series": args.series, "images": ours["images"], "workers": args.workers,
                   "cpu_count": os.cpu_count(), "repeats": args.repeats, "seconds": seconds, "runs": runs,
                   "median_seconds": {step: float(np.median(values)) for step, values in runs.items()},
                   "files_per_s": {k: n_files / v for k, v in seconds.items()},
                   "ratio_index_cache_vs_dcm2niix_per_run": per_run,
                   "worst_ratio_index_cache_vs_dcm2niix": max(per_run)}
        report(results, n_files)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))
        console.print(f"written {args.out}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
