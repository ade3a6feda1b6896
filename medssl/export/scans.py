"""Scans as the model saw them in training: any file or folder (a DICOM series, an Enhanced DICOM, NIfTI,
PNG) is indexed like a dataset, checked against the model's inputs, and preprocessed with the model's own
preprocessing settings — the same code path (manifest → VolumeCache → ImageDataset) training used, so
serving cannot disagree with training about orientation, spacing or intensities."""
from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from pathlib import Path

import pandas as pd
import torch

from medssl.errors import DataError
from medssl.export.package import input_size
from medssl.export.spec import ModelSpec
from medssl.ingest.manifest import build_manifest, read_manifest
from medssl.preprocess.cache import VolumeCache
from medssl.train.loaders import ImageDataset


def _as_folder(path: Path, work: Path) -> Path:
    """A folder to index: the path itself, or a folder holding only the one file given (a hard link, or a copy
    across file systems: a symbolic link would point outside the folder, which the decoder refuses)."""
    if path.is_dir():
        return path
    if not path.is_file():
        raise DataError(f"no such file or folder: {path}", where="model input",
                        fix="give paths to DICOM series folders, DICOM files or NIfTI/PNG files")
    holder = Path(tempfile.mkdtemp(dir=work))
    try:
        os.link(path.resolve(), holder / path.name)
    except OSError:
        shutil.copy2(path.resolve(), holder / path.name)
    return holder


def check_inputs(rows: pd.DataFrame, spec: ModelSpec, source: str) -> None:
    """DataError before any inference when a scan is not what the model was trained on."""
    wanted = spec.inputs
    for _, row in rows.iterrows():
        if wanted.modalities and row["modality"] not in wanted.modalities:
            raise DataError(f"a {row['modality']} scan, but the model was trained on {wanted.modalities}",
                            where=source, fix="give scans of the modality the model was trained on")
        dims, model_dims = int(row["spatial_dims"]), spec.architecture.input_dims
        if dims < model_dims or (wanted.image_dims and dims not in wanted.image_dims):
            raise DataError(f"a {dims}D scan, but the model reads {model_dims}D input "
                            f"(trained on {wanted.image_dims or [model_dims]}D scans)", where=source,
                            fix="give scans of the dimensionality the model was trained on")


def load_scans(paths: list[str], spec: ModelSpec, work: Path) -> tuple[list[str], list[torch.Tensor]]:
    """(the source path of each image, its (C, *input_size) float32 array) for every image found under `paths`
    (a slice-pooled model's volumes keep their own number of axial slices).
    `work`: a scratch folder (manifests and the preprocessing cache of these scans, never a training cache)."""
    work = Path(work)
    sources, images = [], []
    for index, text in enumerate(paths):
        folder = _as_folder(Path(text), work)
        manifest = work / f"scan-{index}.csv"
        build_manifest(folder, manifest, salt=secrets.token_hex(8), workers=1, progress=False,
                       nifti_modality=(spec.inputs.modalities or ["MR"])[0])
        df, meta = read_manifest(manifest)
        if df.empty:
            raise DataError("no readable image", where=text,
                            fix=f"see the reasons in {manifest.with_suffix('.skipped.csv')}")
        check_inputs(df, spec, text)
        cache = VolumeCache(work / f"cache-{index}", spec.preprocess, meta["root"])
        failures = cache.build(df, workers=1)
        if failures:
            raise DataError(f"cannot preprocess: {next(iter(failures.values()))}", where=text)
        dataset = ImageDataset(cache, list(df["image_id"]), [0] * len(df), spatial_dims=spec.architecture.input_dims)
        for i in range(len(dataset)):
            images.append(dataset[i]["image"])
            sources.append(text)
    _check_shapes(images, spec, sources)
    return sources, images


def _check_shapes(images: list[torch.Tensor], spec: ModelSpec, paths: list[str]) -> None:
    want = (spec.architecture.in_channels, *input_size(spec))
    fixed = len(want) - (1 if spec.architecture.slice_pooling else 0)  # slice-pooled: any number of slices
    for image, path in zip(images, paths):
        if image.ndim != len(want) or tuple(image.shape)[:fixed] != want[:fixed]:
            raise DataError(f"preprocessed to {tuple(image.shape)}, the model takes {want}", where=path,
                            fix="the model's preprocessing must set a fixed size (preprocess.size)")
