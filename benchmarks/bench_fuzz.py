"""Long fuzz run: >= 1,000 mutated real DICOM / NIfTI files (byte flips, truncations, huge declared sizes, gzip
and deflate bombs; tests/fuzz_cases.py) beside their untouched seeds, indexed in worker processes and every kept
row decoded. Reports files tried, outcomes by kind, crashes (any failure that is not a skip or a DataError),
good files lost, wall time and peak RSS (this process and its workers, resource.getrusage).

    python benchmarks/bench_fuzz.py [--files 1200] [--workers N] [--max-image-mb 256]
                                    [--out benchmarks/results/fuzz.json]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the fuzz cases are test-side builders

from fuzz_cases import kept_paths, run_fuzz, seed_files, write_fuzz_folder  # noqa: E402
from medssl.ingest.manifest import build_manifest, read_manifest  # noqa: E402


def _peak_rss_mb() -> dict:
    return {who: resource.getrusage(getattr(resource, f"RUSAGE_{who.upper()}")).ru_maxrss / 1024
            for who in ("self", "children")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=1200)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--max-image-mb", type=float, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/fuzz.json"))
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="medssl-fuzz-"))
    try:
        seed_files(tmp / "clean")
        build_manifest(tmp / "clean", tmp / "clean.csv", salt="fuzz", workers=1, max_image_mb=args.max_image_mb,
                       progress=False)
        must_keep = kept_paths(read_manifest(tmp / "clean.csv")[0])
        start = time.perf_counter()
        _, kinds = write_fuzz_folder(tmp / "data", args.files, seed=args.seed)
        made = time.perf_counter() - start
        start = time.perf_counter()
        found = run_fuzz(tmp / "data", tmp / "fuzz.csv", kinds, must_keep, workers=args.workers,
                         max_image_mb=args.max_image_mb)
        wall = time.perf_counter() - start
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result = {"files_tried": len(kinds), "seeds_kept_when_clean": len(must_keep), "files_indexed": found["files"],
              "images_kept": found["images"], "outcomes_by_kind": found["outcomes"], "crashes": found["errors"],
              "good_files_lost": found["lost"], "index_and_decode_wall_s": round(wall, 1),
              "generate_wall_s": round(made, 1), "peak_rss_mb": {k: round(v) for k, v in _peak_rss_mb().items()},
              "workers": args.workers, "max_image_mb": args.max_image_mb, "seed": args.seed,
              "machine": f"{os.cpu_count()}-core CPU shared with other work"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    if found["errors"] or found["lost"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
