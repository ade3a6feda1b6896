"""The two tasks of bench_label_efficiency.py, built from real anatomy that ships in packages (shared/DATA.md).

Task A "lesion": whole-volume lesion vs healthy, the demo's pseudo-subjects (medssl.demo: random affine +
elastic shape, head pose, gain, bias field, Rician noise, a plausible lesion in half of them) rendered from
the ITK T1 (internal site) and from the nilearn MNI152 2009a template (external site: another brain, another
scanner and contrast, 2 mm instead of 2x3x2 mm), 32^3 at about 6 mm.
Task B "tissue": 32^3 patches of pseudo-subjects (same generator, 72^3 at about 2.7 mm) labelled with the
tissue under the patch centre (CSF, grey, white matter: the majority of the central 3^3 voxels): internally
from the ITK T1's 7-class k-means segmentation (classes 4, 5, 6 inside the skull-strip mask), externally from
the MNI152 grey / white matter probability maps (CSF = the brain mask's rest).
Patients are pseudo-subjects: splits, label budgets and bootstrap resampling are per subject.
Each volume is scaled by its own 99th brain percentile (what a per-image intensity normalisation does).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import nibabel as nib
import numpy as np
from scipy import ndimage

from medssl.demo.cohort import ITK_T1, load_anatomy, output_grid, render_subject
from medssl.demo.lesions import Anatomy, Deformation, random_pose, random_subject_shape, scanner_effects

ITK_SEG = ITK_T1.with_name("KmeansTest_T1KmeansPrelimSegmentation.nii.gz")
CLASSES_B = ("CSF", "grey matter", "white matter")
PATCH = 32


@dataclass
class Split:
    images: np.ndarray      # (N, 1, 32, 32, 32) float32
    labels: np.ndarray      # (N,) int
    patients: np.ndarray    # (N,) int: the pseudo-subject each image comes from


@dataclass
class Task:
    name: str
    classes: tuple[str, ...]
    pool: Split             # internal training pool: labels drawn from it, its images are the SSL data
    test: Split             # internal test subjects
    external: Split         # the other site
    unlabelled: list[np.ndarray]  # internal training volumes for pretraining (crops are cut from them)


@lru_cache(maxsize=1)
def mni_anatomy() -> tuple[Anatomy, np.ndarray]:
    """MNI152 2009a T1, skull-stripped by its brain mask, and its (X, Y, Z) tissue map (-1 outside the brain)."""
    from nilearn import datasets
    # at 2 mm: both tasks sample at 2.7-6 mm, and the lesion generator's whole-volume steps cost 8x less
    t1 = nib.as_closest_canonical(datasets.load_mni152_template(resolution=2))
    mask = np.asarray(nib.as_closest_canonical(datasets.load_mni152_brain_mask(resolution=2)).dataobj) > 0
    gm = np.asarray(nib.as_closest_canonical(datasets.load_mni152_gm_template(resolution=2)).dataobj, np.float32)
    wm = np.asarray(nib.as_closest_canonical(datasets.load_mni152_wm_template(resolution=2)).dataobj, np.float32)
    tissue = np.argmax(np.stack([1 - gm - wm, gm, wm]), axis=0)
    tissue[~mask] = -1
    volume = np.asarray(t1.dataobj, np.float32) * mask
    return Anatomy(volume, t1.affine, mask, "mni152-2009a"), tissue.astype(np.int8)


@lru_cache(maxsize=1)
def itk_anatomy() -> tuple[Anatomy, np.ndarray]:
    anatomy = load_anatomy("itk")
    seg = np.asarray(nib.as_closest_canonical(nib.load(ITK_SEG)).dataobj)
    tissue = np.full(seg.shape, -1, np.int8)
    for value, cls in ((4, 0), (5, 1), (6, 2)):
        tissue[(seg == value) & anatomy.brain] = cls
    return anatomy, tissue


def _normalise(volume: np.ndarray) -> np.ndarray:
    top = np.percentile(volume[volume > 0], 99) if (volume > 0).any() else 1.0
    return (volume / top).astype(np.float32)


def lesion_split(anatomy: Anatomy, seed: int, first: int, n: int) -> Split:
    """n subjects (index first..first+n-1), alternately healthy and with a lesion, 32^3 whole volumes."""
    affine, points = output_grid(anatomy, PATCH)
    images, labels = [], []
    for index in range(first, first + n):
        lesion = index % 2 == 1
        image = render_subject(anatomy, points, PATCH, seed, index, lesion)[0]["image"]
        images.append(_normalise(image)[None])
        labels.append(int(lesion))
    return Split(np.stack(images), np.array(labels), np.arange(first, first + n))


def tissue_subject(anatomy: Anatomy, tissue: np.ndarray, seed: int, index: int, size: int = 72):
    """One pseudo-subject: the demo's deformation, pose and scanner effects; image and tissue map on its grid."""
    affine, points = output_grid(anatomy, size)
    linear, elastic = random_subject_shape(np.random.default_rng([seed, 1, index]))
    rng = np.random.default_rng([seed, 3, index, 0])
    warp = Deformation(points.mean(1), linear, elastic, *random_pose(rng))
    inv = np.linalg.inv(anatomy.affine)
    src = inv[:3, :3] @ warp(points) + inv[:3, 3:4]
    image = ndimage.map_coordinates(anatomy.volume, src, order=1, mode="constant").reshape((size,) * 3)
    image = scanner_effects(image, points, rng, gain=rng.uniform(3.0, 5.0),
                            level=float(np.percentile(anatomy.volume[anatomy.brain], 99)))
    labels = ndimage.map_coordinates(tissue, src, order=0, mode="constant", cval=-1).reshape((size,) * 3)
    return _normalise(image), labels


def tissue_patches(volume: np.ndarray, labels: np.ndarray, per_class: int, rng: np.random.Generator):
    """per_class 32^3 patches per tissue class whose central 3^3 voxels are mostly that class."""
    half = PATCH // 2
    votes = np.stack([ndimage.uniform_filter((labels == c).astype(np.float32), 3) for c in range(3)])
    inner = np.zeros(labels.shape, bool)
    inner[half:-half, half:-half, half:-half] = True
    patches, classes = [], []
    for c in range(3):
        where = np.argwhere(inner & (labels == c) & (votes[c] > 0.5))
        for x, y, z in where[rng.choice(len(where), size=min(per_class, len(where)), replace=False)]:
            patches.append(volume[x - half:x + half, y - half:y + half, z - half:z + half][None])
            classes.append(c)
    return patches, classes


def tissue_split(anatomy, tissue, seed: int, first: int, n: int, per_class: int, keep_volumes: bool = False):
    images, labels, patients, volumes = [], [], [], []
    for index in range(first, first + n):
        volume, labelmap = tissue_subject(anatomy, tissue, seed, index)
        patches, classes = tissue_patches(volume, labelmap, per_class, np.random.default_rng([seed, 9, index]))
        images += patches
        labels += classes
        patients += [index] * len(classes)
        if keep_volumes:
            volumes.append(volume[None])
    return Split(np.stack(images).astype(np.float32), np.array(labels), np.array(patients)), volumes


def build_tasks(seed: int = 0, small: bool = False) -> list[Task]:
    """Both tasks; `small` shrinks every set (a quick check of the whole benchmark, not a measurement)."""
    n_pool, n_test = (12, 8) if small else (60, 40)
    itk = load_anatomy("itk")
    mni, mni_tissue = mni_anatomy()
    pool = lesion_split(itk, seed, 0, n_pool)
    lesion = Task("lesion", ("healthy", "lesion"), pool, lesion_split(itk, seed, 1000, n_test),
                  lesion_split(mni, seed + 1, 0, n_test), [image for image in pool.images])
    itk_a, itk_tissue = itk_anatomy()
    t_pool, t_test, per_class = (8, 4, 2) if small else (30, 10, 4)
    pool_b, volumes = tissue_split(itk_a, itk_tissue, seed, 0, t_pool, per_class, keep_volumes=True)
    test_b, _ = tissue_split(itk_a, itk_tissue, seed, 1000, t_test, per_class)
    external_b, _ = tissue_split(mni, mni_tissue, seed + 1, 0, t_test, per_class)
    return [lesion, Task("tissue", CLASSES_B, pool_b, test_b, external_b, volumes)]
