"""The persistent preprocessing cache: decode + orient + resample + normalise each image ONCE.

Layout: `root_dir/<settings key>/<dataset key>/` holds `settings.json` (the PreprocessConfig that made it and
the dataset folder), `index.json` ({image_id: {"source": digest, "shape": [...]}}) and one `<image_id>.npy`
per image.
- The settings key is a hash of every preprocessing setting (not `cache_dir`) plus CACHE_VERSION, so changed
  settings land in a new directory and never mix with the old arrays (which stay reusable if you switch back).
- The dataset key is a hash of the dataset's folder (the manifest root, resolved): image ids are hashes of
  paths relative to that folder, so two datasets with the same layout (two BIDS folders, both with
  sub-01/anat/...) have the same ids and would otherwise overwrite each other's arrays.
- An entry is rebuilt when one of its source files changed (size, modification time, inode or status-change
  time: a file rewritten in place with its old mtime restored, or replaced by another one, still counts) or
  vanished. The index keeps a digest of that, never the paths (BIDS paths can carry dates).
- Arrays are stored as float16: every value is in [0, 1] after normalisation, where float16 is accurate to
  2.4e-4 (0.5 HU in a 2000 HU CT window, below scanner noise), and half the bytes means twice as much of a
  dataset stays in the page cache during training. Readers get a read-only memory map (crops read only
  their own bytes) and cast to float32 themselves.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import pandas as pd

from medssl.config import PreprocessConfig
from medssl.errors import DataError, MedsslError
from medssl.ingest.dicom.known import identity
from medssl.preprocess.arrays import fast_chain, fast_chain_applies, memory_order
from medssl.ui import progress_bar

CACHE_VERSION = 2            # bump when the preprocessing code changes what it writes (2: per-dataset folders)
STORE_DTYPE = np.float16
INDEX_SAVE_SECONDS = 10.0    # an interrupted build keeps what it finished up to this long ago


def settings_key(cfg: PreprocessConfig) -> str:
    settings = cfg.model_dump(mode="json", exclude={"cache_dir"})
    text = json.dumps({"settings": settings, "version": CACHE_VERSION}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def dataset_key(source_root: Path | str) -> str:
    """Which dataset a cache folder belongs to: a hash of its folder's resolved path."""
    return hashlib.sha256(str(Path(source_root).expanduser().resolve()).encode()).hexdigest()[:16]


def source_fingerprint(row: Mapping, root: Path) -> str:
    """A digest of (relative path, size, mtime, inode, ctime) of the files an image is decoded from (OSError if
    one is gone). ctime cannot be set back by a user: an in-place rewrite that restores mtime still shows."""
    found = []
    base = os.fspath(root)
    for rel in str(row["paths"]).split("|"):
        # strings, not Path objects: one stat per slice adds up; the same file identity the index keeps
        found.append([rel, *identity(os.stat(os.path.join(base, rel)))])
    return hashlib.sha256(json.dumps(found).encode()).hexdigest()[:32]


# ------------------------------------------------------------------------------- one image (in a worker)
_CHAINS: dict[str, object] = {}   # per process: the MONAI chain is built once, not once per image


def _load_with_io(row: Mapping, root: Path):
    from medssl.ingest import decode as io      # looked up at call time so tests can count decodes
    return io.load_image(row, root)


def _chain(cfg_json: dict) -> Callable:
    """(array, affine, modality, photometric) -> (C, *spatial) float32: the numpy chain when nothing is
    resampled or cropped to the foreground (arrays.py, no MONAI import), else MONAI's, built once per process."""
    cfg = PreprocessConfig.model_validate(cfg_json)
    if fast_chain_applies(cfg):
        return lambda array, affine, modality, photometric: fast_chain(array, affine, modality, photometric,
                                                                       cfg)[0]
    from medssl.preprocess.transforms import build_preprocess, make_input
    chain = build_preprocess(cfg)
    return lambda *loaded: chain(make_input(*loaded))["image"].detach().cpu().numpy()


def preprocess_one(row: dict, root: str, cfg_json: dict, out: str, load: Callable | None = None) -> list[int]:
    """Decode, preprocess and store one image; returns its stored shape. Raises on any problem."""
    key = json.dumps(cfg_json, sort_keys=True)
    if key not in _CHAINS:
        _CHAINS[key] = _chain(cfg_json)
    loaded = (load or _load_with_io)(row, Path(root))
    array = _CHAINS[key](loaded.array, loaded.affine, loaded.modality, loaded.photometric)   # (C, *spatial)
    # slices_from_3d: the loader reads axial slices [..., k]; Fortran order stores each one contiguously
    # (a 2D crop then touches one contiguous block instead of a strided walk through the whole volume)
    # (3D crops read either layout equally well: keep the chain's, no transposing copy)
    order = "F" if cfg_json["spatial_dims"] == 2 and array.ndim == 4 else memory_order(array)
    # checked in float32, before the cast (numpy's float16 isfinite is ten times slower): finite and within
    # float16's range means the stored values are finite too
    if not np.isfinite(array).all():
        raise DataError("non-finite values after preprocessing (NaN/inf in the source?)")
    if max(-float(array.min()), float(array.max())) > float(np.finfo(STORE_DTYPE).max):
        raise DataError("values beyond float16's range after preprocessing", fix="check preprocess settings")
    array = np.array(array, dtype=STORE_DTYPE, order=order)   # one pass: cast and lay out
    tmp = out + ".tmp.npy"
    np.save(tmp, array)
    os.replace(tmp, out)            # atomic: a killed build never leaves a truncated array behind
    return list(array.shape)


def _reason(err: BaseException) -> str:
    if isinstance(err, BrokenProcessPool):
        return "a worker process died (out of memory, or a crashing decoder); rerun to retry the rest"
    if isinstance(err, MedsslError):
        return err.what + (f" ({err.where})" if err.where else "")
    return f"{type(err).__name__}: {err}"


# ------------------------------------------------------------------------------- the cache
class VolumeCache:
    """Preprocessed images of one dataset (`source_root`, the manifest root) on disk, keyed by the
    preprocessing settings and the dataset. `load` replaces io.load_image (a picklable function
    (row, root) -> object with array/affine/modality/photometric)."""

    def __init__(self, root_dir: Path | str, cfg: PreprocessConfig, source_root: Path | str,
                 load: Callable | None = None):
        self.cfg, self.load = cfg, load
        self.source_root = Path(source_root).expanduser().resolve()
        self.dir = Path(root_dir) / settings_key(cfg) / dataset_key(self.source_root)
        self.dir.mkdir(parents=True, exist_ok=True)
        settings_file = self.dir / "settings.json"
        if not settings_file.is_file():
            settings_file.write_text(json.dumps({"preprocess": cfg.model_dump(mode="json", exclude={"cache_dir"}),
                                                 "dataset": str(self.source_root)}, indent=1))
        self._index = self._read_index()

    # -------------------------------------------------------------- reading
    def path(self, image_id: str) -> Path:
        return self.dir / f"{image_id}.npy"

    def has(self, image_id: str) -> bool:
        """In the index and on disk (source changes are detected by `build`, not here: no stat per read)."""
        return image_id in self._index and self.path(image_id).is_file()

    def shape(self, image_id: str) -> tuple[int, ...]:
        self._require(image_id)
        return tuple(self._index[image_id]["shape"])

    def get(self, image_id: str) -> np.ndarray:
        """(C, *spatial) float16, read-only memory map."""
        self._require(image_id)
        return np.load(self.path(image_id), mmap_mode="r")

    def _require(self, image_id: str) -> None:
        if not self.has(image_id):
            raise DataError(f"image {image_id} is not in the preprocessing cache", where=str(self.dir),
                            fix="run the 'cache' stage (medssl run ...) after changing data or preprocess settings")

    # -------------------------------------------------------------- building
    def stale(self, df: pd.DataFrame, manifest_root: Path) -> tuple[list[dict], dict[str, str]]:
        """Rows that need (re)building, and rows whose sources cannot even be looked at (with reasons)."""
        todo, failures = [], {}
        for row in df.to_dict("records"):
            image_id = str(row["image_id"])
            try:
                source = source_fingerprint(row, manifest_root)
            except OSError as err:
                # the reason, not the path: paths can carry dates (BIDS ses-YYYYMMDD); the image id finds it
                failures[image_id] = f"a source file is missing or unreadable ({err.strerror or type(err).__name__})"
                self._index.pop(image_id, None)
                continue
            entry = self._index.get(image_id)
            if entry is None or entry["source"] != source or not self.path(image_id).is_file():
                todo.append({**row, "_source": source})
        return todo, failures

    def build(self, df: pd.DataFrame, manifest_root: Path | str | None = None,
              workers: int | None = None) -> dict[str, str]:
        """Preprocess every row not cached yet (or whose source changed), in parallel processes.
        Returns {image_id: reason} for the images that failed; never raises for one bad image."""
        if not fast_chain_applies(self.cfg):
            # import MONAI here, once: forked workers inherit it instead of each paying its slow import again
            import medssl.preprocess.transforms  # noqa: F401
        if manifest_root is not None and Path(manifest_root).expanduser().resolve() != self.source_root:
            raise DataError(f"this cache holds the images of {self.source_root}, not of {manifest_root}",
                            where=str(self.dir), fix="open a VolumeCache for the manifest's own root")
        manifest_root = self.source_root
        todo, failures = self.stale(df, manifest_root)
        if workers is None:
            workers = min(os.cpu_count() or 1, 8)
        workers = max(1, min(workers, len(todo) or 1))
        with progress_bar("images") as progress:
            task = progress.add_task(f"preprocessing ({workers} proc.)", total=len(todo))
            for image_id, result in self._run(todo, manifest_root, workers):
                if isinstance(result, str):
                    failures[image_id] = result
                    self._index.pop(image_id, None)
                else:
                    self._index[image_id] = result
                progress.advance(task)
                self._save_index(throttle=True)
        self._save_index()
        return failures

    def _run(self, todo: list[dict], root: Path, workers: int):
        """Yields (image_id, entry dict | failure reason) as images finish."""
        cfg_json = self.cfg.model_dump(mode="json")
        jobs = {str(r["image_id"]): (_clean(r), str(root), cfg_json, str(self.path(str(r["image_id"]))), self.load)
                for r in todo}
        sources = {str(r["image_id"]): r["_source"] for r in todo}
        if workers == 1:   # in-process: no pickling, simplest to debug
            for image_id, args in jobs.items():
                yield image_id, self._attempt(lambda: preprocess_one(*args), sources[image_id])
            return
        orphans = []       # images whose worker died with someone else's crash: retried one per process
        for image_id, result in _pool_results(jobs, workers):
            if isinstance(result, BrokenProcessPool):
                orphans.append(image_id)
            else:
                yield image_id, self._attempt(lambda: _raise_or(result), sources[image_id])
        for image_id in orphans:
            (_, result), = _pool_results({image_id: jobs[image_id]}, 1)
            yield image_id, self._attempt(lambda: _raise_or(result), sources[image_id])

    @staticmethod
    def _attempt(call: Callable, source: list) -> dict | str:
        try:
            return {"source": source, "shape": call()}
        except Exception as err:   # noqa: BLE001 — one bad image (or a dead worker) must not stop the rest
            return _reason(err)

    # -------------------------------------------------------------- index file
    def _read_index(self) -> dict:
        path = self.dir / "index.json"
        if not path.is_file():
            return {}
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError:     # a damaged index only costs a rebuild, never wrong arrays
            return {}

    def _save_index(self, throttle: bool = False) -> None:
        now = time.monotonic()
        if throttle and now - getattr(self, "_saved_at", 0.0) < INDEX_SAVE_SECONDS:
            return
        tmp = self.dir / "index.json.tmp"
        tmp.write_text(json.dumps(self._index, sort_keys=True))
        tmp.replace(self.dir / "index.json")
        self._saved_at = now


def _pool_results(jobs: dict[str, tuple], workers: int):
    """(image_id, shape or the exception) for each job, run in a pool of `workers` processes."""
    with ProcessPoolExecutor(workers, initializer=_single_thread) as pool:
        futures = {pool.submit(preprocess_one, *args): image_id for image_id, args in jobs.items()}
        for future in as_completed(futures):
            error = future.exception()
            yield futures[future], error if error is not None else future.result()


def _raise_or(result):
    if isinstance(result, BaseException):
        raise result
    return result


def _clean(row: dict) -> dict:
    """The manifest row as io.load_image expects it: plain strings/numbers, NaN as ""."""
    return {k: ("" if isinstance(v, float) and np.isnan(v) else v) for k, v in row.items() if k != "_source"}


def _single_thread() -> None:
    """N worker processes x M torch threads would oversubscribe the CPU. Only when torch is already loaded
    (the MONAI chain): the numpy chain never needs it, and importing it costs each worker seconds."""
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(1)
