"""Evaluation metrics: how close a result is to a ground truth. Kept apart from the methods they judge.

* `dice` for label maps;
* `nrmse`, `hfen` and `xsim` for susceptibility maps (the QSM challenge 2.0 metrics; XSIM after Milovic 2025).
"""

import numpy as np
from scipy import ndimage


def dice(a, b):
    """Dice coefficient of two boolean masks."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    total = a.sum() + b.sum()
    return float(2 * np.logical_and(a, b).sum() / total) if total else 1.0


def nrmse(chi, truth, mask):
    """Normalised RMSE (%) inside the mask, each map demeaned there (susceptibility is relative)."""
    a = chi[mask] - chi[mask].mean()
    b = truth[mask] - truth[mask].mean()
    return float(100 * np.linalg.norm(a - b) / np.linalg.norm(b))


def hfen(chi, truth, mask, sigma=1.5):
    """High-frequency error norm (%): NRMSE of Laplacian-of-Gaussian-filtered maps (σ = 1.5 voxels)."""
    a = ndimage.gaussian_laplace(np.where(mask, chi, 0).astype(np.float64), sigma)
    b = ndimage.gaussian_laplace(np.where(mask, truth, 0).astype(np.float64), sigma)
    return float(100 * np.linalg.norm((a - b)[mask]) / np.linalg.norm(b[mask]))


def xsim(chi, truth, mask, *, k1=0.01, k2=0.001, dynamic_range=1.0, sigma=1.5):
    """XSIM (Milovic 2025): SSIM with constants suited to susceptibility (L = 1 ppm, K₁ = 0.01, K₂ = 0.001),
    Gaussian window σ = 1.5 voxels, averaged inside the mask."""
    x = np.where(mask, chi, 0).astype(np.float64)
    y = np.where(mask, truth, 0).astype(np.float64)
    c1, c2 = (k1 * dynamic_range) ** 2, (k2 * dynamic_range) ** 2
    mx, my = ndimage.gaussian_filter(x, sigma), ndimage.gaussian_filter(y, sigma)
    sxx = ndimage.gaussian_filter(x * x, sigma) - mx**2
    syy = ndimage.gaussian_filter(y * y, sigma) - my**2
    sxy = ndimage.gaussian_filter(x * y, sigma) - mx * my
    ssim = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx**2 + my**2 + c1) * (sxx + syy + c2))
    return float(ssim[mask].mean())
