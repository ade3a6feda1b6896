"""Pseudo-subjects from one real anatomy: smooth deformations, scanner effects and a plausible lesion.

Everything works in world millimetres (RAS), so the source volume's anisotropic voxels (2×3×2 mm for the ITK
T1) never distort a shape. A pseudo-subject is (source anatomy, optional lesion) warped by its own affine +
elastic deformation; each of its studies adds a rigid head pose, a gain, a bias field and Rician noise, then
samples the result on the output grid in one interpolation (no repeated resampling blur).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
from scipy import ndimage


@dataclass
class Anatomy:
    """A real volume in RAS voxel order with its affine (voxel -> RAS mm) and a brain mask on the same grid."""
    volume: np.ndarray      # (X, Y, Z) float32
    affine: np.ndarray      # (4, 4)
    brain: np.ndarray       # (X, Y, Z) bool
    name: str

    @cached_property
    def zooms(self) -> np.ndarray:
        return np.linalg.norm(self.affine[:3, :3], axis=0)

    @cached_property
    def depth_mm(self) -> np.ndarray:
        """Distance of each brain voxel to the brain's edge (computed once, reused by every lesion)."""
        return ndimage.distance_transform_edt(self.brain, sampling=self.zooms)


def smooth_noise(shape: tuple[int, ...], sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian-smoothed white noise rescaled to unit standard deviation."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode="wrap")
    field -= field.mean()  # with a sigma near the box size the smoothed field is almost constant: centre it
    return (field / (field.std() + 1e-8)).astype(np.float32)


def rotation(angles_deg: np.ndarray) -> np.ndarray:
    """(3, 3) rotation from three angles in degrees (about x, then y, then z)."""
    ax, ay, az = np.deg2rad(angles_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


# --------------------------------------------------------------------------------------------- lesion
def lesion_mask(anatomy: Anatomy, rng: np.random.Generator, radius_mm: tuple[float, float] = (14.0, 22.0)
                ) -> tuple[np.ndarray, tuple[slice, ...], np.ndarray]:
    """Soft (0..1) irregular blob inside the brain: (values in a box, the box, centre in RAS mm).

    Radius 14-22 mm (about 10-45 ml): at the demo's 5 mm voxels a lesion must span several voxels to keep
    its contrast through partial volume; with 7-13 mm lesions (the former default) no classifier, and not
    even a voxel z-score detector, did better than chance on the 40^3 demo.

    Shape: a sphere whose radius is modulated by smooth noise (lobulated, not a ball), thresholded, then
    blurred by about one voxel so the boundary is soft like a real partial-volume edge. The centre is a
    random brain voxel at least one radius deep, so the lesion lies in tissue and never at a fixed spot.
    """
    zooms = anatomy.zooms
    radius = rng.uniform(*radius_mm)
    inner = anatomy.depth_mm > radius
    candidates = np.argwhere(inner if inner.any() else anatomy.brain)
    centre = candidates[rng.integers(len(candidates))]
    half = np.ceil(2.0 * radius / zooms).astype(int)  # box around the centre, voxels per axis
    lo, hi = np.maximum(centre - half, 0), np.minimum(centre + half + 1, anatomy.brain.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    grid = np.meshgrid(*[(np.arange(a, b) - c) * z for a, b, c, z in zip(lo, hi, centre, zooms)], indexing="ij")
    dist = np.sqrt(sum(g ** 2 for g in grid))   # mm from the centre, (x, y, z) of the box
    wobble = smooth_noise(dist.shape, sigma=max(dist.shape) / 5, rng=rng)
    blob = (dist < radius * (1.0 + 0.3 * np.clip(wobble, -1.5, 1.5))).astype(np.float32)
    soft = ndimage.gaussian_filter(blob, sigma=0.8) * anatomy.brain[box]
    centre_mm = anatomy.affine[:3, :3] @ centre + anatomy.affine[:3, 3]
    return soft.astype(np.float32), box, centre_mm


def insert_lesion(anatomy: Anatomy, soft: np.ndarray, box: tuple[slice, ...], rng: np.random.Generator,
                  contrast: tuple[float, float] = (0.7, 0.95)) -> np.ndarray:
    """A copy of the volume with the lesion blended in, its contrast relative to the surrounding tissue.

    The local tissue level is the median of brain voxels in a ring around the lesion, so a lesion in grey
    matter and one in white matter stand out by the same relative amount: T1-hypointense by 70-95 %
    (a cystic / necrotic lesion, near CSF darkness), with a mild internal texture. Hypointense only:
    hyperintense lesions are clipped back to the white-matter level by the 99th-percentile MR
    normalisation, and a 40-70 % change of either sign (the former default) mimics normal grey / white
    matter at 5 mm.
    """
    local_volume, local_brain = anatomy.volume[box], anatomy.brain[box]
    core = soft > 0.05
    ring = ndimage.binary_dilation(core, iterations=3) & ~core & local_brain
    reference = local_volume[ring] if ring.any() else anatomy.volume[anatomy.brain]
    darker = rng.uniform(*contrast)
    texture = 1.0 + 0.08 * smooth_noise(soft.shape, sigma=1.5, rng=rng)
    lesion = float(np.median(reference)) * (1.0 - darker) * texture
    volume = anatomy.volume.copy()
    volume[box] = local_volume * (1.0 - soft) + lesion * soft
    return volume


# ------------------------------------------------------------------------------------ deformation
@dataclass
class SmoothField:
    """A smooth random vector field as a sum of a few long-wavelength plane waves, evaluated anywhere.

    Analytic, so evaluating it on every output point costs a few array products, where a spline interpolation
    per component would dominate the time it takes to build the cohort.
    """
    freqs: np.ndarray    # (W, 3) cycles per mm
    phases: np.ndarray   # (W,)
    amps: np.ndarray     # (C, W) amplitude of each wave in each output component

    @classmethod
    def random(cls, rng: np.random.Generator, components: int, amplitude: float, wavelength_mm: float,
               waves: int = 6) -> "SmoothField":
        directions = rng.standard_normal((waves, 3))
        directions /= np.linalg.norm(directions, axis=1, keepdims=True)
        freqs = directions / (wavelength_mm * rng.uniform(0.7, 1.4, (waves, 1)))
        amps = rng.standard_normal((components, waves)) * amplitude / np.sqrt(waves / 2)
        return cls(freqs, rng.uniform(0, 2 * np.pi, waves), amps)

    def __call__(self, points: np.ndarray) -> np.ndarray:
        """points (3, N) mm -> (C, N)."""
        return self.amps @ np.sin(2 * np.pi * self.freqs @ points + self.phases[:, None])


@dataclass
class Deformation:
    """Subject anatomy (affine + elastic) composed with a study pose; maps output world mm -> source mm."""
    centre: np.ndarray          # (3,) mm, the point the affine parts turn about
    linear: np.ndarray          # (3, 3) subject shape: scaling / shear / rotation
    elastic: SmoothField        # mm displacement, a function of the subject's own coordinates
    pose_rotation: np.ndarray   # (3, 3) study head pose
    pose_shift: np.ndarray      # (3,) mm

    def __call__(self, points: np.ndarray) -> np.ndarray:
        """points (3, N) world mm on the output grid -> (3, N) mm in the source anatomy."""
        subject = self.pose_rotation @ (points - self.centre[:, None]) + self.pose_shift[:, None]
        return self.linear @ subject + self.elastic(subject) + self.centre[:, None]


def random_subject_shape(rng: np.random.Generator, elastic_mm: float = 3.0) -> tuple[np.ndarray, SmoothField]:
    """(linear (3,3), elastic field): anatomy differs by ±8 % size, small shear, smooth local warps."""
    scale = np.diag(rng.uniform(0.92, 1.08, 3))
    shear = np.eye(3) + np.triu(rng.uniform(-0.04, 0.04, (3, 3)), 1)
    linear = rotation(rng.uniform(-4, 4, 3)) @ shear @ scale
    return linear, SmoothField.random(rng, components=3, amplitude=elastic_mm, wavelength_mm=80.0)


def random_pose(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A study's head position in the scanner: up to 8 degrees of rotation and 6 mm of shift."""
    return rotation(rng.uniform(-8, 8, 3)), rng.uniform(-6, 6, 3)


# ------------------------------------------------------------------------------------ scanner effects
def scanner_effects(volume: np.ndarray, points: np.ndarray, rng: np.random.Generator, gain: float,
                    level: float) -> np.ndarray:
    """Gain, smooth multiplicative bias field (about ±15 %) and Rician noise (magnitudes are never < 0).

    `points` (3, N) are the world mm of the voxels of `volume` (N = volume.size), for the bias field.
    `level`: the bright-tissue level of the lesion-free source; the noise is 1.5-3 % of it (times the gain),
    so adding a lesion changes no voxel outside it (a percentile of this volume would move with the lesion).
    """
    bias = SmoothField.random(rng, components=1, amplitude=0.15, wavelength_mm=250.0, waves=3)(points)
    scaled = volume * gain * np.exp(bias.reshape(volume.shape))
    sigma = rng.uniform(0.015, 0.03) * gain * level
    real = scaled + rng.normal(0, sigma, volume.shape)
    imag = rng.normal(0, sigma, volume.shape)
    return np.sqrt(real ** 2 + imag ** 2).astype(np.float32)
