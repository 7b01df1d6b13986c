"""Head motion between the volumes of a DWI: each volume registered rigidly to the mean b = 0 image, resampled onto
it, and its gradient turned with it.

A head turned by R between volumes meets that volume's gradient g as Rᵀ g; once the volume is brought back onto the
reference, Rᵀ g is its gradient (Leemans & Jones 2009). Registration is ANTs' rigid one (antspyx, Mattes mutual
information sampled in the head: a diffusion-weighted volume's contrast is not the b = 0 image's) on a copy with
in-plane voxels merged to about `REGISTRATION_MM`; resampling is by cubic splines on the DWI's own grid. Eddy
currents' distortions (`ALSQuantLib.phantom.eddy_distortions` simulates them) are not corrected.

Measured on real-anatomy subjects on the study's grid (`benchmarks/bench_motion.py`) and on the phantom: see the
README's DKI section."""

from concurrent.futures import ThreadPoolExecutor

import numpy as np
from scipy import ndimage

from . import geometry, io, masks
from .errors import InputError

REGISTRATION_MM = 2.5
"""In-plane voxel size (about) of the copies that are registered; slices stay as acquired."""
HEAD_MARGIN_MM = 6.0
"""How far around the b = 0 image's brain the registration samples its metric."""
RESAMPLED_MARGIN_MM = 12.0
"""How far around the b = 0 image's brain the volumes are resampled; beyond, they are kept as they are (background)."""
_ANTS_SETTINGS = {
    "aff_iterations": (20, 10, 8),
    "aff_shrink_factors": (4, 2, 1),
    "aff_smoothing_sigmas": (2, 1, 0),
}
METRIC_SAMPLES = 16000
"""Voxels of the head the metric samples at the finest level (a tenth of them on the study's grid).

With `_ANTS_SETTINGS`, chosen on real-anatomy subjects on the study's grid (`benchmarks/bench_motion.py`): against
(100, 50, 25) iterations sampling half of every voxel, about a tenth of the time for the same median accuracy."""


def coarse_grid(shape, affine):
    """A grid over the same field of view with in-plane voxels merged to about `REGISTRATION_MM`."""
    voxel = geometry.voxel_sizes(affine)
    factor = np.maximum(np.floor(REGISTRATION_MM / voxel), 1.0)
    factor[2] = 1.0
    coarse = np.array(affine, float)
    coarse[:3, :3] = affine[:3, :3] * factor
    coarse[:3, 3] = affine[:3, :3] @ ((factor - 1) / 2) + affine[:3, 3]
    return tuple(int(n) for n in np.ceil(np.array(shape) / factor)), coarse


def _distance_from_brain(b0, affine):
    """Distance (mm) of every voxel from the b = 0 image's brain (`masks.brain_mask_from_b0`)."""
    brain = masks.brain_mask_from_b0(b0)
    return ndimage.distance_transform_edt(~brain, sampling=geometry.voxel_sizes(affine))


def _resampled(volume, affine, pose, where):
    """`volume`, seen through `pose` (reference → volume, world), brought back onto the reference at the voxels
    `where` (elsewhere as it is): cubic splines, clipped at 0 (linear interpolation blurred a tract two voxels
    wide by 6 % more in FA)."""
    to_volume = np.linalg.inv(affine) @ pose @ affine
    coefficients = ndimage.spline_filter(volume, order=3)
    points = np.nonzero(where)
    inside = to_volume[:3, :3] @ np.array(points, dtype=float) + to_volume[:3, 3:4]
    out = np.array(volume, dtype=np.float32)
    out[points] = np.maximum(ndimage.map_coordinates(coefficients, inside, order=3, prefilter=False), 0.0)
    return out


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

    def pose(volume, reference, head):
        registration = register(
            coarse(volume),
            small_affine,
            reference,
            small_affine,
            transform="Rigid",
            similarity=False,
            mask=head,
            aff_random_sampling_rate=min(1.0, METRIC_SAMPLES / max(int(head.sum()), 1)),
            **_ANTS_SETTINGS,
        )
        try:
            return rigid_pose(registration)
        finally:
            registration.cleanup()

    poses = np.tile(np.eye(4), (data.shape[3], 1, 1))
    corrected = data.copy()
    first = coarse(data[..., b0[0]])
    distance = _distance_from_brain(first, small_affine)
    # The metric is sampled only in the head: against the whole field of view, a third less time for the same
    # accuracy on real-anatomy subjects (`benchmarks/bench_motion.py`).
    head = distance <= HEAD_MARGIN_MM
    where = geometry.resample(distance <= RESAMPLED_MARGIN_MM, small_affine, shape, affine, order=0) > 0
    for n in b0[1:]:
        poses[n] = pose(data[..., n], first, head)
        corrected[..., n] = _resampled(data[..., n], affine, poses[n], where)
    reference = coarse(corrected[..., b0].mean(axis=-1))
    others = [n for n in range(data.shape[3]) if n not in set(b0.tolist())]
    for count, n in enumerate(others):
        if progress:
            progress(count / max(len(others), 1), f"motion correction: volume {count + 1} of {len(others)}")
        poses[n] = pose(data[..., n], reference, head)

    def resample(n):
        corrected[..., n] = _resampled(data[..., n], affine, poses[n], where)

    if progress:
        progress(1.0, "motion correction: resampling")
    # Two threads: SciPy's resampling lets go of Python's lock (antspyx's registration does not, so the two do not
    # overlap).
    with ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(resample, others))
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
