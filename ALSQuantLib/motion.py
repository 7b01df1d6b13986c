"""Head motion and eddy currents between the volumes of a DWI: each volume registered to the mean b = 0 image,
resampled onto it, and its gradient turned with the head.

A head turned by R between volumes meets that volume's gradient g as Rᵀ g; once the volume is brought back onto the
reference, Rᵀ g is its gradient (Leemans & Jones 2009). Registration is ANTs' rigid one (antspyx, Mattes mutual
information sampled in the head: a diffusion-weighted volume's contrast is not the b = 0 image's) on a copy with
in-plane voxels merged to about `REGISTRATION_MM`; resampling is by cubic splines on the DWI's own grid.

Eddy currents (optional, `correct(eddy_currents=True)`) distort each diffusion-weighted volume along the
phase-encoding axis: scaling, shears and a shift, in proportion to the gradient (b/b_max · M g, one 3×3 matrix M for
the scan, as FSL eddy's linear second-level model). They are found after the rigid registration, with each volume's
rigid pose, by Gauss-Newton on the squared difference between the volume and its shell's mean, in the voxels where
diffusion is nearly isotropic (FA below `EDDY_ISOTROPIC_FA`: grey matter, CSF and the brain's edge), where that mean
is what every volume of the shell should show (`_eddy_currents`). A model's prediction over the whole brain (as
FSL eddy's) was measured not to work with the study's 20 directions on a hemisphere: fitted to the distorted
volumes, it reproduces most of their distortion.

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
EDDY_ISOTROPIC_FA = 0.2
"""Eddy currents are measured in the voxels whose FA (a tensor fitted to the lowest shell) lies below it."""
EDDY_MARGIN_MM = 3.0
"""How far around the b = 0 image's brain eddy currents are measured (the brain's edge shows them best)."""
EDDY_ITERATIONS = 6
"""Gauss-Newton steps. On two real-anatomy subjects the corners' median error fell to 0.26-0.32 mm by the fifth to
eighth and then crept up by about 0.01 mm a step (`benchmarks/bench_motion.py --eddy`)."""
EDDY_SAMPLES = 20000
"""Voxels (at most) in which eddy currents are measured."""
EDDY_DAMPING = 0.3
"""Levenberg-Marquardt damping of the eddy-current steps, relative to the normal equations' diagonal: without it
the worst volume's poses swung by up to 0.7 mm between iterations on real-anatomy subjects."""
MIN_FIELD_OF_VIEW_MM = 80.0
"""A DWI is registered only when its field of view spans at least this along each voxel axis.

Measured on a real-anatomy subject on the study's grid with motion (up to 3° and 2 mm), cropped about the brain's
centre (corners of a brain-sized box against the true poses, median / largest): 40 mm cube 24 / 101 mm, 60 mm cube
1.3 / 73 mm, 80 mm cube 0.58 / 1.9 mm, 100 mm 0.40 / 1.1 mm, the whole field 0.27 / 0.65 mm; the whole plane with
only 40 mm of slices 1.05 / 4.4 mm, 60 mm 0.63 / 1.4 mm. On real crops (MRtrix's 37 mm test DWI) the registration
turned diffusion-weighted volumes by up to 60°."""
SHELL_TOLERANCE = 100.0
"""Volumes whose b-values lie within it (s/mm²) form one shell, whose mean each of them is registered to."""
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
    wide by 6 % more in FA), times the pose's Jacobian (an image stretched by eddy currents spread its signal over
    more voxels; 1 for a rigid pose)."""
    to_volume = np.linalg.inv(affine) @ pose @ affine
    coefficients = ndimage.spline_filter(volume, order=3)
    points = np.nonzero(where)
    inside = to_volume[:3, :3] @ np.array(points, dtype=float) + to_volume[:3, 3:4]
    out = np.array(volume, dtype=np.float32)
    resampled = ndimage.map_coordinates(coefficients, inside, order=3, prefilter=False)
    out[points] = np.maximum(resampled, 0.0) * abs(np.linalg.det(pose[:3, :3]))
    return out


def phase_axis_of(direction):
    """The voxel axis (0, 1, 2) of a BIDS ``PhaseEncodingDirection`` (``i``, ``j``, ``k``, the sign ignored: eddy
    currents are modelled either way); ``j`` when None.

    >>> phase_axis_of("j-"), phase_axis_of("i"), phase_axis_of(None)
    (1, 0, 1)
    """
    if direction is None:
        return 1
    axis = str(direction).strip().rstrip("-")
    if axis not in ("i", "j", "k"):
        raise InputError(f"PhaseEncodingDirection {direction!r}: expected i, j or k, optionally followed by -")
    return "ijk".index(axis)


def phase_direction(affine, phase_axis):
    """The world (RAS) unit vector of voxel axis `phase_axis` (0, 1, 2: BIDS i, j, k), along which eddy currents
    displace."""
    direction = np.asarray(affine, float)[:3, phase_axis]
    return direction / np.linalg.norm(direction)


def rotation_of(pose, phase):
    """The head's rotation within a volume's transform `pose` (world 4×4), which may hold an eddy-current distortion
    along `phase` (a world unit vector) after it: A = (I + p eᵀ) R leaves every direction q ⊥ p as R does
    (qᵀA = qᵀR), so R is found from the two rows of A across p (made orthonormal), whatever the distortion. For a
    rigid pose, its own rotation.

    >>> turn = np.array([[0.0, -1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    >>> eddy = np.eye(4); eddy[1, :3] += [0.02, -0.01, 0.03]  # phase axis y: scaling and shears along it
    >>> bool(np.allclose(rotation_of(eddy @ turn, [0, 1, 0]), turn[:3, :3]))
    True
    """
    p = np.asarray(phase, float) / np.linalg.norm(phase)
    q1 = np.cross(p, [1.0, 0, 0] if abs(p[0]) < 0.9 else [0, 1.0, 0])
    q1 /= np.linalg.norm(q1)
    q2 = np.cross(p, q1)  # (q1, q2, p) right-handed
    u, _, vt = np.linalg.svd(np.array([q1, q2]) @ pose[:3, :3], full_matrices=False)
    r1, r2 = u @ vt
    return np.array([q1, q2, p]).T @ np.array([r1, r2, np.cross(r1, r2)])


def _turn(omega, shift, centre):
    """The rigid transform (world 4×4) turning by the rotation vector `omega` about `centre`, then shifting."""
    from scipy.spatial.transform import Rotation

    out = np.eye(4)
    out[:3, :3] = Rotation.from_rotvec(omega).as_matrix()
    out[:3, 3] = centre - out[:3, :3] @ centre + shift
    return out


def eddy_affine(e, phase, centre):
    """An eddy-current distortion (world 4×4): every point x displaced along `phase` by e·(x − centre)."""
    out = np.eye(4)
    out[:3, :3] += np.outer(phase, e)
    out[:3, 3] = -phase * (e @ centre)
    return out


def _lowest_shell_fa(log_signal, bvals, bvecs, b0):
    """FA of a tensor fitted (least squares on the log-signal) to the b = 0 volumes and the lowest shell, for each row
    of `log_signal` (voxels × volumes)."""
    lowest = bvals[~b0].min()
    used = b0 | (np.abs(bvals - lowest) <= SHELL_TOLERANCE)
    g = bvecs[used]
    quadratic = np.stack(
        [g[:, 0] ** 2, g[:, 1] ** 2, g[:, 2] ** 2, 2 * g[:, 0] * g[:, 1], 2 * g[:, 0] * g[:, 2], 2 * g[:, 1] * g[:, 2]],
        axis=1,
    )
    design = np.hstack([np.ones((used.sum(), 1)), -bvals[used, None] * quadratic])
    x = log_signal[:, used] @ np.linalg.pinv(design).T
    tensor = np.zeros((len(x), 3, 3))
    for k, (i, j) in enumerate([(0, 0), (1, 1), (2, 2), (0, 1), (0, 2), (1, 2)]):
        tensor[:, i, j] = tensor[:, j, i] = x[:, 1 + k]
    evals = np.linalg.eigvalsh(tensor)
    deviation = ((evals - evals.mean(axis=1, keepdims=True)) ** 2).sum(axis=1)
    return np.sqrt(1.5 * deviation / np.maximum((evals**2).sum(axis=1), 1e-30))


def _eddy_currents(volumes, affine, bvals, bvecs, poses, b0, phase, region):
    """Eddy currents and rigid poses of the diffusion-weighted volumes, refined from the rigid `poses` (see the module's
    docstring).

    Parameters
    ----------
    volumes : list of ndarray
        The volumes on one grid (`affine`), as acquired.
    poses : ndarray (n, 4, 4)
        Rigid poses, reference → volume, world mm.
    b0 : ndarray of bool
        The b = 0 volumes (left as they are).
    phase : ndarray (3,)
        World direction of the phase-encoding axis.
    region : ndarray of bool
        The voxels in which the currents may be measured (the brain and its edge).

    Returns
    -------
    poses : ndarray (n, 4, 4)
        reference → volume: the eddy-current distortion after the head's pose; a volume's distortion displaces
        x by e·(x − centre) along `phase`, e = b/b_max · M g, with one M for the scan.
    """
    world = np.argwhere(region) @ affine[:3, :3].T + affine[:3, 3]
    to_voxel = np.linalg.inv(affine)
    to_world_gradient = np.linalg.inv(affine[:3, :3]).T
    weighted = np.flatnonzero(~b0)
    coefficients = [ndimage.spline_filter(np.asarray(volume, float), order=3) for volume in volumes]
    gradients = {n: np.stack(np.gradient(np.asarray(volumes[n], np.float32)), axis=-1) for n in weighted}
    scale = bvals / bvals.max()
    poses = np.array(poses, dtype=float)

    def sample(n, pose, gradient=False):
        voxel = ((world @ pose[:3, :3].T + pose[:3, 3]) @ to_voxel[:3, :3].T + to_voxel[:3, 3]).T
        value = ndimage.map_coordinates(coefficients[n], voxel, order=3, prefilter=False, mode="nearest")
        if not gradient:
            return value
        along = [ndimage.map_coordinates(gradients[n][..., k], voxel, order=1, mode="nearest") for k in range(3)]
        return value, np.stack(along, axis=-1) @ to_world_gradient.T

    # The voxels where diffusion is nearly isotropic, judged once on the rigidly aligned volumes.
    aligned = np.array([sample(n, poses[n]) for n in range(len(bvals))]).T
    positive = np.all(aligned > 0, axis=1)
    fa = np.full(len(world), np.inf)
    fa[positive] = _lowest_shell_fa(np.log(aligned[positive]), bvals, bvecs, b0)
    keep = np.flatnonzero(fa < EDDY_ISOTROPIC_FA)
    if keep.size < 1000:
        raise InputError(
            f"eddy-current correction: only {keep.size} voxels of nearly isotropic diffusion (FA < "
            f"{EDDY_ISOTROPIC_FA:g}) in and around the brain; expected at least 1000 (too few slices, or too little "
            "of the brain in view?)"
        )
    world = world[np.random.default_rng(0).permutation(keep)[:EDDY_SAMPLES]]
    centre = world.mean(axis=0)
    same_shell = np.abs(bvals[weighted, None] - bvals[None, weighted]) <= SHELL_TOLERANCE
    same_shell = same_shell / same_shell.sum(axis=1, keepdims=True)
    matrix = np.zeros((3, 3))
    for _ in range(EDDY_ITERATIONS):
        samples = []
        for n in weighted:
            distortion = eddy_affine(scale[n] * matrix @ bvecs[n], phase, centre)
            samples.append((distortion, np.linalg.det(distortion[:3, :3])) + sample(n, distortion @ poses[n], True))
        corrected = np.array([jacobian * value for _, jacobian, value, _ in samples]).T
        # What each volume should show in these voxels: its shell's (geometric) mean.
        predicted = np.exp(np.log(np.maximum(corrected, 1e-6)) @ same_shell.T)
        # One Gauss-Newton step for every volume's rigid pose (6) and the scan's M (9), the poses eliminated first.
        schur, right, blocks = np.zeros((9, 9)), np.zeros(9), []
        for k, (n, (distortion, jacobian, value, gradient)) in enumerate(zip(weighted, samples)):
            residual = corrected[:, k] - predicted[:, k]
            moved = world @ poses[n][:3, :3].T + poses[n][:3, 3] - centre  # the head's pose, before the distortion
            through = gradient @ distortion[:3, :3]
            rigid = jacobian * np.hstack([np.cross(moved, through), through])
            d_e = jacobian * (gradient @ phase)[:, None] * moved + value[:, None] * phase
            d_matrix = (scale[n] * d_e[:, :, None] * bvecs[n][None, None, :]).reshape(len(world), 9)
            a_rr = rigid.T @ rigid
            a_rr += EDDY_DAMPING * np.diag(np.diag(a_rr))
            a_rm, inverse = rigid.T @ d_matrix, np.linalg.inv(a_rr)
            b_r, b_m = -rigid.T @ residual, -d_matrix.T @ residual
            schur += d_matrix.T @ d_matrix - a_rm.T @ inverse @ a_rm
            right += b_m - a_rm.T @ inverse @ b_r
            blocks.append((n, inverse, a_rm, b_r))
        schur += EDDY_DAMPING * np.diag(np.diag(schur))
        step = np.linalg.solve(schur, right)
        for n, inverse, a_rm, b_r in blocks:
            d = inverse @ (b_r - a_rm @ step)
            poses[n] = _turn(d[:3], d[3:], centre) @ poses[n]
        matrix = matrix + step.reshape(3, 3)
    for n in weighted:
        poses[n] = eddy_affine(scale[n] * matrix @ bvecs[n], phase, centre) @ poses[n]
    return poses


def too_small_to_register(shape, affine):
    """Why a DWI of `shape` on `affine` is too small for `correct` (`MIN_FIELD_OF_VIEW_MM`), or None.

    >>> too_small_to_register((15, 15, 11), np.diag([2.5, 2.5, 2.5, 1.0]))
    'the field of view is 37.5 x 37.5 x 27.5 mm; registration needs at least 80 mm along each axis'
    >>> too_small_to_register((128, 128, 40), np.diag([2.0, 2.0, 3.0, 1.0])) is None
    True
    """
    extent = np.array(shape[:3]) * geometry.voxel_sizes(affine)
    if np.all(extent >= MIN_FIELD_OF_VIEW_MM):
        return None
    return (
        f"the field of view is {' x '.join(f'{e:g}' for e in np.round(extent, 1))} mm; registration needs at "
        f"least {MIN_FIELD_OF_VIEW_MM:g} mm along each axis"
    )


def correct(data, affine, bvals, bvecs, *, b0_threshold, eddy_currents=False, phase_axis=1, progress=None):
    """Register every volume to the mean b = 0 image and resample it there.

    The b = 0 volumes are aligned to the first and averaged: that mean is the reference (as in DIPY's
    ``motion_correction``). With `eddy_currents`, the diffusion-weighted volumes' distortions along the
    phase-encoding axis are found too (`_eddy_currents`) and undone with the motion.

    Parameters
    ----------
    data : ndarray (i, j, k, n)
    affine : ndarray (4, 4), voxel → RAS
    bvals : ndarray (n,), s/mm²
    bvecs : ndarray (n, 3), RAS
    b0_threshold : float
        b-values at or below it are b = 0 volumes.
    eddy_currents : bool
    phase_axis : {0, 1, 2}
        The voxel axis along which the phase was encoded (BIDS i, j, k).
    progress : callable(fraction, message), optional

    Returns
    -------
    data : ndarray, float32, the volumes on the reference
    bvecs : ndarray (n, 3), RAS, turned with the head
    poses : ndarray (n, 4, 4)
        Each volume's transform, world mm, from the reference to the volume: the head's rigid pose, then the
        eddy-current distortion when corrected (`rotation_of` finds the head's rotation in it).
    """
    from .registration import register, rigid_pose

    data = np.asarray(data, dtype=np.float32)
    too_small = too_small_to_register(data.shape, affine)
    if too_small:
        raise InputError(f"motion correction: {too_small}")
    bvals, bvecs = np.asarray(bvals, dtype=float), np.asarray(bvecs, dtype=float)
    b0 = np.flatnonzero(bvals <= b0_threshold)
    if b0.size == 0:
        raise InputError(f"motion correction: no b = 0 volume (b ≤ {b0_threshold:g} s/mm²) to register to")
    shape = data.shape[:3]
    small_shape, small_affine = coarse_grid(shape, affine)

    def coarse(volume):
        return geometry.resample(volume, affine, small_shape, small_affine, order=1)

    def pose(copy, reference, head):
        registration = register(
            copy,
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

    if phase_axis not in (0, 1, 2):
        raise InputError(f"phase-encoding axis {phase_axis!r}: expected 0, 1 or 2 (BIDS i, j, k)")
    copies = [coarse(data[..., n]) for n in range(data.shape[3])]
    poses = np.tile(np.eye(4), (data.shape[3], 1, 1))
    corrected = data.copy()
    distance = _distance_from_brain(copies[b0[0]], small_affine)
    # The metric is sampled only in the head: against the whole field of view, a third less time for the same
    # accuracy on real-anatomy subjects (`benchmarks/bench_motion.py`).
    head = distance <= HEAD_MARGIN_MM
    where = geometry.resample(distance <= RESAMPLED_MARGIN_MM, small_affine, shape, affine, order=0) > 0
    for n in b0[1:]:
        poses[n] = pose(copies[n], copies[b0[0]], head)
        corrected[..., n] = _resampled(data[..., n], affine, poses[n], where)
    reference = coarse(corrected[..., b0].mean(axis=-1))
    others = [n for n in range(data.shape[3]) if n not in set(b0.tolist())]
    for count, n in enumerate(others):
        if progress:
            progress(count / max(len(others), 1), f"motion correction: volume {count + 1} of {len(others)}")
        poses[n] = pose(copies[n], reference, head)
    phase = phase_direction(affine, phase_axis)
    if eddy_currents and others:
        if progress:
            progress(1.0, "eddy currents")
        is_b0 = bvals <= b0_threshold
        poses = _eddy_currents(copies, small_affine, bvals, bvecs, poses, is_b0, phase, distance <= EDDY_MARGIN_MM)
    del copies

    def resample(n):
        corrected[..., n] = _resampled(data[..., n], affine, poses[n], where)

    if progress:
        progress(1.0, "motion correction: resampling")
    # Two threads: SciPy's resampling lets go of Python's lock (antspyx's registration does not, so the two do not
    # overlap).
    with ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(resample, others))
    turned = np.array([rotation_of(p, phase).T @ g for p, g in zip(poses, bvecs)])
    return corrected, turned, poses


def parameters(poses, centre, phase=None):
    """Per volume: the head's rotation about x, y, z (degrees; R = Rz Ry Rx) and the displacement of `centre` (mm);
    with `phase` (the world phase-encoding direction of eddy-current distortions), also the distortion e (%: how far
    along `phase` a point moves per distance along x, y, z)."""
    from scipy.spatial.transform import Rotation

    rows = []
    for pose in poses:
        rotation = rotation_of(pose, [0.0, 0.0, 1.0] if phase is None else phase)
        row = [
            Rotation.from_matrix(rotation).as_euler("xyz", degrees=True),
            pose[:3, :3] @ centre + pose[:3, 3] - centre,
        ]
        if phase is not None:
            row.append(100.0 * (pose[:3, :3] @ rotation.T - np.eye(3)).T @ phase)
        rows.append(np.concatenate(row))
    return np.array(rows)


MOTION_COLUMNS = ("volume", "bval", "rot_x_deg", "rot_y_deg", "rot_z_deg", "shift_x_mm", "shift_y_mm", "shift_z_mm")
EDDY_COLUMNS = ("eddy_x_pct", "eddy_y_pct", "eddy_z_pct")


def write_table(path, poses, bvals, affine, shape, phase=None):
    """Write `path` (tab-separated, one row per volume: `MOTION_COLUMNS`, the shift being that of the field of view's
    centre, then `EDDY_COLUMNS` when `phase` is given) and return the table's numbers (`parameters`)."""
    centre = affine[:3, :3] @ ((np.array(shape) - 1) / 2.0) + affine[:3, 3]
    table = parameters(poses, centre, phase)
    lines = ["\t".join(MOTION_COLUMNS + (EDDY_COLUMNS if phase is not None else ()))]
    for n, (row, b) in enumerate(zip(table, bvals)):
        lines.append("\t".join([str(n), f"{b:g}"] + [f"{v:.4f}" for v in row]))
    io.write_text(path, "\n".join(lines) + "\n")
    return table
