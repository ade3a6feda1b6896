"""Engineered image features: the non-deep baseline arm ("features") of the ladder.

What a radiomics-style logistic regression would see, computed per image with no learning, on the same
preprocessed arrays the deep arms get (LadderContext.dataset: for 2D encoders on 3D volumes the whole volume
when slice-pooled, the central slice under finetune.slice_pooling: central):
- pooled intensities at three scales: the mean over a 1, 2 and 4 cells-per-axis grid (1 + 2^d + 4^d values);
- the intensity distribution: mean, SD, skewness, kurtosis and 9 quantiles (5 % .. 95 %, plus min and max);
- texture: gradient-magnitude mean / SD / 50-90-99 % quantiles, and grey-level co-occurrence (scikit-image
  GLCM on 16 levels, distance 1, 4 angles: contrast, homogeneity, energy, correlation) of the central slice.
pyradiomics was the first choice but has no wheel for Python 3.11; scikit-image carries the GLCM.
The logistic regression on top (standardised, C chosen inside the rung) is ladder.inner.fit_probe, the same probe
the linear protocol fits on encoder features, so the two differ only in the features. The settings that vary are
keyword arguments, recorded in a kept model (models/features_model.py); EXTRACTOR names the fixed rest, so a
package written by another version of this extraction is refused instead of scored with other features.
"""
from __future__ import annotations

import numpy as np
import torch
from scipy import stats
from skimage.feature import graycomatrix, graycoprops

GRIDS = (1, 2, 4)
QUANTILES = (0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0, 0.1, 0.9)
GLCM_LEVELS = 16
GLCM_PROPS = ("contrast", "homogeneity", "energy", "correlation")
EXTRACTOR = "medssl-engineered/1"  # moments, gradient quantiles, GLCM distance 1 at 4 angles on the central slice


def image_features(image: np.ndarray, grids=GRIDS, quantiles=QUANTILES, glcm_levels: int = GLCM_LEVELS,
                   glcm_props=GLCM_PROPS) -> np.ndarray:
    """(C, *spatial) array -> (F,) float64 features (F depends on C, the number of spatial dims and the settings)."""
    parts = []
    for channel in np.asarray(image, np.float64):
        parts += [_pooled(channel, grids), _distribution(channel, quantiles), _gradient(channel),
                  _glcm(channel, glcm_levels, glcm_props)]
    return np.concatenate(parts)


def dataset_features(dataset) -> tuple[np.ndarray, list[str]]:
    """(N, F) features and the image ids, one row per item of an ImageDataset (or any dict dataset)."""
    rows, ids = [], []
    for i in range(len(dataset)):
        item = dataset[i]
        image = item["image"].numpy() if isinstance(item["image"], torch.Tensor) else item["image"]
        rows.append(image_features(image))
        ids.append(item.get("image_id", str(i)))
    return np.stack(rows), ids


def _pooled(x: np.ndarray, grids) -> np.ndarray:
    pool = {2: torch.nn.functional.adaptive_avg_pool2d, 3: torch.nn.functional.adaptive_avg_pool3d}[x.ndim]
    t = torch.from_numpy(x)[None, None]  # (1, 1, *spatial)
    return np.concatenate([pool(t, g).flatten().numpy() for g in grids])


def _distribution(x: np.ndarray, quantiles) -> np.ndarray:
    flat = x.ravel()
    sd = flat.std()
    moments = [flat.mean(), sd, stats.skew(flat) if sd > 0 else 0.0, stats.kurtosis(flat) if sd > 0 else 0.0]
    return np.r_[moments, np.quantile(flat, quantiles)]


def _gradient(x: np.ndarray) -> np.ndarray:
    magnitude = np.sqrt(sum(g ** 2 for g in np.gradient(x)))
    return np.r_[magnitude.mean(), magnitude.std(), np.quantile(magnitude, (0.5, 0.9, 0.99))]


def _glcm(x: np.ndarray, n_levels: int, props) -> np.ndarray:
    plane = x if x.ndim == 2 else x[..., x.shape[-1] // 2]  # the central axial slice of a volume
    low, high = float(plane.min()), float(plane.max())
    levels = np.zeros(plane.shape, np.uint8) if high <= low else \
        np.minimum((plane - low) / (high - low) * n_levels, n_levels - 1).astype(np.uint8)
    glcm = graycomatrix(levels, [1], [0, np.pi / 4, np.pi / 2, 3 * np.pi / 4], levels=n_levels,
                        symmetric=True, normed=True)
    return np.array([np.nan_to_num(graycoprops(glcm, prop)).mean() for prop in props])
