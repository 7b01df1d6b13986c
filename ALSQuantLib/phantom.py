"""A digital brain phantom and an ALS cohort simulator, deterministic from a seed.

The anatomy is defined analytically in template millimetres (RAS), so it can be rendered on any grid:

* an ellipsoidal brain with a cortical ribbon, a CSF shell, an interhemispheric fissure and ventricles;
* white matter; left and right deep grey matter (pallidum-like, high susceptibility);
* left and right corticospinal tracts (CST): tubes along Bézier curves from the brainstem through the internal
  capsule to the motor cortex, with the fibre direction along the curve;
* left and right primary motor cortex (M1): the precentral part of the cortical ribbon;
* a vein (superior sagittal sinus, strongly paramagnetic) and, outside the brain, air cavities that make a
  background field (no skull, no scalp, no air around the head: `ALSQuantLib.anatomy` has them).

Each subject is the template under a random affine pose and a smooth random displacement (so that atlas
registration has real work to do). Ground-truth MK, FA, MD and susceptibility come from tissue values, with the
CST's MK, MD, FA and M1's susceptibility drawn from the study's group distributions (ALS: lower CST MK, higher CST
MD, unchanged FA, higher M1 susceptibility).

Diffusion signals follow the DKI signal equation exactly: diffusion tensor with eigenvalues set by FA and MD
around the local fibre direction, and a kurtosis tensor ``W = c · W_iso`` scaled so that the mean kurtosis (the
sphere average of the apparent kurtosis, as DIPY's analytical ``mean_kurtosis``) equals the target MK. GRE phase
comes from the susceptibility through the dipole forward model (`ALSQuantLib.dipole`), with complex Gaussian noise
(Rician magnitude) and wrapping.

Susceptibility is in ppm relative to CSF.
"""

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from . import __version__, dipole, geometry, io
from .errors import InputError

# ----------------------------------------------------------------------------------------------------------------
# Labels and tissue properties
# ----------------------------------------------------------------------------------------------------------------
BACKGROUND, CSF, GM, WM, CST_LEFT, CST_RIGHT, M1_LEFT, M1_RIGHT, DEEP_GM_LEFT, DEEP_GM_RIGHT, VEIN = range(11)

LABELS = {
    BACKGROUND: ("Background", (0, 0, 0)),
    CSF: ("CSF", (85, 170, 255)),
    GM: ("Cortical_grey_matter", (200, 200, 200)),
    WM: ("White_matter", (245, 245, 245)),
    CST_LEFT: ("CST_left", (0, 128, 255)),
    CST_RIGHT: ("CST_right", (255, 128, 0)),
    M1_LEFT: ("M1_left", (40, 200, 80)),
    M1_RIGHT: ("M1_right", (230, 60, 60)),
    DEEP_GM_LEFT: ("Deep_grey_matter_left", (160, 100, 200)),
    DEEP_GM_RIGHT: ("Deep_grey_matter_right", (200, 100, 160)),
    VEIN: ("Vein", (120, 0, 0)),
}
"""Label value → (name, RGB)."""

REGIONS = {"CST": (CST_LEFT, CST_RIGHT), "M1": (M1_LEFT, M1_RIGHT)}
"""The study's regions as phantom labels."""

#                    MK     FA     MD (mm²/s)  S0(b0)  χ (ppm)  M0(GRE)  R2* (1/s)  T1w
_TISSUE = {
    CSF: (0.00, 0.00, 3.00e-3, 3.0, 0.00, 1.00, 2.0, 0.15),
    GM: (0.80, 0.15, 0.85e-3, 1.3, 0.02, 0.85, 15.0, 0.55),
    WM: (1.00, 0.45, 0.75e-3, 1.0, -0.03, 0.70, 20.0, 0.85),
    CST_LEFT: (1.09, 0.60, 0.80e-3, 1.0, -0.03, 0.70, 22.0, 0.85),
    CST_RIGHT: (1.09, 0.60, 0.80e-3, 1.0, -0.03, 0.70, 22.0, 0.85),
    M1_LEFT: (0.80, 0.15, 0.85e-3, 1.3, 0.14, 0.85, 18.0, 0.55),
    M1_RIGHT: (0.80, 0.15, 0.85e-3, 1.3, 0.14, 0.85, 18.0, 0.55),
    DEEP_GM_LEFT: (0.90, 0.20, 0.72e-3, 1.1, 0.15, 0.80, 30.0, 0.65),
    DEEP_GM_RIGHT: (0.90, 0.20, 0.72e-3, 1.1, 0.15, 0.80, 30.0, 0.65),
    VEIN: (0.50, 0.10, 1.50e-3, 0.8, 0.45, 0.80, 40.0, 0.30),
}
_PROPERTIES = ("mk", "fa", "md", "s0", "chi", "m0", "r2star", "t1w")

AIR_SUSCEPTIBILITY_PPM = 9.4
"""Air relative to tissue (water −9.05 ppm, air +0.36 ppm)."""

NO_HEAD, AIR, BONE, SCALP = range(4)
"""What lies outside the brain (`AnalyticAnatomy.outside_brain`): nothing that matters (no signal, the tissue's
susceptibility), air, the skull, the scalp."""

#                 χ (ppm, relative to tissue)  M0(GRE)  R2* (1/s)
_HEAD = {
    AIR: (AIR_SUSCEPTIBILITY_PPM, 0.0, 0.0),
    BONE: (-2.0, 0.0, 0.0),  # cortical bone, about -2 ppm (Buch et al. 2015); no signal at TE 15 ms
    SCALP: (0.0, 0.9, 30.0),  # skin, fat and muscle, taken as water; bright in a GRE magnitude
}

GROUPS = ("control", "ALS")

# (mean, SD, low, high) of the subject-level value, truncated to [low, high]: the study's ranges, with ALS lower
# CST MK, higher CST MD, equal FA and higher M1 susceptibility.
GROUP_DISTRIBUTIONS = {
    "control": {
        "cst_mk": (1.09, 0.030, 1.02, 1.14),
        "cst_md": (0.805e-3, 0.018e-3, 0.77e-3, 0.84e-3),
        "cst_fa": (0.60, 0.025, 0.52, 0.68),
        "m1_chi": (0.14, 0.060, 0.008, 0.26),
    },
    "ALS": {
        "cst_mk": (1.04, 0.035, 0.92, 1.08),
        "cst_md": (0.830e-3, 0.025e-3, 0.78e-3, 0.88e-3),
        "cst_fa": (0.60, 0.025, 0.52, 0.68),
        "m1_chi": (0.23, 0.060, 0.15, 0.40),
    },
}


# ----------------------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PhantomConfig:
    """Grids and acquisition of a simulation. `small` (the default) keeps tests to seconds; `study` is the paper's.

    Attributes
    ----------
    dwi_shape, dwi_voxel_size : DWI grid (voxels, mm)
    gre_shape, gre_voxel_size : GRE grid
    dwi_center, gre_center : RAS centre of the DWI's and the GRE's field of view, mm
    template_shape, template_voxel_size : template (atlas) grid
    bvalues : non-zero shells, s/mm²
    n_directions : directions per shell
    n_b0 : b = 0 volumes
    snr_dwi : mean white-matter b0 signal / noise SD
    snr_gre : white-matter magnitude at the first echo / noise SD
    echo_times : seconds
    field_strength : tesla
    gre_tilt_deg : obliquity of the GRE slices (rotation about the i axis), degrees; B0 stays along scanner z
    deformation_mm : RMS of the smooth random displacement
    gre_receive_bias : strength of a smooth receive-coil intensity profile over the GRE magnitude (`receive_profile`;
        0: none, 0.6: the head's edge about 1.8× as bright as its centre, as with a multi-channel head coil)
    dwi_motion_deg, dwi_motion_mm : head motion between DWI volumes (`head_motion`): each volume but the first
        rotated about each axis by up to this many degrees and shifted along each by up to this many mm (0: none)
    dwi_eddy_fraction, dwi_eddy_mm : eddy-current distortions of the diffusion-weighted volumes (`eddy_distortions`):
        scaling and shear along the phase-encoding axis (the DWI's j axis) of up to this fraction, and shifts along it
        of up to this many mm, at the largest b-value (0: none)
    """

    dwi_shape: tuple = (48, 58, 42)
    dwi_voxel_size: tuple = (3.0, 3.0, 3.0)
    dwi_center: tuple = (0.0, 0.0, 0.0)
    gre_shape: tuple = (72, 88, 64)
    gre_voxel_size: tuple = (2.0, 2.0, 2.0)
    gre_center: tuple = (0.0, 0.0, 0.0)
    template_shape: tuple = (72, 88, 64)
    template_voxel_size: tuple = (2.0, 2.0, 2.0)
    bvalues: tuple = (1000.0, 2500.0)
    n_directions: int = 20
    n_b0: int = 2
    snr_dwi: float = 30.0
    snr_gre: float = 40.0
    echo_times: tuple = (0.015,)
    field_strength: float = 3.0
    gre_tilt_deg: float = 0.0
    deformation_mm: float = 2.5
    gre_receive_bias: float = 0.0
    dwi_motion_deg: float = 0.0
    dwi_motion_mm: float = 0.0
    dwi_eddy_fraction: float = 0.0
    dwi_eddy_mm: float = 0.0

    @classmethod
    def study(cls, **overrides):
        """The study's grids: DWI 256×256×28 (0.94×0.94×5 mm), GRE 512×512×50 (0.5×0.5×2 mm), 1 mm template."""
        values = dict(
            dwi_shape=(256, 256, 28),
            dwi_voxel_size=(0.9375, 0.9375, 5.0),
            gre_shape=(512, 512, 50),
            gre_voxel_size=(0.5, 0.5, 2.0),
            gre_center=(0.0, 0.0, 10.0),
            template_shape=(144, 176, 128),
            template_voxel_size=(1.0, 1.0, 1.0),
        )
        values.update(overrides)
        return cls(**values)

    def __post_init__(self):
        io.check_echo_times(self.echo_times, len(self.echo_times), "phantom")
        io.check_field_strength(self.field_strength, "phantom")
        for name in ("snr_dwi", "snr_gre"):
            if not getattr(self, name) > 0:
                raise InputError(
                    f"phantom {name}: expected a positive signal-to-noise ratio, got {getattr(self, name)}"
                )
        if not 0 <= self.gre_receive_bias <= 2:
            raise InputError(f"phantom gre_receive_bias: expected 0 to 2, got {self.gre_receive_bias}")
        if self.n_directions < 6 or self.n_b0 < 1:
            raise InputError("phantom: need at least 6 directions per shell and one b = 0 volume")


# ----------------------------------------------------------------------------------------------------------------
# Analytic anatomy (template millimetres, RAS)
# ----------------------------------------------------------------------------------------------------------------
_BRAIN_RADII = np.array([62.0, 78.0, 56.0])
_CSF_SHELL_MM = 3.0
_CORTEX_MM = 3.5
_SULCI_Y_MM = (-25.0, -5.0)  # M1 spans y = -24 to -6, between their clefts
_SULCUS_HALF_WIDTH_MM = 1.0
_SULCUS_DEPTH_MM = 12.0
_CST_RADIUS_MM = 5.0
_VEIN_RADIUS_MM = 2.5


def _bezier(control_points, n=400):
    t = np.linspace(0.0, 1.0, n)[:, None]
    p0, p1, p2, p3 = (np.asarray(p, dtype=float) for p in control_points)
    points = (1 - t) ** 3 * p0 + 3 * (1 - t) ** 2 * t * p1 + 3 * (1 - t) * t**2 * p2 + t**3 * p3
    tangents = 3 * (1 - t) ** 2 * (p1 - p0) + 6 * (1 - t) * t * (p2 - p1) + 3 * t**2 * (p3 - p2)
    return points, tangents / np.linalg.norm(tangents, axis=1, keepdims=True)


def _cst_curve(side):
    """side −1 = left (negative x in RAS), +1 = right."""
    return _bezier([(side * 7, -16, -46), (side * 14, -6, -12), (side * 22, -10, 20), (side * 32, -14, 38)])


def _vein_curve():
    y = np.linspace(-70.0, 70.0, 300)
    z = _BRAIN_RADII[2] * np.sqrt(1 - (y / _BRAIN_RADII[1]) ** 2) + 1.5
    points = np.stack([np.zeros_like(y), y, z], axis=1)
    tangents = np.gradient(points, axis=0)
    return points, tangents / np.linalg.norm(tangents, axis=1, keepdims=True)


_CURVES = {"cst_left": _cst_curve(-1), "cst_right": _cst_curve(+1), "vein": _vein_curve()}
_TREES = {name: cKDTree(points) for name, (points, _) in _CURVES.items()}


def _ellipsoid_distance(points, center, radii):
    """First-order signed distance (mm) to an ellipsoid surface; negative inside."""
    q = (points - center) / radii
    f = np.linalg.norm(q, axis=-1)
    grad = np.linalg.norm((points - center) / radii**2, axis=-1) / np.maximum(f, 1e-9)
    return (f - 1.0) / np.maximum(grad, 1e-9)


def _inside_ellipsoid(points, center, radii):
    return np.sum(((points - np.asarray(center)) / np.asarray(radii)) ** 2, axis=-1) <= 1.0


def _near_curve(points, name, radius):
    """Mask of points within `radius` mm of a curve, and the curve tangent at the nearest sample."""
    tree = _TREES[name]
    lo, hi = tree.mins - radius, tree.maxes + radius
    candidates = np.flatnonzero(np.all((points >= lo) & (points <= hi), axis=1))
    mask = np.zeros(len(points), dtype=bool)
    tangent = np.zeros((len(points), 3))
    if candidates.size:
        distance, index = tree.query(points[candidates], distance_upper_bound=radius)
        hit = np.isfinite(distance)
        mask[candidates[hit]] = True
        tangent[candidates[hit]] = _CURVES[name][1][index[hit]]
    return mask, tangent


def template_anatomy(points):
    """Labels and fibre directions of the template anatomy at template points.

    Parameters
    ----------
    points : ndarray, shape (n, 3)
        Template coordinates, mm (RAS).

    Returns
    -------
    labels : ndarray of uint8, shape (n,)
    fibre : ndarray, shape (n, 3)
        Unit fibre direction in template coordinates (left–right in white matter, along the tract in the CST).
    """
    points = np.asarray(points, dtype=float).reshape(-1, 3)
    x, y, z = points.T
    labels = np.zeros(len(points), dtype=np.uint8)
    d_brain = _ellipsoid_distance(points, np.zeros(3), _BRAIN_RADII)
    brain = d_brain < 0
    labels[d_brain < _CSF_SHELL_MM] = CSF
    labels[brain] = WM
    cortex = brain & (d_brain > -_CORTEX_MM)
    labels[cortex] = GM
    # The central sulcus behind M1 and the precentral sulcus in front of it: clefts of CSF lined with grey matter.
    # They are what a registration can align M1 by; without them the ribbon is a smooth shell.
    depth = -d_brain
    for y0 in _SULCI_Y_MM:
        gap = np.abs(y - y0)
        cleft = brain & (z > 10) & (gap < _SULCUS_HALF_WIDTH_MM + _CORTEX_MM) & (depth < _SULCUS_DEPTH_MM + _CORTEX_MM)
        labels[cleft] = GM
        labels[cleft & (gap < _SULCUS_HALF_WIDTH_MM) & (depth < _SULCUS_DEPTH_MM)] = CSF
    for side in (-1, 1):
        deep = _inside_ellipsoid(points, (side * 22, 4, -2), (6, 11, 7))
        labels[deep] = DEEP_GM_LEFT if side < 0 else DEEP_GM_RIGHT
    for side in (-1, 1):
        labels[_inside_ellipsoid(points, (side * 7, 2, 10), (4, 18, 7))] = CSF
    fissure = brain & (np.abs(x) < 1.5) & (z > 5)
    labels[fissure] = CSF

    fibre = np.zeros((len(points), 3))
    fibre[:, 0] = 1.0
    for name, value in (("cst_left", CST_LEFT), ("cst_right", CST_RIGHT)):
        near, tangent = _near_curve(points, name, _CST_RADIUS_MM)
        tract = near & np.isin(labels, (WM, DEEP_GM_LEFT, DEEP_GM_RIGHT))
        labels[tract] = value
        fibre[tract] = tangent[tract]

    motor = (labels == GM) & (y > -24) & (y < -6) & (z > 18)
    labels[motor & (x < 0)] = M1_LEFT
    labels[motor & (x > 0)] = M1_RIGHT

    vein, _ = _near_curve(points, "vein", _VEIN_RADIUS_MM)
    labels[vein] = VEIN
    return labels, fibre


def air_cavities(points):
    """Mask of air (frontal sinus and ear canals) at template points: the source of the background field."""
    points = np.asarray(points, dtype=float).reshape(-1, 3)
    sinus = _inside_ellipsoid(points, (0, 70, -45), (16, 10, 10))
    ears = _inside_ellipsoid(points, (-72, -10, -40), (8, 8, 8)) | _inside_ellipsoid(points, (72, -10, -40), (8, 8, 8))
    return sinus | ears


def outside_brain(points):
    """What lies outside the brain at template points (`NO_HEAD`, `AIR`, ...): the phantom has its air cavities and
    nothing else (no skull, no scalp, no air around the head)."""
    return np.where(air_cavities(points), AIR, NO_HEAD).astype(np.uint8)


# ----------------------------------------------------------------------------------------------------------------
# Subject pose and deformation
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Deformation:
    """Subject world (mm) → template (mm): ``y = A x + t``, then ``y += u(y)`` with a smooth random field u."""

    matrix: np.ndarray
    translation: np.ndarray
    displacement: np.ndarray  # (3, n, n, n) control-point displacements, mm
    grid_origin: float = -100.0
    grid_spacing: float = 12.5

    @classmethod
    def identity(cls):
        return cls(np.eye(3), np.zeros(3), np.zeros((3, 2, 2, 2)), grid_spacing=200.0)

    @classmethod
    def random(cls, rng, rms_mm=2.5, rotation_deg=4.0, scale_sd=0.04, translation_mm=4.0):
        angles = np.deg2rad(rng.normal(0.0, rotation_deg, 3))
        cx, cy, cz = np.cos(angles)
        sx, sy, sz = np.sin(angles)
        rot_x = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
        rot_y = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
        rot_z = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
        scale = np.diag(1.0 + np.clip(rng.normal(0.0, scale_sd, 3), -2 * scale_sd, 2 * scale_sd))
        n = 17
        field = ndimage.gaussian_filter(rng.normal(size=(3, n, n, n)), sigma=(0, 1.2, 1.2, 1.2), mode="wrap")
        rms = np.sqrt(np.mean(np.sum(field**2, axis=0)))
        field *= rms_mm / rms if rms > 0 else 0.0
        return cls(scale @ rot_z @ rot_y @ rot_x, rng.normal(0.0, translation_mm, 3), field)

    def to_template(self, points_world):
        y = np.asarray(points_world, dtype=float).reshape(-1, 3) @ self.matrix.T + self.translation
        coords = ((y - self.grid_origin) / self.grid_spacing).T
        for axis in range(3):
            y[:, axis] += ndimage.map_coordinates(self.displacement[axis], coords, order=3, mode="nearest")
        return y

    def direction_to_world(self, directions_template):
        world = np.asarray(directions_template) @ np.linalg.inv(self.matrix).T
        norms = np.linalg.norm(world, axis=1, keepdims=True)
        return np.divide(world, norms, out=np.zeros_like(world), where=norms > 0)


# ----------------------------------------------------------------------------------------------------------------
# Tissue maps
# ----------------------------------------------------------------------------------------------------------------
def _truncated_normal(rng, mean, sd, low, high):
    for _ in range(1000):
        value = rng.normal(mean, sd)
        if low <= value <= high:
            return float(value)
    return float(np.clip(mean, low, high))


def draw_subject_values(group, rng):
    """The subject-level CST MK, MD, FA and M1 susceptibility for `group` (``"ALS"`` or ``"control"``)."""
    if group not in GROUP_DISTRIBUTIONS:
        raise InputError(f"group {group!r}: expected one of {list(GROUP_DISTRIBUTIONS)}")
    return {name: _truncated_normal(rng, *params) for name, params in GROUP_DISTRIBUTIONS[group].items()}


def tissue_maps(labels, values=None):
    """Per-voxel tissue properties for a label array.

    Parameters
    ----------
    labels : ndarray of int
    values : dict, optional
        Subject values (`draw_subject_values`) overriding the CST's MK, MD, FA and M1's susceptibility.

    Returns
    -------
    dict of ndarray (float64), keys ``mk fa md s0 chi m0 r2star t1w``; background is 0 everywhere.
    """
    table = np.zeros((len(LABELS), len(_PROPERTIES)))
    for label, props in _TISSUE.items():
        table[label] = props
    if values:
        column = {name: i for i, name in enumerate(_PROPERTIES)}
        for label in REGIONS["CST"]:
            table[label, column["mk"]] = values["cst_mk"]
            table[label, column["md"]] = values["cst_md"]
            table[label, column["fa"]] = values["cst_fa"]
        for label in REGIONS["M1"]:
            table[label, column["chi"]] = values["m1_chi"]
    return {name: table[labels, i] for i, name in enumerate(_PROPERTIES)}


# ----------------------------------------------------------------------------------------------------------------
# Diffusion
# ----------------------------------------------------------------------------------------------------------------
def gradient_directions(n_directions, seed=1234):
    """`n_directions` gradient directions spread over a hemisphere (`geometry.sphere_directions`)."""
    return geometry.sphere_directions(n_directions, seed)


def acquisition_scheme(bvalues=(1000.0, 2500.0), n_directions=20, n_b0=2):
    """The study's protocol: ``n_b0`` b = 0 volumes, then each shell with the same `n_directions` directions.

    Returns
    -------
    bvals : ndarray, shape (n,), s/mm²
    bvecs : ndarray, shape (n, 3), unit (zero for b = 0)
    """
    directions = gradient_directions(n_directions)
    bvals = np.concatenate([np.zeros(n_b0)] + [np.full(n_directions, b) for b in bvalues])
    bvecs = np.concatenate([np.zeros((n_b0, 3))] + [directions for _ in bvalues])
    return bvals, bvecs


def diffusion_eigenvalues(fa, md):
    """Cylindrically symmetric eigenvalues (λ∥, λ⊥) with the given FA and MD.

    Notes
    -----
    With λ∥ = MD + 2δ and λ⊥ = MD − δ: FA = 3δ / √(3 MD² + 6 δ²), so δ = MD · FA · √(3 / (9 − 6 FA²)).
    """
    fa = np.asarray(fa, dtype=float)
    md = np.asarray(md, dtype=float)
    delta = md * fa * np.sqrt(3.0 / (9.0 - 6.0 * fa**2))
    return md + 2 * delta, md - delta


_GL_NODES, _GL_WEIGHTS = np.polynomial.legendre.leggauss(64)


def isotropic_kurtosis_scale(fa, md, mk):
    """Scale c of ``W = c · W_iso`` giving mean kurtosis `mk` with the cylindrical tensor of (`fa`, `md`).

    Notes
    -----
    For ``W = c W_iso`` the apparent kurtosis along n is ``K(n) = c MD² / ADC(n)²`` with
    ``ADC(n) = λ⊥ + (λ∥ − λ⊥)(n·e)²``. Its sphere average is ``c ∫₀¹ MD² / (λ⊥ + (λ∥ − λ⊥)u²)² du``, evaluated by
    64-point Gauss–Legendre quadrature (exact to machine precision for these smooth integrands).
    """
    lam_par, lam_perp = diffusion_eigenvalues(fa, md)
    u = 0.5 * (_GL_NODES + 1.0)
    weights = 0.5 * _GL_WEIGHTS
    lam_par = np.asarray(lam_par)[..., None]
    lam_perp = np.asarray(lam_perp)[..., None]
    md = np.asarray(md, dtype=float)[..., None]
    safe_md = np.where(md > 0, md, 1.0)
    adc = lam_perp + (lam_par - lam_perp) * u**2
    mk_unit = np.sum(weights * safe_md**2 / np.where(adc > 0, adc, 1.0) ** 2, axis=-1)
    return np.asarray(mk) / mk_unit


def dki_signal(bvals, bvecs, fa, md, mk, fibre, s0=1.0):
    """Noise-free DKI signal for cylindrically symmetric tensors and an isotropic-shaped kurtosis tensor.

    Parameters
    ----------
    bvals : ndarray, shape (m,), s/mm²
    bvecs : ndarray, shape (m, 3), unit, in the same frame as `fibre`
    fa, md, mk : ndarray, shape (n,)
        MD in mm²/s.
    fibre : ndarray, shape (n, 3)
        Unit principal direction.
    s0 : float or ndarray, shape (n,)

    Returns
    -------
    ndarray, shape (n, m)

    Notes
    -----
    ``S = S0 exp(−b gᵀDg + b² MD² W(g) / 6)`` with ``W(g) = c`` for ``W = c W_iso`` (Jensen et al. 2005).
    """
    lam_par, lam_perp = diffusion_eigenvalues(fa, md)
    c = isotropic_kurtosis_scale(fa, md, mk)
    cos2 = (np.asarray(fibre) @ np.asarray(bvecs).T) ** 2
    adc = lam_perp[:, None] + (lam_par - lam_perp)[:, None] * cos2
    b = np.asarray(bvals, dtype=float)[None, :]
    exponent = -b * adc + b**2 * (np.asarray(md) ** 2 * c)[:, None] / 6.0
    return np.asarray(s0)[..., None] * np.exp(exponent)


def _rician(signal, sigma, rng):
    noise_real = rng.normal(0.0, sigma, signal.shape).astype(np.float32)
    noise_imag = rng.normal(0.0, sigma, signal.shape).astype(np.float32)
    return np.sqrt((signal + noise_real) ** 2 + noise_imag**2)


# ----------------------------------------------------------------------------------------------------------------
# Subjects
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class SimulatedSubject:
    """One simulated subject: its images and their ground truth.

    Attributes
    ----------
    group : str
    values : dict
        Subject-level truth: ``cst_mk``, ``cst_md`` (mm²/s), ``cst_fa``, ``m1_chi`` (ppm).
    dwi : io.DWI
    gre : io.GRE
    truth_dwi : dict of ndarray
        On the DWI grid: ``label``, ``mk``, ``fa``, ``md``.
    truth_gre : dict of ndarray
        On the GRE grid: ``label``, ``chi`` (ppm, CSF = 0), ``local_field`` (ppm, from sources inside the brain),
        ``total_field`` (ppm).
    dwi_motion : ndarray, shape (volumes, 4, 4), or None
        Each DWI volume's head pose against the first's (`head_motion`), with its eddy-current distortion after it
        when simulated (`eddy_distortions`), world (RAS) mm; None without either.
    """

    group: str
    values: dict
    dwi: io.DWI
    gre: io.GRE
    truth_dwi: dict = field(default_factory=dict)
    truth_gre: dict = field(default_factory=dict)
    dwi_motion: np.ndarray = None


class AnalyticAnatomy:
    """The phantom's own template anatomy (`template_anatomy`, `outside_brain`); `ALSQuantLib.anatomy.RealAnatomy`
    has the same interface."""

    template_anatomy = staticmethod(template_anatomy)
    outside_brain = staticmethod(outside_brain)

    @staticmethod
    def fa_at(points):
        """No voxel-wise FA: white matter takes its class's."""
        return None


def render_anatomy(shape, affine, deformation, anatomy=AnalyticAnatomy):
    """Labels, world fibre directions and voxel-wise FA (None for a per-class anatomy) of a subject on a grid."""
    points = deformation.to_template(geometry.voxel_centers_world(shape, affine).reshape(-1, 3))
    labels, fibre_template = anatomy.template_anatomy(points)
    fibre = deformation.direction_to_world(fibre_template)
    fa = anatomy.fa_at(points)
    return labels.reshape(shape), fibre.reshape(tuple(shape) + (3,)), None if fa is None else fa.reshape(shape)


def simulate_dwi(labels, fibre, affine, values, config, rng, fa=None, signal=dki_signal):
    """DWI (`io.DWI`) and its truth maps for a rendered subject; `fa`, when given, replaces the per-class FA voxel by
    voxel in the tissue (white and grey matter, the CST and M1; not CSF or veins): a real anatomy's FA. `signal`
    makes the noise-free signal from each voxel's truth, with `dki_signal`'s parameters."""
    maps = tissue_maps(labels, values)
    if fa is not None:
        tissue = ~np.isin(labels, (BACKGROUND, CSF, VEIN))
        maps["fa"] = np.where(tissue, np.clip(fa, 0.05, 0.95), maps["fa"])
    bvals, bvecs = acquisition_scheme(config.bvalues, config.n_directions, config.n_b0)
    brain = labels > 0
    scale = 1000.0 / _TISSUE[WM][3]
    motion = eddy = None
    centre = affine[:3, :3] @ ((np.array(labels.shape) - 1) / 2.0) + affine[:3, 3]
    if config.dwi_motion_deg > 0 or config.dwi_motion_mm > 0:
        motion = head_motion(len(bvals), config.dwi_motion_deg, config.dwi_motion_mm, centre, rng)
    # A moved head meets each gradient turned by the inverse of its rotation: the tissue's gradient is Rᵀ g.
    tissue_bvecs = bvecs if motion is None else np.einsum("nji,nj->ni", motion[:, :3, :3], bvecs)
    if config.dwi_eddy_fraction > 0 or config.dwi_eddy_mm > 0:  # distorted in the scanner, after the head moved
        phase_axis = affine[:3, 1] / np.linalg.norm(affine[:3, 1])
        eddy = eddy_distortions(bvals, bvecs, config.dwi_eddy_fraction, config.dwi_eddy_mm, centre, phase_axis, rng)
        motion = eddy if motion is None else eddy @ motion
    signal_map = np.zeros(labels.shape + (len(bvals),), dtype=np.float32)
    signal_map[brain] = signal(
        bvals,
        tissue_bvecs,
        maps["fa"][brain],
        maps["md"][brain],
        maps["mk"][brain],
        fibre[brain],
        maps["s0"][brain] * scale,
    )
    if motion is not None:
        for n, pose in enumerate(motion):  # the image of a moved head: S(x) = S_still(pose⁻¹ x)
            to_still = np.linalg.inv(affine) @ np.linalg.inv(pose) @ affine
            moved = ndimage.affine_transform(signal_map[..., n], to_still[:3, :3], to_still[:3, 3], order=3)
            # cubic splines: the least blur a resampling adds; an image stretched by eddy currents spreads the same
            # signal over more voxels (its intensity divided by the Jacobian; 1 for a rigid motion)
            jacobian = np.linalg.det(pose[:3, :3]) if eddy is not None else 1.0
            signal_map[..., n] = np.maximum(moved, 0.0) / jacobian
    noisy = _rician(signal_map, 1000.0 / config.snr_dwi, rng)
    truth = {"label": labels.astype(np.uint8), "mk": maps["mk"], "fa": maps["fa"], "md": maps["md"]}
    return io.DWI(noisy, affine, bvals, bvecs, source="phantom"), truth, motion


def head_motion(n_volumes, max_deg, max_mm, centre, rng):
    """Rigid head poses (world 4×4, about `centre`), one per volume, the first the identity: rotations about each axis
    and shifts along each drawn uniformly within ±`max_deg` degrees and ±`max_mm` mm."""
    poses = np.tile(np.eye(4), (n_volumes, 1, 1))
    for n in range(1, n_volumes):
        angles = np.deg2rad(rng.uniform(-max_deg, max_deg, 3))
        rotation = np.eye(3)
        for axis, angle in enumerate(angles):
            c, s = np.cos(angle), np.sin(angle)
            i, j = [k for k in range(3) if k != axis]
            turn = np.eye(3)
            turn[i, i] = turn[j, j] = c
            turn[i, j], turn[j, i] = -s, s
            rotation = turn @ rotation
        poses[n, :3, :3] = rotation
        poses[n, :3, 3] = centre - rotation @ centre + rng.uniform(-max_mm, max_mm, 3)
    return poses


def eddy_distortions(bvals, bvecs, max_fraction, max_mm, centre, phase_axis, rng):
    """Eddy-current distortions (world 4×4 affines, one per volume; the identity at b = 0): the eddy currents' field,
    linear in space, displaces each point along the phase-encoding axis p by d = e·(x − centre) + t, a scaling
    (e ∥ p), shears (e ⊥ p) and a shift. The currents follow the diffusion gradient: e = (b / b_max) M g and
    t = (b / b_max) m·g, with the scanner's M (3×3) and m (3) drawn once, uniformly within ±`max_fraction` and
    ±`max_mm`. `simulate_dwi` divides the distorted image's intensities by the Jacobian."""
    eddy = rng.uniform(-max_fraction, max_fraction, (3, 3))
    shift = rng.uniform(-max_mm, max_mm, 3)
    affines = np.tile(np.eye(4), (len(bvals), 1, 1))
    for n, (b, g) in enumerate(zip(bvals, bvecs)):
        scale = b / max(bvals.max(), 1e-9)
        e, t = scale * eddy @ g, scale * shift @ g
        affines[n, :3, :3] += np.outer(phase_axis, e)
        affines[n, :3, 3] = phase_axis * (t - e @ centre)
    return affines


def receive_profile(world, strength):
    """A multi-channel head coil's receive sensitivity at RAS points `world` (mm, ..., 3): brighter towards the
    head's edge than at its centre, and towards the back, ``exp(strength · (q − 0.5 − 0.5 y / 100))`` with ``q`` the
    squared distance from the centre in units of a head-sized ellipsoid (80 × 100 × 80 mm). 1 everywhere for
    strength 0.

    >>> np.round(receive_profile(np.array([[0.0, 0.0, 0.0], [80.0, 0.0, 0.0]]), 0.6), 3)
    array([0.741, 1.35 ])
    """
    x, y, z = np.moveaxis(np.asarray(world, float), -1, 0)
    q = (x / 80.0) ** 2 + (y / 100.0) ** 2 + (z / 80.0) ** 2
    return np.exp(strength * (q - 0.5 - 0.5 * y / 100.0))


def simulate_gre(labels, head, affine, values, config, rng):
    """GRE (`io.GRE`) and its truth maps for a rendered subject, `head` what lies outside its brain (`outside_brain`:
    air and bone make the background field, the scalp gives signal); phase in radians, wrapped to [−π, π)."""
    maps = tissue_maps(labels, values)
    voxel_size = geometry.voxel_sizes(affine)
    b0 = geometry.b0_direction_voxel(affine)
    chi = maps["chi"].astype(np.float32)
    brain = labels > 0
    head = np.where(brain, NO_HEAD, head)
    local_field = dipole.forward_field(np.where(brain, chi, 0.0), voxel_size, b0)
    head_chi, head_m0, head_r2star = (
        np.select([head == code for code in _HEAD], [_HEAD[code][k] for code in _HEAD], 0.0) for k in range(3)
    )
    outside_field = dipole.forward_field(head_chi, voxel_size, b0)
    world = geometry.voxel_centers_world(labels.shape, affine)
    shim = 0.02 * world[..., 0] / 50.0 + 0.03 * world[..., 2] / 50.0  # imperfect linear shim, ppm (harmonic)
    total_field = local_field + outside_field + shim
    receiver_offset = 0.4 + 0.004 * world[..., 1]  # radians, the same at every echo
    sigma = _TISSUE[WM][5] * np.exp(-config.echo_times[0] * _TISSUE[WM][6]) / config.snr_gre
    coil = receive_profile(world, config.gre_receive_bias) if config.gre_receive_bias else 1.0
    magnitudes, phases = [], []
    for te in config.echo_times:
        amplitude = coil * np.where(
            brain, maps["m0"] * np.exp(-te * maps["r2star"]), head_m0 * np.exp(-te * head_r2star)
        )
        phase = dipole.field_ppm_to_phase(total_field, te, config.field_strength) + receiver_offset
        complex_signal = amplitude * np.exp(1j * phase)
        complex_signal += rng.normal(0.0, sigma, labels.shape) + 1j * rng.normal(0.0, sigma, labels.shape)
        magnitudes.append(np.abs(complex_signal).astype(np.float32))
        phases.append(np.angle(complex_signal).astype(np.float32))
    gre = io.GRE(
        np.stack(magnitudes, axis=-1),
        np.stack(phases, axis=-1),
        affine,
        np.asarray(config.echo_times),
        config.field_strength,
        source="phantom",
    )
    truth = {
        "label": labels.astype(np.uint8),
        "chi": chi,
        "local_field": local_field,
        "total_field": total_field.astype(np.float32),
    }
    return gre, truth


def dwi_affine(config):
    return geometry.voxel_grid_affine(config.dwi_shape, config.dwi_voxel_size, center=config.dwi_center)


def gre_affine(config):
    tilt = np.deg2rad(config.gre_tilt_deg)
    rotation = np.array([[1, 0, 0], [0, np.cos(tilt), -np.sin(tilt)], [0, np.sin(tilt), np.cos(tilt)]])
    return geometry.voxel_grid_affine(
        config.gre_shape, config.gre_voxel_size, rotation=rotation, center=config.gre_center
    )


def simulate_subject(group, seed, config=None, anatomy=AnalyticAnatomy, signal=dki_signal):
    """Simulate one subject of `group` (``"ALS"`` or ``"control"``) from `seed`.

    Parameters
    ----------
    group : str
    seed : int or numpy.random.SeedSequence
    config : PhantomConfig, optional
    anatomy : AnalyticAnatomy or anatomy.RealAnatomy
        The template anatomy the subject is made from (default: the analytic phantom's).
    signal : callable
        The DWI signal from each voxel's truth (default `dki_signal`), with its parameters.

    Returns
    -------
    SimulatedSubject

    Examples
    --------
    >>> subject = simulate_subject("ALS", seed=1)
    >>> subject.dwi.data.shape
    (48, 58, 42, 42)
    """
    config = config or PhantomConfig()
    rng = np.random.default_rng(seed)
    values = draw_subject_values(group, rng)
    deformation = Deformation.random(rng, rms_mm=config.deformation_mm)

    affine_dwi = dwi_affine(config)
    labels_dwi, fibre_dwi, fa = render_anatomy(config.dwi_shape, affine_dwi, deformation, anatomy)
    dwi, truth_dwi, dwi_motion = simulate_dwi(labels_dwi, fibre_dwi, affine_dwi, values, config, rng, fa, signal)

    affine_gre = gre_affine(config)
    labels_gre, _, _ = render_anatomy(config.gre_shape, affine_gre, deformation, anatomy)
    points = deformation.to_template(geometry.voxel_centers_world(config.gre_shape, affine_gre).reshape(-1, 3))
    head = anatomy.outside_brain(points).reshape(config.gre_shape)
    gre, truth_gre = simulate_gre(labels_gre, head, affine_gre, values, config, rng)
    return SimulatedSubject(group, values, dwi, gre, truth_dwi, truth_gre, dwi_motion)


def make_template(config=None):
    """The atlas template: T1-weighted image, FA image (control-group CST values) and labels, with their affine.

    Returns
    -------
    dict with ``t1w``, ``fa``, ``label`` arrays and ``affine``.
    """
    config = config or PhantomConfig()
    affine = geometry.voxel_grid_affine(config.template_shape, config.template_voxel_size)
    points = geometry.voxel_centers_world(config.template_shape, affine).reshape(-1, 3)
    labels, _ = template_anatomy(points)
    labels = labels.reshape(config.template_shape)
    means = {name: params[0] for name, params in GROUP_DISTRIBUTIONS["control"].items()}
    maps = tissue_maps(labels, means)
    return {"t1w": maps["t1w"], "fa": maps["fa"], "label": labels, "affine": affine}


# ----------------------------------------------------------------------------------------------------------------
# Writing a cohort
# ----------------------------------------------------------------------------------------------------------------
GENERATOR_NAME = "ALSQuant phantom"
TRUTH_DIR = Path("derivatives") / "phantom-truth"


def label_table():
    """The phantom's labels as ``[(value, name, (r, g, b)), ...]``."""
    return [(value, name, rgb) for value, (name, rgb) in LABELS.items()]


def assign_groups(n_subjects, als_fraction, rng):
    """Groups for `n_subjects` in a seeded random order, ``round(n · als_fraction)`` of them ALS."""
    if n_subjects < 1:
        raise InputError(f"subjects: expected at least 1, got {n_subjects}")
    if not 0.0 <= als_fraction <= 1.0:
        raise InputError(f"ALS fraction: expected a value from 0 to 1, got {als_fraction}")
    n_als = int(round(n_subjects * als_fraction))
    groups = np.array(["ALS"] * n_als + ["control"] * (n_subjects - n_als))
    rng.shuffle(groups)
    return groups.tolist()


def _check_output_folder(out_dir):
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        description = out_dir / "dataset_description.json"
        generated = io.read_json(description).get("GeneratedBy", [{}]) if description.is_file() else [{}]
        if not any(entry.get("Name") == GENERATOR_NAME for entry in generated):
            raise InputError(
                f"output folder {out_dir} is not empty and was not made by the phantom; choose a new folder"
            )
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir


def write_subject(out_dir, subject_id, subject, config):
    """Write one subject in the BIDS-like layout, with its truth under ``derivatives/phantom-truth``."""
    out_dir = Path(out_dir)
    dwi_dir = out_dir / subject_id / "dwi"
    anat_dir = out_dir / subject_id / "anat"
    truth_dir = out_dir / TRUTH_DIR / subject_id
    io.write_dwi(subject.dwi, dwi_dir / f"{subject_id}_dwi.nii.gz")
    io.write_json(
        dwi_dir / f"{subject_id}_dwi.json",
        {"MagneticFieldStrength": config.field_strength, "Manufacturer": GENERATOR_NAME, "PhantomSNR": config.snr_dwi},
    )
    multi_echo = len(config.echo_times) > 1
    for echo, te in enumerate(config.echo_times):
        for part, data in (("mag", subject.gre.magnitude[..., echo]), ("phase", subject.gre.phase[..., echo])):
            entity = f"_echo-{echo + 1}" if multi_echo else ""
            suffix = "MEGRE" if multi_echo else "T2starw"
            stem = anat_dir / f"{subject_id}{entity}_part-{part}_{suffix}"
            io.save_image(stem.with_suffix(".nii.gz"), data, subject.gre.affine)
            sidecar = {
                "EchoTime": te,
                "MagneticFieldStrength": config.field_strength,
                "Manufacturer": GENERATOR_NAME,
                "PhantomSNR": config.snr_gre,
            }
            if part == "phase":
                sidecar["Units"] = "rad"  # BIDS: a phase image's sidecar says "rad" or "arbitrary"
            io.write_json(stem.with_suffix(".json"), sidecar)
    for name, data in subject.truth_dwi.items():
        dtype = np.uint8 if name == "label" else np.float32
        io.save_image(truth_dir / f"{subject_id}_space-dwi_{name}.nii.gz", data, subject.dwi.affine, dtype=dtype)
    for name, data in subject.truth_gre.items():
        dtype = np.uint8 if name == "label" else np.float32
        io.save_image(truth_dir / f"{subject_id}_space-gre_{name}.nii.gz", data, subject.gre.affine, dtype=dtype)
    io.write_json(truth_dir / f"{subject_id}_truth.json", {"group": subject.group, **subject.values})


def write_template(out_dir, config):
    template = make_template(config)
    folder = Path(out_dir) / TRUTH_DIR / "template"
    io.save_image(folder / "template_T1w.nii.gz", template["t1w"], template["affine"])
    io.save_image(folder / "template_FA.nii.gz", template["fa"], template["affine"])
    io.save_image(folder / "template_label.nii.gz", template["label"], template["affine"], dtype=np.uint8)
    io.write_color_table(folder / "template_label.ctbl", label_table())
    return folder


def simulate_cohort(
    out_dir, n_subjects=10, *, seed=0, als_fraction=0.5, config=None, anatomy=AnalyticAnatomy, progress=None
):
    """Simulate a cohort and write it as a BIDS-like dataset.

    Parameters
    ----------
    out_dir : str or Path
        New or empty folder (or one the phantom wrote before, which is rewritten identically for the same seed).
    n_subjects : int
    seed : int
        Everything follows from it; subject k's data depend only on (seed, k).
    als_fraction : float
        Fraction of subjects in the ALS group.
    config : PhantomConfig, optional
    anatomy : AnalyticAnatomy or anatomy.RealAnatomy
        The template anatomy (default: the analytic phantom's, whose atlas is written to
        ``derivatives/phantom-truth/template``; a real anatomy is labelled with real atlases, so none is written).
    progress : callable(fraction, message), optional

    Returns
    -------
    list of dict
        One row per subject: ``participant_id``, ``group`` and the drawn truth values.

    Notes
    -----
    Layout::

        participants.tsv                      participant_id, group
        sub-01/dwi/sub-01_dwi.nii.gz (+ .bval .bvec .json)
        sub-01/anat/sub-01_part-mag_T2starw.nii.gz, sub-01_part-phase_T2starw.nii.gz (+ .json with EchoTime in s)
        derivatives/phantom-truth/template/   template_T1w, template_FA, template_label (+ .ctbl)
        derivatives/phantom-truth/sub-01/     true maps on the DWI and GRE grids, sub-01_truth.json
    """
    config = config or PhantomConfig()
    out_dir = _check_output_folder(out_dir)
    root = np.random.SeedSequence(seed)
    group_seed, *subject_seeds = root.spawn(n_subjects + 1)
    groups = assign_groups(n_subjects, als_fraction, np.random.default_rng(group_seed))
    io.write_json(
        out_dir / "dataset_description.json",
        {
            "Name": "ALSQuant simulated ALS cohort",
            "BIDSVersion": "1.9.0",
            "DatasetType": "raw",
            "GeneratedBy": [{"Name": GENERATOR_NAME, "Version": __version__}],
            "PhantomParameters": {
                "seed": seed,
                "n_subjects": n_subjects,
                "als_fraction": als_fraction,
                **asdict(config),
                "anatomy": getattr(anatomy, "description", "analytic phantom"),
            },
        },
    )
    if anatomy is AnalyticAnatomy:
        write_template(out_dir, config)
    rows = []
    width = max(2, len(str(n_subjects)))
    for index, (group, subject_seed) in enumerate(zip(groups, subject_seeds)):
        subject_id = f"sub-{index + 1:0{width}d}"
        if progress:
            progress(index / n_subjects, f"simulating {subject_id} ({group})")
        subject = simulate_subject(group, subject_seed, config, anatomy)
        write_subject(out_dir, subject_id, subject, config)
        rows.append({"participant_id": subject_id, "group": group, **subject.values})
    io.write_table(
        out_dir / "participants.tsv", [{"participant_id": r["participant_id"], "group": r["group"]} for r in rows]
    )
    io.write_table(out_dir / TRUTH_DIR / "truth.tsv", rows)
    if progress:
        progress(1.0, f"wrote {n_subjects} subjects to {out_dir}")
    return rows


DWI_SLAB = {"slices": 28, "thickness_mm": 3.0, "center_z_mm": 10.0}
"""The study's partial DWI coverage: 28 axial slices of 3 mm (84 mm), here centred 10 mm above the template's
origin (the brain's centre; with real anatomy MNI z = -22 to +62 mm: from the midbrain into the motor cortex)."""


def with_dwi_slab(config, slab=DWI_SLAB):
    """`config` with the DWI cut to a slab (`DWI_SLAB`); the in-plane grid stays."""
    return replace(
        config,
        dwi_shape=(*config.dwi_shape[:2], slab["slices"]),
        dwi_voxel_size=(*config.dwi_voxel_size[:2], slab["thickness_mm"]),
        dwi_center=(config.dwi_center[0], config.dwi_center[1], slab["center_z_mm"]),
    )


def with_overrides(config, **overrides):
    """`config` with the given fields replaced; None values are ignored."""
    return replace(config, **{k: v for k, v in overrides.items() if v is not None})
