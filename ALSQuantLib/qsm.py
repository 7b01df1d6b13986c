"""Quantitative susceptibility mapping in pure Python: phase → field → local field → susceptibility (ppm).

Each step is a function usable alone; `reconstruct_qsm` chains them::

    phase (any scaling) ──scale_phase, sign, chopped_axes / unchopped──► radians
        ──combine_echoes (multi-echo: offset removal + weighted fit; single echo: unwrap / TE)──► field, ppm
        ──brain_mask (magnitude, eroded)──► mask
        ──background_field_removal (V-SHARP, LBV or PDF)──► local field, ppm
        ──magnitude_noise (the magnitude's background), field_noise──► the field's noise, ppm (the TV weight's
          source with ``--tv-weight-from noise``)
        ──dipole_inversion (TKD, CG or TV-ADMM)──► χ, ppm
        ──reference (whole-brain mean, CSF by its R2* (csf_region), none, or a region given)──► χ, ppm

Conventions: phase φ = 2π γ̄ B0 TE δB with γ̄ = 42.58 MHz/T (`ALSQuantLib.dipole`); the field is in ppm of B0;
TE in seconds; B0 direction in the frame of the image axes (`ALSQuantLib.geometry.b0_direction_voxel`), so oblique
slices give an oblique B0; anisotropic voxels enter the dipole kernel exactly. FFTs are real (scipy.fft), in
float32, with as many workers as the process has cores.

References
----------
Schofield MA, Zhu Y. Fast phase unwrapping algorithm for interferometric applications. Opt Lett 2003;28:1194-6.
Herráez MA et al. Fast three-dimensional phase-unwrapping algorithm based on sorting by reliability following a
non-continuous path. Appl Opt 2002;41:7437-44.
Li W, Wu B, Liu C. Quantitative susceptibility mapping of human brain reflects spatial variation in tissue
composition. NeuroImage 2011;55:1645-56 (V-SHARP).
Zhou D, Liu T, Spincemaille P, Wang Y. Background field removal by solving the Laplacian boundary value problem.
NMR Biomed 2014;27:312-9 (LBV).
Liu T et al. A novel background field removal method for MRI using projection onto dipole fields (PDF).
NMR Biomed 2011;24:1129-36.
Shmueli K et al. Magnetic susceptibility mapping of brain tissue in vivo using MRI phase data. MRM
2009;62:1510-22 (TKD).
Bilgic B et al. Fast quantitative susceptibility mapping with L1-regularization and automatic parameter
selection. MRM 2014;72:1444-59 (TV by ADMM).
Liu J et al. Morphology enabled dipole inversion for quantitative susceptibility mapping using structural
consistency between the magnitude image and the susceptibility map. NeuroImage 2012;59:2560-8 (MEDI's edge mask).
Milovic C et al. Fast nonlinear susceptibility inversion with variational regularization. MRM 2018;80:814-21
(FANSI: the weighted data term by a variable split).
Langkammer C et al. Quantitative susceptibility mapping (QSM) as a means to measure brain iron? A post mortem
validation study. NeuroImage 2012;62:1593-9 (HFEN as used in the QSM challenges).
Milovic C et al. XSIM: a structural similarity index measure optimized for MRI QSM. MRM 2025;93:411-21.
"""

import logging
from dataclasses import dataclass, field

import numpy as np
import scipy.fft
import scipy.sparse
from scipy import ndimage

from . import dipole, geometry, io, masks
from .errors import InputError
from .options import check_choices, option
from .progress import report as report_progress

log = logging.getLogger(__name__)

UNWRAP_METHODS = ("laplacian", "path")
BACKGROUND_METHODS = ("vsharp", "pdf", "lbv")
INVERSION_METHODS = ("tkd", "cg", "tv")
TV_EDGES = ("none", "magnitude")
TV_OUTSIDE = ("free", "penalised")
TV_EDGE_FRACTION = 0.2
"""`magnitude_edges`' fraction for ``--tv-edges magnitude``: on three real-anatomy subjects (true brain mask, V-SHARP
chain) 0.1 / 0.2 / 0.3 raised M1 from 0.78-0.79 x its truth to 0.79-0.80 / 0.81-0.82 / 0.81-0.83 and the correlation
with the true χ from 0.88-0.90 to 0.90-0.91 / 0.91 / 0.90-0.91: 0.2 has the best correlation."""
TV_FREE_ITERATIONS = 40
TV_FREE_RHO_FACTOR = 30.0
TV_FREE_PAD_MM = 10.0
"""The TV inversion with χ free outside the mask (``--tv-outside free``): ADMM iterations, ρ as a multiple of α, and
the margin of sources around the mask. Measured on three real-anatomy subjects (exact total field, the true brain
eroded 2 mm as the mask, V-SHARP and LBV): M1 and the map's correlation settle by 40 iterations (within 0.01-0.02 of
100); ρ = 30 α reaches in 20-40 iterations what 10 α reaches in 40-100 (seed 100); a 10 mm margin reads M1 0.00-0.02
lower than 20 mm with the same correlation and, on the study's grid, takes 8.9 s instead of 24.3 s."""
TV_WEIGHT_FROM = ("default", "noise")
TV_NOISE_PPM = 0.0032
"""With ``--tv-weight-from noise`` the TV inversion's α is `TV_WEIGHT` × the field's noise SD (`field_noise`) / this,
whatever the voxel size. Measured on real-anatomy subjects (`simulate --anatomy mni152`, a head, coil profile 0.6,
V-SHARP, the true brain eroded 2 mm as the mask, weights 0.25-5.6 x the default): on 2 mm grids the lowest NRMSE
came at 0.7-1 x the default at SNR 80 (field noise 0.00096 ppm), 1.0-1.4 x at SNR 40 (0.0019), 2 x at SNR 25
(0.0031), 2.8-4 x at SNR 15 (0.0051) and 4-5.6 x at SNR 10 (0.0077): in proportion to the noise. On the study's
grid (0.5 x 0.5 x 2 mm, SNR 40, 2 subjects) at 0.5 x the default, whose α is twice the 2 mm one's there: the
best α is the same for the same noise per voxel, not scaled by the voxel size (README)."""
TV_BREGMAN_ITERATIONS = 20
"""ADMM iterations of each Bregman step (``--tv-bregman``), going on from the previous solve."""
TV_WEIGHT = 5e-4
"""α of the TV inversion for 1 mm voxels (`dipole_inversion` divides it by the mean voxel size). Measured on three
subjects from real anatomy (`simulate --anatomy mni152`, a head around the brain, 2 mm, V-SHARP local field from the
simulated GRE, weights 0.25-4 x this): at the simulator's SNR 40 this weight gives the best correlation with the true
χ on all three (0.74-0.78) and an NRMSE within 3 % of the best; at SNR 15 twice it lowers the NRMSE by 8-12 % and
raises the correlation by 0.01-0.03 with M1 within 1 %, four times lowers the NRMSE by 12-17 % but M1 by 7-14 %
(`QSMOptions.tv_weight`). Measured again with χ free outside the mask (the default now; the true brain eroded 2 mm as
the mask; weights 0.5-4 x): at SNR 40 this weight has the lowest NRMSE on all three (32-39 %; correlation within
0.002 of the best), at SNR 15 twice it lowers the NRMSE by 14-15 % and raises the correlation by 0.04-0.05 with M1
within 3 %."""


# ----------------------------------------------------------------------------------------------------------------
# Phase scaling
# ----------------------------------------------------------------------------------------------------------------
PHASE_UNITS = ("auto", "radians", "degrees", "milliradians", "int12")

# How each unit stores one turn (2π), from its lowest value: signed (from −half a turn) or unsigned (from 0).
_UNITS = (
    ("radians", 2 * np.pi, False),
    ("degrees", 360.0, False),
    ("milliradians", 2000 * np.pi, False),
    ("int12", 4096.0, True),  # 0…4095, as stored in DICOM
    ("int12", 8192.0, True),  # −4096…4095, Siemens through dcm2niix
)


def _turn(units, low):
    """One turn of the phase in `units` (int12: by its signedness)."""
    if units == "int12":
        return 8192.0 if low < 0 else 4096.0
    return next(turn for name, turn, _ in _UNITS if name == units)


def _within_a_turn(low, high, turn):
    """Whether [low, high] lies within ±half a turn or 0 to a turn (1 % slack)."""
    signed = low >= -turn / 2 * 1.01 and high <= turn / 2 * 1.01
    unsigned = low >= -0.01 * turn and high <= turn * 1.01
    return signed or unsigned


def _units_from_range(low, high, integers):
    """The units a stored phase range points to, and whether the reading is sure. A wrapped phase image (with its
    noisy background) spans nearly a full turn, within ±half a turn or 0 to a turn of its unit: a unit fits when
    the range lies there (1 % slack) and spans more than a quarter turn; it is sure when the range spans 90 % of a
    turn. The first sure unit wins, else the first that fits."""
    fitting = []
    for units, turn, integer_only in _UNITS:
        if _within_a_turn(low, high, turn) and high - low > turn / 4 and (integers or not integer_only):
            if units == "int12" and (turn == 8192.0) != (low < 0):
                continue
            fitting.append((units, high - low >= 0.9 * turn))
    sure = [units for units, certain in fitting if certain]
    if sure:
        return sure[0], True
    return (fitting[0][0], False) if fitting else (None, False)


def scale_phase(phase, units="auto", *, sidecar_units=None):
    """Convert stored phase to radians in [−π, π) and say how.

    Parameters
    ----------
    phase : ndarray
    sidecar_units : str, optional
        The BIDS sidecar's ``Units`` (``"rad"`` or ``"arbitrary"``). With ``auto``, ``rad`` settles a range that
        radians fit but does not span a turn (no warning then); a range radians do not fit is read by its range,
        with a warning that the sidecar disagrees.
    units : {"auto", "radians", "degrees", "milliradians", "int12"}
        ``int12``: scanner integers of 12 bits, one turn over −4096…4095 (Siemens through dcm2niix) or 0…4095 (as
        DICOM stores it). ``auto`` reads the unit from the range (`_units_from_range`): within ±π (or 0…2π)
        radians, ±180 degrees, ±3142 milliradians (radians × 1000, as GE and some converters write), integers
        within −4096…4095 or 0…4095 ``int12``; a range that fits none (e.g. ±0.00367, as the ROMEO test data store
        it) is rescaled linearly from [min, max] to [−π, π).

    Returns
    -------
    radians : ndarray, float32
    description : str
    warning : str or None
        Set when ``auto`` was not sure (the range spans less than 90 % of a turn in the unit it chose, or fits none):
        the units should then be given.

    Examples
    --------
    >>> radians, how, warning = scale_phase(np.array([-3141.0, 0.0, 1570.0, 3141.0]))
    >>> [round(float(r), 3) for r in radians], how.split(" (")[0], warning
    ([-3.141, 0.0, 1.57, 3.141], 'milliradians', None)
    """
    if units not in PHASE_UNITS:
        raise InputError(f"phase units {units!r}: expected one of {', '.join(PHASE_UNITS)}")
    phase = np.asarray(phase, dtype=np.float32)
    if not np.all(np.isfinite(phase)):
        raise InputError("phase: contains NaN or infinite values")
    low, high = float(phase.min()), float(phase.max())
    if high - low <= 0:
        raise InputError("phase: the image is constant; expected a phase image")
    stored, warning = f"range {low:.4g} to {high:.4g}", None
    if units == "auto":
        sample = phase[:: max(1, phase.size // 100000)]
        units, sure = _units_from_range(low, high, bool(np.allclose(sample, np.round(sample))))
        if units is None:
            warning = (
                f"phase: its {stored} fits no known unit and was rescaled linearly to [-pi, pi); if it is in "
                f"radians, degrees, milliradians or 12-bit integers, give --phase-units"
            )
            radians = (phase - low) / (high - low) * (2 * np.pi) - np.pi
            return radians.astype(np.float32), f"{stored} rescaled linearly to [-pi, pi)", warning
        says_radians = sidecar_units == "rad"
        if says_radians and _within_a_turn(low, high, 2 * np.pi):
            units, sure, how = "radians", True, f"radians (the sidecar's Units; {stored})"
        else:
            how = f"{units} (detected from the {stored})"
        if says_radians and units != "radians":
            warning = (
                f"phase: its sidecar says radians, but its {stored} is not, so it was read as {units}; "
                "if that is wrong, give --phase-units"
            )
        elif not sure:
            warning = (
                f"phase: its {stored} spans less than 90 % of a turn, so its units are a guess ({units}); "
                "if that is wrong, give --phase-units"
            )
    else:
        how = f"{units} (as given; {stored})"
    radians = wrap(phase * np.float32(2 * np.pi / _turn(units, low)))
    return radians.astype(np.float32), how, warning


CHOPPING = ("auto", "off")
REFERENCES = ("whole-brain", "csf", "none")
PHASE_SIGNS = ("+1", "-1")
CHOPPED_COHERENCE = -0.3
"""`chopped_axes`: the magnitude-weighted mean of exp(iΔφ) between neighbours below which an axis is chopped."""


def chopped_axes(phase, magnitude):
    """The axes along which every other slice's phase is shifted by π (slice chopping: alternating signs between
    slices left in by a reconstruction or a converter; also a k-space shift left undone along an in-plane axis).

    Between neighbours along an axis, the magnitude-weighted mean of exp(iΔφ) is near +1 in an image, whose field
    is smooth (a wrap changes Δφ by 2π, which exp ignores), and near −1 when every other slice is negated; an axis
    is chopped below `CHOPPED_COHERENCE`.

    >>> phase = np.zeros((4, 4, 6)); phase[:, :, 1::2] = np.pi
    >>> chopped_axes(phase, np.ones_like(phase))
    [2]
    """
    z = (np.asarray(magnitude, np.float32) * np.exp(1j * np.asarray(phase, np.float32))).astype(np.complex64)
    axes = []
    for axis in range(3):
        if z.shape[axis] < 2:
            continue
        first = z[(slice(None),) * axis + (slice(None, -1),)]  # views: no copy of a 512x512x50 image
        second = z[(slice(None),) * axis + (slice(1, None),)]
        products = first * np.conj(second)
        weight = float(np.abs(products).sum())
        if weight > 0 and float(products.real.sum()) / weight < CHOPPED_COHERENCE:
            axes.append(axis)
    return axes


def unchopped(phase, axes):
    """`phase` with π added to every other slice along each of `axes` (undoes `chopped_axes`' finding), wrapped."""
    phase = np.array(phase, dtype=np.float32)
    for axis in axes:
        shape = [1] * phase.ndim
        shape[axis] = phase.shape[axis]
        phase += (np.pi * (np.arange(phase.shape[axis]) % 2)).astype(np.float32).reshape(shape)
    return wrap(phase).astype(np.float32)


def wrap(phase):
    """Wrap to [−π, π)."""
    return (np.asarray(phase) + np.pi) % (2 * np.pi) - np.pi


# ----------------------------------------------------------------------------------------------------------------
# Unwrapping
# ----------------------------------------------------------------------------------------------------------------
def _laplacian_eigenvalues(shape, voxel_size):
    """Eigenvalues of the discrete Laplacian under the type-II DCT (Neumann boundaries), shape `shape`."""
    total = np.zeros(shape, dtype=np.float32)
    for axis, (n, h) in enumerate(zip(shape, voxel_size)):
        k = np.arange(n, dtype=np.float32)
        eig = (2 * np.cos(np.pi * k / n) - 2) / np.float32(h * h)
        total = total + eig.reshape([-1 if a == axis else 1 for a in range(3)])
    return total


def laplacian(image, voxel_size=(1.0, 1.0, 1.0)):
    """Discrete Laplacian with Neumann boundaries, through the DCT (exact inverse of `inverse_laplacian`)."""
    eig = _laplacian_eigenvalues(image.shape, voxel_size)
    return scipy.fft.idctn(
        scipy.fft.dctn(image, type=2, workers=dipole.fft_workers()) * eig, type=2, workers=dipole.fft_workers()
    )


def inverse_laplacian(image, voxel_size=(1.0, 1.0, 1.0)):
    eig = _laplacian_eigenvalues(image.shape, voxel_size)
    eig[0, 0, 0] = 1.0
    spectrum = scipy.fft.dctn(image, type=2, workers=dipole.fft_workers()) / eig
    spectrum[0, 0, 0] = 0.0
    return scipy.fft.idctn(spectrum, type=2, workers=dipole.fft_workers())


def unwrap_phase(phase, *, mask=None, method="laplacian", voxel_size=(1.0, 1.0, 1.0)):
    """Unwrap a 3D phase image (radians).

    Parameters
    ----------
    phase : ndarray, 3D
    mask : ndarray of bool, optional
        Voxels to unwrap (``path``); outside it the result is 0.
    method : {"laplacian", "path"}
        ``laplacian``: ∇⁻²[cos φ ∇² sin φ − sin φ ∇² cos φ] (Schofield & Zhu 2003), fast and robust to noise, but
        it returns the phase up to a smooth (harmonic) error, not the exact phase — background field removal
        absorbs the difference. ``path``: reliability-sorted path following (Herráez 2002, scikit-image), which
        keeps the exact phase (result − φ is a multiple of 2π everywhere).
    voxel_size : mm

    Returns
    -------
    ndarray, float32
    """
    phase = np.asarray(phase, dtype=np.float32)
    if phase.ndim != 3:
        raise InputError(f"phase: expected a 3D image to unwrap, got shape {phase.shape}")
    if method == "laplacian":
        sin, cos = np.sin(phase), np.cos(phase)
        lap = cos * laplacian(sin, voxel_size) - sin * laplacian(cos, voxel_size)
        unwrapped = inverse_laplacian(lap, voxel_size).astype(np.float32)
    elif method == "path":
        from skimage.restoration import unwrap_phase as skimage_unwrap

        masked = np.ma.masked_array(phase, mask=None if mask is None else ~np.asarray(mask, dtype=bool))
        unwrapped = skimage_unwrap(masked)
        unwrapped = np.ma.filled(unwrapped, 0.0).astype(np.float32)
    else:
        raise InputError(f"unwrapping method {method!r}: expected one of {', '.join(UNWRAP_METHODS)}")
    if mask is not None:
        unwrapped = np.where(mask, unwrapped, 0.0).astype(np.float32)
    return unwrapped


PHASE_JUMP = 2.0
"""`unreliable_jumps`: radians between neighbours that an exactly unwrapped phase should not exceed there."""
JUMP_EDGE_MM = 4.0
"""`unreliable_jumps` looks this far inside the mask's edge."""
JUMP_DARK = 0.3
"""`unreliable_jumps`: a voxel darker than this fraction of the mask's median magnitude holds mostly noise."""
MAX_JUMPS = 0.25
"""`reconstruct_qsm` leaves `unreliable_jumps` out of the mask unless they are more than this fraction of it (a
phase that is noise or read in the wrong units): then it keeps them and warns."""


def _without_jumps(total_field, gre, mask, voxel_size):
    """The mask without the `unreliable_jumps` of an exactly unwrapped total field (ppm), holes filled (a jump
    inside the mask would leave a hole, which V-SHARP erodes around like an edge): (mask, how many were left out,
    a warning or None). More than `MAX_JUMPS` of the mask are kept, with the warning. Worked out on the mask's
    bounding box."""
    box = _crop_box(mask, 1)
    per_ppm = 2 * np.pi * dipole.GYROMAGNETIC_RATIO_HZ_PER_T * gre.field_strength * 1e-6 * gre.echo_times[0]
    inside = mask[box]
    jumped = unreliable_jumps(total_field[box] * np.float32(per_ppm), gre.magnitude[box + (0,)], inside, voxel_size)
    jumps = int(jumped.sum())
    if jumps > MAX_JUMPS * inside.sum():
        warning = (
            f"GRE {gre.source}: the unwrapped phase jumps by more than {PHASE_JUMP:g} rad in {jumps} of the mask's "
            f"{int(inside.sum())} voxels: a noisy or mis-scaled phase (check --phase-units) or a mask far beyond the "
            "brain; they were kept"
        )
        return mask, 0, warning
    kept = np.zeros_like(mask)
    kept[box] = ndimage.binary_fill_holes(inside & ~jumped) & inside
    return kept, int((mask & ~kept).sum()), None


def unreliable_jumps(unwrapped, magnitude, mask, voxel_size):
    """Voxels of `mask` that an exact unwrapping (`unwrap_phase`'s ``path``) cannot be trusted in: those whose
    unwrapped phase (radians) still differs from a neighbour's by more than `PHASE_JUMP` and that lie within
    `JUMP_EDGE_MM` of the mask's edge, where air and bone make the field change faster than the grid samples it,
    or are dark (below `JUMP_DARK` of the median magnitude: noise). A jump deep inside bright tissue is kept: it is
    a real step of the field (a vein, a cylinder of iron), which only an exact unwrapping keeps.

    Measured (V-SHARP and TV after it; three subjects from real anatomy with a head, 2 mm, their brain as the mask):
    without this, path unwrapping left 2π errors in 0.3 % of the brain, all in its outer 2 mm, and χ correlated
    0.57-0.63 with the truth (Laplacian 0.74-0.78); with it 0.86-0.88. With the mask 4 mm too wide: 0.16-0.18
    without, 0.54-0.60 with (Laplacian 0.58-0.61). qsm-forward's cylinders: no voxel left out (22.5 % NRMSE either
    way); leaving out every jump instead took out the 0.5 ppm cylinder's rim and put it at 0.21x.

    >>> phase = np.zeros((30, 13, 13)); phase[10:] = 2 * np.pi; phase[20:] = 4 * np.pi  # two steps along x
    >>> line = np.zeros(phase.shape, bool); line[:, 6, 6] = True  # a line of voxels, each 1 mm from the edge
    >>> np.flatnonzero(unreliable_jumps(phase, np.ones(phase.shape), line, (1.0, 1, 1))[:, 6, 6]).tolist()
    [9, 10, 19, 20]
    >>> wide = np.zeros(phase.shape, bool); wide[1:-1, 1:-1, 1:-1] = True  # the line is 6 mm deep in it
    >>> magnitude = np.ones(phase.shape); magnitude[20:] = 0.1  # dark from x = 20: only the step into it counts
    >>> np.flatnonzero(unreliable_jumps(phase, magnitude, wide, (1.0, 1, 1))[:, 6, 6]).tolist()
    [20]
    """
    mask = np.asarray(mask, dtype=bool)
    jumps = np.zeros(mask.shape, dtype=bool)
    for axis in range(3):
        head, tail, _, _ = _axis_slices(axis)
        jump = (np.abs(unwrapped[tail] - unwrapped[head]) > PHASE_JUMP) & mask[head] & mask[tail]
        jumps[head] |= jump
        jumps[tail] |= jump
    near_edge = ndimage.distance_transform_edt(mask, sampling=voxel_size) <= JUMP_EDGE_MM
    dark = magnitude < JUMP_DARK * np.median(magnitude[mask])
    return jumps & (near_edge | dark)


# ----------------------------------------------------------------------------------------------------------------
# Echo combination
# ----------------------------------------------------------------------------------------------------------------
def combine_echoes(
    phase, magnitude, echo_times, field_strength, *, mask=None, unwrap="laplacian", voxel_size=(1, 1, 1)
):
    """Total field (ppm) from one or more echoes.

    Single echo: the unwrapped phase / (2π γ̄ B0 TE); the receiver phase offset stays in it and is removed with the
    background field (it is smooth).

    Multi-echo: the phase offset φ₀ is estimated from the first two echoes (φ₀ = φ₁ − TE₁ Δφ/ΔTE, with Δφ the
    Hermitian echo difference), removed from every echo, the echo difference is unwrapped spatially once, and each
    echo is unwrapped in time against it; the field is then the weighted least-squares slope of phase against TE
    through the origin, with weights |m_n|² TE_n² (the inverse variance of the field from echo n).

    Parameters
    ----------
    phase, magnitude : ndarray, shape (i, j, k, echoes), phase in radians
    echo_times : sequence of float, seconds
    field_strength : float, tesla
    mask : ndarray of bool, optional
    unwrap : {"laplacian", "path"}

    Returns
    -------
    field_ppm : ndarray, float32
    """
    phase = np.asarray(phase, dtype=np.float32)
    magnitude = np.asarray(magnitude, dtype=np.float32)
    if phase.ndim == 3:
        phase, magnitude = phase[..., None], magnitude[..., None]
    echo_times = io.check_echo_times(echo_times, phase.shape[3], "QSM")
    io.check_field_strength(field_strength, "QSM")
    to_ppm = 1.0 / (2 * np.pi * dipole.GYROMAGNETIC_RATIO_HZ_PER_T * field_strength * 1e-6)  # rad/s → ppm
    if phase.shape[3] == 1:
        unwrapped = unwrap_phase(phase[..., 0], mask=mask, method=unwrap, voxel_size=voxel_size)
        return (unwrapped / echo_times[0] * to_ppm).astype(np.float32)
    z = magnitude * np.exp(1j * phase)
    delta_te = echo_times[1] - echo_times[0]
    delta = np.angle(z[..., 1] * np.conj(z[..., 0]))
    offset = np.angle(z[..., 0] * np.exp(-1j * delta * (echo_times[0] / delta_te)))
    delta_unwrapped = unwrap_phase(delta.astype(np.float32), mask=mask, method=unwrap, voxel_size=voxel_size)
    numerator = np.zeros(phase.shape[:3], dtype=np.float64)
    denominator = np.zeros(phase.shape[:3], dtype=np.float64)
    for n, te in enumerate(echo_times):
        corrected = np.angle(z[..., n] * np.exp(-1j * offset))
        predicted = delta_unwrapped * (te / delta_te)
        unwrapped = predicted + wrap(corrected - predicted)
        weight = magnitude[..., n] ** 2 * te**2
        numerator += weight * te * unwrapped
        denominator += weight * te**2
    slope = np.divide(numerator, denominator, out=np.zeros_like(numerator), where=denominator > 0)
    return (slope * to_ppm).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------------
# Noise
# ----------------------------------------------------------------------------------------------------------------
NOISE_BACKGROUND_MM = 5.0
"""`magnitude_noise` reads the noise from voxels farther than this from anything brighter than half the
magnitude's Otsu threshold (head, ghosts at their brightest)."""
NOISE_MIN_BACKGROUND = 0.02
"""... and only when they are at least this share of the image (a tight crop has no background to read)."""
UNIFORM_PHASE_SD = np.pi / np.sqrt(3.0)
"""The SD of a phase carrying no signal (uniform on a turn): the most a voxel's phase noise can be."""


def magnitude_noise(magnitude, voxel_size):
    """The noise SD of the real and imaginary channels, from the magnitude's background; None without one.

    The background is air: the voxels farther than `NOISE_BACKGROUND_MM` from the smoothed magnitude's signal
    (above half its Otsu threshold). There the magnitude is Rayleigh distributed, with median σ √(2 ln 2). The
    median keeps a few ghosts from counting. This assumes one receive channel or an adaptive coil combination (as
    phase images need); a sum-of-squares magnitude has a brighter background, and parallel imaging makes the noise
    vary across the image, which one figure cannot tell. In-plane voxels finer than 1 mm are subsampled, which
    leaves the statistic alone and the distance transform fast.

    Returns
    -------
    float or None
        None when the background is less than `NOISE_MIN_BACKGROUND` of the image or is zero (a crop, or a
        scanner that masks the background).
    """
    from skimage.filters import threshold_otsu

    voxel_size = np.broadcast_to(np.asarray(voxel_size, dtype=float), (3,))
    step = np.maximum(1, np.floor(1.0 / voxel_size)).astype(int)
    sample = np.asarray(magnitude, dtype=np.float32)[:: step[0], :: step[1], :: step[2]]
    smooth = ndimage.gaussian_filter(sample, sigma=1.0)
    if not np.ptp(smooth) > 0:
        return None
    signal = smooth > 0.5 * threshold_otsu(smooth[::2, ::2, ::2])
    if signal.all():
        return None
    background = ndimage.distance_transform_edt(~signal, sampling=voxel_size * step) > NOISE_BACKGROUND_MM
    if background.mean() < NOISE_MIN_BACKGROUND:
        return None
    sigma = float(np.median(sample[background])) / np.sqrt(2.0 * np.log(2.0))
    return sigma if sigma > 0 else None


def field_noise(magnitude, echo_times, field_strength, mask, sigma):
    """The RMS over `mask` of the total field's noise SD (ppm), for channel noise `sigma` (`magnitude_noise`).

    A voxel's phase noise at echo n is σ / m_n (the complex noise across the signal), at most `UNIFORM_PHASE_SD`.
    `combine_echoes`' field is linear in the echoes' phases: one echo φ / TE; several, the slope through the origin
    with weights m_n² TE_n² after the receiver offset φ₁ − TE₁ (φ₂ − φ₁) / ΔTE is taken from every echo (which
    roughly triples the noise of three echoes at 5, 10, 15 ms). Its SD is that of the linear combination. This is
    what the local field carries too: background removal passes noise, which is all high frequencies.
    """
    magnitude = np.asarray(magnitude, dtype=np.float32)
    if magnitude.ndim == 3:
        magnitude = magnitude[..., None]
    te = np.asarray(echo_times, dtype=float)
    m = magnitude[np.asarray(mask, dtype=bool)].astype(np.float64)
    m = np.maximum(m, sigma / UNIFORM_PHASE_SD)  # no echo's phase is noisier than a uniform one
    weights = m**2 * te**2
    coefficients = weights * te / np.sum(weights * te**2, axis=-1, keepdims=True)  # ∂ field / ∂ φ_n, 1/s
    if te.size > 1:  # each echo less the offset, 1 + r times φ₁ less r times φ₂ (r = TE₁ / ΔTE)
        offset = coefficients.sum(axis=-1)
        ratio = te[0] / (te[1] - te[0])
        coefficients[:, 0] -= offset * (1 + ratio)
        coefficients[:, 1] += offset * ratio
    phase_rate_sd = sigma * np.sqrt(np.sum(coefficients**2 / m**2, axis=-1))  # rad / s: the phase of 1 s
    return float(dipole.phase_to_field_ppm(np.sqrt(np.mean(phase_rate_sd**2)), 1.0, field_strength))


# ----------------------------------------------------------------------------------------------------------------
# Mask
# ----------------------------------------------------------------------------------------------------------------
def _ball(radius_mm, voxel_size):
    voxel_size = np.asarray(voxel_size, dtype=float)
    half = np.maximum(np.floor(radius_mm / voxel_size).astype(int), 0)
    grids = np.meshgrid(*[np.arange(-h, h + 1) * v for h, v in zip(half, voxel_size)], indexing="ij")
    return sum(g**2 for g in grids) <= radius_mm**2 + 1e-9


# ----------------------------------------------------------------------------------------------------------------
# Background field removal
# ----------------------------------------------------------------------------------------------------------------
def _smv_kernel_spectrum(shape, voxel_size, radius_mm):
    """Spectrum (rfftn layout) of the normalised spherical-mean-value kernel of `radius_mm`, centred at 0."""
    ball = _ball(radius_mm, voxel_size).astype(np.float32)
    ball /= ball.sum()
    kernel = np.zeros(shape, dtype=np.float32)
    half = [s // 2 for s in ball.shape]
    idx = [np.arange(-h, h + 1) % n for h, n in zip(half, shape)]
    kernel[np.ix_(*idx)] = ball
    return scipy.fft.rfftn(kernel, workers=dipole.fft_workers())


def vsharp(total_field, mask, voxel_size, *, radii_mm=None, threshold=0.05):
    """Variable-kernel SHARP (after Li et al. 2011).

    For each radius r, the field minus its spherical mean, (δ − S_r) * f, is free of the (harmonic) background
    inside the mask eroded by r, and deconvolving it by (δ − S_r) with truncation (|F(δ − S_r)| < `threshold`
    → 0) gives the local field there. Every voxel takes the result of the largest radius valid at it: large
    kernels are accurate in the interior, small ones reach closer to the brain's edge.

    Each radius is deconvolved with its own kernel; deconvolving the combined high-passed field with the largest
    kernel alone (a common shortcut) scales the boundary shell's values by (r/R)² and spreads that error
    everywhere (measured on the phantom: local-field error 0.011 ppm against 0.0014 ppm for one 12 mm radius).

    Parameters
    ----------
    radii_mm : sequence of float, optional
        Default: five radii from 12 mm down to the coarsest voxel size (2 mm at least).

    Returns
    -------
    local_field : ndarray, float32 (same units as `total_field`)
    local_mask : ndarray of bool
        Where a radius was valid (the mask eroded by the smallest radius).
    """
    voxel_size = np.asarray(voxel_size, dtype=float)
    if radii_mm is None:
        # Down to one voxel along the coarsest axis (2 mm at least): the cortex lies within a few millimetres of the
        # mask's edge. On the 2 mm phantom, 2 mm instead of 4 mm measures 98 % of M1 instead of 63 %, and its mean
        # at 0.69 × the truth instead of 0.61 ×, with the same whole-brain NRMSE.
        smallest = max(2.0, float(voxel_size.max()))
        radii_mm = np.unique(np.round(np.linspace(12.0, smallest, 5), 1))
    radii_mm = sorted((float(r) for r in radii_mm), reverse=True)
    mask = np.asarray(mask, dtype=bool)
    shape = dipole.padded_shape(mask.shape, 1.0 + 2 * radii_mm[0] / (np.asarray(mask.shape) * voxel_size).min())
    workers = dipole.fft_workers()
    field_spectrum = scipy.fft.rfftn(np.where(mask, total_field, 0.0).astype(np.float32), s=shape, workers=workers)
    mask_spectrum = scipy.fft.rfftn(mask.astype(np.float32), s=shape, workers=workers)
    sl = tuple(slice(0, n) for n in mask.shape)
    local = np.zeros(mask.shape, dtype=np.float32)
    filled = np.zeros(mask.shape, dtype=bool)
    for radius in radii_mm:
        smv = _smv_kernel_spectrum(shape, voxel_size, radius)
        eroded = scipy.fft.irfftn(mask_spectrum * smv, s=shape, workers=workers)[sl] > 0.999
        new = eroded & ~filled
        if not new.any():
            continue
        kernel = 1.0 - smv
        high_pass = scipy.fft.irfftn(field_spectrum * kernel, s=shape, workers=workers)[sl]
        inverse = np.where(np.abs(kernel) < threshold, 0.0, 1.0 / np.where(kernel == 0, 1, kernel))
        solution = scipy.fft.irfftn(
            scipy.fft.rfftn(np.where(eroded, high_pass, 0.0), s=shape, workers=workers) * inverse,
            s=shape,
            workers=workers,
        )[sl]
        local[new] = solution[new]
        filled |= eroded
    if not filled.any():
        raise InputError("V-SHARP: the mask is thinner than the smallest radius; use a larger mask or smaller radii")
    return local, filled


def conjugate_gradient(apply, b, iterations, tolerance):
    """Solve A x = b for a symmetric positive (semi-)definite operator `apply`, from x = 0, stopping when
    ‖r‖ < `tolerance` ‖b‖ or after `iterations`."""
    x = np.zeros_like(b)
    r = b.copy()
    p = r.copy()
    rs = float(np.vdot(r, r))
    stop = tolerance**2 * rs
    for _ in range(iterations):
        ap = apply(p)
        alpha = rs / max(float(np.vdot(p, ap)), 1e-30)
        x += alpha * p
        r -= alpha * ap
        rs_new = float(np.vdot(r, r))
        if rs_new < stop:
            break
        p = r + (rs_new / rs) * p
        rs = rs_new
    return x


def pdf(total_field, mask, voxel_size, b0_direction, *, iterations=100, tolerance=1e-3, weights=None):
    """Projection onto dipole fields (Liu et al. 2011).

    Fits the field inside the mask with dipoles outside it, min ‖W (f − M D χ_out)‖² over χ_out supported outside
    the mask, by conjugate gradients on the normal equations; the background is D χ_out and the local field the
    rest.

    Returns
    -------
    local_field : ndarray, float32, zero outside the mask
    """
    mask = np.asarray(mask, dtype=bool)
    voxel_size = np.asarray(voxel_size, dtype=float)
    shape = dipole.padded_shape(mask.shape, 1.5)
    kernel = dipole.dipole_kernel(shape, voxel_size, b0_direction)
    workers = dipole.fft_workers()
    sl = tuple(slice(0, n) for n in mask.shape)
    outside = np.ones(shape, dtype=bool)  # the padding is outside the brain too
    outside[sl] = ~mask
    w2 = (np.ones(mask.shape, np.float32) if weights is None else np.asarray(weights, np.float32) ** 2) * mask

    def forward(x):  # χ_out → field inside the mask
        return scipy.fft.irfftn(scipy.fft.rfftn(x, workers=workers) * kernel, s=shape, workers=workers)[sl]

    def adjoint(y):  # field inside the mask → χ_out (the kernel is real and symmetric)
        padded = np.zeros(shape, dtype=np.float32)
        padded[sl] = y
        return scipy.fft.irfftn(scipy.fft.rfftn(padded, workers=workers) * kernel, s=shape, workers=workers) * outside

    x = conjugate_gradient(lambda v: adjoint(w2 * forward(v)), adjoint(w2 * total_field), iterations, tolerance)
    background = forward(x)
    return np.where(mask, total_field - background, 0.0).astype(np.float32)


def lbv(total_field, mask, voxel_size, *, tolerance=1e-5):
    """Laplacian boundary value (Zhou et al. 2014).

    Inside the mask the background field is harmonic, so the local field f_L has the total field's Laplacian there;
    taking f_L = 0 on the mask's boundary, the Poisson problem Δf_L = Δf in the interior (the mask eroded by one
    voxel) with that Dirichlet condition has one solution. It is found by algebraic multigrid (pyamg's Ruge-Stüben
    solver with direct interpolation, the fastest of pyamg's solvers measured on the study's grid) with conjugate
    gradients, to a relative residual of `tolerance`.

    Returns
    -------
    local_field : ndarray, float32
    local_mask : ndarray of bool
        The interior.
    """
    import pyamg

    mask = np.asarray(mask, dtype=bool)
    interior = ndimage.binary_erosion(mask)
    n = int(interior.sum())
    if n < 27:
        raise InputError("LBV: the mask has no interior; use a larger mask")
    weights = 1.0 / np.asarray(voxel_size, dtype=float) ** 2
    index = np.full(mask.shape, -1, dtype=np.int32)
    index[interior] = np.arange(n, dtype=np.int32)
    field = np.where(mask, total_field, 0.0).astype(np.float64)
    centre = np.nonzero(interior)
    laplacian_field = np.zeros(n)
    # The 7-point Laplacian's rows, built directly in CSR form: neighbours in ascending raveled order, those on the
    # boundary (index -1, where f_L = 0) left out.
    columns = np.empty((n, 7), dtype=np.int32)
    values = np.empty((n, 7))
    for k, (axis, step) in enumerate([(0, -1), (1, -1), (2, -1), (None, 0), (2, 1), (1, 1), (0, 1)]):
        if axis is None:
            columns[:, k] = np.arange(n, dtype=np.int32)
            values[:, k] = 2.0 * weights.sum()
            continue
        neighbour = list(centre)
        neighbour[axis] = centre[axis] + step
        neighbour = tuple(neighbour)
        laplacian_field += weights[axis] * (field[neighbour] - field[centre])
        columns[:, k] = index[neighbour]
        values[:, k] = -weights[axis]
    inside = columns >= 0
    row_starts = np.concatenate([[0], np.cumsum(inside.sum(axis=1))]).astype(np.int32)
    matrix = scipy.sparse.csr_matrix((values[inside], columns[inside], row_starts), (n, n))
    solver = pyamg.ruge_stuben_solver(matrix, interpolation="direct")
    solution = solver.solve(-laplacian_field, tol=tolerance, accel="cg")
    local = np.zeros(mask.shape, dtype=np.float32)
    local[interior] = solution
    return local, interior


def background_field_removal(total_field, mask, voxel_size, b0_direction=(0, 0, 1), *, method="vsharp", **options):
    """Local field (same units) and the mask it is valid in, by V-SHARP (`vsharp`), PDF (`pdf`) or LBV (`lbv`)."""
    if method == "vsharp":
        return vsharp(total_field, mask, voxel_size, **options)
    if method == "lbv":
        return lbv(total_field, mask, voxel_size, **options)
    if method == "pdf":
        return pdf(total_field, mask, voxel_size, b0_direction, **options), np.asarray(mask, dtype=bool)
    raise InputError(f"background field removal method {method!r}: expected one of {', '.join(BACKGROUND_METHODS)}")


# ----------------------------------------------------------------------------------------------------------------
# Dipole inversion
# ----------------------------------------------------------------------------------------------------------------
def _crop_box(mask, margin):
    index = np.argwhere(mask)
    if index.size == 0:
        raise InputError("mask: empty; nothing to invert")
    low = np.maximum(index.min(axis=0) - margin, 0)
    high = np.minimum(index.max(axis=0) + margin + 1, mask.shape)
    return tuple(slice(a, b) for a, b in zip(low, high))


def _axis_slices(axis):
    """Index tuples along `axis`: all but the last, all but the first, the first, the last."""

    def along(part):
        index = [slice(None)] * 3
        index[axis] = part
        return tuple(index)

    return along(slice(0, -1)), along(slice(1, None)), along(slice(0, 1)), along(slice(-1, None))


def _gradient(x, voxel_size, out=None):
    """Forward differences with periodic boundaries, per axis, divided by the voxel size (into `out` if given)."""
    out = out or [np.empty_like(x) for _ in range(3)]
    for a, g in enumerate(out):
        head, tail, first, last = _axis_slices(a)
        np.subtract(x[tail], x[head], out=g[head])
        np.subtract(x[first], x[last], out=g[last])
        g *= np.float32(1.0 / voxel_size[a])
    return out


def _divergence_adjoint(g, voxel_size, out=None, work=None):
    """Adjoint of `_gradient` (= −divergence): Σ_a (g_a shifted forward by one − g_a) / h_a (into `out` if given;
    `work` is a scratch array of the same shape)."""
    total = np.empty_like(g[0]) if out is None else out
    work = np.empty_like(g[0]) if work is None else work
    for a in range(3):
        head, tail, first, last = _axis_slices(a)
        np.subtract(g[a][head], g[a][tail], out=work[tail])
        np.subtract(g[a][last], g[a][first], out=work[first])
        if a == 0:
            np.multiply(work, np.float32(1.0 / voxel_size[a]), out=total)
        else:
            work *= np.float32(1.0 / voxel_size[a])
            total += work
    return total


def _gradient_spectrum(shape, voxel_size):
    """|E|² of the forward-difference gradient in the rfftn layout (sum over axes)."""
    total = np.zeros((shape[0], shape[1], shape[2] // 2 + 1), dtype=np.float32)
    freqs = [np.fft.fftfreq(shape[0]), np.fft.fftfreq(shape[1]), np.fft.rfftfreq(shape[2])]
    for a in range(3):
        e2 = (2 - 2 * np.cos(2 * np.pi * freqs[a])) / voxel_size[a] ** 2
        total = total + e2.astype(np.float32).reshape([-1 if b == a else 1 for b in range(3)])
    return total


def _pairs_within(mask):
    """(3, i, j, k) bool: whether each forward-difference gradient component (`_gradient`, periodic) joins two voxels
    of `mask`."""
    mask = np.asarray(mask, dtype=bool)
    return np.stack([mask & np.roll(mask, -1, axis=axis) for axis in range(3)])


def magnitude_edges(magnitude, mask, voxel_size, fraction=TV_EDGE_FRACTION):
    """Where the magnitude has edges, per axis (MEDI's gradient mask, Liu 2012): the `fraction` of the
    forward-difference gradient components (three per voxel) between two voxels of the mask largest in magnitude,
    as a (3, i, j, k) boolean array.

    Tissue boundaries that show in the magnitude are likely boundaries of χ too; TV leaves them unpenalised
    (`dipole_inversion`'s ``edges``). MEDI's default (``percentage`` 0.9: as many edge components as 90 % of the
    mask's voxels) is a fraction of 0.3.
    """
    gradients = np.abs(np.stack(_gradient(np.asarray(magnitude, dtype=np.float32), voxel_size)))
    # only differences between two voxels of the mask: the mask's own edge is no tissue boundary (counted, it took
    # most of the fraction and left the edge unpenalised: NRMSE 23 % against 5 % on a sphere with a shell)
    inside = _pairs_within(mask)
    level = np.quantile(gradients[inside], 1.0 - fraction) if inside.any() else np.inf
    return (gradients > level) & inside


def dipole_inversion(
    local_field_ppm,
    mask,
    voxel_size,
    *,
    b0_direction=(0.0, 0.0, 1.0),
    method="tv",
    threshold=0.19,
    regularization=None,
    iterations=None,
    tolerance=1e-3,
    pad_mm=None,
    edges=None,
    outside="free",
    bregman=0,
    bregman_iterations=None,
):
    """Susceptibility (ppm) from a local field (ppm).

    Parameters
    ----------
    local_field_ppm : ndarray, 3D
    mask : ndarray of bool
    voxel_size : sequence of 3 floats, mm
    b0_direction : sequence of 3 floats, in the frame of the image axes
    method : {"tkd", "cg", "tv"}
        ``tkd``: truncated k-space division, 1/D replaced by sign(D)/`threshold` where |D| < `threshold`
        (Shmueli 2009). ``cg``: L2-regularised least squares min ‖M(Dχ − f)‖² + λ‖χ‖² by conjugate gradients
        (`iterations` default 50, λ default 1e-3: early stopping regularises, as in iLSQR). ``tv``: total variation,
        min ½‖M(Dχ − f)‖² + α‖∇χ‖₁ by ADMM with closed-form updates (Bilgic 2014, with the data term inside the
        mask only as in Milovic 2018; `regularization` α default 5e-4 per mm⁻¹ scaled to the voxel size,
        `iterations` default 20, `TV_FREE_ITERATIONS` with `outside` free). Counting the data only inside the mask
        halves the error near the brain's edge against the unmasked form, which fits a zero field outside the mask
        (phantom: NRMSE 35 % → 13 %).
    threshold : float
        TKD threshold.
    pad_mm : float, optional
        The field is cropped to the mask's bounding box plus this margin (zero field outside the mask), which keeps
        the FFTs small: 20 mm, or `TV_FREE_PAD_MM` with `outside` free.
    edges : ndarray of bool, shape (3, i, j, k), optional
        TV only: gradient components left unpenalised (`magnitude_edges`, ``--tv-edges magnitude``).
    outside : {"free", "penalised"}
        TV only: whether χ outside the mask (on the padded grid, where it explains the field inside the mask but is
        never reported) is penalised like χ inside, or left free. Free, sources outside the mask take up the
        harmonic field that background removal left in the local field (`_tv_admm`).
    bregman : int
        TV only: Bregman iterations after the first solve (Osher 2005): the part of the field that χ does not
        explain inside the mask is added back to the field and TV solved again, which restores the contrast TV's
        penalty takes from small, faint structures (and lets some noise back in). The ADMM goes on from where it
        was, for `bregman_iterations` more each (default `TV_BREGMAN_ITERATIONS`).

    Returns
    -------
    ndarray, float32, zero outside the mask
    """
    field = np.asarray(local_field_ppm, dtype=np.float32)
    mask = np.asarray(mask, dtype=bool)
    if field.ndim != 3 or field.shape != mask.shape:
        raise InputError(f"local field {field.shape} and mask {mask.shape}: expected two 3D arrays of the same shape")
    voxel_size = np.broadcast_to(np.asarray(voxel_size, dtype=float), (3,))
    if method not in INVERSION_METHODS:
        raise InputError(f"dipole inversion method {method!r}: expected one of {', '.join(INVERSION_METHODS)}")
    if outside not in TV_OUTSIDE:
        raise InputError(f"TV outside the mask {outside!r}: expected one of {', '.join(TV_OUTSIDE)}")
    free = method == "tv" and outside == "free"
    if pad_mm is None:
        pad_mm = TV_FREE_PAD_MM if free else 20.0
    margin = np.ceil(pad_mm / voxel_size).astype(int)
    box = _crop_box(mask, margin.max())
    f = np.where(mask, field, 0.0)[box]
    m = mask[box]
    shape = tuple(scipy.fft.next_fast_len(int(n + 2 * mg), real=True) for n, mg in zip(f.shape, margin))
    D = dipole.dipole_kernel(shape, voxel_size, b0_direction)
    workers = dipole.fft_workers()
    sl = tuple(slice(0, n) for n in f.shape)

    def fft(x):
        return scipy.fft.rfftn(x, s=shape, workers=workers)

    def ifft(x):
        return scipy.fft.irfftn(x, s=shape, workers=workers)

    if method == "tkd":
        inverse = np.where(np.abs(D) < threshold, np.sign(D) / threshold, 1.0 / np.where(D == 0, 1, D))
        inverse[0, 0, 0] = 0.0
        chi = ifft(fft(f) * inverse)[sl]
    elif method == "cg":
        lam = 1e-3 if regularization is None else regularization
        n_iter = 50 if iterations is None else iterations
        mp = np.zeros(shape, dtype=np.float32)
        mp[sl] = m

        def normal(x):
            return ifft(D * fft(mp * ifft(D * fft(x)))) + lam * x

        padded_f = np.zeros(shape, dtype=np.float32)
        padded_f[sl] = f
        chi = conjugate_gradient(normal, ifft(D * fft(mp * padded_f)), n_iter, tolerance)[sl]
    else:
        if edges is not None:
            edges = np.asarray(edges, dtype=bool)[(slice(None),) + box]
        n_iter = (TV_FREE_ITERATIONS if free else 20) if iterations is None else iterations
        chi = _tv_admm(
            f,
            m,
            shape,
            D,
            voxel_size,
            regularization,
            n_iter,
            fft,
            ifft,
            edges=edges,
            free_outside=free,
            rho_factor=TV_FREE_RHO_FACTOR if free else 10.0,
            bregman=bregman,
            bregman_iterations=TV_BREGMAN_ITERATIONS if bregman_iterations is None else bregman_iterations,
        )[sl]
    out = np.zeros(mask.shape, dtype=np.float32)
    out[box] = np.where(m, chi, 0.0)
    return out


def _tv_admm(
    f,
    mask,
    shape,
    D,
    voxel_size,
    alpha,
    iterations,
    fft,
    ifft,
    rho_factor=10.0,
    mu=0.1,
    edges=None,
    free_outside=False,
    bregman=0,
    bregman_iterations=None,
):
    """min ½‖M(Dχ − f)‖² + α‖∇χ‖₁ (anisotropic TV) by ADMM; returns χ on the padded grid.

    The data term counts only inside the mask M: outside it the field is unknown, not zero (the cortex's own field
    reaches beyond the brain's edge). With the splits v = Dχ and z = ∇χ every update has a closed form (after
    Milovic et al. 2018, FANSI's weighted linear model): χ by one division in k-space, v and z voxel by voxel.
    The penalty weights ρ (of the split z) and μ (of v) set the speed, not the answer: measured on the phantom,
    μ = 0.1 reaches in 20 iterations the error that μ = 1 reaches in more than 40.

    With `free_outside`, only differences between two voxels of the mask are penalised (then ‖∇χ‖₁ counts them
    alone): χ beyond the mask is as unknown as the field there. It is not reported, but its field inside the mask
    takes up what is harmonic there, which background removal leaves in the local field (most of it at the brain's
    edge, where V-SHARP and LBV are least accurate), and the cortex's step to whatever lies beyond the mask costs
    nothing. This is total field inversion's idea (Liu 2018: χ estimated everywhere, background sources included)
    applied after background removal, where the residual is small, so that the same closed-form ADMM converges in
    `TV_FREE_ITERATIONS`; from the total field itself it did not (M1 at 0.5 x its truth after 200 iterations).
    """
    if alpha is None:
        alpha = TV_WEIGHT / float(np.mean(voxel_size))
    rho = np.float32(rho_factor * alpha)
    mu = np.float32(mu)
    m = np.zeros(shape, dtype=np.float32)
    padded = np.zeros(shape, dtype=np.float32)
    inside = tuple(slice(0, n) for n in f.shape)
    m[inside] = mask
    padded[inside] = f
    # The v-update, v = (M f + μ (Dχ + u_v)) / (M + μ), as v = field_part + weight (Dχ + u_v).
    weight = mu / (m + mu)
    field_part = m * padded / (m + mu)
    denominator = (mu * np.abs(D) ** 2 + rho * _gradient_spectrum(shape, voxel_size)).astype(np.float32)
    denominator[0, 0, 0] = max(float(denominator[0, 0, 0]), 1e-6)
    # χ = F⁻¹[(ρ F(∇ᵀ(z − u)) + μ D F(v − u_v)) / (μ|D|² + ρ|E|²)], with the two spectral weights precomputed.
    gradient_weight = (rho / denominator).astype(np.float32)
    data_weight = (mu * D / denominator).astype(np.float32)
    del denominator
    # Scaled ADMM with z = shrink(∇χ + u) and u ← ∇χ + u − z. Since shrink(v) = v − clip(v, −t, t), the new u is
    # clip(v, −t, t) and the next χ-update needs only z − u = v − 2u: one buffer per axis instead of four, which
    # also takes the next gradient.
    u = [np.zeros(shape, dtype=np.float32) for _ in range(3)]
    z_minus_u = [np.zeros(shape, dtype=np.float32) for _ in range(3)]
    divergence, work = np.empty(shape, dtype=np.float32), np.empty(shape, dtype=np.float32)
    v, u_v = padded.copy(), np.zeros(shape, dtype=np.float32)
    chi = np.zeros(shape, dtype=np.float32)
    shrink = np.float32(alpha) / rho
    penalised = None  # where u may be non-zero; elsewhere u stays 0 and z = ∇χ: no penalty
    if free_outside:  # only differences between two voxels of the mask are penalised
        penalised = _pairs_within(m > 0)
    if edges is not None:  # nor across the magnitude's edges
        if penalised is None:
            penalised = np.ones((3,) + shape, dtype=bool)
        penalised[(slice(None),) + inside] &= ~edges
    later = iterations if bregman_iterations is None else bregman_iterations
    restarts = {iterations + k * later for k in range(bregman)}
    measured = padded.copy() if bregman else None
    for step in range(iterations + bregman * later):
        if step in restarts:  # Bregman: add back what χ leaves unexplained inside the mask, and go on from here
            padded += m * (measured - ifft(fft(chi) * D))
            field_part = m * padded / (m + mu)
        spectrum = fft(_divergence_adjoint(z_minus_u, voxel_size, out=divergence, work=work))
        spectrum *= gradient_weight
        v -= u_v
        data_spectrum = fft(v)
        data_spectrum *= data_weight
        spectrum += data_spectrum
        chi = ifft(spectrum).astype(np.float32, copy=False)
        for a, g in enumerate(_gradient(chi, voxel_size, out=z_minus_u)):
            g += u[a]
            np.clip(g, -shrink, shrink, out=u[a])
            if penalised is not None:
                u[a] *= penalised[a]
            g -= u[a]
            g -= u[a]
        spectrum *= D
        field_estimate = ifft(spectrum).astype(np.float32, copy=False)  # Dχ
        field_estimate += u_v
        np.multiply(field_estimate, weight, out=v)
        v += field_part  # data inside the mask, Dχ + u_v outside
        np.subtract(field_estimate, v, out=u_v)
    return chi


# ----------------------------------------------------------------------------------------------------------------
# Referencing
# ----------------------------------------------------------------------------------------------------------------
def reference(chi, mask, region=None):
    """Subtract the mean over `region` (a boolean mask, e.g. CSF), or over the whole `mask` when none is given."""
    mask = np.asarray(mask, dtype=bool)
    region = mask if region is None else np.asarray(region, dtype=bool) & mask
    if not region.any():
        raise InputError("reference region: it has no voxels inside the brain mask")
    return np.where(mask, chi - chi[region].mean(), 0.0).astype(np.float32)


CSF_R2STAR = 5.0
"""`csf_region`: CSF's R2* is about 1-3/s, the brain's tissue 15/s and more (3 T); below this, CSF (MEDI+0's limit)."""
CSF_EDGE_MM = 10.0
"""`csf_region` looks this far inside the brain mask: the ventricles, away from the cortex's sulci and the edge."""


def r2star(magnitude, echo_times):
    """R2* (1/s) by a log-linear least-squares fit of the magnitude over the echoes (≥ 2); 0 where a magnitude is 0."""
    magnitude = np.asarray(magnitude, dtype=np.float32)
    te = np.asarray(echo_times, dtype=np.float32)
    valid = np.all(magnitude > 0, axis=3)
    logs = np.log(np.where(magnitude > 0, magnitude, 1.0))
    centred = te - te.mean()
    slope = np.tensordot(logs, centred, axes=([3], [0])) / np.sum(centred**2)
    return np.where(valid, -slope, 0.0).astype(np.float32)


def csf_region(magnitude, echo_times, mask, voxel_size):
    """CSF to reference χ to: voxels of R2* below `CSF_R2STAR` farther than `CSF_EDGE_MM` inside `mask` (the
    ventricles), their largest connected component (Liu Z et al., MEDI+0, MRM 2018;79:2795-803).

    Needs two or more echoes; raises `InputError` when there are fewer, or when no such voxel is found."""
    magnitude = np.asarray(magnitude)
    if magnitude.ndim != 4 or magnitude.shape[3] < 2:
        raise InputError(
            "reference csf: CSF is found by its low R2*, which needs two or more echoes; this GRE has one. "
            "Use --reference whole-brain (or none)"
        )
    inner = masks.distance_near(mask, mask, voxel_size, CSF_EDGE_MM) > CSF_EDGE_MM
    csf = inner & (r2star(magnitude, echo_times) < CSF_R2STAR)
    labels, n = ndimage.label(csf)
    if n == 0:
        raise InputError(
            f"reference csf: no voxel of R2* below {CSF_R2STAR:g}/s deeper than {CSF_EDGE_MM:g} mm in the brain mask; "
            "use --reference whole-brain"
        )
    return labels == np.argmax(np.bincount(labels.ravel())[1:]) + 1


# ----------------------------------------------------------------------------------------------------------------
# The chain
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class QSMResult:
    """Output of `reconstruct_qsm`: susceptibility (ppm), local and total field (ppm), masks, and what was done."""

    susceptibility: np.ndarray
    local_field: np.ndarray
    total_field: np.ndarray
    mask: np.ndarray
    brain_mask: np.ndarray
    parameters: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)


@dataclass(frozen=True)
class QSMOptions:
    """The methods of the QSM chain (`reconstruct_qsm`) and how to read the scanner's phase."""

    unwrap: str = option(
        "path",
        "phase unwrapping: exact path (Herraez, scikit-image; voxels at the mask's edge or in the dark left with a "
        "phase jump above 2 rad leave the mask), or Laplacian (smooth; loses real steps of the field, and its M1 "
        "reading moves with the mask: on 10 real-anatomy subjects in the pipeline M1 read 0.73-1.46 x its truth, "
        "correlation across subjects 0.86, against path's 0.72-0.76 x and 0.999)",
        choices=UNWRAP_METHODS,
    )
    background: str = option(
        "lbv",
        "background-field removal: LBV (Laplacian boundary value; the default: on 10 real-anatomy subjects at the "
        "study's grids M1 read 0.93-0.98 x its truth, slope across subjects 0.95, against V-SHARP's 0.82-0.92 x and "
        "0.88, with the deep interior a little less accurate), V-SHARP (spherical-mean kernels; the whole map "
        "closer to the truth, the cortex lower) or PDF (slow)",
        choices=BACKGROUND_METHODS,
    )
    inversion: str = option("tv", "dipole inversion: TV (ADMM), TKD or CG", choices=INVERSION_METHODS)
    mask_erosion_mm: float = option(
        2.0, "erosion of the automatic brain mask", unit="mm", flag="--mask-erosion", aliases=("--erosion-mm",)
    )
    phase_units: str = option(
        "auto",
        "units of the stored phase; auto reads them from its range and warns when unsure "
        "(phase from real and imaginary parts is radians)",
        choices=PHASE_UNITS,
    )
    phase_sign: str = option(
        "+1", "-1 when the scanner's phase turns the other way (chi would come out negated)", choices=PHASE_SIGNS
    )
    chopping: str = option(
        "auto", "find and undo phase that alternates by pi between slices (slice chopping), or off", choices=CHOPPING
    )
    tv_weight: float = option(
        1.0,
        "weight of the TV inversion's regulariser, as a multiple of the default (5e-4 per mm of voxel size): larger "
        "for noisier phase (smoother chi, slightly lower cortex values), smaller for cleaner",
        flag="--tv-weight",
    )
    tv_weight_from: str = option(
        "default",
        "where the TV weight comes from: the default (best at a white-matter SNR near 40), or the noise of the "
        "field, read from the magnitude's background, the weight in proportion to it (maps closer to the truth on "
        "noisy scans, region means a little lower); --tv-weight multiplies either",
        choices=TV_WEIGHT_FROM,
    )
    tv_edges: str = option(
        "none",
        "TV without a penalty across the magnitude's edges (MEDI's morphology prior: tissue boundaries seen in the "
        "first echo's magnitude, the largest fifth of its gradient components in the mask), or none",
        choices=TV_EDGES,
    )
    tv_outside: str = option(
        "free",
        "TV with chi outside the brain mask free: sources there take up the harmonic field that background removal "
        "left in the local field, most of it at the cortex (on 10 real-anatomy subjects in the pipeline M1 read "
        "closer to its truth on every one); or penalised like chi inside (the default before)",
        choices=TV_OUTSIDE,
    )
    tv_bregman: int = option(
        1,
        "Bregman iterations after the TV inversion: the field chi leaves unexplained in the mask is added back and "
        "the solve goes on, which restores the contrast TV takes from faint structures and lets noise back in: 1 "
        "(the default: measured closer in M1 and deep grey matter on the study's grid) for a single-echo scan, 0 "
        "for a noisy one (low SNR, or echoes whose receiver offset was removed)",
        flag="--tv-bregman",
    )
    reference: str = option(
        "whole-brain",
        "what chi is relative to: the mean over the brain mask, CSF (voxels of R2* below 5/s far from the brain's "
        "edge; needs two or more echoes), or none (as inverted)",
        choices=REFERENCES,
    )


def reconstruct_qsm(
    gre,
    options=None,
    *,
    mask=None,
    reference_region=None,
    inversion_options=None,
    background_options=None,
    progress=None,
):
    """The whole chain on a `ALSQuantLib.io.GRE`.

    Parameters
    ----------
    gre : io.GRE
        Magnitude, phase (units as ``gre.phase_units`` or ``options.phase_units``), echo times (s), field strength
        (T), affine (for voxel size and B0).
    options : QSMOptions, optional
        How to read the phase (`scale_phase`, its sign, `chopped_axes`), the methods of `unwrap_phase`,
        `background_field_removal` and `dipole_inversion`, the erosion of the automatic mask, and the reference
        (default `QSMOptions()`).
    mask : ndarray of bool, optional
        Brain mask; default `masks.brain_mask` on the first-echo magnitude.
    reference_region : ndarray of bool, optional
        Referencing region, instead of ``options.reference``.
    inversion_options, background_options : dict, optional
        Further keyword arguments of `dipole_inversion` and `background_field_removal` (for experiments).

    Returns
    -------
    QSMResult
    """
    import time

    options = options or QSMOptions()
    check_choices(options)
    if not options.tv_weight > 0:
        raise InputError(f"--tv-weight {options.tv_weight}: expected a positive multiple of the default TV weight")
    if options.tv_bregman < 0:
        raise InputError(f"--tv-bregman {options.tv_bregman}: expected a number of iterations, 0 or more")
    voxel_size = geometry.voxel_sizes(gre.affine)
    timings = {}

    def step(name, fraction, func):
        report_progress(progress, fraction, name, log)
        start = time.perf_counter()
        value = func()
        timings[name] = time.perf_counter() - start
        return value

    b0 = gre.b0_direction
    phase, scaling, units_warning = step(
        "phase scaling",
        0.0,
        lambda: scale_phase(
            gre.phase, gre.phase_units or options.phase_units, sidecar_units=(gre.metadata or {}).get("Units")
        ),
    )
    if options.phase_sign == "-1":
        phase = wrap(-phase).astype(np.float32)
    axes = chopped_axes(phase[..., 0], gre.magnitude[..., 0]) if options.chopping == "auto" else []
    if axes:
        phase = unchopped(phase, axes)
    automatic = mask is None
    if automatic:
        mask = step(
            "brain mask",
            0.1,
            lambda: masks.brain_mask(gre.magnitude[..., 0], voxel_size, erosion_mm=options.mask_erosion_mm),
        )
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != phase.shape[:3]:
        raise InputError(f"mask: shape {mask.shape} does not match the GRE's {phase.shape[:3]}")
    warnings = [units_warning, masks.check_brain_mask(mask, f"GRE {gre.source}", automatic=automatic)]
    warnings = [w for w in warnings if w]
    for warning in warnings:
        log.warning(warning)
    total = step(
        "unwrapping and echo combination",
        0.2,
        lambda: combine_echoes(
            phase,
            gre.magnitude,
            gre.echo_times,
            gre.field_strength,
            mask=mask,
            unwrap=options.unwrap,
            voxel_size=voxel_size,
        ),
    )
    field_mask, jumps = mask, 0
    if options.unwrap == "path":
        field_mask, jumps, warning = step("phase jumps", 0.35, lambda: _without_jumps(total, gre, mask, voxel_size))
        if warning:
            warnings.append(warning)
            log.warning(warning)
    local, local_mask = step(
        "background field removal",
        0.4,
        lambda: background_field_removal(
            total, field_mask, voxel_size, b0, method=options.background, **(background_options or {})
        ),
    )
    sigma = step("noise", 0.5, lambda: magnitude_noise(gre.magnitude[..., 0], voxel_size))
    noise_ppm = None
    if sigma is not None:
        noise_ppm = field_noise(gre.magnitude, gre.echo_times, gre.field_strength, local_mask, sigma)
    if options.inversion == "tv":
        alpha = TV_WEIGHT / float(np.mean(voxel_size))
        if options.tv_weight_from == "noise" and noise_ppm is not None:
            alpha = TV_WEIGHT * noise_ppm / TV_NOISE_PPM  # the same noise per voxel, the same α on any grid
        elif options.tv_weight_from == "noise":
            warning = (
                f"GRE {gre.source}: no background to read the noise from (a crop, or a background set to zero): "
                "the default TV weight is used"
            )
            warnings.append(warning)
            log.warning(warning)
        tv = {
            "regularization": options.tv_weight * alpha,
            "outside": options.tv_outside,
            "bregman": options.tv_bregman,
        }
        inversion_options = {**tv, **(inversion_options or {})}
    edges = None
    if options.inversion == "tv" and options.tv_edges == "magnitude":
        edges = step(
            "magnitude edges",
            0.55,
            lambda: magnitude_edges(gre.magnitude[..., 0], local_mask, voxel_size),
        )
        inversion_options = {"edges": edges, **inversion_options}
    chi = step(
        "dipole inversion",
        0.6,
        lambda: dipole_inversion(
            local, local_mask, voxel_size, b0_direction=b0, method=options.inversion, **(inversion_options or {})
        ),
    )
    if reference_region is not None:
        referenced_to = "the region given"
    elif options.reference == "csf":
        reference_region = csf_region(gre.magnitude, gre.echo_times, local_mask, voxel_size)
        referenced_to = f"CSF (R2* < {CSF_R2STAR:g}/s, {int(reference_region.sum())} voxels)"
    else:
        referenced_to = {"whole-brain": "the mean over the brain mask", "none": "nothing (as inverted)"}[
            options.reference
        ]
    if options.reference == "none" and reference_region is None:
        chi = np.where(local_mask, chi, 0.0).astype(np.float32)
    else:
        chi = step("referencing", 0.95, lambda: reference(chi, local_mask, reference_region))
    report_progress(progress, 1.0, "QSM done", log)
    parameters = {
        "phase_scaling": scaling,
        "phase_sign": options.phase_sign,
        "chopping": f"undone along axes {axes}" if axes else ("none found" if options.chopping == "auto" else "off"),
        "phase_jumps_left_out": jumps,
        "reference": referenced_to,
        "echo_times_s": gre.echo_times.tolist(),
        "field_strength_t": gre.field_strength,
        "b0_direction_voxel": b0.tolist(),
        "voxel_size_mm": voxel_size.tolist(),
        "magnitude_noise": sigma,
        "field_noise_ppm": noise_ppm,
        "inversion_options": {k: v for k, v in (inversion_options or {}).items() if k != "edges"},
        "tv_edges": "none" if edges is None else f"magnitude ({int(edges.sum())} edge components)",
        "background_options": background_options or {},
        "warnings": warnings,
    }
    return QSMResult(chi, local, total, local_mask, mask, parameters, timings)
