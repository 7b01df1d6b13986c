"""The one place that converts between image conventions.

Conventions
-----------
* **MRML** (Slicer) arrays are indexed ``(k, j, i[, n])`` and carry a 4×4 IJK→RAS matrix.
* **nibabel / DIPY** arrays are indexed ``(i, j, k[, n])`` and carry a 4×4 RAS affine.
  The IJK→RAS matrix *is* the affine; only the axis order of the array differs.
* Gradient directions inside ALSQuant are unit vectors in **RAS world** coordinates, shape ``(n, 3)``.
  FSL ``.bvec`` files and NRRD ``DWMRI_gradient_NNNN`` keys are converted on the way in and out here.
* The main field B0 points along the scanner's z axis (superior in RAS). Its direction in the frame of the
  image axes is what a dipole kernel needs.

Nobody else transposes arrays or flips gradients.
"""

import functools

import numpy as np

from .errors import InputError

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])

_SPACE_TO_RAS = {
    "right-anterior-superior": np.eye(3),
    "ras": np.eye(3),
    "left-posterior-superior": LPS_TO_RAS,
    "lps": LPS_TO_RAS,
    "left-anterior-superior": np.diag([-1.0, 1.0, 1.0]),
    "las": np.diag([-1.0, 1.0, 1.0]),
}


def _check_affine(affine, name="affine"):
    affine = np.asarray(affine, dtype=float)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise InputError(f"{name}: expected a finite 4x4 matrix, got shape {affine.shape}")
    if abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise InputError(f"{name}: the 3x3 part is singular; voxel axes must span 3D space")
    return affine


def array_from_mrml(array_kji):
    """Reorder an MRML ``(k, j, i[, n])`` array to nibabel's ``(i, j, k[, n])``.

    Parameters
    ----------
    array_kji : ndarray, 3D or 4D
        Array as returned by ``slicer.util.arrayFromVolume``.

    Returns
    -------
    ndarray
        C-contiguous copy in ``(i, j, k[, n])`` order. The IJK→RAS matrix of the node is its affine unchanged.
    """
    array_kji = np.asarray(array_kji)
    if array_kji.ndim not in (3, 4):
        raise InputError(f"MRML array: expected 3D (k, j, i) or 4D (k, j, i, n), got {array_kji.ndim}D")
    axes = (2, 1, 0) + tuple(range(3, array_kji.ndim))
    return np.ascontiguousarray(array_kji.transpose(axes))


def array_to_mrml(array_ijk):
    """Reorder a nibabel ``(i, j, k[, n])`` array to MRML's ``(k, j, i[, n])``; the inverse of `array_from_mrml`."""
    array_ijk = np.asarray(array_ijk)
    if array_ijk.ndim not in (3, 4):
        raise InputError(f"image array: expected 3D (i, j, k) or 4D (i, j, k, n), got {array_ijk.ndim}D")
    axes = (2, 1, 0) + tuple(range(3, array_ijk.ndim))
    return np.ascontiguousarray(array_ijk.transpose(axes))


def voxel_sizes(affine):
    """Voxel edge lengths in mm: the norms of the affine's first three columns."""
    affine = _check_affine(affine)
    return np.linalg.norm(affine[:3, :3], axis=0)


def direction_cosines(affine):
    """The 3×3 matrix whose columns are the unit RAS directions of the i, j and k axes."""
    affine = _check_affine(affine)
    return affine[:3, :3] / voxel_sizes(affine)


def world_to_voxel_directions(vectors_ras, affine):
    """Express RAS direction vectors in the frame of the image axes (unit length along each voxel axis).

    For an orthogonal grid this is ``Rᵀ v``; the inverse is used so that the result stays exact for the dot
    products a k-space kernel takes (``k · b``) even on a sheared grid.

    Parameters
    ----------
    vectors_ras : array_like, shape (3,) or (n, 3)
    affine : array_like, shape (4, 4)

    Returns
    -------
    ndarray, same shape as `vectors_ras`, each row of unit length (zero rows stay zero).
    """
    vectors = np.atleast_2d(np.asarray(vectors_ras, dtype=float))
    local = vectors @ np.linalg.inv(direction_cosines(affine)).T
    norms = np.linalg.norm(local, axis=1, keepdims=True)
    local = np.divide(local, norms, out=np.zeros_like(local), where=norms > 0)
    return local.reshape(np.shape(vectors_ras))


def voxel_to_world_directions(vectors_voxel, affine):
    """Inverse of `world_to_voxel_directions`: RAS unit vectors from directions in the image-axis frame."""
    vectors = np.atleast_2d(np.asarray(vectors_voxel, dtype=float))
    world = vectors @ direction_cosines(affine).T
    norms = np.linalg.norm(world, axis=1, keepdims=True)
    world = np.divide(world, norms, out=np.zeros_like(world), where=norms > 0)
    return world.reshape(np.shape(vectors_voxel))


def b0_direction_voxel(affine, b0_direction_ras=(0.0, 0.0, 1.0)):
    """Direction of the main field in the frame of the image axes.

    Parameters
    ----------
    affine : array_like, shape (4, 4)
        Voxel → RAS affine (equivalently, a node's IJK→RAS matrix).
    b0_direction_ras : array_like, shape (3,)
        B0 in RAS world coordinates; the scanner's z axis ``(0, 0, 1)`` unless the scanner frame is not the
        patient frame (a tilted head coil still has B0 along scanner z).

    Returns
    -------
    ndarray, shape (3,)
        Unit vector along the i, j, k axes. An axial acquisition gives ``(0, 0, 1)``; oblique slices give an
        oblique B0.

    Examples
    --------
    >>> import numpy as np
    >>> tilt = np.deg2rad(30)
    >>> affine = np.eye(4)
    >>> affine[1:3, 1:3] = [[np.cos(tilt), -np.sin(tilt)], [np.sin(tilt), np.cos(tilt)]]
    >>> np.round(b0_direction_voxel(affine), 3)
    array([0.   , 0.5  , 0.866])
    """
    b0 = np.asarray(b0_direction_ras, dtype=float)
    if b0.shape != (3,) or np.linalg.norm(b0) == 0:
        raise InputError(f"b0_direction_ras: expected a non-zero 3-vector, got {b0_direction_ras!r}")
    return world_to_voxel_directions(b0 / np.linalg.norm(b0), affine)


def _fsl_flip(affine):
    # FSL's voxel frame is radiological: when the affine's determinant is positive (neurological storage)
    # FSL's x runs opposite to the i axis, and bvecs are given in FSL's frame.
    return np.diag([-1.0, 1.0, 1.0]) if np.linalg.det(affine[:3, :3]) > 0 else np.eye(3)


def fsl_bvecs_to_ras(bvecs, affine):
    """Convert FSL bvecs (image-axis frame, x flipped for a positive-determinant affine) to RAS unit vectors.

    Parameters
    ----------
    bvecs : array_like, shape (n, 3)
        As read from a ``.bvec`` file and transposed; zero vectors (b = 0) stay zero.
    affine : array_like, shape (4, 4)

    Returns
    -------
    ndarray, shape (n, 3)

    Notes
    -----
    ``g_ras = R F b`` with ``R`` the direction cosines and ``F = diag(-1, 1, 1)`` when ``det(affine) > 0``
    (MRtrix3's and FSL's convention). The same acquisition stored as LAS or as RAS thus gives the same RAS
    gradients.
    """
    affine = _check_affine(affine)
    bvecs = np.asarray(bvecs, dtype=float)
    if bvecs.ndim != 2 or bvecs.shape[1] != 3:
        raise InputError(f"bvecs: expected shape (n, 3), got {bvecs.shape}")
    return voxel_to_world_directions(bvecs @ _fsl_flip(affine).T, affine)


def ras_to_fsl_bvecs(gradients_ras, affine):
    """Inverse of `fsl_bvecs_to_ras`: FSL bvecs, shape (n, 3), for RAS unit gradients."""
    affine = _check_affine(affine)
    local = world_to_voxel_directions(np.asarray(gradients_ras, dtype=float).reshape(-1, 3), affine)
    return local @ _fsl_flip(affine).T


def space_to_ras(space):
    """3×3 matrix taking vectors of a NRRD ``space`` (e.g. ``left-posterior-superior``) to RAS."""
    key = str(space).strip().lower()
    if key not in _SPACE_TO_RAS:
        raise InputError(f"NRRD space {space!r}: expected one of {sorted(_SPACE_TO_RAS)}")
    return _SPACE_TO_RAS[key]


def nrrd_gradients_to_ras(gradients, measurement_frame, space):
    """RAS gradient vectors from NRRD ``DWMRI_gradient_NNNN`` values.

    Parameters
    ----------
    gradients : array_like, shape (n, 3)
        Gradients in measurement-frame coordinates; their norm encodes the b-value scale, and is kept.
    measurement_frame : array_like, shape (3, 3) or None
        NRRD ``measurement frame``: its columns are the measurement axes in ``space`` coordinates. ``None`` is
        the identity.
    space : str
        NRRD ``space`` field.

    Returns
    -------
    ndarray, shape (n, 3)
        ``space_to_ras(space) @ measurement_frame @ g`` for each gradient g.
    """
    frame = np.eye(3) if measurement_frame is None else np.asarray(measurement_frame, dtype=float)
    if frame.shape != (3, 3) or not np.all(np.isfinite(frame)):
        raise InputError(f"NRRD measurement frame: expected a finite 3x3 matrix, got {frame!r}")
    g = np.asarray(gradients, dtype=float).reshape(-1, 3)
    return g @ (space_to_ras(space) @ frame).T


def affine_from_nrrd(space_directions, space_origin, space):
    """RAS affine from NRRD ``space directions`` (one row per spatial axis) and ``space origin``."""
    to_ras = space_to_ras(space)
    directions = np.asarray(space_directions, dtype=float)
    origin = np.zeros(3) if space_origin is None else np.asarray(space_origin, dtype=float)
    if directions.shape != (3, 3) or not np.all(np.isfinite(directions)) or not np.all(np.isfinite(origin)):
        raise InputError(f"NRRD space directions: expected three finite spatial rows, got {directions!r}")
    affine = np.eye(4)
    affine[:3, :3] = to_ras @ directions.T
    affine[:3, 3] = to_ras @ origin
    return _check_affine(affine, "NRRD space directions")


def nrrd_from_affine(affine):
    """LPS ``space directions`` (rows) and ``space origin`` for a RAS affine: how Slicer writes NRRD."""
    affine = _check_affine(affine)
    return (LPS_TO_RAS @ affine[:3, :3]).T.copy(), LPS_TO_RAS @ affine[:3, 3]


def voxel_grid_affine(shape, voxel_size, *, rotation=None, center=(0.0, 0.0, 0.0)):
    """RAS affine of a grid of `shape` voxels of `voxel_size` mm whose centre lies at `center`.

    Parameters
    ----------
    shape : sequence of 3 ints
    voxel_size : float or sequence of 3 floats, mm
    rotation : (3, 3) array_like, optional
        Direction cosines (columns = i, j, k directions in RAS); identity (axial, RAS) by default.
    center : sequence of 3 floats, mm
    """
    rotation = np.eye(3) if rotation is None else np.asarray(rotation, dtype=float)
    linear = rotation * np.broadcast_to(np.asarray(voxel_size, dtype=float), (3,))
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = np.asarray(center, dtype=float) - linear @ ((np.asarray(shape[:3], dtype=float) - 1) / 2)
    return affine


def voxel_centers_world(shape, affine):
    """RAS coordinates (mm) of every voxel centre of a 3D grid, shape ``shape[:3] + (3,)``."""
    affine = _check_affine(affine)
    ijk = np.stack(np.meshgrid(*[np.arange(n, dtype=float) for n in shape[:3]], indexing="ij"), axis=-1)
    return ijk @ affine[:3, :3].T + affine[:3, 3]


def itk_from_affine(affine):
    """ITK/ANTs physical-space description of a RAS affine: LPS ``origin``, ``spacing`` and ``direction``.

    ITK maps index to physical point as ``origin + direction @ (spacing * index)`` in LPS; an ANTsPy array shares
    nibabel's ``(i, j, k)`` order.
    """
    affine = _check_affine(affine)
    spacing = voxel_sizes(affine)
    direction = LPS_TO_RAS @ (affine[:3, :3] / spacing)
    return tuple(LPS_TO_RAS @ affine[:3, 3]), tuple(spacing), direction


def affine_from_itk(origin, spacing, direction):
    """Inverse of `itk_from_affine`: the RAS affine of an ITK/ANTs image."""
    affine = np.eye(4)
    affine[:3, :3] = LPS_TO_RAS @ np.asarray(direction, dtype=float).reshape(3, 3) * np.asarray(spacing, dtype=float)
    affine[:3, 3] = LPS_TO_RAS @ np.asarray(origin, dtype=float)
    return _check_affine(affine, "ITK image geometry")


GRID_TOLERANCE_MM = 1e-3
"""Two affines describe the same grid when no entry differs by more than this (NIfTI stores them as float32)."""


def same_grid(shape_a, affine_a, shape_b, affine_b):
    """Whether two images share a voxel grid: the same spatial shape and affines equal to `GRID_TOLERANCE_MM`.

    >>> same_grid((4, 4, 4), np.eye(4), (4, 4, 4, 7), np.eye(4) + 1e-5)
    True
    """
    return tuple(shape_a[:3]) == tuple(shape_b[:3]) and np.allclose(affine_a, affine_b, atol=GRID_TOLERANCE_MM)


def resample(image, affine, shape, target_affine, *, order):
    """An image on another grid through physical space (0 outside the source): ``order`` 0 (nearest neighbour,
    for labels: int32 out) or 1 (linear).

    >>> labels = np.arange(8).reshape(2, 2, 2)
    >>> shifted = np.eye(4); shifted[0, 3] = 1.0
    >>> resample(labels, np.eye(4), (2, 2, 2), shifted, order=0)[:, 0, 0].tolist()
    [4, 0]
    """
    from scipy import ndimage

    image = np.asarray(image).astype(np.int32 if order == 0 else np.float32)
    if image.shape == tuple(shape) and np.allclose(affine, target_affine, atol=GRID_TOLERANCE_MM):
        return image
    voxel_to_voxel = np.linalg.solve(np.asarray(affine, float), np.asarray(target_affine, float))
    return ndimage.affine_transform(
        image, voxel_to_voxel[:3, :3], voxel_to_voxel[:3, 3], output_shape=tuple(shape), order=order
    )


def coarsened(image, affine, voxel_mm):
    """`image` resampled linearly to isotropic `voxel_mm` voxels over the same field of view, with its affine; as
    it is if no voxel is smaller than that.

    >>> image, affine = coarsened(np.ones((10, 10, 10)), np.eye(4), 2.0)
    >>> image.shape, float(affine[0, 0]), float(affine[0, 3])
    ((5, 5, 5), 2.0, 0.5)
    """
    factor = voxel_mm / voxel_sizes(affine)
    if np.all(factor <= 1):
        return np.asarray(image, np.float32), np.asarray(affine, float)
    coarse = np.array(affine, float)
    coarse[:3, :3] = affine[:3, :3] * factor
    coarse[:3, 3] = affine[:3, :3] @ ((factor - 1) / 2) + affine[:3, 3]
    shape = tuple(int(n) for n in np.ceil(np.array(np.shape(image)) / factor))
    return resample(image, affine, shape, coarse, order=1), coarse


def grid_difference(shape_a, affine_a, shape_b, affine_b):
    """How the first grid differs from the second, in words, for messages.

    >>> shifted = np.eye(4); shifted[:3, 3] = [0, 2.5, 0]
    >>> grid_difference((48, 58, 42), shifted, (48, 58, 42), np.eye(4))
    'same shape (48, 58, 42); origin shifted by (0, 2.5, 0) mm'
    """
    shape_a, shape_b = tuple(int(n) for n in shape_a[:3]), tuple(int(n) for n in shape_b[:3])
    parts = [f"same shape {shape_a}" if shape_a == shape_b else f"shape {shape_a} against {shape_b}"]
    affine_a, affine_b = np.asarray(affine_a, dtype=float), np.asarray(affine_b, dtype=float)
    sizes_a, sizes_b = voxel_sizes(affine_a), voxel_sizes(affine_b)
    if not np.allclose(sizes_a, sizes_b, atol=GRID_TOLERANCE_MM):
        parts.append(f"voxel size {_mm(sizes_a)} against {_mm(sizes_b)} mm")
    axes_a, axes_b = affine_a[:3, :3] / sizes_a, affine_b[:3, :3] / sizes_b
    cosine = np.clip(np.sum(axes_a * axes_b, axis=0), -1.0, 1.0)
    angle = float(np.degrees(np.arccos(cosine)).max())
    if angle > 0.01:
        parts.append(f"axes turned by up to {angle:.3g} degrees")
    shift = affine_a[:3, 3] - affine_b[:3, 3]
    if not np.allclose(shift, 0.0, atol=GRID_TOLERANCE_MM):
        parts.append(f"origin shifted by {_mm(shift)} mm")
    return "; ".join(parts)


def require_grid(what, grid, grids):
    """Refuse an image whose grid ``(shape, affine)`` is none of `grids` (name → (shape, affine)), saying what
    differs from each; `what` names the image ("mask F").

    >>> require_grid("mask m.nii", ((2, 2, 2), np.eye(4)), {"DWI": ((3, 2, 2), np.eye(4))})
    Traceback (most recent call last):
    ...
    ALSQuantLib.errors.InputError: mask m.nii: not on the DWI's grid (shape (2, 2, 2) against (3, 2, 2))
    """
    if any(same_grid(*grid, *other) for other in grids.values()):
        return
    if len(grids) == 1:
        ((name, other),) = grids.items()
        raise InputError(f"{what}: not on the {name}'s grid ({grid_difference(*grid, *other)})")
    names = list(grids)
    differences = "; ".join(f"against the {n}'s: {grid_difference(*grid, *grids[n])}" for n in names)
    alternatives = " nor ".join(f"the {n}'s" for n in names)
    raise InputError(f"{what}: on neither {alternatives} grid ({differences})")


def _mm(values):
    return "(" + ", ".join(f"{v:.3g}" for v in values) + ")"


@functools.lru_cache(maxsize=16)
def sphere_directions(n_directions, seed=1234):
    """`n_directions` unit vectors spread over a hemisphere by electrostatic repulsion (DIPY), fixed by `seed`.

    The result is cached and read-only.
    """
    from dipy.core.sphere import HemiSphere, disperse_charges

    rng = np.random.default_rng(seed)
    theta = np.arccos(rng.uniform(0.0, 1.0, n_directions))
    phi = rng.uniform(0.0, 2 * np.pi, n_directions)
    hemisphere, _ = disperse_charges(HemiSphere(theta=theta, phi=phi), 5000)
    vertices = hemisphere.vertices.copy()
    vertices.setflags(write=False)
    return vertices
