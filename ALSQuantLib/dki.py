"""Diffusion kurtosis (DKI) and tensor (DTI) reconstruction, vectorised over voxels.

API in DIPY's Model/Fit style::

    model = DKIModel(bvals, bvecs, fit_method="WLS")
    fit = model.fit(data, mask=mask)
    fit.mk, fit.fa, fit.md            # maps with the data's spatial shape; MD, AD, RD in mm²/s

Notes
-----
The signal model (Jensen et al. 2005) is

    ln S(b, g) = ln S0 − b Σ gᵢgⱼ Dᵢⱼ + b²/6 Σ gᵢgⱼgₖgₗ Vᵢⱼₖₗ,   V = MD² W

which is linear in the 22 parameters (ln S0, 6 of D, 15 of V). All voxels are solved at once through their
22×22 weighted normal equations (b is scaled to ms/µm² so that the systems are well conditioned):

* ``"OLS"``: unit weights;
* ``"WLS"``: reweighted with S² from the previous prediction (Veraart et al. 2013), once by default;
* ``"CWLS"``: WLS under linear constraints on 100 directions n (DIPY's stored repulsion sphere): D(n) ≥ 0, V(n) ≥ 0
  (no negative directional kurtosis) and, with Tabesh's full set, V(n) ≤ 3 D(n) / b_max (apparent kurtosis below
  3 / (b_max D(n)), so the signal falls monotonically up to b_max; `CONSTRAINT_SETS`), solved exactly by DAQP (a dual
  active-set QP solver) for the voxels whose WLS fit breaks one, given only the constraints it breaks;
* ``"robust"``: CWLS without the (slice, volume) pairs whose signal dropped out (`DKIModel.dropouts`: a slice's
  median residual far from its shell's, as FSL eddy's outlier replacement judges them).

Given the noise σ (``fit(..., noise_sigma=)``), any of them is followed by a fit of the Rician noise floor: Gauss-Newton
steps that fit the *expected magnitude* under Rician noise, E[M] = `rician_mean` (S, σ), instead of S itself, to the
signals (the constraints, where the method has them, hold on the last step).

Scalar maps follow DIPY's definitions: MK, RK analytically (Tabesh et al. 2011) with exact Carlson integrals,
AK = Ŵ₁₁₁₁ MD²/λ₁², MKT = tr(W)/5 (Hansen et al. 2013), KFA (Glenn et al. 2015). Kurtosis maps are clipped to
[−3/7, 10] as DIPY does by default.

Zero, negative and non-finite signals carry no weight and are counted (``fit.n_invalid_signals``); voxels left with
too few measurements are counted in ``fit.n_failed`` and get 0 in every map. No map ever holds NaN.

References
----------
Jensen JH, Helpern JA, Ramani A, Lu H, Kaczynski K. Diffusional kurtosis imaging. MRM 2005;53:1432-40.
Tabesh A, Jensen JH, Ardekani BA, Helpern JA. Estimation of tensors and tensor-derived measures in diffusional
kurtosis imaging. MRM 2011;65:823-36.
Veraart J, Sijbers J, Sunaert S, Leemans A, Jeurissen B. Weighted linear least squares estimation of diffusion MRI
parameters. NeuroImage 2013;81:335-46.
Hansen B, Lund TE, Sangill R, Jespersen SN. Experimentally and computationally fast method for estimation of a
mean kurtosis. MRM 2013;69:1754-60.
Arnström D, Bemporad A, Axehill D. A dual active-set solver for embedded quadratic programming using recursive
LDLᵀ updates. IEEE Trans Automat Contr 2022;67:4362-9.
Glenn GR, Helpern JA, Tabesh A, Jensen JH. Quantitative assessment of diffusional kurtosis anisotropy. NMR Biomed
2015;28:448-59.
"""

import logging
import warnings
from dataclasses import dataclass
from functools import cached_property

import numpy as np
from scipy.special import elliprd, elliprf, i0e, i1e

from . import geometry, io, masks, motion
from .errors import InputError
from .io import MIN_DIFFUSION_WEIGHTING
from .options import check_choices, flag, option

log = logging.getLogger(__name__)

FIT_METHODS = ("OLS", "WLS", "CWLS", "robust")
DENOISERS = ("mppca", "patch2self")
CONSTRAINT_SETS = ("positive", "tabesh")
"""CWLS's constraints on each direction n: D(n) ≥ 0 and K(n) ≥ 0 (``positive``), or also Tabesh's
K(n) ≤ 3 / (b_max D(n)), the signal falling monotonically up to b_max (``tabesh``). The bound biased FA by +7 % and
MD by −2.6 % on DIPY's simulated white matter at the study's b_max of 2500 s/mm² and SNR 30 (whose radial kurtosis,
2.9, lies above it); without it the fit equals WLS there, and at SNR 15 its MK is closer to the truth."""
DKI_MAPS = ("mk", "fa", "md", "ad", "rd", "ak", "rk", "mkt", "kfa", "s0")
"""Every map a kurtosis fit gives (a DTI-only fit gives FA, MD, AD, RD and S0)."""
MIN_KURTOSIS = -3.0 / 7.0
MAX_KURTOSIS = 10.0
MIN_DIRECTIONS = 15
DROPOUT_Z = 4.0
"""``robust``: a slice of a volume whose median relative residual lies this many robust standard deviations from its
shell's is signal dropout (FSL eddy's default outlier limit, 4 standard deviations)."""
MIN_SLICE_VOXELS = 50
MIN_DROPOUT = 0.1
"""``robust``: nor is a slice of a volume judged a dropout unless its median relative residual is off by more than
this (10 % of the signal): where the slices' medians agree to a fraction of a percent (the phantom's: MAD 0.002),
4 MADs is within the model's own misfit (up to 4 % there)."""
DROPOUT_ROUNDS = 5
RICIAN_STEPS = 5
"""Gauss-Newton steps of the Rician fit (on DIPY's simulated white matter at SNR 10-30, 3, 6 and 10 steps gave MK
within 0.01 of one another)."""
B_UNIT = 1000.0  # b in s/mm² / 1000 = ms/µm²; diffusivities then come out in µm²/ms = 1e-3 mm²/s

# The 15 unique elements of a symmetric 4th-order tensor, in DIPY's order, and their multiplicities.
KT_INDICES = np.array(
    [
        (0, 0, 0, 0),
        (1, 1, 1, 1),
        (2, 2, 2, 2),
        (0, 0, 0, 1),
        (0, 0, 0, 2),
        (0, 1, 1, 1),
        (1, 1, 1, 2),
        (0, 2, 2, 2),
        (1, 2, 2, 2),
        (0, 0, 1, 1),
        (0, 0, 2, 2),
        (1, 1, 2, 2),
        (0, 0, 1, 2),
        (0, 1, 1, 2),
        (0, 1, 2, 2),
    ]
)
KT_MULTIPLICITY = np.array([1, 1, 1, 4, 4, 4, 4, 4, 4, 6, 6, 6, 12, 12, 12], dtype=float)
DT_INDICES = np.array([(0, 0), (0, 1), (1, 1), (0, 2), (1, 2), (2, 2)])  # DIPY's lower-triangular order
DT_MULTIPLICITY = np.array([1, 2, 1, 2, 2, 1], dtype=float)


def _full_kt_index():
    """Map each of the 81 (i, j, k, l) to its unique element."""
    index = np.zeros((3, 3, 3, 3), dtype=int)
    for n, ijkl in enumerate(KT_INDICES):
        for perm in {(a, b, c, d) for a in ijkl for b in ijkl for c in ijkl for d in ijkl}:
            if sorted(perm) == sorted(ijkl):
                index[perm] = n
    return index


_KT_FULL = _full_kt_index()


# ----------------------------------------------------------------------------------------------------------------
# Acquisition handling
# ----------------------------------------------------------------------------------------------------------------
def round_bvals(bvals, *, b0_threshold=MIN_DIFFUSION_WEIGHTING, tolerance=100.0):
    """Round b-values to their shells.

    b-values within `tolerance` (s/mm²) of each other form one shell, represented by its median rounded to the
    nearest 10; values at or below `b0_threshold` become 0.

    Returns
    -------
    ndarray, shape (n,)
    """
    bvals = np.asarray(bvals, dtype=float)
    rounded = np.zeros_like(bvals)
    weighted = np.flatnonzero(bvals > b0_threshold)
    order = weighted[np.argsort(bvals[weighted])]
    start = 0
    for n in range(1, len(order) + 1):
        if n == len(order) or bvals[order[n]] - bvals[order[start]] > tolerance:
            group = order[start:n]
            rounded[group] = np.round(np.median(bvals[group]), -1)
            start = n
    return rounded


def count_directions(bvecs, *, tolerance_deg=5.0):
    """Number of distinct (antipodally identified) directions among unit vectors."""
    unique = []
    for v in bvecs:
        if np.linalg.norm(v) < 1e-6:
            continue
        if all(abs(np.dot(v, u)) < np.cos(np.deg2rad(tolerance_deg)) for u in unique):
            unique.append(v)
    return len(unique)


def _design_matrix(bvals, bvecs, n_params):
    """Rows: [1, −b gᵢgⱼ (×mult), b²/6 gᵢgⱼgₖgₗ (×mult)] with b in ms/µm²."""
    b = np.asarray(bvals, dtype=float)[:, None] / B_UNIT
    g = np.asarray(bvecs, dtype=float)
    dt = g[:, DT_INDICES[:, 0]] * g[:, DT_INDICES[:, 1]] * DT_MULTIPLICITY
    columns = [np.ones((len(b), 1)), -b * dt]
    if n_params == 22:
        kt = np.prod(g[:, KT_INDICES], axis=2) * KT_MULTIPLICITY
        columns.append(b**2 / 6.0 * kt)
    return np.hstack(columns)


CONSTRAINT_DIRECTIONS = 100


def constraint_directions(n_directions=CONSTRAINT_DIRECTIONS):
    """Directions covering the hemisphere evenly: DIPY's stored ``repulsion200`` sphere, one of each antipodal pair,
    for the default 100 (read, not computed); any other number placed by electrostatic repulsion (1-2 s)."""
    if n_directions == CONSTRAINT_DIRECTIONS:
        from dipy.data import get_sphere

        vertices = get_sphere(name="repulsion200").vertices
        keep = [i for i, v in enumerate(vertices) if not any(np.dot(v, vertices[j]) < -0.999 for j in range(i))]
        return vertices[keep]
    return geometry.sphere_directions(n_directions, seed=42)


def constraint_matrix(n_directions, b_max, constraint_set="positive"):
    """Rows C with C x ≥ 0 meaning D(n) ≥ 0 and V(n) ≥ 0 for `n_directions` directions (`constraint_directions`),
    and, for the ``"tabesh"`` set (`CONSTRAINT_SETS`), 3 D(n)/b_max − V(n) ≥ 0.
    """
    n = constraint_directions(n_directions)
    d = n[:, DT_INDICES[:, 0]] * n[:, DT_INDICES[:, 1]] * DT_MULTIPLICITY
    v = np.prod(n[:, KT_INDICES], axis=2) * KT_MULTIPLICITY
    zeros_d, zeros_v, zeros_1 = np.zeros_like(d), np.zeros_like(v), np.zeros((len(n), 1))
    b = b_max / B_UNIT
    rows = [np.hstack([zeros_1, d, zeros_v]), np.hstack([zeros_1, zeros_d, v])]
    if constraint_set == "tabesh":
        rows.append(np.hstack([zeros_1, 3.0 / b * d, -v]))
    return np.vstack(rows)


# ----------------------------------------------------------------------------------------------------------------
# Batched weighted least squares
# ----------------------------------------------------------------------------------------------------------------
_PACKED = {}


def _packed_index(p):
    """(p, p) array mapping (i, j) to the position of P_ij among the p(p+1)/2 unique entries of a symmetric P."""
    if p not in _PACKED:
        rows, cols = np.triu_indices(p)
        index = np.zeros((p, p), dtype=int)
        index[rows, cols] = index[cols, rows] = np.arange(len(rows))
        _PACKED[p] = (rows, cols, index)
    return _PACKED[p]


def _normal_equations(design, weights, log_signal):
    """P = Aᵀ W A and q = Aᵀ W y for every voxel (rows of `weights` and `log_signal`).

    P is returned packed and voxels-last: shape (p(p+1)/2, n), one matrix product over its unique entries.
    """
    rows, cols, _ = _packed_index(design.shape[1])
    packed = np.ascontiguousarray((weights @ (design[:, rows] * design[:, cols])).T)
    q = (weights * log_signal) @ design
    return packed, q


def _unpack(packed, p):
    """Full (n, p, p) matrices from packed (p(p+1)/2, n)."""
    return np.moveaxis(packed[_packed_index(p)[2]], 2, 0)


def _unsolvable(design, valid):
    """Rows of `valid` (voxels × measurements) whose valid measurements do not determine the model: fewer than its
    parameters, or (a voxel missing some) a rank-deficient design. Six directions and a b = 0 determine DTI exactly
    (the smallest DTI acquisition, as a real GE series has it)."""
    count = valid.sum(axis=1)
    failed = count < design.shape[1]
    partial = np.flatnonzero(~failed & (count < valid.shape[1]))
    if partial.size:
        unit = design / np.linalg.norm(design, axis=0)  # columns on one scale: b and b² terms differ by 10⁶
        eigenvalues = np.linalg.eigvalsh(np.einsum("vm,mi,mj->vij", valid[partial].astype(float), unit, unit))
        failed[partial] = eigenvalues[:, 0] <= 1e-8 * eigenvalues[:, -1]
    return failed


def _solve(packed, q):
    """Solve P x = q for every voxel by a Cholesky factorisation vectorised across voxels.

    `packed` holds P's unique entries voxels-last (every step is then a contiguous vector operation); q has
    shape (n, p). A relative ridge of 1e-10 keeps a rank-deficient voxel finite; such voxels are caught by
    `_unsolvable`.
    """
    n, p = q.shape
    index = _packed_index(p)[2]
    diagonal = index[np.arange(p), np.arange(p)]
    ridge = 1e-10 * packed[diagonal].sum(axis=0)
    L = np.empty((p, p, n))
    for j in range(p):
        d = packed[index[j, j]] + ridge - np.einsum("kn,kn->n", L[j, :j], L[j, :j])
        L[j, j] = np.sqrt(np.maximum(d, 1e-300))
        if j + 1 < p:
            L[j + 1 :, j] = (packed[index[j + 1 :, j]] - np.einsum("ikn,kn->in", L[j + 1 :, :j], L[j, :j])) / L[j, j]
    y = np.empty((p, n))
    b = q.T
    for j in range(p):
        y[j] = (b[j] - np.einsum("kn,kn->n", L[j, :j], y[:j])) / L[j, j]
    x = np.empty((p, n))
    for j in reversed(range(p)):
        x[j] = (y[j] - np.einsum("kn,kn->n", L[j + 1 :, j], x[j + 1 :])) / L[j, j]
    return x.T


DAQP_INFINITY = 1e30
"""DAQP's 'no bound'."""


def _constrained(packed, q, x0, C, *, tolerance=1e-9):
    """min ½xᵀPx − qᵀx subject to C x ≥ 0, exactly, for a batch of voxels.

    Each voxel's QP is solved by DAQP (Arnström, Bemporad & Axehill 2022), a dual active-set solver for small dense
    QPs, given only the constraints its solution breaks: first those the unconstrained solution `x0` breaks, then any
    further ones the constrained solution breaks, until it breaks none; it is then the optimum under all of C. Few of
    the hundreds of constraints are ever needed (on the real Prisma DWI 37 of 300 on average, in 1.07 rounds), and
    the cost of a DAQP call grows with the constraints it is given.

    Returns the solutions and the worst remaining violation of C x ≥ 0 per voxel, relative to the largest |C x|
    (0 within DAQP's tolerance; a voxel DAQP fails on keeps `x0`, with its violation, and is counted in a warning).
    """
    import daqp

    P = np.ascontiguousarray(_unpack(packed, C.shape[1]))
    f = -q
    upper, lower = np.full(len(C), DAQP_INFINITY), np.zeros(len(C))
    x = x0.copy()
    cx = x0 @ C.T
    scale = np.maximum(np.abs(cx).max(axis=1), 1e-300)
    given = cx < -tolerance * scale[:, None]
    todo = np.flatnonzero(given.any(axis=1))
    failed = np.zeros(len(x0), dtype=bool)
    while todo.size:
        for i in todo:
            rows = C[given[i]]
            solution, _, exitflag, _ = daqp.solve(P[i], f[i], rows, upper[: len(rows)], lower[: len(rows)])
            if exitflag < 1:
                failed[i] = True
                x[i] = x0[i]
            else:
                x[i] = solution
        todo = todo[~failed[todo]]
        broken = (x[todo] @ C.T < -tolerance * scale[todo, None]) & ~given[todo]
        given[todo] |= broken
        todo = todo[broken.any(axis=1)]
    if failed.any():
        warnings.warn(f"the constrained fit failed in {int(failed.sum())} voxels; their WLS fit is kept", stacklevel=3)
    violation = np.maximum(-(x @ C.T), 0.0).max(axis=1) / scale
    return x, violation


# ----------------------------------------------------------------------------------------------------------------
# Tensor-derived measures (DIPY's definitions)
# ----------------------------------------------------------------------------------------------------------------
_DEGENERATE = 1e-4  # relative eigenvalue difference below which the analytic limit is used


def _positive(*evals):
    return np.all([e > 2e-7 for e in evals], axis=0)


def _carlson(a, b, c):
    """R_F(a/b, a/c, 1) and R_D(a/b, a/c, 1), shared by F₁(a, b, c) and F₂(a, b, c); 0 where not all positive."""
    ok = _positive(a, b, c)
    safe_b, safe_c = np.where(ok, b, 1.0), np.where(ok, c, 1.0)
    safe_a = np.where(ok, a, 1.0)
    return elliprf(safe_a / safe_b, safe_a / safe_c, 1.0), elliprd(safe_a / safe_b, safe_a / safe_c, 1.0)


def _f2(a, b, c, carlson=None):
    """Tabesh's F₂(λ₁, λ₂, λ₃), with its limits for λ₂ = λ₃ and λ₁ = λ₂ = λ₃."""
    out = np.zeros_like(a)
    ok = _positive(a, b, c)
    general = ok & (np.abs(b - c) > _DEGENERATE * b)
    if general.any():
        L1, L2, L3 = a[general], b[general], c[general]
        rf, rd = (carlson[0][general], carlson[1][general]) if carlson else _carlson(L1, L2, L3)
        out[general] = ((L1 + L2 + L3) ** 2 / (3.0 * (L2 - L3) ** 2)) * (
            (L2 + L3) / np.sqrt(L2 * L3) * rf + (2.0 * L1 - L2 - L3) / (3.0 * np.sqrt(L2 * L3)) * rd - 2.0
        )
    cylinder = ok & ~general
    if cylinder.any():
        L1 = a[cylinder]
        L3 = 0.5 * (b[cylinder] + c[cylinder])
        isotropic = np.abs(L1 - L3) <= _DEGENERATE * L3
        x = 1.0 - L1 / L3
        root = np.sqrt(np.abs(x))
        safe_root = np.where(root > 0, root, 1.0)
        alpha = np.where(x > 0, np.arctanh(np.minimum(root, 1 - 1e-16)) / safe_root, np.arctan(root) / safe_root)
        denominator = np.where(isotropic, 1.0, 144.0 * L3**2 * (L1 - L3) ** 2)
        value = 6.0 * (L1 + 2.0 * L3) ** 2 / denominator * (L3 * (L1 + 2.0 * L3) + L1 * (L1 - 4.0 * L3) * alpha)
        out[cylinder] = np.where(isotropic, 6.0 / 15.0, value)
    return out


def _f1(a, b, c, carlson=None):
    """Tabesh's F₁(λ₁, λ₂, λ₃), with its limits when λ₁ equals λ₂ or λ₃."""
    out = np.zeros_like(a)
    ok = _positive(a, b, c)
    near_b = np.abs(a - b) < _DEGENERATE * a
    near_c = np.abs(a - c) < _DEGENERATE * a
    general = ok & ~near_b & ~near_c
    if general.any():
        L1, L2, L3 = a[general], b[general], c[general]
        rf, rd = (carlson[0][general], carlson[1][general]) if carlson else _carlson(L1, L2, L3)
        out[general] = ((L1 + L2 + L3) ** 2 / (18.0 * (L1 - L2) * (L1 - L3))) * (
            np.sqrt(L2 * L3) / L1 * rf
            + (3.0 * L1**2 - L1 * L2 - L1 * L3 - L2 * L3) / (3.0 * L1 * np.sqrt(L2 * L3)) * rd
            - 1.0
        )
    for near, other in ((near_b & ~near_c, c), (near_c & ~near_b, b)):
        sel = ok & near
        if sel.any():
            L = 0.5 * (a[sel] + (b[sel] if other is c else c[sel]))
            out[sel] = _f2(other[sel], L, L) / 2.0
    out[ok & near_b & near_c] = 1.0 / 5.0
    return out


def _g1(a, b, c):
    out = np.zeros_like(a)
    ok = _positive(a, b, c)
    general = ok & (np.abs(b - c) > _DEGENERATE * b)
    L1, L2, L3 = a[general], b[general], c[general]
    out[general] = (
        (L1 + L2 + L3) ** 2 / (18.0 * L2 * (L2 - L3) ** 2) * (2.0 * L2 + (L3**2 - 3.0 * L2 * L3) / np.sqrt(L2 * L3))
    )
    limit = ok & ~general
    L1, L2 = a[limit], 0.5 * (b[limit] + c[limit])
    out[limit] = (L1 + 2.0 * L2) ** 2 / (24.0 * L2**2)
    return out


def _g2(a, b, c):
    out = np.zeros_like(a)
    ok = _positive(a, b, c)
    general = ok & (np.abs(b - c) > _DEGENERATE * b)
    L1, L2, L3 = a[general], b[general], c[general]
    out[general] = (L1 + L2 + L3) ** 2 / (3.0 * (L2 - L3) ** 2) * ((L2 + L3) / np.sqrt(L2 * L3) - 2.0)
    limit = ok & ~general
    L1, L2 = a[limit], 0.5 * (b[limit] + c[limit])
    out[limit] = (L1 + 2.0 * L2) ** 2 / (12.0 * L2**2)
    return out


_PAIR_FULL = _KT_FULL[DT_INDICES[:, 0], DT_INDICES[:, 1]][:, DT_INDICES[:, 0], DT_INDICES[:, 1]]  # (6, 6)


def _rotated_kt(kt, evecs):
    """Ŵ_aabb (a, b = 0..2) of W in the eigenvector frame: shape (n, 3, 3).

    With W as a symmetric 6×6 matrix M over index pairs and s(u) = (c_ij u_i u_j) (c = 1 on the diagonal, 2 off
    it), W(u, u, v, v) = s(u)ᵀ M s(v).
    """
    M = kt[:, _PAIR_FULL]  # (n, 6, 6)
    S = evecs[:, DT_INDICES[:, 0], :] * evecs[:, DT_INDICES[:, 1], :] * DT_MULTIPLICITY[None, :, None]  # (n, 6, 3)
    return np.einsum("npa,npq,nqb->nab", S, M, S, optimize=True)


def tensor_measures(evals, evecs, kt, *, min_kurtosis=MIN_KURTOSIS, max_kurtosis=MAX_KURTOSIS):
    """All scalar maps from eigenvalues (mm²/s, descending), eigenvectors (columns) and the 15 W elements.

    Returns
    -------
    dict of ndarray (n,): ``fa md ad rd mk ak rk mkt kfa`` (kurtosis maps clipped to [min, max]).
    """
    l1, l2, l3 = evals[:, 0], evals[:, 1], evals[:, 2]
    md = (l1 + l2 + l3) / 3.0
    rd = (l2 + l3) / 2.0
    norm = np.sqrt(l1**2 + l2**2 + l3**2)
    fa = np.sqrt(0.5 * ((l1 - l2) ** 2 + (l2 - l3) ** 2 + (l3 - l1) ** 2)) / np.where(norm > 0, norm, 1.0)
    out = {"fa": np.where(norm > 0, fa, 0.0), "md": md, "ad": l1, "rd": rd}
    if kt is None:
        return out
    w = _rotated_kt(kt, evecs)
    c1, c2, c3 = _carlson(l1, l2, l3), _carlson(l2, l1, l3), _carlson(l3, l2, l1)
    mk = (
        _f1(l1, l2, l3, c1) * w[:, 0, 0]
        + _f1(l2, l1, l3, c2) * w[:, 1, 1]
        + _f1(l3, l2, l1, c3) * w[:, 2, 2]
        + _f2(l1, l2, l3, c1) * w[:, 1, 2]
        + _f2(l2, l1, l3, c2) * w[:, 0, 2]
        + _f2(l3, l2, l1, c3) * w[:, 0, 1]
    )
    rk = _g1(l1, l2, l3) * w[:, 1, 1] + _g1(l1, l3, l2) * w[:, 2, 2] + _g2(l1, l2, l3) * w[:, 1, 2]
    positive = _positive(l1, l2, l3)
    ak = np.where(positive, w[:, 0, 0] * md**2 / np.where(positive, l1, 1.0) ** 2, 0.0)
    mkt = (kt[:, 0] + kt[:, 1] + kt[:, 2] + 2 * (kt[:, 9] + kt[:, 10] + kt[:, 11])) / 5.0
    squares = KT_MULTIPLICITY * kt**2
    iso = mkt[:, None] * np.array([1, 1, 1, 0, 0, 0, 0, 0, 0, 1 / 3, 1 / 3, 1 / 3, 0, 0, 0])
    deviation = np.sum(KT_MULTIPLICITY * (kt - iso) ** 2, axis=1)
    total = squares.sum(axis=1)
    valid = (total > 0) & (mkt > 1e-8)
    kfa = np.sqrt(np.divide(deviation, total, out=np.zeros_like(total), where=valid))
    clip = {"min": min_kurtosis, "max": max_kurtosis}
    out.update(
        mk=np.clip(mk, clip["min"], clip["max"]),
        ak=np.clip(ak, clip["min"], clip["max"]),
        rk=np.clip(rk, clip["min"], clip["max"]),
        mkt=np.clip(mkt, clip["min"], clip["max"]),
        kfa=kfa,
    )
    return out


# ----------------------------------------------------------------------------------------------------------------
# Model and fit
# ----------------------------------------------------------------------------------------------------------------
def _slices(index, spatial, slice_axis):
    """Each flat voxel index's slice along `slice_axis`, and the number of slices; data with fewer axes (a list of
    voxels) is one slice."""
    if len(spatial) <= slice_axis:
        return np.zeros(len(index), dtype=int), 1
    return np.unravel_index(index, spatial)[slice_axis], spatial[slice_axis]


def rician_mean(signal, sigma):
    """The expected magnitude of a signal under Rician noise of Gaussian standard deviation `sigma` (> 0):
    σ √(π/2) L½(−S²/2σ²), written with exponentially scaled Bessel functions (no overflow at any SNR).

    >>> float(rician_mean(0.0, 1.0)) == float(np.sqrt(np.pi / 2))  # the noise floor of a signal of zero
    True
    >>> round(float(rician_mean(100.0, 1.0)), 4)  # high SNR: S + σ²/2S
    100.005
    """
    return _rician_mean_and_slope(signal, sigma)[0]


def _rician_mean_and_slope(signal, sigma):
    """`rician_mean` and its derivative in S, √(π/2) S/(2σ) (I₀ + I₁)(S²/4σ²) e^(−S²/4σ²) (0 at S = 0, 1 at high
    SNR), from one evaluation of each Bessel function."""
    t = np.square(signal) / (4.0 * np.square(sigma))
    i0, i1 = i0e(t), i1e(t)
    root = np.sqrt(np.pi / 2)
    return sigma * root * ((1 + 2 * t) * i0 + 2 * t * i1), root * signal / (2.0 * sigma) * (i0 + i1)


class DKIModel:
    """Diffusion kurtosis model for one acquisition.

    Parameters
    ----------
    bvals : array_like, shape (n,)
        s/mm², fitted as given (a b-value 1 % off its nominal shell is fitted at its own value); grouped into shells
        (`round_bvals`) only to count and report them.
    bvecs : array_like, shape (n, 3)
        Unit gradient directions (any frame: scalar maps do not depend on it; tensors are expressed in it).
    fit_method : {"OLS", "WLS", "CWLS", "robust"}
    n_iterations : int
        Reweighting iterations of WLS and CWLS (default 1, as DIPY). More iterations are available but measured
        worse here: at SNR 30 in white matter each further reweighting added about −0.03 of MK bias (RMSE 0.095
        with one, 0.113 with two), because the S² weights come from predictions that are themselves noisy.
    dti_only : bool
        Allow an acquisition without two non-zero shells and 15 directions: fit the diffusion tensor only
        (FA, MD, AD, RD), with a warning. Without it such an acquisition is refused.
    b0_threshold : float
        b-values at or below it (s/mm²) are b = 0 volumes: they may have no direction, and do not count as a shell.
        They are fitted at their own b-value all the same.
    constraint_directions : int
        Directions on which CWLS enforces its constraints.
    constraint_set : {"positive", "tabesh"}
        CWLS's and ``robust``'s constraints (`CONSTRAINT_SETS`).
    min_kurtosis, max_kurtosis : float
        Clipping of the kurtosis maps (DIPY's defaults).

    Examples
    --------
    >>> directions = geometry.sphere_directions(20)
    >>> bvals = np.repeat([0.0, 1000.0, 2500.0], [1, 20, 20])
    >>> bvecs = np.vstack([np.zeros((1, 3)), directions, directions])
    >>> model = DKIModel(bvals, bvecs, fit_method="WLS")
    >>> model.shells
    [1000.0, 2500.0]
    """

    def __init__(
        self,
        bvals,
        bvecs,
        *,
        fit_method="WLS",
        n_iterations=1,
        dti_only=False,
        b0_threshold=MIN_DIFFUSION_WEIGHTING,
        constraint_directions=CONSTRAINT_DIRECTIONS,
        constraint_set="positive",
        min_kurtosis=MIN_KURTOSIS,
        max_kurtosis=MAX_KURTOSIS,
    ):
        bvals = np.asarray(bvals, dtype=float).ravel()
        bvecs = np.asarray(bvecs, dtype=float)
        if bvecs.ndim != 2 or bvecs.shape[1] != 3:
            raise InputError(f"bvecs: expected shape (n, 3), got {bvecs.shape}")
        if len(bvals) != len(bvecs):
            raise InputError(f"bvals and bvecs: {len(bvals)} b-values but {len(bvecs)} directions")
        if not np.all(np.isfinite(bvals)) or np.any(bvals < 0) or not np.all(np.isfinite(bvecs)):
            raise InputError("bvals and bvecs: expected finite values and non-negative b-values")
        if fit_method not in FIT_METHODS:
            raise InputError(f"fit_method {fit_method!r}: expected one of {', '.join(FIT_METHODS)}")
        if int(n_iterations) < 1:
            raise InputError(f"n_iterations: expected at least 1, got {n_iterations}")
        if not float(b0_threshold) >= 0:
            raise InputError(f"b0 threshold {b0_threshold!r}: expected a b-value of 0 or more (s/mm²)")
        self.bvals = bvals
        self.b0 = bvals <= b0_threshold
        weighted = ~self.b0
        norms = np.linalg.norm(bvecs, axis=1)
        if np.any(weighted & (np.abs(norms - 1) > 0.05)):
            raise InputError("bvecs: diffusion-weighted directions must be unit vectors")
        # A b = 0 volume's direction (none, or one with b = 5) enters the fit through b g gᵀ, as given.
        self.bvecs = np.divide(bvecs, norms[:, None], out=np.zeros_like(bvecs), where=norms[:, None] > 1e-6)
        if not np.any(self.b0):
            raise InputError(
                f"bvals: no b = 0 volume (none at or below {b0_threshold:g} s/mm²); DKI and DTI need at least one"
            )
        self.shells = sorted(set(round_bvals(bvals, b0_threshold=b0_threshold)[weighted].tolist()))
        self.n_directions = count_directions(self.bvecs[weighted])
        self.fit_method = fit_method
        self.n_iterations = int(n_iterations)
        self.min_kurtosis, self.max_kurtosis = min_kurtosis, max_kurtosis
        self.kurtosis = len(self.shells) >= 2 and self.n_directions >= MIN_DIRECTIONS
        if not self.kurtosis:
            reason = (
                f"DKI needs at least two non-zero shells and {MIN_DIRECTIONS} directions; this acquisition has "
                f"{len(self.shells)} shell(s) {self.shells} and {self.n_directions} directions"
            )
            if not dti_only:
                raise InputError(
                    f"{reason}; to fit the diffusion tensor only, choose DTI only ({flag(DKIOptions, 'dti_only')})"
                )
            if self.n_directions < 6:
                raise InputError(f"DTI needs at least 6 directions; this acquisition has {self.n_directions}")
            warnings.warn(reason + "; fitting DTI only (FA, MD, AD, RD)", stacklevel=2)
        self.n_params = 22 if self.kurtosis else 7
        self.design = _design_matrix(self.bvals, self.bvecs, self.n_params)
        self._pinv = np.linalg.pinv(self.design)
        if constraint_set not in CONSTRAINT_SETS:
            raise InputError(f"constraint set {constraint_set!r}: expected one of {', '.join(CONSTRAINT_SETS)}")
        self._constraint_directions = constraint_directions
        self.constraint_set = constraint_set

    @cached_property
    def constraints(self):
        """The constraint rows of CWLS and ``robust`` (`constraint_matrix`), made when first needed: a number of
        directions other than the stored default takes 1-2 s to place, which a WLS or OLS fit need not spend."""
        if not self.kurtosis:
            return None
        return constraint_matrix(self._constraint_directions, self.bvals.max(), self.constraint_set)

    def fit(self, data, *, mask=None, chunk_size=10000, slice_axis=2, noise_sigma=None, progress=None):
        """Fit every voxel of `data` inside `mask`.

        Parameters
        ----------
        data : ndarray, shape (..., n)
            Signals; the last axis matches the b-values.
        mask : ndarray of bool, shape data.shape[:-1], optional
            Voxels to fit (default: every voxel with a finite, positive mean b = 0 signal).
        chunk_size : int
            Voxels per batch (bounds memory).
        slice_axis : int
            The axis along which slices were acquired (``robust``: signal dropout is judged slice by slice).
        noise_sigma : float or ndarray of data.shape[:-1], optional
            The noise's Gaussian standard deviation, in the signal's units: then the Rician noise floor is fitted
            (`_rician`); voxels where it is not positive and finite keep the plain fit.
        progress : callable(fraction, message), optional

        Returns
        -------
        DKIFit
        """
        data = np.asarray(data)
        if data.ndim < 1 or data.shape[-1] != len(self.bvals):
            raise InputError(
                f"DWI data: last axis has {data.shape[-1] if data.ndim else 0} volumes but the model has "
                f"{len(self.bvals)} b-values; expected one volume per b-value"
            )
        spatial = data.shape[:-1]
        if mask is None:
            b0 = data[..., self.b0]
            with np.errstate(invalid="ignore"):
                mask = np.all(np.isfinite(b0), axis=-1) & (np.nan_to_num(b0).mean(axis=-1) > 0)
        else:
            mask = np.asarray(mask, dtype=bool)
            if mask.shape != spatial:
                raise InputError(f"mask: shape {mask.shape} does not match the DWI's spatial shape {spatial}")
        index = np.flatnonzero(mask.ravel())
        flat = data.reshape(-1, data.shape[-1])
        if noise_sigma is not None:
            noise_sigma = np.broadcast_to(np.asarray(noise_sigma, dtype=np.float64), spatial).ravel()
        params = np.zeros((len(index), self.n_params))
        invalid = np.zeros(len(index), dtype=np.int32)
        failed = np.zeros(len(index), dtype=bool)
        violation = np.zeros(len(index))
        dropouts = self.dropouts(data, mask, slice_axis=slice_axis) if self.fit_method == "robust" else None
        slices = _slices(index, spatial, slice_axis)[0]
        for start in range(0, len(index), chunk_size):
            stop = min(start + chunk_size, len(index))
            signal = flat[index[start:stop]].astype(np.float64)
            excluded = None if dropouts is None else dropouts[slices[start:stop]]
            sigma = None if noise_sigma is None else noise_sigma[index[start:stop]]
            (params[start:stop], invalid[start:stop], failed[start:stop], violation[start:stop]) = self._fit_chunk(
                signal, excluded, sigma
            )
            if progress:
                progress(stop / max(len(index), 1), f"fitted {stop} of {len(index)} voxels")
        fit = DKIFit(self, spatial, index, params, invalid, failed, violation)
        fit.dropouts = dropouts
        return fit

    def _least_squares(self, signal, excluded=None, *, reweight=True):
        """OLS, then `n_iterations` WLS reweightings if `reweight`, of a batch of voxels (rows of `signal`), without
        zero, negative, non-finite and `excluded` measurements. Returns x, the last normal equations (P, q; None
        without reweighting) and the failed voxels."""
        valid = np.isfinite(signal) & (signal > 0)
        if excluded is not None:
            valid &= ~excluded
        log_signal = np.log(np.where(valid, signal, 1.0))
        weights = valid.astype(np.float64)
        failed = _unsolvable(self.design, valid)
        weights[failed] = 1.0  # keep the batch solvable; these voxels are zeroed afterwards
        # Unit weights: voxels with every measurement valid share one design, so one pseudo-inverse serves them.
        x = log_signal @ self._pinv.T
        partial = np.flatnonzero(~valid.all(axis=1))
        if partial.size:
            x[partial] = _solve(*_normal_equations(self.design, weights[partial], log_signal[partial]))
        P = q = None
        if reweight:
            for _ in range(self.n_iterations):
                x, P, q = self._reweighted(x, valid, failed, log_signal)
        return x, P, q, failed

    def _fit_chunk(self, signal, excluded=None, sigma=None):
        """Fit a batch of voxels (rows of `signal`); `excluded` (same shape) marks measurements to leave out;
        `sigma` (one per row), when given, the noise σ for the Rician fit."""
        x, P, q, failed = self._least_squares(signal, excluded, reweight=self.fit_method != "OLS")
        if sigma is not None:
            x, P, q = self._rician(signal, excluded, x, P, q, sigma, failed)
        violation = np.zeros(len(x))
        if self.fit_method in ("CWLS", "robust") and self.constraints is not None:  # DTI has none: WLS
            cx = x @ self.constraints.T
            scale = np.abs(cx).max(axis=1)
            breaking = np.flatnonzero((cx.min(axis=1) < -1e-9 * scale) & ~failed)
            if breaking.size:
                x[breaking], violation[breaking] = _constrained(
                    P[:, breaking], q[breaking], x[breaking], self.constraints
                )
        x[failed] = 0.0
        invalid = (~(np.isfinite(signal) & (signal > 0))).sum(axis=1)
        return x, invalid, failed, violation

    def _reweighted(self, x, valid, failed, log_signal):
        """One WLS step: weights S² from the prediction of `x` where `valid`."""
        predicted = np.clip(self.design @ x.T, -50, 50).T
        w = np.exp(2.0 * predicted) * valid
        w /= np.maximum(w.max(axis=1, keepdims=True), 1e-300)
        w[failed] = 1.0
        P, q = _normal_equations(self.design, w, log_signal)
        return _solve(P, q), P, q

    def _rician(self, signal, excluded, x, P, q, sigma, failed):
        """`RICIAN_STEPS` Gauss-Newton steps fitting E[M] = `rician_mean` (exp(A x), σ) to the signals M, from `x`.

        Each step is a weighted linear least-squares problem in x, in the same form as WLS (so CWLS's constraints
        apply to the last one): with S = exp(A x) and J = E'(S) S, weights J² and working response
        A x + (M − E[M]) / J. Rician noise has a nearly constant variance in M, hence the unit weights in M. At high
        SNR this is a nonlinear least-squares fit of S; near the noise floor J falls to 0 and such a measurement
        weighs nothing. Rows whose σ is not positive and finite, and failed voxels, are returned as given, with
        their P, q (None for OLS, which no constraint follows)."""
        usable = np.isfinite(signal) & (signal > 0)
        if excluded is not None:
            usable &= ~excluded
        rows = np.flatnonzero(np.isfinite(sigma) & (sigma > 0) & ~failed)
        if rows.size == 0:
            return x, P, q
        measured, usable, noise = signal[rows], usable[rows], sigma[rows, None]
        estimate = x[rows]
        for _ in range(RICIAN_STEPS):
            log_predicted = np.clip(estimate @ self.design.T, -50, 50)
            predicted = np.exp(log_predicted)
            expected, slope = _rician_mean_and_slope(predicted, noise)
            slope *= predicted
            weights = np.where(usable & (slope > 1e-12 * noise), slope**2, 0.0)
            residual = np.where(weights > 0, measured - expected, 0.0)
            working = log_predicted + np.divide(residual, slope, out=np.zeros_like(residual), where=weights > 0)
            weights /= np.maximum(weights.max(axis=1, keepdims=True), 1e-300)
            Pr, qr = _normal_equations(self.design, weights, working)
            estimate = _solve(Pr, qr)
        x = x.copy()
        x[rows] = estimate
        if P is not None:
            P, q = P.copy(), q.copy()
            P[:, rows], q[rows] = Pr, qr
        return x, P, q

    def dropouts(self, data, mask, *, slice_axis=2, chunk_size=10000):
        """(slice, volume) pairs whose signal fell out: a diffusion-weighted volume whose median relative residual
        in a slice, (S − Ŝ) / Ŝ against a WLS fit of the slice's voxels, lies more than `DROPOUT_Z` robust standard
        deviations from its shell's (median and MAD over the shell's slices and volumes), and more than
        `MIN_DROPOUT`.

        A head that moves during a volume's diffusion encoding loses signal in the slices acquired then (what
        FSL eddy's ``--repol`` detects, Andersson 2016). Judged voxel by voxel, such a measurement mostly hides: with
        20 directions a b = 2500 measurement has a leverage of 0.5-0.8 and the kurtosis tensor follows it; the
        median over a slice's voxels shows it plainly. A dropout also pulls the fit, and with it the residuals of
        the slice's other volumes, so each round leaves out only the worst volume of each slice, refits, and judges
        again (at most `DROPOUT_ROUNDS` rounds). Slices with fewer than `MIN_SLICE_VOXELS` fitted voxels are not
        judged. Returns an array of shape (slices, volumes).
        """
        data = np.asarray(data)
        index = np.flatnonzero(np.asarray(mask, dtype=bool).ravel())
        slices, n_slices = _slices(index, data.shape[:-1], slice_axis)
        flat = data.reshape(-1, data.shape[-1])
        shells = round_bvals(self.bvals, b0_threshold=0.0)
        groups = [np.flatnonzero((shells == shell) & ~self.b0) for shell in self.shells]
        flagged = np.zeros((n_slices, data.shape[-1]), dtype=bool)
        relative = np.full((len(index), data.shape[-1]), np.nan)
        medians = np.full((n_slices, data.shape[-1]), np.nan)
        changed = np.ones(n_slices, dtype=bool)  # slices to (re)fit: all at first, then those with a new dropout
        for _ in range(DROPOUT_ROUNDS):
            rows = np.flatnonzero(changed[slices])
            relative[rows] = self._relative_residuals(flat, index[rows], flagged[slices[rows]], chunk_size)
            for k in np.flatnonzero(changed):
                here = relative[slices == k]
                if len(here) >= MIN_SLICE_VOXELS:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN column: nothing to judge
                        medians[k] = np.nanmedian(here, axis=0)
            z = np.zeros(medians.shape)
            for volumes in groups:
                values = np.where(flagged[:, volumes], np.nan, medians[:, volumes])
                finite = values[np.isfinite(values)]
                if finite.size < 10:
                    continue
                centre = np.median(finite)
                spread = 1.4826 * np.median(np.abs(finite - centre))
                deviation = np.nan_to_num(np.abs(values - centre))
                z[:, volumes] = np.where(deviation > MIN_DROPOUT, deviation / max(spread, 1e-12), 0.0)
            worst = np.argmax(z, axis=1)
            changed = z[np.arange(n_slices), worst] > DROPOUT_Z
            if not changed.any():
                break
            flagged[np.flatnonzero(changed), worst[changed]] = True
        return flagged

    def _relative_residuals(self, flat, voxels, excluded, chunk_size):
        """(S − Ŝ) / Ŝ of a WLS fit of the `voxels` (flat indices) without their `excluded` measurements; NaN where
        a signal is invalid or the voxel's fit failed."""
        relative = np.full((len(voxels), flat.shape[1]), np.nan)
        for start in range(0, len(voxels), chunk_size):
            rows = slice(start, start + chunk_size)
            signal = flat[voxels[rows]].astype(np.float64)
            x, _, _, failed = self._least_squares(signal, excluded[rows])
            predicted = np.exp(np.clip(self.design @ x.T, -50, 50).T)
            valid = np.isfinite(signal) & (signal > 0)
            relative[rows] = np.where(valid & ~failed[:, None], signal / predicted - 1.0, np.nan)
        return relative


class DKIFit:
    """The result of `DKIModel.fit`: maps of the data's spatial shape, computed on first access.

    Attributes
    ----------
    mask : ndarray of bool
        Voxels fitted.
    n_invalid_signals : int
        Zero, negative or non-finite signals that were given no weight.
    n_failed : int
        Voxels left with too few valid measurements; 0 in every map.
    invalid_signals : ndarray of int
        Per-voxel count of such signals.
    dropouts : ndarray of bool, shape (slices, volumes), or None
        ``robust``: the (slice, volume) pairs left out as signal dropout (`DKIModel.dropouts`); None otherwise.
    max_constraint_violation : float
        CWLS and ``robust``: the worst violation of a constraint left in any voxel, relative to that voxel's largest
        |C x| (0 up to DAQP's tolerance; non-zero only where the solver failed, which a warning says).
    """

    def __init__(self, model, shape, index, params, invalid, failed, violation):
        self.model = model
        self.shape = shape
        self._index = index
        self._params = params
        self.mask = np.zeros(int(np.prod(shape)), dtype=bool)
        self.mask[index] = True
        self.mask = self.mask.reshape(shape)
        self.invalid_signals = self._to_map(invalid).astype(np.int32)
        self.n_invalid_signals = int(invalid.sum())
        self.n_failed = int(failed.sum())
        self._failed = failed
        self.max_constraint_violation = float(violation.max()) if violation.size else 0.0

    def _to_map(self, values):
        out = np.zeros(int(np.prod(self.shape)), dtype=np.float32)
        out[self._index] = values
        return out.reshape(self.shape)

    def _tensors(self, chunk):
        x = self._params[chunk]
        D = np.zeros((len(x), 3, 3))
        for n, (i, j) in enumerate(DT_INDICES):
            D[:, i, j] = D[:, j, i] = x[:, 1 + n]
        evals, evecs = np.linalg.eigh(D)
        evals, evecs = evals[:, ::-1] * 1e-3, evecs[:, :, ::-1]  # descending, mm²/s
        kt = None
        if self.model.kurtosis:
            md = evals.mean(axis=1)
            safe_md = np.where(md > 0, md, 1.0) * 1e3  # V is in (µm²/ms)²
            kt = np.where(md[:, None] > 0, x[:, 7:22] / safe_md[:, None] ** 2, 0.0)
        return np.clip(evals, 0.0, None), evecs, kt

    @cached_property
    def _maps(self):
        names = ("fa", "md", "ad", "rd") + (("mk", "ak", "rk", "mkt", "kfa") if self.model.kurtosis else ())
        values = {name: np.zeros(len(self._index)) for name in names}
        step = 40000
        for start in range(0, len(self._index), step):
            chunk = slice(start, start + step)
            measures = tensor_measures(
                *self._tensors(chunk), min_kurtosis=self.model.min_kurtosis, max_kurtosis=self.model.max_kurtosis
            )
            for name in names:
                values[name][chunk] = measures[name]
        s0 = np.exp(np.clip(self._params[:, 0], -50, 50))
        values["s0"] = s0
        maps = {}
        for name, v in values.items():
            v = np.where(np.isfinite(v) & ~self._failed, v, 0.0)
            maps[name] = self._to_map(v)
        return maps

    def _get(self, name):
        if name not in self._maps:
            raise InputError(f"{name.upper()} is not available: this was a DTI-only fit (see DKIModel(dti_only=...))")
        return self._maps[name]

    fa = property(lambda self: self._get("fa"), doc="Fractional anisotropy.")
    md = property(lambda self: self._get("md"), doc="Mean diffusivity, mm²/s.")
    ad = property(lambda self: self._get("ad"), doc="Axial diffusivity, mm²/s.")
    rd = property(lambda self: self._get("rd"), doc="Radial diffusivity, mm²/s.")
    s0 = property(lambda self: self._get("s0"), doc="Fitted non-diffusion-weighted signal.")
    mk = property(lambda self: self._get("mk"), doc="Mean kurtosis (Tabesh 2011, analytic).")
    ak = property(lambda self: self._get("ak"), doc="Axial kurtosis.")
    rk = property(lambda self: self._get("rk"), doc="Radial kurtosis (Tabesh 2011, analytic).")
    mkt = property(lambda self: self._get("mkt"), doc="Mean of the kurtosis tensor (Hansen 2013).")
    kfa = property(lambda self: self._get("kfa"), doc="Kurtosis fractional anisotropy (Glenn 2015).")

    @property
    def map_names(self):
        return tuple(self._maps)

    def dipy_params(self):
        """Parameters in DIPY's 27-element layout (evals, evecs rows, 15 W) for the fitted voxels, shape (n, 27)."""
        evals, evecs, kt = self._tensors(slice(None))
        kt = np.zeros((len(evals), 15)) if kt is None else kt
        return np.hstack([evals, evecs.reshape(len(evals), 9), kt])


# ----------------------------------------------------------------------------------------------------------------
# Preprocessing and the whole chain
# ----------------------------------------------------------------------------------------------------------------
def average_b0(data, bvals, bvecs, *, b0_threshold=MIN_DIFFUSION_WEIGHTING):
    """Replace the b = 0 volumes (b at or below `b0_threshold`) by their mean, placed first, at their mean b-value
    with no direction.

    Returns
    -------
    data, bvals, bvecs with one b = 0 volume.
    """
    bvals = np.asarray(bvals, dtype=float)
    b0 = bvals <= b0_threshold
    if b0.sum() <= 1:
        return data, bvals, np.asarray(bvecs)
    mean_b0 = data[..., b0].mean(axis=-1, keepdims=True).astype(data.dtype)
    return (
        np.concatenate([mean_b0, data[..., ~b0]], axis=-1),
        np.concatenate([[bvals[b0].mean()], bvals[~b0]]),
        np.vstack([np.zeros((1, 3)), np.asarray(bvecs)[~b0]]),
    )


def denoise_mppca(data, *, mask=None, patch_radius=2):
    """Marchenko–Pastur PCA denoising (Veraart et al. 2016), DIPY's implementation: the denoised data and the noise
    σ it estimated, voxel by voxel."""
    from dipy.denoise.localpca import mppca

    denoised, sigma = mppca(np.asarray(data, dtype=np.float32), mask=mask, patch_radius=patch_radius, return_sigma=True)
    return denoised.astype(np.float32), np.asarray(sigma, dtype=np.float32)


def denoise_patch2self(data, bvals, *, b0_threshold=MIN_DIFFUSION_WEIGHTING):
    """Patch2Self denoising (Fadnavis et al. 2020), DIPY's implementation: each volume predicted from the others by
    linear regression, which assumes only that noise is independent between volumes, not that it is white in
    space (MP-PCA's assumption, which interpolated data such as GE's 256² reconstructions break)."""
    from dipy.denoise.patch2self import patch2self

    return patch2self(
        np.asarray(data, dtype=np.float32), np.asarray(bvals, dtype=float), b0_threshold=b0_threshold, verbose=False
    ).astype(np.float32)


def remove_gibbs(data, *, slice_axis=2):
    """Gibbs-ringing removal by local sub-voxel shifts (Kellner et al. 2016), DIPY's implementation."""
    from dipy.denoise.gibbs import gibbs_removal

    return gibbs_removal(np.asarray(data, dtype=np.float32), slice_axis=slice_axis, inplace=False, num_processes=1)


def _filled(data, finite, bvals, *, tolerance=100.0):
    """`data` with its non-finite samples replaced by the mean of the voxel's finite samples in the same shell (b-values
    within `tolerance`; 0 where there are none), for resampling only: a zero in their place would spread into the
    neighbouring voxels through the motion correction's cubic splines (measured: 32 missing samples became 112)."""
    out = np.where(finite, data, 0.0)
    for n in np.flatnonzero(~finite.reshape(-1, data.shape[-1]).all(axis=0)):
        shell = np.abs(bvals - bvals[n]) <= tolerance
        count = finite[..., shell].sum(axis=-1)
        mean = out[..., shell].sum(axis=-1) / np.maximum(count, 1)
        out[..., n] = np.where(finite[..., n], out[..., n], mean)
    return out


@dataclass(frozen=True)
class DKIOptions:
    """How a DWI is preprocessed and fitted (`reconstruct`)."""

    fit_method: str = option(
        "robust",
        "fit: WLS under constraints on 100 directions (--constraints) without the slices of volumes whose signal "
        "dropped out (robust: patients move, and no voxel's kurtosis may go negative), that without dropout detection "
        "(CWLS), weighted least squares reweighted once with S^2 (WLS, as DIPY), or ordinary (OLS)",
        choices=FIT_METHODS,
    )
    denoise: bool = option(False, "denoising first (by --denoiser)")
    denoiser: str = option(
        "mppca",
        "denoising method: MP-PCA (Veraart 2016, DIPY; also estimates the noise) or Patch2Self (Fadnavis 2020, "
        "DIPY; for interpolated data, such as GE's reconstructions to twice the acquired matrix)",
        choices=DENOISERS,
    )
    gibbs: bool = option(
        False,
        "Gibbs-ringing removal first (Kellner 2016, DIPY), after denoising; skipped, with a warning, when the DWI's "
        "sidecar says it was acquired with partial Fourier",
    )
    rician: bool = option(
        False,
        "fit the Rician noise floor, with the noise sigma from MP-PCA (of the raw data): removes the floor's bias of "
        "MD and FA at low SNR; MK comes out lower (see the README: MK's own low-SNR bias is negative and the floor "
        "had hidden part of it)",
    )
    motion_correction: bool = option(
        True,
        "head-motion correction after denoising and Gibbs removal: every volume registered rigidly to the mean b = 0 "
        "(ANTs), its gradient turned with it; motion.tsv and motion.png report it. Skipped, with a warning, when "
        "the field of view is under 80 mm along an axis (a crop or a slab: too little to register)",
        flag="--no-motion-correction",
    )
    eddy_currents: bool = option(
        True,
        "eddy-current correction with the motion correction: each diffusion-weighted volume's scaling, shears and "
        "shift along the phase-encoding axis (the BIDS sidecar's PhaseEncodingDirection; j when there is none), "
        "linear in the gradient as FSL eddy's second-level model; motion.tsv gets them",
        flag="--no-eddy-currents",
    )
    constraints: str = option(
        "positive",
        "constraints of CWLS and robust on 100 directions: D(n) >= 0 and K(n) >= 0 (positive), or also "
        "K(n) <= 3/(b_max D(n)) (tabesh; measured to bias FA and MD at b_max 2500, see the README)",
        choices=CONSTRAINT_SETS,
    )
    average_b0: bool = option(True, "average the b = 0 volumes into one", flag="--no-average-b0")
    b0_threshold: float = option(
        MIN_DIFFUSION_WEIGHTING,
        "b-values at or below it are b = 0 volumes (DIPY's default; scanners store some as b = 5 or 10)",
        unit="s/mm²",
    )
    dti_only: bool = option(False, "accept a single-shell acquisition and fit DTI only (FA, MD, AD, RD)")


def reconstruct(dwi, options=None, *, mask=None, partial_fourier=None, phase_encoding=None, progress=None):
    """Preprocess and fit a `ALSQuantLib.io.DWI`.

    Parameters
    ----------
    dwi : io.DWI
    options : DKIOptions, optional
        Fit method and preprocessing (default `DKIOptions()`).
    mask : ndarray of bool, optional
        Brain mask; default: DIPY ``median_otsu`` on the mean b = 0 image (`masks.brain_mask_from_b0`).
    partial_fourier : float, optional
        The fraction of k-space acquired (BIDS ``PartialFourier``); below 1, Gibbs-ringing removal is skipped:
        its sub-voxel shifts assume ringing from a symmetric, fully sampled k-space (Lee et al. 2021 adapt it to
        partial Fourier; DIPY's does not).
    phase_encoding : str, optional
        The phase-encoding direction as BIDS writes it (``i``, ``j``, ``k``, with or without ``-``): the axis along
        which eddy currents distort (`DKIOptions.eddy_currents`); ``j`` when not given, with a warning.
    progress : callable(fraction, message), optional

    Returns
    -------
    fit : DKIFit
    mask : ndarray of bool
    details : dict
        What the acquisition and the fit were found to be (shells, directions, voxels), for provenance.
    """
    options = options or DKIOptions()
    check_choices(options)
    if not options.b0_threshold >= 0:
        raise InputError(f"option b0_threshold {options.b0_threshold!r}: expected a b-value of 0 or more (s/mm²)")
    bvals = dwi.bvals
    is_b0 = bvals <= options.b0_threshold
    data = np.asarray(dwi.data, dtype=np.float32)
    # Bad samples are masked by the fit, never passed to the filters: zero them for preprocessing only.
    finite = np.isfinite(data)
    name = f"DWI {dwi.source}".strip()
    if not is_b0.any():
        raise InputError(
            f"{name}: no b = 0 volume (b-values {np.unique(bvals).tolist()}, none at or below the b0 threshold "
            f"{options.b0_threshold:g} s/mm²); DKI and DTI need at least one ({flag(DKIOptions, 'b0_threshold')})"
        )
    b0 = np.where(finite, data, 0)[..., is_b0]
    if not np.any(b0 > 0):
        raise InputError(
            f"{name}: the b = 0 volumes hold no positive signal (all zero, negative or not finite); expected "
            "magnitude images"
        )
    automatic = mask is None
    if automatic:
        mask = masks.brain_mask_from_b0(b0.mean(axis=-1))
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != data.shape[:3]:
        raise InputError(f"mask: shape {mask.shape} does not match the DWI's spatial shape {data.shape[:3]}")
    warnings = [w for w in [masks.check_brain_mask(mask, name, automatic=automatic)] if w]
    for warning in warnings:
        log.warning(warning)
    gibbs = options.gibbs
    if gibbs and partial_fourier is not None and float(partial_fourier) < 1.0:
        gibbs = False
        warnings.append(
            f"Gibbs-ringing removal skipped: the DWI was acquired with partial Fourier (PartialFourier "
            f"{float(partial_fourier):g}); the method assumes a fully sampled k-space"
        )
        log.warning(warnings[-1])
    extra = {}  # what preprocessing found, for the record
    noise_sigma = None
    if options.rician and not (options.denoise and options.denoiser == "mppca"):
        if progress:
            progress(0.0, "noise estimate (MP-PCA)")
        noise_sigma = denoise_mppca(np.where(finite, data, 0.0), mask=mask)[1]
    if options.denoise or gibbs:
        clean = np.where(finite, data, 0.0)
        if options.denoise and options.denoiser == "patch2self":
            if progress:
                progress(0.0, "Patch2Self denoising")
            clean = denoise_patch2self(clean, bvals, b0_threshold=options.b0_threshold)
        elif options.denoise:
            if progress:
                progress(0.0, "MP-PCA denoising")
            clean, noise_sigma = denoise_mppca(clean, mask=mask)
        if gibbs:
            if progress:
                progress(0.0, "Gibbs-ringing removal")
            clean = remove_gibbs(clean)
        # DIPY's MP-PCA can leave NaN where a local PCA divides by zero: keep the original signal there.
        data = np.where(finite & np.isfinite(clean), clean, data)
    if noise_sigma is not None:
        sigma = float(np.median(noise_sigma[mask])) if mask.any() else float("nan")
        extra.update(noise_sigma=sigma, snr_b0=float(np.median(b0.mean(axis=-1)[mask])) / sigma)
        noise_sigma = noise_sigma if options.rician else None
    too_small = motion.too_small_to_register(data.shape[:3], dwi.affine) if options.motion_correction else None
    if too_small:
        warnings.append(f"head-motion and eddy-current correction skipped: {too_small}")
        log.warning(warnings[-1])
    extra["motion_corrected"] = bool(options.motion_correction and not too_small)
    if extra["motion_corrected"]:
        if progress:
            progress(0.0, "motion correction")
        phase_axis = motion.phase_axis_of(phase_encoding)
        if options.eddy_currents:
            extra["phase_encoding_axis"] = "ijk"[phase_axis]
            if phase_encoding is None:
                warnings.append(
                    "eddy currents: the phase-encoding direction is not given (no PhaseEncodingDirection "
                    "in a BIDS sidecar); taken as j, the second voxel axis"
                )
                log.warning(warnings[-1])
        corrected, turned, poses = motion.correct(
            _filled(data, finite, bvals),
            dwi.affine,
            bvals,
            dwi.bvecs,
            b0_threshold=options.b0_threshold,
            eddy_currents=options.eddy_currents,
            phase_axis=phase_axis,
        )
        data = np.where(finite, corrected, data)
        dwi = io.DWI(data, dwi.affine, bvals, turned, source=dwi.source)
        extra["motion_poses"] = poses.tolist()
    bvecs = dwi.bvecs_voxel
    if options.average_b0:
        data, bvals, bvecs = average_b0(data, bvals, bvecs, b0_threshold=options.b0_threshold)
    model = DKIModel(
        bvals,
        bvecs,
        fit_method=options.fit_method,
        dti_only=options.dti_only,
        b0_threshold=options.b0_threshold,
        constraint_set=options.constraints,
    )
    fit = model.fit(data, mask=mask, noise_sigma=noise_sigma, progress=progress)
    details = {
        "shells": model.shells,
        "directions": model.n_directions,
        "kurtosis": model.kurtosis,
        "mask_voxels": int(mask.sum()),
        "invalid_signals": fit.n_invalid_signals,
        "failed_voxels": fit.n_failed,
        "gibbs_removal": gibbs,
        "rician_fit": noise_sigma is not None,
        **extra,
        "warnings": warnings,
    }
    if fit.dropouts is not None:  # (slice, volume) with the input DWI's volume numbers, b = 0 averaged or not
        volumes = np.arange(len(dwi.bvals))
        if options.average_b0 and is_b0.sum() > 1:
            volumes = np.concatenate([np.flatnonzero(is_b0)[:1], np.flatnonzero(~is_b0)])
        details["dropouts_slice_volume"] = [[int(k), int(volumes[v])] for k, v in np.argwhere(fit.dropouts)]
    return fit, mask, details
