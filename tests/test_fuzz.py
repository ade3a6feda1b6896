"""A short fuzz run in CI: ~100 mutated real DICOM / NIfTI files (byte flips, truncations, huge declared sizes,
gzip and deflate bombs) beside their untouched seeds. No traceback, no hang, bounded memory, and every seed the
clean folder keeps is still kept. The long run (>= 1,000 files) is benchmarks/bench_fuzz.py."""
from __future__ import annotations

import resource
import shutil
import time
from pathlib import Path

import pytest

from medssl.ingest.manifest import build_manifest, read_manifest

from fuzz_cases import KINDS, kept_paths, run_fuzz, seed_files, write_fuzz_folder

pytestmark = pytest.mark.timeout(300)


def _clean_keeps(tmp_path: Path) -> set[str]:
    """What the seeds alone give: the files a fuzzed neighbour must not cost."""
    root = tmp_path / "clean"
    seed_files(root)
    build_manifest(root, tmp_path / "clean.csv", salt="fuzz", workers=1, max_image_mb=64, progress=False)
    return kept_paths(read_manifest(tmp_path / "clean.csv")[0])


def test_fuzz_short(tmp_path: Path):
    must_keep = _clean_keeps(tmp_path)
    assert len(must_keep) >= 8
    root = tmp_path / "data"
    _, kinds = write_fuzz_folder(root, 100, seed=11)
    assert set(kinds.values()) == set(KINDS)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    found = run_fuzz(root, tmp_path / "fuzz.csv", kinds, must_keep, max_image_mb=64)
    wall = time.perf_counter() - start
    rss_growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss_before
    assert not found["errors"], found["errors"][:5]
    assert not found["lost"], found["lost"]
    assert found["files"] == len(kinds) + len(list((tmp_path / "clean").rglob("*.*")))
    assert any(k.startswith("skipped: decompression bound") for k in found["outcomes"]["gzip_bomb"])
    assert wall < 120, f"{wall:.0f} s: something hung"
    assert rss_growth < 600, f"peak RSS grew {rss_growth:.0f} MB"
    shutil.rmtree(root)
