"""Second segmentation cohort from packaged real anatomy: the ITK example T1 with its 7-class k-means
segmentation (Debian insighttoolkit5-examples), as 2D axial slices of deformed pseudo-subjects, then the
whole segmentation pipeline (manifest with mask checks, SSL pretraining, Dice ladder SSL vs scratch).

Each pseudo-subject: the subject deformation and scanner effects of the demo (medssl/demo/lesions.py) applied
to the T1 (linear interpolation) and to the label map (nearest neighbour: labels stay labels), then one axial
slice at a random level through the brain. Classes: the k-means labels 2..6 (tissue classes) become 1..5;
0/1 (air and the darkest class) are background. Written as (X, Y, 1) NIfTI + mask NIfTI + labels.csv.

    python benchmarks/bench_seg_itk.py OUT_DIR [--subjects 40] [--run]
--run then runs `medssl run` on it with benchmarks/seg_itk.yaml's settings (2D ResNet-10/4, SimCLR).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from scipy import ndimage

from medssl.demo.cohort import load_anatomy, output_grid
from medssl.demo.lesions import Deformation, random_pose, random_subject_shape, scanner_effects

ITK_SEG = Path("/usr/share/doc/insighttoolkit5-examples/examples/Data/KmeansTest_T1KmeansPrelimSegmentation.nii.gz")
CLASSES = {2: 1, 3: 2, 4: 3, 5: 4, 6: 5}


def build(out: Path, subjects: int, size: int = 64, seed: int = 0) -> Path:
    anatomy = load_anatomy("itk")
    seg = nib.as_closest_canonical(nib.load(ITK_SEG))
    labels = np.zeros(seg.shape, np.uint8)
    for src, dst in CLASSES.items():
        labels[np.asarray(seg.dataobj) == src] = dst
    labels *= anatomy.brain        # the brain-extracted T1 of the demo: tissue classes inside the brain only
    affine, points = output_grid(anatomy, size)
    inv = np.linalg.inv(anatomy.affine)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(exist_ok=True)
    rows = []
    for index in range(subjects):
        rng = np.random.default_rng([seed, index])
        linear, elastic = random_subject_shape(rng)
        warp = Deformation(points.mean(1), linear, elastic, *random_pose(rng))
        src = inv[:3, :3] @ warp(points) + inv[:3, 3:4]
        t1 = ndimage.map_coordinates(anatomy.volume, src, order=1).reshape((size,) * 3)
        t1 = scanner_effects(t1, points, rng, gain=rng.uniform(3, 5), level=float(np.percentile(anatomy.volume, 99)))
        lab = ndimage.map_coordinates(labels, src, order=0).reshape((size,) * 3)
        depth = np.flatnonzero(lab.sum(axis=(0, 1)) > 0.2 * lab.sum(axis=(0, 1)).max())
        k = int(rng.integers(depth.min(), depth.max() + 1))
        grid = affine.copy()
        grid[:3, 3] = affine[:3, :3] @ [0, 0, k] + affine[:3, 3]
        name = f"sub-{index + 1:04d}"
        (out / "images" / name).mkdir(exist_ok=True)
        nib.save(nib.Nifti1Image(np.rint(t1[:, :, k:k + 1]).astype(np.int16), grid), out / "images" / name / "t1.nii.gz")
        nib.save(nib.Nifti1Image(lab[:, :, k:k + 1].astype(np.uint8), grid), out / "masks" / f"{name}.nii.gz")
        rows.append({"path": f"{name}/t1.nii.gz", "mask": f"masks/{name}.nii.gz"})
    pd.DataFrame(rows).to_csv(out / "labels.csv", index=False)
    return out / "labels.csv"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--subjects", type=int, default=40)
    parser.add_argument("--run", action="store_true")
    args = parser.parse_args()
    labels = build(args.out.resolve(), args.subjects)
    print(f"wrote {args.subjects} subjects: {labels}")
    if args.run:
        pipeline = Path(__file__).with_name("seg_itk.yaml")
        subprocess.run([sys.executable, "-m", "medssl.cli", "run", str(pipeline), f"data.folder={labels.parent / 'images'}",
                        f"data.labels={labels}", f"workdir={args.out.resolve() / 'work'}",
                        f"manifest.out={args.out.resolve() / 'manifest.csv'}",
                        f"preprocess.cache_dir={args.out.resolve() / 'cache'}"], check=True)


if __name__ == "__main__":
    main()
