"""Head motion between the volumes of a DWI: each volume registered rigidly to the mean b = 0 image, resampled onto
it, and its gradient turned with it.

A head turned by R between volumes meets that volume's gradient g as Rᵀ g; once the volume is brought back onto the
reference, Rᵀ g is its gradient (Leemans & Jones 2009). Registration is ANTs' rigid one (antspyx, Mattes mutual
information: a diffusion-weighted volume's contrast is not the b = 0 image's) on a copy with in-plane voxels merged
to about `REGISTRATION_MM`; resampling is by cubic splines on the DWI's own grid.

Measured on the phantom with motion (`ALSQuantLib.phantom.head_motion`, up to 3° about each axis and 2 mm along
each, 3.5 mm voxels, SNR 30): ANTs rigid put the brain's corners a median 0.6 mm (largest 2.0 mm) from their true
places, DIPY's mutual-information rigid registration 1.1 mm (largest 9.2 mm).
"""

import numpy as np
from scipy import ndimage

from . import geometry, io
from .errors import InputError

REGISTRATION_MM = 2.5
"""In-plane voxel size (about) of the copies that are registered; slices stay as acquired."""
_ANTS_SETTINGS = {
    "aff_iterations": (100, 50, 25),
    "aff_shrink_factors": (4, 2, 1),
    "aff_smoothing_sigmas": (2, 1, 0),
    "aff_random_sampling_rate": 0.5,
}


def coarse_grid(shape, affine):
    """A grid over the same field of view with in-plane voxels merged to about `REGISTRATION_MM`."""
    voxel = geometry.voxel_sizes(affine)
    factor = np.maximum(np.floor(REGISTRATION_MM / voxel), 1.0)
    factor[2] = 1.0
    coarse = np.array(affine, float)
    coarse[:3, :3] = affine[:3, :3] * factor
    coarse[:3, 3] = affine[:3, :3] @ ((factor - 1) / 2) + affine[:3, 3]
    return tuple(int(n) for n in np.ceil(np.array(shape) / factor)), coarse


def _resampled(volume, affine, pose):
    """`volume`, seen through `pose` (reference → volume, world), brought back onto the reference: cubic splines,
    clipped at 0 (linear interpolation blurred a tract two voxels wide by 6 % more in FA)."""
    to_volume = np.linalg.inv(affine) @ pose @ affine
    moved = ndimage.affine_transform(volume, to_volume[:3, :3], to_volume[:3, 3], order=3)
    return np.maximum(moved, 0.0).astype(np.float32)


def correct(data, affine, bvals, bvecs, *, b0_threshold, progress=None):
    """Register every volume to the mean b = 0 image and resample it there.

    The b = 0 volumes are aligned to the first and averaged: that mean is the reference (as in DIPY's
    ``motion_correction``).

    Parameters
    ----------
    data : ndarray (i, j, k, n)
    affine : ndarray (4, 4), voxel → RAS
    bvals : ndarray (n,), s/mm²
    bvecs : ndarray (n, 3), RAS
    b0_threshold : float
        b-values at or below it are b = 0 volumes.
    progress : callable(fraction, message), optional

    Returns
    -------
    data : ndarray, float32, the volumes on the reference
    bvecs : ndarray (n, 3), RAS, turned
    poses : ndarray (n, 4, 4)
        Each volume's rigid transform, world mm, from the reference to the volume.
    """
    from scipy.linalg import polar

    from .registration import register, rigid_pose

    data = np.asarray(data, dtype=np.float32)
    bvals, bvecs = np.asarray(bvals, dtype=float), np.asarray(bvecs, dtype=float)
    b0 = np.flatnonzero(bvals <= b0_threshold)
    if b0.size == 0:
        raise InputError(f"motion correction: no b = 0 volume (b ≤ {b0_threshold:g} s/mm²) to register to")
    shape = data.shape[:3]
    small_shape, small_affine = coarse_grid(shape, affine)

    def coarse(volume):
        return geometry.resample(volume, affine, small_shape, small_affine, order=1)

    def pose(volume, reference):
        registration = register(
            coarse(volume), small_affine, reference, small_affine, transform="Rigid", **_ANTS_SETTINGS
        )
        try:
            return rigid_pose(registration)
        finally:
            registration.cleanup()

    poses = np.tile(np.eye(4), (data.shape[3], 1, 1))
    corrected = data.copy()
    first = coarse(data[..., b0[0]])
    for n in b0[1:]:
        poses[n] = pose(data[..., n], first)
        corrected[..., n] = _resampled(data[..., n], affine, poses[n])
    reference = coarse(corrected[..., b0].mean(axis=-1))
    others = [n for n in range(data.shape[3]) if n not in set(b0.tolist())]
    for count, n in enumerate(others):
        if progress:
            progress(count / max(len(others), 1), f"motion correction: volume {count + 1} of {len(others)}")
        poses[n] = pose(data[..., n], reference)
        corrected[..., n] = _resampled(data[..., n], affine, poses[n])
    turned = np.array([polar(p[:3, :3])[0].T @ g for p, g in zip(poses, bvecs)])
    return corrected, turned, poses


def parameters(poses, centre):
    """Per volume: rotation about x, y, z (degrees; R = Rz Ry Rx) and the displacement of `centre` (mm)."""
    from scipy.linalg import polar
    from scipy.spatial.transform import Rotation

    rows = []
    for pose in poses:
        angles = Rotation.from_matrix(polar(pose[:3, :3])[0]).as_euler("xyz", degrees=True)
        rows.append(np.concatenate([angles, pose[:3, :3] @ centre + pose[:3, 3] - centre]))
    return np.array(rows)


MOTION_COLUMNS = ("volume", "bval", "rot_x_deg", "rot_y_deg", "rot_z_deg", "shift_x_mm", "shift_y_mm", "shift_z_mm")


def write_table(path, poses, bvals, affine, shape):
    """Write `path` (tab-separated, one row per volume: `MOTION_COLUMNS`, the shift being that of the field of view's
    centre) and return the table's numbers (`parameters`)."""
    centre = affine[:3, :3] @ ((np.array(shape) - 1) / 2.0) + affine[:3, 3]
    table = parameters(poses, centre)
    lines = ["\t".join(MOTION_COLUMNS)]
    for n, (row, b) in enumerate(zip(table, bvals)):
        lines.append("\t".join([str(n), f"{b:g}"] + [f"{v:.4f}" for v in row]))
    io.write_text(path, "\n".join(lines) + "\n")
    return table
