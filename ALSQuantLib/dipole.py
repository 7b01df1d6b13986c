"""The magnetic dipole kernel and the forward model from susceptibility to field.

Shared by the phantom (which makes phase from susceptibility) and `ALSQuantLib.qsm` (which inverts it).

Notes
-----
In k-space the field perturbation (in units of B0, so ppm for a susceptibility in ppm) is

    δB(k) / B0 = D(k) χ(k),    D(k) = 1/3 − (k · b̂)² / |k|²

with b̂ the unit B0 direction and k the physical wave vector. On a grid with voxel sizes (Δi, Δj, Δk) the wave
vector of frequency index f along axis a is f / (N_a Δ_a), so anisotropic voxels are handled exactly; b̂ must be
expressed in the frame of the image axes (`ALSQuantLib.geometry.b0_direction_voxel`). D(0) is set to 0: the mean
field over the field of view is undetermined and carries no local information.

References
----------
Salomir R, de Senneville BD, Moonen CT. A fast calculation method for magnetic field inhomogeneity due to an
arbitrary distribution of bulk susceptibility. Concepts Magn Reson B 2003;19B:26-34.
Marques JP, Bowtell R. Application of a Fourier-based method for rapid calculation of field inhomogeneity due to
spatial variation of magnetic susceptibility. Concepts Magn Reson B 2005;25B:65-78.
"""

import os

import numpy as np
import scipy.fft

from .errors import InputError

GYROMAGNETIC_RATIO_HZ_PER_T = 42.58e6
"""γ/2π for ¹H, Hz/T (42.58 MHz/T)."""


def fft_workers():
    """Threads for scipy.fft: ``$ALSQUANT_THREADS`` when set (a cohort run gives each parallel subject its share),
    else the cores this process may use."""
    if os.environ.get("ALSQUANT_THREADS", "").isdigit():
        return max(1, int(os.environ["ALSQUANT_THREADS"]))
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _unit(direction):
    b = np.asarray(direction, dtype=float)
    if b.shape != (3,) or not np.isfinite(b).all() or np.linalg.norm(b) == 0:
        raise InputError(f"b0_direction: expected a non-zero 3-vector in voxel axes, got {direction!r}")
    return b / np.linalg.norm(b)


def dipole_kernel(shape, voxel_size, b0_direction=(0.0, 0.0, 1.0), *, dtype=np.float32):
    """Dipole kernel D(k) on the half spectrum of a real FFT (``scipy.fft.rfftn`` layout).

    Parameters
    ----------
    shape : sequence of 3 ints
        Grid shape (after any zero padding).
    voxel_size : sequence of 3 floats, mm
    b0_direction : sequence of 3 floats
        B0 in the frame of the image axes.
    dtype : numpy dtype

    Returns
    -------
    ndarray, shape ``(n0, n1, n2 // 2 + 1)``
    """
    if len(shape) != 3 or min(shape) < 1:
        raise InputError(f"dipole kernel shape: expected three positive sizes, got {shape!r}")
    voxel_size = np.broadcast_to(np.asarray(voxel_size, dtype=float), (3,))
    if np.any(voxel_size <= 0):
        raise InputError(f"voxel_size: expected positive sizes in mm, got {voxel_size.tolist()}")
    b = _unit(b0_direction)
    k0 = np.fft.fftfreq(shape[0], d=voxel_size[0]).astype(dtype)[:, None, None]
    k1 = np.fft.fftfreq(shape[1], d=voxel_size[1]).astype(dtype)[None, :, None]
    k2 = np.fft.rfftfreq(shape[2], d=voxel_size[2]).astype(dtype)[None, None, :]
    k_dot_b = k0 * dtype(b[0]) + k1 * dtype(b[1]) + k2 * dtype(b[2])
    k_squared = k0**2 + k1**2 + k2**2
    k_squared[0, 0, 0] = 1.0
    kernel = dtype(1.0 / 3.0) - k_dot_b**2 / k_squared
    kernel[0, 0, 0] = 0.0
    return kernel.astype(dtype, copy=False)


def padded_shape(shape, factor=2.0):
    """A fast FFT size at least ``factor`` times each dimension of `shape`."""
    return tuple(scipy.fft.next_fast_len(int(np.ceil(n * factor)), real=True) for n in shape)


def forward_field(susceptibility, voxel_size, b0_direction=(0.0, 0.0, 1.0), *, pad_factor=2.0):
    """Field perturbation (in units of B0: ppm for ppm) from a susceptibility distribution.

    Parameters
    ----------
    susceptibility : ndarray, shape (i, j, k)
        χ, any unit (ppm in ALSQuant).
    voxel_size : sequence of 3 floats, mm
    b0_direction : sequence of 3 floats
        B0 in the frame of the image axes.
    pad_factor : float
        Zero padding of each dimension before the FFT, to keep the periodic wrap-around of the dipole field away
        from the region of interest (2 is enough for sources well inside the field of view).

    Returns
    -------
    ndarray, float32, same shape as `susceptibility`
    """
    chi = np.asarray(susceptibility, dtype=np.float32)
    if chi.ndim != 3:
        raise InputError(f"susceptibility: expected a 3D array, got shape {chi.shape}")
    shape = padded_shape(chi.shape, pad_factor) if pad_factor > 1 else chi.shape
    kernel = dipole_kernel(shape, voxel_size, b0_direction)
    workers = fft_workers()
    spectrum = scipy.fft.rfftn(chi, s=shape, workers=workers)
    spectrum *= kernel
    field = scipy.fft.irfftn(spectrum, s=shape, workers=workers)
    return np.ascontiguousarray(field[: chi.shape[0], : chi.shape[1], : chi.shape[2]], dtype=np.float32)


def field_ppm_to_phase(field_ppm, echo_time, field_strength):
    """Phase (radians, unwrapped) accrued at `echo_time` (s) by a field offset in ppm at `field_strength` (T).

    ``φ = 2π γ̄ B0 TE δB``, with ``γ̄ = 42.58 MHz/T`` and δB in ppm × 1e-6.
    """
    return 2.0 * np.pi * GYROMAGNETIC_RATIO_HZ_PER_T * field_strength * echo_time * 1e-6 * np.asarray(field_ppm)


def phase_to_field_ppm(phase, echo_time, field_strength):
    """Inverse of `field_ppm_to_phase`: ppm from unwrapped phase (radians)."""
    return np.asarray(phase) / (2.0 * np.pi * GYROMAGNETIC_RATIO_HZ_PER_T * field_strength * echo_time * 1e-6)
